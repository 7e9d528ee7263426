"""Namespace patterns, end to end: a namespace that starts to match while the operator runs is served at once.

An operator starts with ``--namespace '<prefix>-*'`` before any matching namespace exists. Then:

- ``BURST`` namespaces are created back to back as soon as it says it started, then each gets its credential
  Secret and a SecuredEndpoint. kopf lists the namespaces, then its namespace watch lists them again and
  watches from there; a namespace created between the two LISTs was never served by kopf (see
  ``secured_endpoint.wiring.serve_listed_namespaces``). Without that fix 7 of 8 runs of this test lost at least
  one endpoint here;
- ``ROUNDS`` namespaces are created one after another, each right away with its Secret and SecuredEndpoint (the
  order a GitOps tool or a tenant's bootstrap applies them): the race between the namespace being noticed and
  the endpoint being created (before or after the per-namespace watches begin) gets ``ROUNDS`` chances.

Every endpoint must be Ready within ``READY_WITHIN`` seconds of its creation.

Two installs:
- ``admin``: cluster-wide reads allowed; the operator's Secret watch is one cluster-wide watch;
- ``roles``: a ServiceAccount with only ``manifests/rbac-namespace-patterns.yaml`` and, in each new namespace,
  the Role and RoleBinding of ``manifests/rbac-namespaced.yaml``, created right after the namespace (as a
  tenant's bootstrap does): the operator watches each matching namespace's Secrets on its own, and its first
  requests there may well be refused until the RoleBinding exists.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from secured_endpoint import api
from secured_endpoint_devenv.controlplane import ControlPlane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import TEST_OPERATOR_ENV, Kube, OperatorProcess, Setup, load_yaml, wait_for

pytestmark = pytest.mark.e2e

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
BURST = 40  # namespaces created back to back as soon as the operator says it started
ROUNDS = 20  # then namespaces created one after another, each once the one before is served
READY_WITHIN = 10.0  # seconds from the endpoint's creation; a served namespace takes well under 2


@pytest.fixture
def prefix(kube: Kube) -> Iterator[str]:
    """A fresh namespace prefix no other operator serves; its namespaces are cleaned up at the end (endpoints
    released by hand: the test's operator is gone by then)."""
    name = f"pg{uuid.uuid4().hex[:6]}"
    yield name
    for namespace in kube.core.list_namespace().items:
        if not namespace.metadata.name.startswith(f"{name}-"):
            continue
        ns = namespace.metadata.name
        for item in kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]:
            kube.patch_endpoint(ns, item["metadata"]["name"], {"metadata": {"finalizers": None}})
            kube.delete_endpoint(ns, item["metadata"]["name"])
        kube.core.delete_namespace(ns)


def _service_account_kubeconfig(control_plane: ControlPlane, namespace: str, path: Path) -> Path:
    control_plane.kubectl("create", "serviceaccount", "secured-endpoint-operator", "-n", namespace)
    token = control_plane.kubectl("create", "token", "secured-endpoint-operator", "-n", namespace,
                                  "--duration=1h").stdout.strip()
    config = json.loads(control_plane.kubeconfig_path.read_text())
    config["users"] = [{"name": "sa", "user": {"token": token}}]
    config["contexts"] = [{"name": "sa", "context": {"cluster": config["clusters"][0]["name"], "user": "sa"}}]
    config["current-context"] = "sa"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class _Roles:
    """The pattern install's RBAC for a ServiceAccount of ``system``: the cluster-scoped namespace/CRD reads
    once, the Lease Role once, and the per-namespace Role + RoleBinding with :meth:`grant`."""

    def __init__(self, control_plane: ControlPlane, kube: Kube, system: str) -> None:
        self.control_plane = control_plane
        self.kube = kube
        self.rbac = k8s.RbacAuthorizationV1Api(control_plane.api_client())
        self.system = system
        self.suffix = f"-{system}"
        documents = load_yaml(MANIFESTS / "rbac-namespaced.yaml")
        for document in documents:
            for subject in document.get("subjects", ()):
                subject["namespace"] = system
        self.per_namespace = [d for d in documents if not d["metadata"]["name"].endswith("-leader-election")]
        self.lease = [d for d in documents if d["metadata"]["name"].endswith("-leader-election")]
        self.cluster = load_yaml(MANIFESTS / "rbac-namespace-patterns.yaml")
        for document in self.cluster:
            document["metadata"]["name"] += self.suffix
            if document["kind"] == "ClusterRoleBinding":
                document["roleRef"]["name"] += self.suffix
                for subject in document["subjects"]:
                    subject["namespace"] = system

    def install(self) -> None:
        self.kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=self.system)))
        for document in self.lease:
            self._create(document, self.system)
        for document in self.cluster:
            self._create(document, None)

    def grant(self, namespace: str) -> None:
        for document in self.per_namespace:
            self._create(document, namespace)

    def _create(self, document: dict[str, Any], namespace: str | None) -> None:
        body = copy.deepcopy(document)
        if namespace is not None:
            body["metadata"]["namespace"] = namespace
        create = {"Role": lambda: self.rbac.create_namespaced_role(namespace, body),
                  "RoleBinding": lambda: self.rbac.create_namespaced_role_binding(namespace, body),
                  "ClusterRole": lambda: self.rbac.create_cluster_role(body),
                  "ClusterRoleBinding": lambda: self.rbac.create_cluster_role_binding(body)}[body["kind"]]
        create()

    def remove(self) -> None:
        for document in self.cluster:
            self.control_plane.kubectl("delete", document["kind"].lower(), document["metadata"]["name"],
                                       "--ignore-not-found")
        self.kube.core.delete_namespace(self.system)


@pytest.mark.parametrize("install", ["admin", "roles"])
def test_every_namespace_that_starts_to_match_is_served(install: str, control_plane: ControlPlane, kube: Kube,
                                                        prefix: str, token_server: TokenServer,
                                                        secret_values: set[str],
                                                        operator_processes: list[OperatorProcess],
                                                        tmp_path: Path) -> None:
    roles: _Roles | None = None
    kubeconfig = control_plane.kubeconfig_path
    env = dict(TEST_OPERATOR_ENV)
    if install == "roles":
        roles = _Roles(control_plane, kube, f"{prefix}sys")  # not matched by the pattern
        roles.install()
        kubeconfig = _service_account_kubeconfig(control_plane, roles.system, tmp_path / "sa.kubeconfig")
        env |= {"SEP_LEASE_NAME": "secured-endpoint-operator", "SEP_LEASE_NAMESPACE": roles.system}
    operator = OperatorProcess(kubeconfig=kubeconfig, log_path=tmp_path / "operator.log",
                               scope=("--namespace", f"{prefix}-*"), env=env)
    operator_processes.append(operator)
    created: dict[str, float] = {}  # namespace -> when its endpoint was created
    ready: dict[str, float] = {}  # namespace -> when its endpoint was seen Ready

    def populate(namespace: str) -> None:
        if roles is not None:
            roles.grant(namespace)
        setup = Setup(kube, namespace, secret_values)
        setup.client(token_server)
        setup.endpoint("tenant", token_server)
        created[namespace] = time.monotonic()

    try:
        # The moments after the start: kopf lists the namespaces, then its namespace watch lists them again and
        # watches from there. A burst of namespaces right after "started" puts some between the two LISTs.
        operator.start(wait=False)
        wait_for(lambda: "secured-endpoint-operator started" in operator.log_text(), timeout=30, interval=0.005,
                 message="the operator to start")
        burst = [f"{prefix}-s{index:02d}" for index in range(BURST)]
        for namespace in burst:
            kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        for namespace in burst:
            populate(namespace)
        stuck = _not_ready_in_time(kube, burst, created, ready)
        # While it runs: one namespace after another, each with its endpoint right away.
        for round_ in range(ROUNDS):
            namespace = f"{prefix}-r{round_:02d}"
            kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
            populate(namespace)
            stuck += _not_ready_in_time(kube, [namespace], created, ready)
        slowest = max((at - created[namespace] for namespace, at in ready.items()), default=0.0)
        print(f"{install}: {len(ready)}/{len(created)} Ready, the slowest after {slowest:.2f} s")
        assert stuck == [], f"never Ready within {READY_WITHIN:g} s: {stuck} (log: {operator.log_path})"
        assert token_server.token_requests == len(created)

        for namespace in created:  # released through the operator: it serves every one of them
            kube.delete_endpoint(namespace, "tenant")
        wait_for(lambda: all(_gone(kube, namespace) for namespace in created), timeout=20,
                 message="every endpoint released by the operator")
    finally:
        operator.stop()
        if roles is not None:
            roles.remove()
    assert "Traceback" not in operator.log_text()


def _not_ready_in_time(kube: Kube, namespaces: list[str], created: dict[str, float],
                       ready: dict[str, float]) -> list[str]:
    """The namespaces whose endpoint is not Ready within READY_WITHIN seconds of its creation; ``ready`` gets
    when each of the others was seen Ready."""
    stuck = []
    for namespace in namespaces:
        deadline = created[namespace] + READY_WITHIN
        while time.monotonic() < deadline:
            condition = kube.ready(namespace, "tenant")
            if condition is not None and condition["status"] == "True":
                ready[namespace] = time.monotonic()
                break
            time.sleep(0.05)
        else:
            stuck.append(namespace)
    return stuck


def _gone(kube: Kube, namespace: str) -> bool:
    try:
        kube.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "tenant")
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False
