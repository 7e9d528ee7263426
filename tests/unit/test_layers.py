"""The import-linter contracts in pyproject.toml hold for the tree, and each one catches what it forbids.

Each case copies the three packages, adds one forbidden import and runs ``lint-imports`` on the copy: the
contract named must then be broken (a contract that can never fail would prove nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "statement", "contract"), [
    ("operator/secured_endpoint/controller.py", "import kopf", "kopf only in the wiring"),
    ("operator/secured_endpoint/credentials.py", "import kubernetes", "the Kubernetes client only in kube"),
    ("operator/secured_endpoint/schedule.py", "import redis", "tokens, schedule and api know nothing"),
    ("operator/secured_endpoint/api.py", "from secured_endpoint import kube", "tokens, schedule and api know nothing"),
    ("operator/secured_endpoint/tokens/errors.py", "import secured_endpoint.targets.base",
     "tokens, schedule and api know nothing"),
    ("gateway/secured_endpoint_gateway/wire.py", "import secured_endpoint.api", "the gateway library stands alone"),
    ("gateway/secured_endpoint_gateway/_token.py", "import jks", "the gateway library stands alone"),
    ("operator/secured_endpoint/metrics.py", "import secured_endpoint_devenv.loopback",
     "the product never imports the development harness"),
])
def test_each_contract_catches_its_import(tmp_path: Path, module: str, statement: str, contract: str) -> None:
    tree = _copy(tmp_path)
    with (tree / module).open("a") as source:
        source.write(f"\n{statement}  # the violation under test\n")
    result = _lint(tree)
    assert result.returncode != 0
    verdicts = dict(_VERDICT.findall(result.stdout))  # contract name -> KEPT | BROKEN
    assert len(verdicts) == 5, result.stdout
    assert [name for name, verdict in verdicts.items() if verdict == "BROKEN"] == [
        name for name in verdicts if name.startswith(contract)], result.stdout
