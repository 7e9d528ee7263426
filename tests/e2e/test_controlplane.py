"""Smoke test of the local control plane (etcd + kube-apiserver + kubectl built from source).

The first run builds the binaries (10-25 min on 2 cores); later runs reuse the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from secured_endpoint_devenv.controlplane import (
    KUBERNETES_VERSION,
    Binaries,
    ControlPlane,
    _checksum_db_unreachable,
    _kube_wrapper_gomod,
    ensure_binaries,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_mentioning(needle: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def binaries() -> Binaries:
    return ensure_binaries()


def test_wrapper_gomod_replaces_every_staging_module() -> None:
    upstream = (
        "module k8s.io/kubernetes\n\ngo 1.24.0\n\ngodebug default=go1.24\n\n"
        "replace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n"
        "\tk8s.io/kubectl => ./staging/src/k8s.io/kubectl\n\tfoo.io/x => foo.io/x v1.0.0\n)\n"
    )
    gomod = _kube_wrapper_gomod(upstream, "v1.34.4")
    assert "require k8s.io/kubernetes v1.34.4" in gomod
    assert "\tk8s.io/api => k8s.io/api v0.34.4" in gomod
    assert "\tk8s.io/kubectl => k8s.io/kubectl v0.34.4" in gomod
    assert "foo.io" not in gomod
    assert "go 1.24.0" in gomod
    assert "godebug default=go1.24" in gomod


def test_sumdb_fallback_only_when_unreachable_never_on_mismatch() -> None:
    unreachable = (
        "verifying k8s.io/api@v0.34.4/go.mod: Get "
        '"https://sum.golang.org/lookup/k8s.io/api@v0.34.4": dial tcp: lookup sum.golang.org: no such host'
    )
    mismatch = (
        "verifying k8s.io/api@v0.34.4: checksum mismatch\n\tdownloaded: h1:a\n\tsum.golang.org: h1:b\n"
        "SECURITY ERROR"
    )
    assert _checksum_db_unreachable(unreachable)
    assert not _checksum_db_unreachable(mismatch)
    assert not _checksum_db_unreachable("go: build failed: undefined: foo")


@pytest.mark.e2e
def test_control_plane_starts_serves_and_cleans_up(binaries: Binaries) -> None:
    cp = ControlPlane(binaries)
    with cp:
        status, body = cp.get("/version")
        assert status == 200
        assert json.loads(body)["gitVersion"] == KUBERNETES_VERSION

        namespaces = cp.kubectl("get", "ns", "-o", "name").stdout.split()
        assert "namespace/default" in namespaces
        assert "namespace/kube-system" in namespaces

        manifest = json.dumps(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smoke"}, "data": {"k": "v"}}
        )
        cp.kubectl("apply", "-f", "-", input=manifest)
        assert cp.kubectl("get", "configmap", "smoke", "-o", "jsonpath={.data.k}").stdout == "v"

        kubeconfig = json.loads(cp.kubeconfig_path.read_text())
        assert kubeconfig["clusters"][0]["cluster"]["server"] == cp.server
        assert cp.ca_path.is_file()
        assert cp.kubectl("get", "ns", "nope", check=False).returncode != 0

        pids, workdir = cp.pids, cp.workdir
        assert len(pids) == 2
        assert all(_alive(pid) for pid in pids)

    assert not cp.running
    assert not any(_alive(pid) for pid in pids)
    assert not workdir.exists()
    assert _processes_mentioning(str(workdir)) == []
    cp.stop()  # idempotent
