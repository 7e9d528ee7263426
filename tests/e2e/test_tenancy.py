"""Tenancy and least privilege, end to end: what the operator may touch, and what it even sees.

Cases:
- namespace-scoped install: a ServiceAccount (token from the TokenRequest API) bound only by the Role and
  RoleBinding of ``manifests/rbac-namespaced.yaml`` in namespace X; the operator runs with its kubeconfig
  and ``--namespace X`` → an endpoint in X gets its token, Event and cleanup; an endpoint in Y is not
  touched (no finalizer, no status, no token request); the log holds no permission error at all;
- namespace patterns: the same Roles plus ``manifests/rbac-namespace-patterns.yaml`` (namespaces list/watch,
  CRDs list/watch) serve ``--namespace 'X*'`` without a permission error;
- the cluster-wide ClusterRole grants exactly the namespaced Role's rules (plus kopf's CRD reads), so the
  rules tested here are the rules both installs get;
- ``SEP_SOURCE_LABEL_SELECTOR``: unlabelled Secrets and ConfigMaps never reach the operator (no handler
  runs for them, however often they change); a labelled credential's rotation gives a new token at once;
  token Secrets carry the label (and get it back if it is removed); a credential Secret without the label
  still works — read with a GET — with no refetch loop and a log line naming the label to add; a restart
  asks the token server for nothing and relabels a token Secret that lost its label while the operator was
  down; its rotation waits for the next refresh, and labelling it afterwards
  picks the rotation up at once;
- references never leave the endpoint's namespace: a Secret of the same name in another namespace is not
  used (CredentialsNotFound in the own namespace); a ``namespace`` in any reference is refused by the CRD
  (the cases ``test_crd_schema`` does not cover: ``trustStore.secretRef`` and ``target.secret``) and by
  the operator's own model for every reference, in case the schema were bypassed; and, for references yet
  to come, no field of the spec's schema or models is a ``namespace`` and none accepts unknown fields.
"""

from __future__ import annotations

import copy
import json
import re
import time
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from pydantic import BaseModel

from secured_endpoint import api
from secured_endpoint_devenv.controlplane import ControlPlane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import TEST_OPERATOR_ENV, Kube, OperatorProcess, Setup, load_yaml, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
SELECTOR_KEY = "secured-endpoint.io/credentials"
SELECTOR = f"{SELECTOR_KEY}=true"
PERMISSION_PROBLEM = re.compile(r"forbidden|403|not enough permissions|unresolved resources", re.IGNORECASE)


# -- helpers -------------------------------------------------------------------------------------------


@pytest.fixture
def namespaces(kube: Kube) -> Iterator[list[str]]:
    """Fresh namespaces no other operator of the session watches; ``namespaces.append(prefix)`` adds one."""
    created: list[str] = []

    class Factory(list[str]):
        def new(self, prefix: str) -> str:
            name = f"{prefix}-{uuid.uuid4().hex[:10]}"
            kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
            created.append(name)
            self.append(name)
            return name

    factory = Factory()
    yield factory
    for name in created:
        items = kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, name, api.PLURAL)["items"]
        for item in items:  # the test's operator is gone by now: release the finalizers by hand
            kube.patch_endpoint(name, item["metadata"]["name"], {"metadata": {"finalizers": None}})
            kube.delete_endpoint(name, item["metadata"]["name"])
        kube.core.delete_namespace(name)


def _operator(control_plane: ControlPlane, tmp_path: Path, processes: list[OperatorProcess], *,
              scope: tuple[str, ...], kubeconfig: Path | None = None, lease_namespace: str | None = None,
              env: dict[str, str] | None = None) -> OperatorProcess:
    """An operator process; one running as a ServiceAccount (``kubeconfig``) takes the Lease the manifests'
    Role allows it (its name, in ``lease_namespace``, where the test applied that Role)."""
    lease = {} if lease_namespace is None else {"SEP_LEASE_NAME": "secured-endpoint-operator",
                                                "SEP_LEASE_NAMESPACE": lease_namespace}
    process = OperatorProcess(kubeconfig=kubeconfig or control_plane.kubeconfig_path,
                              log_path=tmp_path / f"operator-{uuid.uuid4().hex[:6]}.log", scope=scope,
                              env={**TEST_OPERATOR_ENV, **lease, **(env or {})})
    processes.append(process)
    process.start()
    return process


def _service_account_kubeconfig(control_plane: ControlPlane, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig for a ServiceAccount, with a token from the TokenRequest API (``kubectl create token``)."""
    control_plane.kubectl("create", "serviceaccount", name, "-n", namespace)
    token = control_plane.kubectl("create", "token", name, "-n", namespace, "--duration=2h").stdout.strip()
    assert token.count(".") == 2, "a signed JWT"
    config = json.loads(control_plane.kubeconfig_path.read_text())
    config["users"] = [{"name": name, "user": {"token": token}}]
    config["contexts"] = [{"name": name, "context": {"cluster": config["clusters"][0]["name"], "user": name}}]
    config["current-context"] = name
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def _rbac(path: Path, *, namespace: str | None, account_namespace: str, suffix: str = "") -> list[dict[str, Any]]:
    """A manifest's documents, with the template's namespace and the ServiceAccount's namespace replaced."""
    documents = load_yaml(path)
    for document in documents:
        meta = document["metadata"]
        if namespace is not None and "namespace" in meta:
            meta["namespace"] = namespace
        if document["kind"].startswith("Cluster"):
            meta["name"] += suffix  # cluster-scoped: one per test, removed afterwards
            if document["kind"] == "ClusterRoleBinding":
                document["roleRef"]["name"] += suffix
        for subject in document.get("subjects", ()):
            subject["namespace"] = account_namespace
    return documents


def _apply(control_plane: ControlPlane, documents: list[dict[str, Any]]) -> None:
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                "items": documents}))


def _can(control_plane: ControlPlane, user: str, *args: str) -> bool:
    answer = control_plane.kubectl("auth", "can-i", *args, f"--as={user}", check=False).stdout.strip()
    return answer == "yes"


def _permission_problems(log: str) -> list[str]:
    return [line for line in log.splitlines() if PERMISSION_PROBLEM.search(line)]


def _seen(process: OperatorProcess, kind: str, namespace: str) -> int:
    """How many changes of Secrets or ConfigMaps in ``namespace`` reached the operator (its debug log)."""
    return process.log_text().count(f"Seen {kind} {namespace}/")


_LISTED = "Secrets and ConfigMaps in scope listed"


def _labelled_secret(kube: Kube, namespace: str, name: str, values: dict[str, str]) -> None:
    kube.core.create_namespaced_secret(namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name, labels={SELECTOR_KEY: "true"}), string_data=values))


def _untouched(kube: Kube, namespace: str, name: str) -> bool:
    body = kube.get_endpoint(namespace, name) or {}
    return not body.get("status") and not body["metadata"].get("finalizers") \
        and kube.secret_data(namespace, f"{name}-token") is None


# -- namespace-scoped install ----------------------------------------------------------------------------


def test_namespaced_install_needs_only_roles(control_plane: ControlPlane, kube: Kube, namespaces: Any,
                                             token_server: TokenServer, secret_values: set[str],
                                             operator_processes: list[OperatorProcess], tmp_path: Path) -> None:
    watched, other, system = namespaces.new("tenx"), namespaces.new("teny"), namespaces.new("tensys")
    documents = _rbac(MANIFESTS / "rbac-namespaced.yaml", namespace=watched, account_namespace=system)
    assert {document["kind"] for document in documents} == {"Role", "RoleBinding"}, "nothing cluster-scoped"
    kubeconfig = _service_account_kubeconfig(control_plane, system, "secured-endpoint-operator",
                                             tmp_path / "sa.kubeconfig")
    _apply(control_plane, documents)
    account = f"system:serviceaccount:{system}:secured-endpoint-operator"
    assert _can(control_plane, account, "watch", "secrets", "-n", watched)
    assert not _can(control_plane, account, "list", "secrets", "-n", other)
    assert not _can(control_plane, account, "list", "secrets", "--all-namespaces")
    assert not _can(control_plane, account, "list", "namespaces")

    operator = _operator(control_plane, tmp_path, operator_processes, scope=("--namespace", watched),
                         kubeconfig=kubeconfig, lease_namespace=watched)
    inside, outside = Setup(kube, watched, secret_values), Setup(kube, other, secret_values)
    inside.client(token_server)
    outside.client(token_server)
    outside.endpoint("elsewhere", token_server)
    inside.endpoint("served", token_server)
    kube.wait_ready(watched, "served")
    assert (kube.secret_data(watched, "served-token") or {}).get("authorization", "").startswith("Bearer ")
    wait_for(lambda: any(event.involved_object.name == "served" for event in kube.events(watched)),
             message="the Event on the served endpoint")

    time.sleep(2)  # the other namespace had every chance to be served by mistake
    assert _untouched(kube, other, "elsewhere")
    assert token_server.token_requests == 1

    kube.delete_endpoint(watched, "served")  # cleanup: the token Secret removed, the finalizer released
    wait_for(lambda: kube.get_endpoint(watched, "served") is None, message="the endpoint to be deleted")
    assert kube.secret_data(watched, "served-token") is None
    operator.stop()
    assert _permission_problems(operator.log_text()) == []


def test_namespace_patterns_need_namespace_reads(control_plane: ControlPlane, kube: Kube, namespaces: Any,
                                                 token_server: TokenServer, secret_values: set[str],
                                                 operator_processes: list[OperatorProcess],
                                                 tmp_path: Path) -> None:
    watched, system = namespaces.new("tenp"), namespaces.new("tensys")
    suffix = f"-{uuid.uuid4().hex[:6]}"
    documents = [*_rbac(MANIFESTS / "rbac-namespaced.yaml", namespace=watched, account_namespace=system),
                 *_rbac(MANIFESTS / "rbac-namespace-patterns.yaml", namespace=None, account_namespace=system,
                        suffix=suffix)]
    cluster_rules = [rule for document in documents if document["kind"] == "ClusterRole"
                     for rule in document["rules"]]
    assert {(tuple(rule["apiGroups"]), tuple(rule["resources"])) for rule in cluster_rules} == {
        (("",), ("namespaces",)), (("apiextensions.k8s.io",), ("customresourcedefinitions",))}
    assert all(set(rule["verbs"]) <= {"list", "watch"} for rule in cluster_rules), "reads only"
    kubeconfig = _service_account_kubeconfig(control_plane, system, "secured-endpoint-operator",
                                             tmp_path / "sa.kubeconfig")
    _apply(control_plane, documents)
    try:
        operator = _operator(control_plane, tmp_path, operator_processes, scope=("--namespace", f"{watched}*"),
                             kubeconfig=kubeconfig, lease_namespace=watched)
        setup = Setup(kube, watched, secret_values)
        setup.client(token_server)
        setup.endpoint("by-pattern", token_server)
        kube.wait_ready(watched, "by-pattern")
        kube.delete_endpoint(watched, "by-pattern")
        wait_for(lambda: kube.get_endpoint(watched, "by-pattern") is None, message="the endpoint to be deleted")
        operator.stop()
        assert _permission_problems(operator.log_text()) == []
    finally:
        for document in documents:
            if document["kind"].startswith("Cluster"):
                control_plane.kubectl("delete", document["kind"].lower(), document["metadata"]["name"],
                                      "--ignore-not-found")


def test_cluster_role_grants_what_the_namespaced_role_grants() -> None:
    def rules(path: Path, kind: str) -> list[dict[str, Any]]:
        # the operator's own rules, not the leader election's Lease Role (the same in both installs)
        return [rule for document in load_yaml(path) if document["kind"] == kind
                and not document["metadata"]["name"].endswith("-leader-election") for rule in document["rules"]]

    namespaced = rules(MANIFESTS / "rbac-namespaced.yaml", "Role")
    crds = [rule for rule in rules(MANIFESTS / "rbac-namespace-patterns.yaml", "ClusterRole")
            if rule["resources"] == ["customresourcedefinitions"]]
    # --all-namespaces: kopf lists no namespaces, but follows the CRD
    assert rules(MANIFESTS / "rbac-cluster.yaml", "ClusterRole") == namespaced + crds


# -- label-selected Secrets and ConfigMaps ----------------------------------------------------------------


def test_label_selected_sources(control_plane: ControlPlane, kube: Kube, namespaces: Any,
                                token_server: TokenServer, secret_values: set[str],
                                operator_processes: list[OperatorProcess], tmp_path: Path) -> None:
    ns = namespaces.new("tenl")
    operator = _operator(control_plane, tmp_path, operator_processes, scope=("--namespace", ns),
                         env={"SEP_SOURCE_LABEL_SELECTOR": SELECTOR})
    wait_for(lambda: _LISTED in operator.log_text(), message="the Secret watch to start")
    assert f"Watching only the Secrets and ConfigMaps labelled {SELECTOR}." in operator.log_text()

    # Unlabelled Secrets and ConfigMaps never reach the operator, however often they change.
    before = _seen(operator, "Secret", ns), _seen(operator, "ConfigMap", ns)
    for round_ in range(3):
        kube.create_secret(ns, f"noise-{round_}", {"data": "x" * 1024})
        kube.update_secret(ns, f"noise-{round_}", {"data": "y" * 1024})
        kube.core.create_namespaced_config_map(ns, k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name=f"noise-{round_}"), data={"ca.crt": "z"}))
    kube.core.delete_namespaced_secret("noise-0", ns)
    _labelled_secret(kube, ns, "marker", {"data": "m"})  # seen after the noise: the same watch stream
    kube.core.create_namespaced_config_map(ns, k8s.V1ConfigMap(
        metadata=k8s.V1ObjectMeta(name="marker", labels={SELECTOR_KEY: "true"}), data={"ca.crt": "m"}))
    wait_for(lambda: (_seen(operator, "Secret", ns), _seen(operator, "ConfigMap", ns))
             == (before[0] + 1, before[1] + 1), message="the labelled marker Secret and ConfigMap seen")
    time.sleep(1)
    assert (_seen(operator, "Secret", ns), _seen(operator, "ConfigMap", ns)) == \
        (before[0] + 1, before[1] + 1), "only the labelled objects were seen"

    # A labelled credential: its token Secret carries the label, its rotation is noticed at once.
    client_id = "labelled"
    token_server.add_client(client_id, "labelled-secret")
    secret_values.add("labelled-secret")
    _labelled_secret(kube, ns, "oauth", {"client_id": client_id, "client_secret": "labelled-secret"})
    Setup(kube, ns, secret_values).endpoint("labelled", token_server)
    kube.wait_ready(ns, "labelled")
    labels = kube.core.read_namespaced_secret("labelled-token", ns).metadata.labels
    assert labels == {SELECTOR_KEY: "true", api.MANAGED_BY_LABEL: api.MANAGED_BY_VALUE}
    first = (kube.secret_data(ns, "labelled-token") or {})["access_token"]
    token_server.add_client(client_id, "labelled-rotated")
    secret_values.add("labelled-rotated")
    kube.update_secret(ns, "oauth", {"client_secret": "labelled-rotated"})
    wait_for(lambda: (kube.secret_data(ns, "labelled-token") or {}).get("access_token") != first, timeout=5,
             message="a token from the rotated, labelled credentials")

    # The token Secret loses the label: the operator stops seeing it, so it puts the label back.
    kube.core.patch_namespaced_secret("labelled-token", ns, {"metadata": {"labels": {SELECTOR_KEY: None}}})
    wait_for(lambda: (kube.core.read_namespaced_secret("labelled-token", ns).metadata.labels or {})
             .get(SELECTOR_KEY) == "true", message="the label back on the token Secret")

    # A credential without the label: read with a GET, so it works, once; its rotation waits for a refresh.
    token_server.add_client("plain", "plain-secret")
    secret_values.add("plain-secret")
    kube.create_secret(ns, "plain", {"client_id": "plain", "client_secret": "plain-secret"})
    Setup(kube, ns, secret_values).endpoint("unlabelled", token_server, clientSecretRef={"name": "plain"})
    kube.wait_ready(ns, "unlabelled")
    hint = (f"Secret/plain in namespace {ns} (used by SecuredEndpoint unlabelled) lacks the label {SELECTOR}, "
            "so this operator does not watch it")
    wait_for(lambda: hint in operator.log_text(), message="the hint to label the Secret")
    assert f"kubectl label -n {ns} secret plain {SELECTOR}" in operator.log_text()
    time.sleep(2)
    plain_requests = [r for r in token_server.requests if r.client_id == "plain"]
    assert len(plain_requests) == 1, "no refetch loop for a source the index cannot see"

    # A restart asks the token server for nothing, whether the sources are labelled or not; a token Secret
    # that lost its label meanwhile (as one written before the selector was set) is relabelled.
    requests = token_server.token_requests
    operator.stop()
    kube.core.patch_namespaced_secret("labelled-token", ns, {"metadata": {"labels": {SELECTOR_KEY: None}}})
    operator.start()
    wait_for(lambda: operator.log_text().count(_LISTED) == 2, message="the restarted operator's Secret watch")
    wait_for(lambda: operator.log_text().count(hint) == 2, message="the hint after the restart")
    wait_for(lambda: (kube.core.read_namespaced_secret("labelled-token", ns).metadata.labels or {})
             .get(SELECTOR_KEY) == "true", message="the label back on the token Secret after the restart")
    time.sleep(2)
    assert token_server.token_requests == requests
    issued = (kube.secret_data(ns, "unlabelled-token") or {})["access_token"]
    token_server.add_client("plain", "plain-rotated")
    secret_values.add("plain-rotated")
    kube.update_secret(ns, "plain", {"client_secret": "plain-rotated"})
    time.sleep(2)
    assert (kube.secret_data(ns, "unlabelled-token") or {})["access_token"] == issued, \
        "an unlabelled Secret's rotation is not seen before the next refresh"
    kube.core.patch_namespaced_secret("plain", ns, {"metadata": {"labels": {SELECTOR_KEY: "true"}}})
    wait_for(lambda: (kube.secret_data(ns, "unlabelled-token") or {}).get("access_token") != issued, timeout=5,
             message="labelling the rotated Secret to give a new token at once")
    kube.wait_ready(ns, "unlabelled", reason="TokenRefreshed")

    for name in ("labelled", "unlabelled"):
        kube.delete_endpoint(ns, name)
        wait_for(lambda name=name: kube.get_endpoint(ns, name) is None, message=f"{name} deleted")
    operator.stop()
    assert "Traceback" not in operator.log_text()


# -- references stay in the endpoint's namespace ----------------------------------------------------------


def test_a_secret_in_another_namespace_is_never_used(control_plane: ControlPlane, kube: Kube, namespaces: Any,
                                                     token_server: TokenServer, secret_values: set[str],
                                                     operator_processes: list[OperatorProcess],
                                                     tmp_path: Path) -> None:
    own, foreign = namespaces.new("tenr"), namespaces.new("tenf")
    operator = _operator(control_plane, tmp_path, operator_processes, scope=("--namespace", own))
    Setup(kube, foreign, secret_values).client(token_server, secret_name="shared")  # valid, but elsewhere
    Setup(kube, own, secret_values).endpoint("borrower", token_server, clientSecretRef={"name": "shared"})
    condition = kube.wait_ready(own, "borrower", status="False", reason="CredentialsNotFound")
    assert f"Secret/shared not found in namespace {own}" in condition["message"]
    assert token_server.token_requests == 0
    kube.delete_endpoint(own, "borrower")
    wait_for(lambda: kube.get_endpoint(own, "borrower") is None, message="the endpoint to be deleted")
    operator.stop()


KEY_REF = {"name": "idp-ca", "key": "ca.crt"}
MINIMAL = {"tokenUrl": "https://idp.example.com/oauth2/token", "clientSecretRef": {"name": "oauth"}}
# Every reference in the spec, with a namespace added: (spec changes, the field the schema names).
REFERENCES: list[tuple[dict[str, Any], str]] = [
    ({"clientSecretRef": {"name": "oauth", "namespace": "other"}}, "spec.clientSecretRef.namespace"),
    ({"grantType": "Password", "passwordSecretRef": {"name": "u", "namespace": "other"}},
     "spec.passwordSecretRef.namespace"),
    ({"parameters": [{"name": "t", "valueFrom": {"secretKeyRef": KEY_REF | {"namespace": "other"}}}]},
     "spec.parameters[0].valueFrom.secretKeyRef.namespace"),
    ({"trustStore": {"configMapRef": KEY_REF | {"namespace": "other"}}}, "spec.trustStore.configMapRef.namespace"),
    ({"trustStore": {"secretRef": KEY_REF | {"namespace": "other"}}}, "spec.trustStore.secretRef.namespace"),
    ({"target": {"secret": {"name": "t", "namespace": "other"}}}, "spec.target.secret.namespace"),
]
IDS = ["clientSecretRef", "passwordSecretRef", "parameter", "trustStore.configMapRef", "trustStore.secretRef",
       "target.secret"]


@pytest.mark.parametrize(("changes", "field"), REFERENCES[4:], ids=IDS[4:])
def test_crd_refuses_a_namespace_in_the_remaining_references(control_plane: ControlPlane, namespaces: Any,
                                                             changes: dict[str, Any], field: str) -> None:
    """test_crd_schema covers the first four; these two complete every reference."""
    ns = namespaces.new("tens")
    body = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": "x"},
            "spec": copy.deepcopy(MINIMAL) | changes}
    result = control_plane.kubectl("apply", "--validate=strict", "-n", ns, "-f", "-", input=json.dumps(body),
                                   check=False)
    assert result.returncode != 0
    assert f'unknown field "{field}"' in result.stderr


@pytest.mark.parametrize(("changes", "field"), REFERENCES, ids=IDS)
def test_operator_model_refuses_a_namespace_in_every_reference(changes: dict[str, Any], field: str) -> None:
    """Should the schema be bypassed (an old CRD), the operator refuses the spec instead of reading elsewhere."""
    api.parse_spec(_without_namespace(MINIMAL | changes))  # the same spec without the namespace is fine
    with pytest.raises(api.SpecError, match="namespace: Extra inputs are not permitted"):
        api.parse_spec(MINIMAL | changes)


def _without_namespace(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_namespace(item) for key, item in value.items() if key != "namespace"}
    if isinstance(value, list):
        return [_without_namespace(item) for item in value]
    return value


def test_no_field_anywhere_in_the_spec_can_name_a_namespace() -> None:
    """Whatever references the spec gains, none can point elsewhere: no ``namespace`` property in the CRD's
    spec schema, no part of it keeps unknown fields, and every model of the spec refuses unknown fields."""
    crd = load_yaml(ROOT / "crds" / "secured-endpoint.io_securedendpoints.yaml")[0]
    for version in crd["spec"]["versions"]:
        spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert _schema_problems(spec_schema, "spec") == []

    seen: set[type[BaseModel]] = set()
    _check_model(api.SecuredEndpointSpec, seen)
    assert len(seen) > 5


def _schema_problems(schema: dict[str, Any], path: str) -> list[str]:
    problems = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path} keeps unknown fields")
    for name, child in (schema.get("properties") or {}).items():
        if name == "namespace":
            problems.append(f"{path}.namespace")
        problems += _schema_problems(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        problems += _schema_problems(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += _schema_problems(schema["additionalProperties"], f"{path}{{}}")
    return problems


def _check_model(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    assert model.model_config.get("extra") == "forbid", model.__name__
    for name, info in model.model_fields.items():
        assert name != "namespace", model.__name__
        for annotation in _types_in(info.annotation):
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                _check_model(annotation, seen)


def _types_in(annotation: Any) -> list[Any]:
    arguments = typing.get_args(annotation)
    return [annotation] if not arguments else [item for argument in arguments for item in _types_in(argument)]


# -- a permission missing ---------------------------------------------------------------------------------


def test_a_missing_get_permission_is_named_not_taken_for_a_missing_secret(
        control_plane: ControlPlane, kube: Kube, namespaces: Any, token_server: TokenServer,
        secret_values: set[str], operator_processes: list[OperatorProcess], tmp_path: Path) -> None:
    """The Secret exists but the operator may not get it: CredentialsUnreadable naming the permission (not
    CredentialsNotFound, which would send a user looking for a Secret that is there); once granted, the
    transient backoff brings the token within seconds."""
    watched, system = namespaces.new("tenr"), namespaces.new("tensys")
    documents = _rbac(MANIFESTS / "rbac-namespaced.yaml", namespace=watched, account_namespace=system)
    (secrets,) = [rule for document in documents if document["kind"] == "Role"
                  for rule in document["rules"] if rule["resources"] == ["secrets"]]
    secrets["verbs"] = [verb for verb in secrets["verbs"] if verb != "get"]
    kubeconfig = _service_account_kubeconfig(control_plane, system, "secured-endpoint-operator",
                                             tmp_path / "sa.kubeconfig")
    _apply(control_plane, documents)
    operator = _operator(control_plane, tmp_path, operator_processes, scope=("--namespace", watched),
                         kubeconfig=kubeconfig, lease_namespace=watched)
    setup = Setup(kube, watched, secret_values)
    setup.client(token_server)
    setup.endpoint("forbidden", token_server)
    condition = kube.wait_ready(watched, "forbidden", status="False", reason="CredentialsUnreadable", timeout=15)
    assert f"not allowed to get secrets in namespace {watched}" in condition["message"]
    assert "RBAC needs get on secrets" in condition["message"]
    assert token_server.token_requests == 0
    secrets["verbs"].append("get")
    _apply(control_plane, documents)
    kube.wait_ready(watched, "forbidden", timeout=20)
    assert token_server.token_requests == 1
    kube.delete_endpoint(watched, "forbidden")
    wait_for(lambda: kube.get_endpoint(watched, "forbidden") is None, message="the endpoint to be deleted")
    operator.stop()
