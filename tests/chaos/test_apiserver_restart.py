"""Chaos 2: kube-apiserver, then etcd, restarted under a running operator (own control plane: this module stops
its parts).

- kube-apiserver: stopped (SIGKILL, no graceful close of the watches) for 5 s and started again;
- etcd: killed (SIGKILL) for 5 s under a running apiserver and started again on the same data dir and ports;
  the apiserver stays up, answers errors meanwhile, and reconnects to it by itself.

Right after each restart (as soon as the apiserver accepts writes again), one endpoint's spec changes (a new
scope) and the credential Secret of another is rotated (a new client). The operator's watches resume by
themselves: within 30 s both changes are applied (Ready for the new generation; issued with the Secret's new
resourceVersion), and a sampler never saw an expired or half-written token.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import urllib3
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.chaos.conftest import Chaos, TokenSampler, chaos_env, ready_for_generation, report
from tests.conftest import CRD_PATH, RECORD, Kube, OperatorProcess, Setup, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

T = TypeVar("T")


@pytest.fixture(scope="module")
def plane() -> Iterator[controlplane.ControlPlane]:
    controlplane.ensure_binaries()
    with controlplane.ControlPlane() as own:
        own.install_crds(CRD_PATH.parent)
        yield own


def _restart_apiserver(plane: controlplane.ControlPlane) -> None:
    plane.stop_apiserver(grace=0)
    time.sleep(OUTAGE_S)
    plane.start_apiserver()


def _restart_etcd(plane: controlplane.ControlPlane) -> None:
    plane.stop_etcd()
    down = time.monotonic()
    # the outage is real: the apiserver itself says its storage is gone (its /readyz checks etcd)
    wait_for(lambda: _readyz(plane) != 200, timeout=OUTAGE_S, interval=0.1,
             message="kube-apiserver to report etcd unready")
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
    plane.start_etcd()


def _readyz(plane: controlplane.ControlPlane) -> int:
    try:
        return plane.get("/readyz", timeout=2)[0]
    except OSError:  # a timeout: not ready either
        return 0


OUTAGE_S = 5
RESTARTS: dict[str, Callable[[controlplane.ControlPlane], None]] = {
    "kube-apiserver": _restart_apiserver, "etcd": _restart_etcd}


def _accepted(write: Callable[[], T], *, timeout: float = 30.0) -> T:
    """``write()`` once the apiserver accepts it: right after etcd is back the apiserver may still fail writes
    (500, 503, 504, a timeout) until it has reconnected."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return write()
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            if isinstance(exc, ApiException) and exc.status is not None and exc.status < 500 \
                    and exc.status != 429:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("restarted", list(RESTARTS))
def test_watches_resume_after_a_restart(restarted: str, plane: controlplane.ControlPlane,
                                        token_server: TokenServer, secret_values: set[str], tmp_path: Path) -> None:
    api_client = plane.api_client()
    kube = Kube(core=k8s.CoreV1Api(api_client), custom=k8s.CustomObjectsApi(api_client), control_plane=plane)
    namespace = f"c-{uuid.uuid4().hex[:8]}"
    kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    token_server.lifetime_seconds = 60
    setup = Setup(kube, namespace, secret_values)
    setup.client(token_server, secret_name="changed-oauth")
    setup.client(token_server, secret_name="rotated-oauth")
    operator = OperatorProcess(kubeconfig=plane.kubeconfig_path, log_path=tmp_path / "operator.log",
                               scope=("--namespace", namespace), env=chaos_env())
    chaos = Chaos(kube, namespace, operator, tmp_path)
    operator.start()
    sampler = TokenSampler(kube, namespace, [token_server], alive=lambda: {"changed", "rotated"}, interval=0.1)
    try:
        setup.endpoint("changed", token_server, clientSecretRef={"name": "changed-oauth"})
        setup.endpoint("rotated", token_server, clientSecretRef={"name": "rotated-oauth"})
        kube.wait_ready(namespace, "changed")
        kube.wait_ready(namespace, "rotated")
        sampler.start()
        RESTARTS[restarted](plane)
        back = time.monotonic()
        _accepted(lambda: kube.patch_endpoint(namespace, "changed", {"spec": {"scopes": ["after-the-outage"]}}))
        writes_accepted_after = time.monotonic() - back
        client_id, client_secret = f"client-{uuid.uuid4().hex[:8]}", f"r0tated:{uuid.uuid4().hex}"
        token_server.add_client(client_id, client_secret)
        secret_values.add(client_secret)
        RECORD.client_ids[client_secret] = client_id
        _accepted(lambda: kube.update_secret(namespace, "rotated-oauth",
                                             {"client_id": client_id, "client_secret": client_secret}))
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
            _accepted(lambda name=name: kube.delete_endpoint(namespace, name))
        wait_for(lambda: not chaos.endpoints(), timeout=20, message="the endpoints released")
        operator.stop()
    report(f"2 {restarted} restart", outage_s=OUTAGE_S, writes_accepted_after_restart_s=round(writes_accepted_after, 2),
           changes_applied_after_restart_s=round(applied_after, 2), token_requests=token_server.token_requests,
           sampler_reads=sampler.reads, sampler_errors_during_outage=sampler.errors,
           expired_tokens_observed=len(sampler.expired), half_written_observed=len(sampler.broken),
           tokens_lost=len(sampler.lost))
    assert sampler.expired == [] and sampler.broken == [] and sampler.lost == []  # noqa: PT018
    assert token_server.token_requests == 4, "two first tokens, one per change"
