"""``helm`` (v3) built from its Go module and cached, like the control plane's binaries.

No prebuilt download is possible here, so ``ensure_helm`` does what helm's own Makefile does, from the module
proxy: a throw-away wrapper module requires ``helm.sh/helm/v3``, ``go build`` compiles ``cmd/helm`` with the
version stamps the Makefile sets (its version, and the Kubernetes version it reports to charts and to
``helm lint``, taken from the client-go it is built with). It shares the Go runner, the module cache and the
build lock with :mod:`secured_endpoint_devenv.controlplane`.

Cache layout: ``$SEP_HELM_CACHE_DIR`` (default ``~/.cache/secured-endpoint-operator/helm``)
``/<helm-version>/bin/helm``. A cold build takes about 1-3 minutes on 2 cores; afterwards it is reused.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from secured_endpoint_devenv import controlplane

HELM_VERSION = "v3.21.4"
_MODULE = "helm.sh/helm/v3"
_PREFIX = "[helm]"


def helm_version() -> str:
    return os.environ.get("SEP_HELM_VERSION", HELM_VERSION)


def cache_root() -> Path:
    override = os.environ.get("SEP_HELM_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "secured-endpoint-operator" / "helm"


def binary_path() -> Path:
    return cache_root() / helm_version() / "bin" / "helm"


def ensure_helm(*, progress: controlplane.Progress = print) -> Path:
    """Return a working ``helm`` of :func:`helm_version`, building it once (under a file lock) if needed."""
    version = helm_version()
    helm = binary_path()
    if _helm_ok(helm, version):
        return helm
    helm.parent.mkdir(parents=True, exist_ok=True)

    def relabel(line: str) -> None:  # the shared Go runner labels its lines as the control plane's
        progress(line.replace("[control-plane]", _PREFIX, 1))

    with controlplane._file_lock(helm.parent.parent / ".build.lock", relabel):
        if not _helm_ok(helm, version):  # another process may have built it while we waited
            _build(version, helm, relabel)
    if not _helm_ok(helm, version):
        raise controlplane.ControlPlaneError(f"{helm} does not report version {version}")
    return helm


def _helm_ok(helm: Path, version: str) -> bool:
    return controlplane._reports_version([str(helm), "version", "--short"], version)


def _build(version: str, out: Path, progress: controlplane.Progress) -> None:
    build_dir = out.parent.parent / "build"
    controlplane._fresh_dir(build_dir)
    runner = controlplane._GoRunner(build_dir, progress)
    started = time.monotonic()
    (build_dir / "go.mod").write_text("module sep.local/helm-build\n\ngo 1.24\n")  # `go get` raises the floor
    progress(f"{_PREFIX} resolving {_MODULE}@{version} and its dependencies (first run only) …")
    runner.run(["go", "get", f"{_MODULE}/cmd/helm@{version}"], step=f"download helm {version}",
               timeout=30 * 60.0)
    client_go = runner.run(["go", "list", "-m", "-f", "{{.Version}}", "k8s.io/client-go"],
                           step="read the client-go version", timeout=120.0, echo=False).strip()
    progress(f"{_PREFIX} module download took {time.monotonic() - started:.0f}s (client-go {client_go})")
    kube_major, kube_minor = _kube_version(client_go)
    stamps = {
        f"{_MODULE}/internal/version.version": version,
        f"{_MODULE}/internal/version.gitTreeState": "clean",
        # what helm tells charts (.Capabilities.KubeVersion) and `helm lint` when no cluster is asked
        f"{_MODULE}/pkg/lint/rules.k8sVersionMajor": kube_major,
        f"{_MODULE}/pkg/lint/rules.k8sVersionMinor": kube_minor,
        f"{_MODULE}/pkg/chartutil.k8sVersionMajor": kube_major,
        f"{_MODULE}/pkg/chartutil.k8sVersionMinor": kube_minor,
    }
    ldflags = " ".join(["-s", "-w", *(f"-X {name}={value}" for name, value in stamps.items())])
    progress(f"{_PREFIX} building helm {version} (first run only; 1-3 min on 2 cores, quiet while compiling) …")
    runner.build(f"{_MODULE}/cmd/helm", out, ldflags)


def _kube_version(client_go: str) -> tuple[str, str]:
    """client-go v0.36.2 belongs to Kubernetes 1.36 (helm's Makefile does the same arithmetic)."""
    parts = client_go.removeprefix("v").split(".")
    if len(parts) < 2 or not all(part.isdigit() for part in parts[:2]):
        raise controlplane.ControlPlaneError(f"unexpected client-go version {client_go!r}")
    return str(int(parts[0]) + 1), parts[1]


def run(*args: str, check: bool = True, timeout: float = 120.0, kubeconfig: Path | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the cached helm (building it first if needed) with its state under the cache, not ``~/.config``."""
    helm = ensure_helm()
    home = cache_root() / "home"
    env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"))
    env.pop("KUBECONFIG", None)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=env, input=input)
    if check and proc.returncode != 0:
        raise controlplane.ControlPlaneError(
            f"helm {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return proc


def main_build() -> None:
    """CLI entry: build (or reuse) helm and print where it is."""
    print(f"{_PREFIX} helm: {ensure_helm()}")
