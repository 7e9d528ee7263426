"""Chaos 2: kube-apiserver restarted under a running operator (own control plane: this module stops it).

The apiserver is stopped (SIGKILL, no graceful close of the watches) for 5 s and started again; right after,
one endpoint's spec changes (a new scope) and the credential Secret of another is rotated (a new client). The
operator's watches resume by themselves: within 30 s both changes are applied (Ready for the new generation;
issued with the Secret's new resourceVersion), and a sampler never saw an expired or half-written token.
An etcd restart is not covered yet (the harness has no stop_etcd/start_etcd).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.chaos.conftest import Chaos, TokenSampler, chaos_env, ready_for_generation, report
from tests.conftest import CRD_PATH, RECORD, Kube, OperatorProcess, Setup, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]


@pytest.fixture(scope="module")
def plane() -> Iterator[controlplane.ControlPlane]:
    controlplane.ensure_binaries()
    with controlplane.ControlPlane() as own:
        own.install_crds(CRD_PATH.parent)
        yield own


def test_watches_resume_after_an_apiserver_restart(plane: controlplane.ControlPlane, token_server: TokenServer,
                                                   secret_values: set[str], tmp_path: object) -> None:
    api_client = plane.api_client()
    kube = Kube(core=k8s.CoreV1Api(api_client), custom=k8s.CustomObjectsApi(api_client), control_plane=plane)
    namespace = f"c-{uuid.uuid4().hex[:8]}"
    kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    token_server.lifetime_seconds = 60
    setup = Setup(kube, namespace, secret_values)
    setup.client(token_server, secret_name="changed-oauth")
    setup.client(token_server, secret_name="rotated-oauth")
    operator = OperatorProcess(kubeconfig=plane.kubeconfig_path, log_path=tmp_path / "operator.log",  # type: ignore[operator]
                               scope=("--namespace", namespace), env=chaos_env())
    chaos = Chaos(kube, namespace, operator, tmp_path)  # type: ignore[arg-type]
    operator.start()
    sampler = TokenSampler(kube, namespace, [token_server], alive=lambda: {"changed", "rotated"}, interval=0.1)
    try:
        setup.endpoint("changed", token_server, clientSecretRef={"name": "changed-oauth"})
        setup.endpoint("rotated", token_server, clientSecretRef={"name": "rotated-oauth"})
        kube.wait_ready(namespace, "changed")
        kube.wait_ready(namespace, "rotated")
        sampler.start()
        plane.stop_apiserver(grace=0)
        time.sleep(5)
        plane.start_apiserver()
        back = time.monotonic()
        kube.patch_endpoint(namespace, "changed", {"spec": {"scopes": ["after-the-outage"]}})
        client_id, client_secret = f"client-{uuid.uuid4().hex[:8]}", f"r0tated:{uuid.uuid4().hex}"
        token_server.add_client(client_id, client_secret)
        secret_values.add(client_secret)
        RECORD.client_ids[client_secret] = client_id
        kube.update_secret(namespace, "rotated-oauth", {"client_id": client_id, "client_secret": client_secret})
        version = kube.core.read_namespaced_secret("rotated-oauth", namespace).metadata.resource_version

        def applied() -> bool:
            changed, rotated = kube.get_endpoint(namespace, "changed"), kube.get_endpoint(namespace, "rotated")
            return bool(changed and rotated and ready_for_generation(changed) and ready_for_generation(rotated)
                        and (rotated.get("status") or {}).get("sourceVersions", {}).get("Secret/rotated-oauth")
                        == version)

        wait_for(applied, timeout=30, interval=0.1, message="the spec change and the rotation applied")
        applied_after = time.monotonic() - back
        time.sleep(0.5)
    finally:
        sampler.stop()
        for name in ("changed", "rotated"):
            kube.delete_endpoint(namespace, name)
        wait_for(lambda: not chaos.endpoints(), timeout=20, message="the endpoints released")
        operator.stop()
    report("2 kube-apiserver restart", outage_s=5, changes_applied_after_restart_s=round(applied_after, 2),
           token_requests=token_server.token_requests, sampler_reads=sampler.reads,
           sampler_errors_during_outage=sampler.errors, expired_tokens_observed=len(sampler.expired),
           half_written_observed=len(sampler.broken), tokens_lost=len(sampler.lost))
    assert sampler.expired == [] and sampler.broken == [] and sampler.lost == []  # noqa: PT018
    assert token_server.token_requests == 4, "two first tokens, one per change"
