"""The import-linter contracts in pyproject.toml hold for the tree, and each one catches what it forbids.

Each case copies the three packages, adds one forbidden import and runs ``lint-imports`` on the copy: every
forbidden contract that covers that import must then be broken (a contract that can never fail would prove
nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
_VERDICT = re.compile(r"^(.+?) (KEPT|BROKEN)\b", re.MULTILINE)
PACKAGES = {"operator": "secured_endpoint", "gateway": "secured_endpoint_gateway", "devenv": "secured_endpoint_devenv"}


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # the copies come first on the path; COLUMNS keeps each contract's verdict on one line
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / folder) for folder in PACKAGES),
                   "COLUMNS": "300"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")], cwd=tree,
                          env=environment, capture_output=True, text=True, timeout=120)


def _copy(destination: Path) -> Path:
    shutil.copy2(ROOT / "pyproject.toml", destination / "pyproject.toml")
    for folder, package in PACKAGES.items():
        shutil.copytree(ROOT / folder / package, destination / folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def _contracts() -> list[dict[str, Any]]:
    with (ROOT / "pyproject.toml").open("rb") as config:
        contracts: list[dict[str, Any]] = tomllib.load(config)["tool"]["importlinter"]["contracts"]
    return contracts


def _within(module: str, packages: list[str]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = dict(_VERDICT.findall(result.stdout))
    assert set(verdicts) == {contract["name"] for contract in _contracts()}, result.stdout
    assert set(verdicts.values()) == {"KEPT"}


@pytest.mark.parametrize(("path", "imported"), [
    ("operator/secured_endpoint/controller.py", "kopf"),
    ("operator/secured_endpoint/credentials.py", "kubernetes"),
    ("operator/secured_endpoint/schedule.py", "redis"),
    ("operator/secured_endpoint/api.py", "secured_endpoint.kube"),
    ("operator/secured_endpoint/tokens/errors.py", "secured_endpoint.targets.base"),
    ("gateway/secured_endpoint_gateway/wire.py", "secured_endpoint.api"),
    ("gateway/secured_endpoint_gateway/_token.py", "jks"),
    ("operator/secured_endpoint/metrics.py", "secured_endpoint_devenv.loopback"),
])
def test_each_forbidden_import_is_caught(tmp_path: Path, path: str, imported: str) -> None:
    """The forbidden contracts that name this import must break (a layers contract may break too)."""
    module = path.split("/", 1)[1].removesuffix(".py").replace("/", ".")
    expected = {contract["name"] for contract in _contracts() if contract["type"] == "forbidden"
                and _within(module, contract["source_modules"]) and _within(imported, contract["forbidden_modules"])}
    assert expected, f"no contract forbids {module} -> {imported}"
    tree = _copy(tmp_path)
    with (tree / path).open("a") as source:
        source.write(f"\nimport {imported}  # the violation under test\n")
    result = _lint(tree)
    assert result.returncode != 0
    verdicts = dict(_VERDICT.findall(result.stdout))  # contract name -> KEPT | BROKEN
    assert {name for name, verdict in verdicts.items() if verdict == "BROKEN"} >= expected, result.stdout
    assert f"{module} -> {imported}" in result.stdout
