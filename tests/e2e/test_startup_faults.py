"""An operator that starts while the apiserver is away serves once it is back, by itself.

A control-plane upgrade restarts the apiserver; an operator Pod started at that moment used to look its
resource up once, find nothing, log "Unresolved resources cannot be served" and run on serving nothing, for
ever. Cases, each on a control plane of this module's own (its apiserver is stopped and started):
- the apiserver is down when the operator starts and comes back 4 s later: the operator waits, says so, and
  then serves an endpoint created before (Ready, token Secret written, one token request);
- the apiserver goes away within the operator's first second for 4 s: the same;
- in both, the operator is still running (no crash loop needed) and logged no "Unresolved resources".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import CRD_PATH, TEST_OPERATOR_ENV, Kube, OperatorProcess, Setup, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def plane() -> Iterator[controlplane.ControlPlane]:
    controlplane.ensure_binaries()
    with controlplane.ControlPlane() as own:
        own.install_crds(CRD_PATH.parent)
        yield own


@pytest.fixture
def own_kube(plane: controlplane.ControlPlane) -> Kube:
    api_client = plane.api_client()
    return Kube(core=k8s.CoreV1Api(api_client), custom=k8s.CustomObjectsApi(api_client), control_plane=plane)


def _endpoint_in_a_fresh_namespace(kube: Kube, token_server: TokenServer, secret_values: set[str], name: str
                                   ) -> str:
    namespace = f"blink-{name}-{time.monotonic_ns() % 100000}"
    kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    setup = Setup(kube, namespace, secret_values)
    setup.client(token_server)
    setup.endpoint(name, token_server)
    return namespace


@pytest.mark.parametrize("away_after", [None, 0.5], ids=["down-at-start", "gone-in-the-first-second"])
def test_the_operator_serves_once_the_apiserver_is_back(plane: controlplane.ControlPlane, own_kube: Kube,
                                                        token_server: TokenServer, secret_values: set[str],
                                                        tmp_path: Path, away_after: float | None) -> None:
    namespace = _endpoint_in_a_fresh_namespace(own_kube, token_server, secret_values, "orders")
    operator = OperatorProcess(kubeconfig=plane.kubeconfig_path, log_path=tmp_path / "operator.log",
                               scope=("--namespace", namespace), env=dict(TEST_OPERATOR_ENV))
    try:
        if away_after is None:
            plane.stop_apiserver(grace=0)
            operator.start(wait=False)
        else:
            operator.start(wait=False)
            time.sleep(away_after)
            plane.stop_apiserver(grace=0)
        time.sleep(4)
        plane.start_apiserver()
        own_kube.wait_ready(namespace, "orders", timeout=40)
        assert own_kube.secret_data(namespace, "orders-token") is not None
        assert token_server.token_requests == 1
        assert operator.process is not None
        assert operator.process.poll() is None, "still running"
        log = operator.log_text()
        assert "Unresolved resources cannot be served" not in log
    finally:
        operator.stop()


def test_an_operator_started_before_its_crd_waits_for_it(token_server: TokenServer, secret_values: set[str],
                                                         tmp_path: Path) -> None:
    """What a just-started apiserver shows for a moment (discovery without the custom resources' groups), made
    lasting: no CRD at all. kopf would look once, find nothing and serve nothing; the operator waits instead."""
    with controlplane.ControlPlane() as bare:
        api_client = bare.api_client()
        kube = Kube(core=k8s.CoreV1Api(api_client), custom=k8s.CustomObjectsApi(api_client), control_plane=bare)
        namespace = "early"
        kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        operator = OperatorProcess(kubeconfig=bare.kubeconfig_path, log_path=tmp_path / "operator.log",
                                   scope=("--namespace", namespace), env=dict(TEST_OPERATOR_ENV))
        try:
            operator.start(wait=False)
            wait_for(lambda: "does not serve securedendpoints.secured-endpoint.io/v1alpha1 yet" in operator.log_text(),
                     timeout=20, message="the operator to say it waits for the resource")
            bare.install_crds(CRD_PATH.parent)
            setup = Setup(kube, namespace, secret_values)
            setup.client(token_server)
            setup.endpoint("orders", token_server)
            kube.wait_ready(namespace, "orders", timeout=30)
            assert kube.secret_data(namespace, "orders-token") is not None
            assert "Unresolved resources cannot be served" not in operator.log_text()
            assert operator.process is not None
            assert operator.process.poll() is None
        finally:
            operator.stop()
