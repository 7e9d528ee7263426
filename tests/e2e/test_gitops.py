"""GitOps and kubectl against a running operator: real statuses judged by Argo CD's health.lua, server-side
apply by a GitOps field manager, ``kubectl wait`` and the printer columns.

Cases:
- statuses the operator really writes — Ready (TokenIssued), InvalidCredentials, CredentialsNotFound,
  TokenRequestFailed (IdP down), Suspended, none yet (a namespace no operator watches), one for an older
  generation — give the Argo CD verdicts Healthy / Degraded / Degraded / Degraded / Suspended / Progressing /
  Progressing; ``SEP_CAPTURE_GITOPS_SAMPLES=DIR`` writes them out (that is how health.lua's testdata was made);
- the same manifest applied twice with ``kubectl apply --server-side --field-manager=argocd`` while the operator
  works: no conflict, no new generation, ``kubectl diff --server-side`` finds no drift; the operator's field
  managers own only ``status`` and ``metadata.finalizers``, Argo CD's only what the manifest says; a refresh
  annotation set by another manager survives a re-apply;
- ``kubectl wait --for=condition=Ready sep/NAME`` returns once Ready, and times out (non-zero) on a failing one;
- ``kubectl get sep`` shows READY, REASON, EXPIRES, AGE, and ``-o wide`` NEXT REFRESH, with the status' values.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from secured_endpoint import api
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import Kube, OperatorProcess, Setup, _namespace, wait_for
from tests.unit.test_health_lua import HEALTH, run_lua

pytestmark = pytest.mark.e2e


def health(body: dict[str, Any]) -> dict[str, str]:
    verdict: dict[str, str] = run_lua(HEALTH, body)
    return verdict


def _capture(name: str, body: dict[str, Any]) -> None:
    """Keep a real object as a test sample (without the apiserver's bookkeeping) when asked to."""
    target = os.environ.get("SEP_CAPTURE_GITOPS_SAMPLES")
    if not target:
        return
    sample = json.loads(json.dumps(body))
    meta = sample["metadata"]
    for key in ("managedFields", "resourceVersion", "uid", "creationTimestamp", "finalizers"):
        meta.pop(key, None)
    meta["namespace"] = "shop"
    Path(target).mkdir(parents=True, exist_ok=True)
    (Path(target) / f"{name}.yaml").write_text(yaml.safe_dump(sample, sort_keys=False))


@pytest.fixture
def unwatched_namespace(kube: Kube) -> Iterator[str]:
    yield from _namespace(kube, "g")  # no operator of the session serves g-*


def test_real_statuses_through_health_lua(operator: OperatorProcess, kube: Kube, setup: Setup,
                                          token_server: TokenServer, unwatched_namespace: str) -> None:
    ns = setup.namespace
    setup.client(token_server)
    setup.endpoint("ready", token_server)
    setup.endpoint("nocreds", token_server, clientSecretRef={"name": "missing"})
    setup.endpoint("paused", token_server, suspend=True)
    kube.wait_ready(ns, "ready")
    kube.wait_ready(ns, "nocreds", status="False", reason="CredentialsNotFound")
    kube.wait_ready(ns, "paused", status="False", reason="Suspended")

    token_server.fault = "invalid_client"
    setup.endpoint("refused", token_server)
    kube.wait_ready(ns, "refused", status="False", reason="InvalidCredentials")
    token_server.fault = None

    setup.endpoint("down", token_server)
    kube.wait_ready(ns, "down")
    token_server.stop()
    kube.patch_endpoint(ns, "down", {"metadata": {"annotations": {api.REFRESH_ANNOTATION: uuid.uuid4().hex}}})
    kube.wait_ready(ns, "down", status="False", reason="TokenRequestFailed")

    expected = {"ready": "Healthy", "nocreds": "Degraded", "paused": "Suspended", "refused": "Degraded",
                "down": "Degraded"}
    for name, verdict in expected.items():
        body = kube.get_endpoint(ns, name)
        assert body is not None
        result = health(body)
        assert result["status"] == verdict, (name, result, body.get("status"))
        condition = kube.ready(ns, name) or {}
        assert condition["message"] in result["message"], (name, result)
        if verdict == "Degraded":
            assert result["message"].startswith(condition["reason"])
        _capture(name, body)

    # a spec change the operator has not acted on yet: as captured, with the generation one ahead
    stale = kube.get_endpoint(ns, "ready")
    assert stale is not None
    stale["metadata"]["generation"] += 1
    assert health(stale)["status"] == "Progressing"
    _capture("stale-generation", stale)

    nobody = kube.create_endpoint(unwatched_namespace, "nobody", {
        "tokenUrl": token_server.token_url, "allowInsecureHttp": True, "clientSecretRef": {"name": "oauth"}})
    assert "status" not in nobody
    assert health(nobody) == {"status": "Progressing", "message": "Waiting for the operator to fetch the first token"}
    _capture("no-status", nobody)


def _manifest(namespace: str, token_url: str, scopes: list[str]) -> str:
    return yaml.safe_dump({
        "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
        "metadata": {"name": "from-git", "namespace": namespace, "labels": {"app": "orders"}},
        "spec": {"tokenUrl": token_url, "allowInsecureHttp": True, "clientSecretRef": {"name": "oauth"},
                 "scopes": scopes, "refresh": {"refreshBeforePercent": 20}},
    })


def _managers(body: dict[str, Any]) -> dict[str, set[str]]:
    """Field manager → the top-level paths it owns (``f:spec``, ``f:status``, ``f:metadata.f:finalizers``)."""
    owned: dict[str, set[str]] = {}
    for entry in body["metadata"].get("managedFields") or ():
        paths = owned.setdefault(entry["manager"], set())
        for key, value in (entry.get("fieldsV1") or {}).items():
            if key == "f:metadata":
                paths.update(f"f:metadata.{sub}" for sub in value)
            else:
                paths.add(key)
    return owned


def test_server_side_apply_twice_no_drift_no_conflict(operator: OperatorProcess, kube: Kube, setup: Setup,
                                                      token_server: TokenServer) -> None:
    plane = kube.control_plane
    ns = setup.namespace
    setup.client(token_server)
    manifest = _manifest(ns, token_server.token_url, ["orders.read"])
    apply = ("apply", "--server-side", "--field-manager=argocd", "-f", "-")
    first = plane.kubectl(*apply, input=manifest)
    assert "serverside-applied" in first.stdout
    kube.wait_ready(ns, "from-git")
    before = kube.get_endpoint(ns, "from-git")
    assert before is not None

    second = plane.kubectl(*apply, input=manifest)  # no --force-conflicts: a conflict would fail it
    assert second.returncode == 0
    diff = plane.kubectl("diff", "--server-side", "--field-manager=argocd", "-f", "-", input=manifest, check=False)
    assert diff.returncode == 0, f"drift after the operator's writes:\n{diff.stdout}{diff.stderr}"
    after = kube.get_endpoint(ns, "from-git")
    assert after is not None
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1
    assert after["status"]["tokenFingerprint"] == before["status"]["tokenFingerprint"], "no new token for nothing"

    owned = _managers(after)
    assert owned.pop("argocd") == {"f:spec", "f:metadata.f:labels"}
    for manager, paths in owned.items():  # the operator's own writes (status patch, finalizer patch)
        assert paths <= {"f:status", "f:metadata.f:finalizers"}, (manager, paths)
    assert any("f:status" in paths for paths in owned.values())

    # a refresh requested by someone else (kubectl annotate, an Argo CD action) is not undone by a re-apply
    plane.kubectl("annotate", "-n", ns, "sep/from-git", f"{api.REFRESH_ANNOTATION}=now-1", "--overwrite")
    wait_for(lambda: (kube.get_endpoint(ns, "from-git") or {}).get("status", {}).get("lastRefreshRequest") == "now-1",
             message="the forced refresh")
    assert plane.kubectl(*apply, input=manifest).returncode == 0
    again = kube.get_endpoint(ns, "from-git") or {}
    assert again["metadata"]["annotations"][api.REFRESH_ANNOTATION] == "now-1"
    assert again["metadata"]["generation"] == 1

    # a change in Git is applied as usual and acted on
    changed = _manifest(ns, token_server.token_url, ["orders.read", "orders.write"])
    assert plane.kubectl(*apply, input=changed).returncode == 0
    wait_for(lambda: (kube.ready(ns, "from-git") or {}).get("observedGeneration") == 2, message="generation 2")


def test_kubectl_wait_and_columns(operator: OperatorProcess, kube: Kube, setup: Setup,
                                  token_server: TokenServer) -> None:
    plane = kube.control_plane
    ns = setup.namespace
    setup.client(token_server)
    setup.endpoint("waited", token_server)
    waited = plane.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=20s", "sep/waited", timeout=30)
    assert waited.stdout.strip() == f"{api.KIND.lower()}.{api.GROUP}/waited condition met"

    setup.endpoint("never", token_server, clientSecretRef={"name": "missing"})
    kube.wait_ready(ns, "never", status="False", reason="CredentialsNotFound")
    failing = plane.kubectl("wait", "-n", ns, "--for=condition=Ready", "--timeout=2s", "sep/never", check=False,
                            timeout=15)
    assert failing.returncode != 0
    assert "timed out" in failing.stderr

    status = (kube.get_endpoint(ns, "waited") or {})["status"]
    header, *rows = plane.kubectl("get", "sep", "-n", ns).stdout.splitlines()
    assert header.split() == ["NAME", "READY", "REASON", "EXPIRES", "NEXT", "REFRESH", "AGE"]
    row = next(r.split() for r in rows if r.startswith("waited "))
    assert row[:5] == ["waited", "True", "TokenIssued", status["expiresAt"], status["nextRefreshTime"]]
    wide_header = plane.kubectl("get", "sep", "-n", ns, "-o", "wide").stdout.splitlines()[0]
    assert wide_header.split()[-2:] == ["TOKEN", "URL"]
