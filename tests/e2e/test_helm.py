"""The Helm chart (charts/secured-endpoint-operator) with a real ``helm`` (v3, built from its Go module on first
use and cached: secured_endpoint_devenv.helm) and the local control plane.

Cases:
- ``helm lint --strict`` passes for the defaults and for every option together;
- one source of truth: with the default values the chart renders exactly the objects of ``kubectl kustomize
  manifests/`` (CRD included), up to Helm's own labels (chart, instance, version, managed-by) and the
  Namespace, which Helm's --create-namespace makes (``createNamespace=true`` renders the manifests' one);
  the chart's CRD is crds/'s file (a symbolic link, which helm follows and helm package copies);
- namespaced mode renders rbac-namespaced.yaml's Role and RoleBinding in each named namespace and
  ``--namespace=NS`` arguments, nothing cluster-scoped; a pattern adds rbac-namespace-patterns.yaml's
  ClusterRole; a bad mode or no namespaces fails with a message;
- leader election: the Lease Role and RoleBinding of the manifests; switched off, neither, and
  SEP_LEADER_ELECTION=false;
- metrics: SEP_METRICS_PORT, a container port, a Service and a ServiceMonitor; Redis: the password comes from
  the existing Secret, mounted and read with SEP_REDIS_PASSWORD_FILE, never as a value; extra env, resources,
  replicas, image are passed through;
- ``helm install --dry-run=server`` and a real install on the control plane (cluster and namespaced mode):
  every object exists as rendered; ``helm uninstall`` removes them. There is no kubelet (nor
  controller-manager) in the harness: the Deployment is stored, no Pod ever runs.
"""

from __future__ import annotations

import copy
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from secured_endpoint_devenv import controlplane, helm
from tests.conftest import ROOT, Kube, _namespace

pytestmark = pytest.mark.e2e

CHART = ROOT / "charts" / "secured-endpoint-operator"
HELM_LABELS = {"helm.sh/chart", "app.kubernetes.io/instance", "app.kubernetes.io/version",
               "app.kubernetes.io/managed-by"}
Key = tuple[str, str, str]


@pytest.fixture(scope="module")
def helm_binary() -> None:
    helm.ensure_helm()  # builds on the first run (1-3 min), prints progress lines; cached afterwards


def render(*values: str, release: str = "secured-endpoint-operator",
           namespace: str = "secured-endpoint-system") -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace, "--include-crds"]
    for value in values:
        args += ["--set", value]
    return [doc for doc in yaml.safe_load_all(helm.run(*args).stdout) if doc]


def render_error(*values: str) -> str:
    args = ["template", "x", str(CHART)]
    for value in values:
        args += ["--set", value]
    result = helm.run(*args, check=False)
    assert result.returncode != 0
    return result.stderr


def _strip_helm_labels(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: ({k: v for k, v in value.items() if k not in HELM_LABELS}
                      if key in ("labels", "matchLabels") and isinstance(value, dict) else _strip_helm_labels(value))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_strip_helm_labels(item) for item in node]
    return node


def by_key(docs: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    objects = {(doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]): doc for doc in docs}
    assert len(objects) == len(docs), "duplicate objects"
    return objects


def kustomized(plane: controlplane.ControlPlane) -> dict[Key, dict[str, Any]]:
    output = plane.kubectl("kustomize", str(ROOT / "manifests")).stdout
    return by_key([doc for doc in yaml.safe_load_all(output) if doc])


def test_lint(helm_binary: None) -> None:
    assert "0 chart(s) failed" in helm.run("lint", "--strict", str(CHART)).stdout
    everything = ["mode=namespaced", "namespaces={team-a,team-*}", "metrics.enabled=true",
                  "metrics.serviceMonitor.enabled=true", "redis.host=redis.redis", "redis.existingSecret=redis",
                  "redis.caKey=ca.crt", "redis.tls=true", "redis.db=2", "createNamespace=true", "logFormat=json"]
    args = ["lint", "--strict", str(CHART)]
    for value in everything:
        args += ["--set", value]
    assert "0 chart(s) failed" in helm.run(*args).stdout


def test_defaults_render_the_manifests(helm_binary: None, kube: Kube) -> None:
    manifests = kustomized(kube.control_plane)
    namespace = manifests.pop(("Namespace", "", "secured-endpoint-system"))
    chart = {key: _strip_helm_labels(doc) for key, doc in by_key(render()).items()}
    assert sorted(chart) == sorted(manifests)
    for key, doc in manifests.items():
        assert chart[key] == doc, key
    # the Namespace, when asked for
    with_namespace = by_key(render("createNamespace=true"))
    assert _strip_helm_labels(with_namespace[("Namespace", "", "secured-endpoint-system")]) == namespace
    # one CRD file: the chart's is a link to crds/ (helm package copies the content in)
    assert (CHART / "crds" / "secured-endpoint.io_securedendpoints.yaml").resolve() \
        == (ROOT / "crds" / "secured-endpoint.io_securedendpoints.yaml").resolve()


def test_namespaced_mode(helm_binary: None) -> None:
    def manifest_docs(name: str) -> list[dict[str, Any]]:
        return [doc for doc in yaml.safe_load_all((ROOT / "manifests" / name).read_text()) if doc]

    # the template's team-a Role and RoleBinding, and what it puts in the operator's own namespace once
    per_namespace = [doc for doc in manifest_docs("rbac-namespaced.yaml") if doc["metadata"]["namespace"] == "team-a"]
    once = [doc for doc in manifest_docs("rbac-namespaced.yaml") if doc["metadata"]["namespace"] != "team-a"]
    assert per_namespace
    chart = by_key(render("mode=namespaced", "namespaces={team-a,team-b}"))
    assert not [key for key in chart if key[0].startswith("Cluster")], "nothing cluster-scoped"
    for ns in ("team-a", "team-b"):
        for template in per_namespace:
            wanted = copy.deepcopy(template)
            wanted["metadata"]["namespace"] = ns
            assert _strip_helm_labels(chart[(wanted["kind"], ns, wanted["metadata"]["name"])]) == wanted
    for wanted in once:
        assert _strip_helm_labels(chart[(wanted["kind"], wanted["metadata"]["namespace"],
                                         wanted["metadata"]["name"])]) == wanted
    # + CRD, ServiceAccount, Deployment, PodDisruptionBudget
    assert len(chart) == 2 * len(per_namespace) + len(once) + 4, sorted(chart)
    (deployment,) = [doc for key, doc in chart.items() if key[0] == "Deployment"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[2:4] == ["--namespace=team-a", "--namespace=team-b"]
    assert "--all-namespaces" not in command

    patterns = by_key(render("mode=namespaced", "namespaces={team-*}"))
    wanted_cluster = {(doc["kind"], "", doc["metadata"]["name"]): doc for doc in manifest_docs(
        "rbac-namespace-patterns.yaml")}
    assert {key: _strip_helm_labels(doc) for key, doc in patterns.items() if key[0].startswith("Cluster")} \
        == wanted_cluster
    assert [key[2] for key in patterns if key[0] == "Role"] == ["secured-endpoint-operator-leader-election"], \
        "a pattern is no namespace to put a Role in"

    without_election = by_key(render("leaderElection.enabled=false"))
    assert not [key for key in without_election if key[2].endswith("-leader-election")]
    assert {"name": "SEP_LEADER_ELECTION", "value": "false"} in _container(list(without_election.values()))["env"]

    assert "mode must be cluster or namespaced" in render_error("mode=everywhere")
    assert "mode namespaced needs namespaces" in render_error("mode=namespaced")


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_options(helm_binary: None) -> None:
    docs = render("metrics.enabled=true", "metrics.port=9100", "metrics.serviceMonitor.enabled=true",
                  "metrics.serviceMonitor.labels.release=prom", "redis.host=redis.redis", "redis.port=6380",
                  "redis.existingSecret=sep-redis", "redis.caKey=ca.crt", "redis.tls=true", "redis.username=sep",
                  "extraEnv[0].name=SEP_REFRESH_CONCURRENCY", "extraEnv[0].value=64", "replicas=2",
                  "image.repository=registry.local/sep", "image.tag=1.2.3", "resources.limits.memory=1Gi",
                  "sourceLabelSelector=secured-endpoint.io/credentials=true")
    objects = by_key(docs)
    container = _container(docs)
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert env == {"PYTHONUNBUFFERED": "1", "SEP_HEALTH_PORT": "8081", "POD_NAME": None,
                   "SEP_METRICS_PORT": "9100", "SEP_REDIS_HOST": "redis.redis",
                   "SEP_REDIS_PORT": "6380", "SEP_REDIS_USERNAME": "sep", "SEP_REDIS_TLS": "true",
                   "SEP_REDIS_PASSWORD_FILE": "/etc/secured-endpoint/redis/password",
                   "SEP_REDIS_CA_FILE": "/etc/secured-endpoint/redis/ca.crt", "SEP_REFRESH_CONCURRENCY": "64",
                   "SEP_SOURCE_LABEL_SELECTOR": "secured-endpoint.io/credentials=true"}
    assert container["image"] == "registry.local/sep:1.2.3"
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    deployment = objects[("Deployment", "secured-endpoint-system", "secured-endpoint-operator")]
    assert deployment["spec"]["replicas"] == 2
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["redis-credentials"]["secret"]["secretName"] == "sep-redis"
    service = objects[("Service", "secured-endpoint-system", "secured-endpoint-operator-metrics")]
    assert service["spec"]["ports"][0]["port"] == 9100
    monitor = objects[("ServiceMonitor", "secured-endpoint-system", "secured-endpoint-operator")]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


@pytest.fixture
def helm_namespace(kube: Kube) -> Iterator[str]:
    yield from _namespace(kube, "h")  # no operator of the session serves h-*


def _exists(kube: Kube, key: Key) -> bool:
    kind, ns, name = key
    rbac = k8s.RbacAuthorizationV1Api(kube.core.api_client)
    apps = k8s.AppsV1Api(kube.core.api_client)
    policy = k8s.PolicyV1Api(kube.core.api_client)
    read = {"PodDisruptionBudget": lambda: policy.read_namespaced_pod_disruption_budget(name, ns),
            "ServiceAccount": lambda: kube.core.read_namespaced_service_account(name, ns),
            "Deployment": lambda: apps.read_namespaced_deployment(name, ns),
            "Role": lambda: rbac.read_namespaced_role(name, ns),
            "RoleBinding": lambda: rbac.read_namespaced_role_binding(name, ns),
            "ClusterRole": lambda: rbac.read_cluster_role(name),
            "ClusterRoleBinding": lambda: rbac.read_cluster_role_binding(name),
            "CustomResourceDefinition": lambda: True}[kind]
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_install_on_the_control_plane(helm_binary: None, kube: Kube, helm_namespace: str, mode: str) -> None:
    plane = kube.control_plane
    release = f"helm-{mode[:4]}-{uuid.uuid4().hex[:6]}"
    values = ["--set", f"mode={mode}"] + (["--set", f"namespaces={{{helm_namespace}}}"] if mode == "namespaced"
                                          else [])
    common = ["--namespace", helm_namespace, "--kubeconfig", str(plane.kubeconfig_path), *values]
    dry = helm.run("install", release, str(CHART), "--dry-run=server", *common, kubeconfig=plane.kubeconfig_path)
    assert "STATUS: pending-install" in dry.stdout
    rendered = by_key([doc for doc in yaml.safe_load_all(dry.stdout.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0])
                       if doc])
    assert not any(_exists(kube, key) for key in rendered if key[0] != "CustomResourceDefinition")
    installed = helm.run("install", release, str(CHART), "--wait=false", *common, kubeconfig=plane.kubeconfig_path)
    try:
        assert "STATUS: deployed" in installed.stdout
        assert all(_exists(kube, key) for key in rendered), rendered.keys()
        deployment = k8s.AppsV1Api(kube.core.api_client).read_namespaced_deployment(
            f"{release}-secured-endpoint-operator", helm_namespace)
        assert deployment.spec.template.spec.service_account_name == f"{release}-secured-endpoint-operator"
        assert not deployment.status.ready_replicas, "no kubelet here: no Pod runs"
        status = helm.run("status", release, "--namespace", helm_namespace, kubeconfig=plane.kubeconfig_path)
        assert "STATUS: deployed" in status.stdout
    finally:
        helm.run("uninstall", release, "--namespace", helm_namespace, "--wait=false",
                 kubeconfig=plane.kubeconfig_path)
    assert not any(_exists(kube, key) for key in rendered if key[0] != "CustomResourceDefinition")
    # the CRD stays (Helm never deletes CRDs); the session's endpoints depend on it
    assert plane.kubectl("get", "crd", "securedendpoints.secured-endpoint.io").returncode == 0


def test_helm_is_the_cached_build(helm_binary: None) -> None:
    result = subprocess.run([str(helm.binary_path()), "version", "--short"], capture_output=True, text=True,
                            check=True, timeout=30)
    assert result.stdout.startswith(helm.HELM_VERSION)
