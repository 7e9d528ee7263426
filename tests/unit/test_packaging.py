"""The three distributions hold what they should, and nothing more.

- The operator's wheel carries the product only: no development harness (token server, control plane,
  demo) and no gateway library, and it depends on ``secured-endpoint-gateway`` for the wire format.
- The gateway library's wheel carries ``secured_endpoint_gateway`` alone, and installing it into an empty
  environment pulls in neither kopf, nor the Kubernetes client, nor pyjks (resolved by pip against the package
  index, ``--dry-run --ignore-installed``: what a fresh virtualenv would get).
- The product's command line offers ``run`` only; ``demo`` and ``build-control-plane`` are ``sep-devenv``'s.

The wheels are built from a copy of the working tree (without caches and earlier build output), so a stale
``build/`` directory can neither hide nor fake a file.
"""

from __future__ import annotations

import email.parser
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
_IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".mypy_cache",
                                  ".ruff_cache", ".pytest_cache", ".hypothesis")


def _copy_tree(destination: Path) -> Path:
    tree = destination / "src"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("operator", "gateway", "devenv"):
        shutil.copytree(ROOT / name, tree / name, ignore=_IGNORED)
    return tree


def _build_wheel(project: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                    str(project)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    return wheel


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [item for item in wheel.namelist() if item.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_tree(tmp_path_factory.mktemp("packaging"))


@pytest.mark.packaging
def test_the_operator_wheel_holds_the_product_only(source_tree: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(_build_wheel(source_tree, tmp_path)) as wheel:
        files = wheel.namelist()
        metadata = _metadata(wheel)
        (entry_points,) = [item for item in files if item.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    assert "secured_endpoint/cli.py" in files
    assert "secured_endpoint/wiring.py" in files
    assert "secured_endpoint/py.typed" in files
    modules = [item for item in files if not item.split("/")[0].endswith(".dist-info")]
    assert all(item.startswith("secured_endpoint/") for item in modules), modules
    for unwanted in ("secured_endpoint_devenv", "secured_endpoint/devenv", "secured_endpoint_gateway",
                     "secured_endpoint/gateway", "tokenserver", "controlplane", "redisserver", "demo"):
        assert [item for item in files if unwanted in item] == [], unwanted
    requirements = metadata.get_all("Requires-Dist") or []
    assert any(requirement.startswith("secured-endpoint-gateway") for requirement in requirements)
    assert "secured-endpoint-operator = secured_endpoint.cli:main" in scripts
    assert "sep-devenv" not in scripts


@pytest.mark.packaging
def test_the_gateway_wheel_installs_without_kopf_kubernetes_or_pyjks(source_tree: Path, tmp_path: Path) -> None:
    wheel_path = _build_wheel(source_tree / "gateway", tmp_path)
    with zipfile.ZipFile(wheel_path) as wheel:
        files = wheel.namelist()
        requirements = _metadata(wheel).get_all("Requires-Dist") or []
    modules = sorted(item for item in files if not item.split("/")[0].endswith(".dist-info"))
    assert "secured_endpoint_gateway/wire.py" in modules
    assert "secured_endpoint_gateway/py.typed" in modules
    assert all(item.startswith("secured_endpoint_gateway/") for item in modules), modules
    assert sorted(requirement.split(">")[0].split("<")[0].split("=")[0] for requirement in requirements) == [
        "anyio", "httpx", "pydantic", "redis"]

    resolved = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed", "--report", "-",
         str(wheel_path)], check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(resolved.stdout)
    names = {item["metadata"]["name"].lower() for item in report["install"]}
    assert {"secured-endpoint-gateway", "httpx", "redis", "pydantic"} <= names
    assert names.isdisjoint({"kopf", "kubernetes", "pyjks", "twofish", "secured-endpoint-operator",
                             "secured-endpoint-devenv"}), names


def _help(command: str) -> str:
    return subprocess.run([str(BIN / command), "--help"], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def test_the_product_command_offers_run_only() -> None:
    text = _help("secured-endpoint-operator")
    assert "{run}" in text
    assert "demo" not in text
    assert "build-control-plane" not in text


def test_the_harness_command_offers_demo_and_build_control_plane() -> None:
    text = _help("sep-devenv")
    assert "{demo,build-control-plane}" in text
    demo = subprocess.run([str(BIN / "sep-devenv"), "demo", "--help"], check=True, capture_output=True,
                          text=True, timeout=60).stdout
    assert "--duration" in demo
    assert "--token-lifetime" in demo
