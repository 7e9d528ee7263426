"""The SecuredEndpoint CRD on a real kube-apiserver: what ``kubectl apply`` accepts and refuses, and why.

Cases:
- accepted: a minimal object, read back with every default filled in; an https tokenUrl in any letter
  case; an http tokenUrl with allowInsecureHttp; a full object using every field; every example in
  ``examples/`` (server-side dry run);
- refused, with the message the user sees:
  - tokenUrl: http without allowInsecureHttp; ftp://, a relative URL, an empty string;
  - grant: Password without passwordSecretRef; ClientCredentials with passwordSecretRef; an unknown
    grantType or clientAuthMethod;
  - refresh: both refreshBeforeSeconds and refreshBeforePercent; refreshBeforePercent 0 and 95;
    defaultExpiresInSeconds below 10;
  - parameters: both value and valueFrom; neither; every reserved name; a duplicate name;
  - trustStore: both refs, and neither;
  - unknown fields (strict field validation), including ``namespace`` in any reference;
  - a Secret name that is no DNS subdomain; a missing clientSecretRef;
  - an update that turns a valid object invalid;
- status: ignored when written through the main resource; written through the status subresource,
  unknown fields pruned (the schema is closed), a bad condition status or a time that is not RFC 3339
  refused;
- discovery: printer columns (READY REASON EXPIRES AGE, and their values), short name ``sep``, category
  ``secured-endpoint``, ``kubectl explain`` shows the descriptions.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secured_endpoint import api
from secured_endpoint_devenv.controlplane import ControlPlane
from tests.conftest import Kube, _namespace

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
API_VERSION = f"{api.GROUP}/{api.VERSION}"
RESOURCE = f"{api.PLURAL}.{api.GROUP}"

MINIMAL_SPEC: dict[str, Any] = {
    "tokenUrl": "https://idp.example.com/oauth2/token",
    "clientSecretRef": {"name": "orders-oauth"},
}
KEY_REF = {"name": "idp-ca", "key": "ca.crt"}


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A namespace no operator watches ("s-*"): whether the session's operators already run (other modules
    sort before this one) or not, only the test itself writes a status here."""
    yield from _namespace(kube, "s")


def _endpoint(name: str = "orders", **changes: Any) -> dict[str, Any]:
    """A SecuredEndpoint with MINIMAL_SPEC updated by ``changes`` (camelCase keys; None removes a key)."""
    spec = copy.deepcopy(MINIMAL_SPEC)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return {"apiVersion": API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def _apply(cp: ControlPlane, namespace: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cp.kubectl(
        "apply", "--validate=strict", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False,
    )


def _get(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    result = cp.kubectl("get", RESOURCE, name, "-n", namespace, "-o", "json")
    stored: dict[str, Any] = json.loads(result.stdout)
    return stored


def _accepted(cp: ControlPlane, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    result = _apply(cp, namespace, obj)
    assert result.returncode == 0, result.stderr
    return _get(cp, namespace, obj["metadata"]["name"])


def _refused(cp: ControlPlane, namespace: str, obj: dict[str, Any], *expected: str) -> str:
    result = _apply(cp, namespace, obj)
    assert result.returncode != 0, f"accepted: {json.dumps(obj['spec'])}"
    for text in expected:
        assert text in result.stderr
    return result.stderr


def _patch_status(
    cp: ControlPlane, namespace: str, name: str, status: dict[str, Any],
) -> subprocess.CompletedProcess[str]:
    return cp.kubectl(
        "patch", RESOURCE, name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), check=False,
    )


# -- accepted, with defaults ------------------------------------------------------------------------------


def test_minimal_object_gets_the_defaults(control_plane: ControlPlane, namespace: str) -> None:
    spec = _accepted(control_plane, namespace, _endpoint())["spec"]
    assert spec == {
        "tokenUrl": "https://idp.example.com/oauth2/token",
        "allowInsecureHttp": False,
        "grantType": "ClientCredentials",
        "clientAuthMethod": "ClientSecretBasic",
        "clientSecretRef": {
            "name": "orders-oauth", "clientIdKey": "client_id", "clientSecretKey": "client_secret",
        },
        "refresh": {"defaultExpiresInSeconds": 3600, "reactive": True},
        "suspend": False,
    }
    api.parse_spec(spec)


def test_password_reference_gets_default_keys(control_plane: ControlPlane, namespace: str) -> None:
    obj = _endpoint(grantType="Password", passwordSecretRef={"name": "orders-user"})
    spec = _accepted(control_plane, namespace, obj)["spec"]
    assert spec["passwordSecretRef"] == {
        "name": "orders-user", "usernameKey": "username", "passwordKey": "password",
    }


def test_full_object_is_accepted_and_parses(control_plane: ControlPlane, namespace: str) -> None:
    obj = _endpoint(
        endpoints={"production": "https://orders.internal/api", "sandbox": "https://orders-sandbox.internal/api"},
        grantType="Password",
        clientAuthMethod="ClientSecretPost",
        clientSecretRef={"name": "orders-oauth", "clientIdKey": "id", "clientSecretKey": "secret"},
        passwordSecretRef={"name": "orders-user", "usernameKey": "user", "passwordKey": "pass"},
        scopes=["orders.read", "orders.write"],
        audience="https://orders.internal",
        parameters=[
            {"name": "resource", "value": "https://orders.internal"},
            {"name": "tenant", "valueFrom": {"secretKeyRef": {"name": "orders-oauth", "key": "tenant"}}},
        ],
        trustStore={"secretRef": KEY_REF},
        refresh={"defaultExpiresInSeconds": 600, "refreshBeforeSeconds": 60, "reactive": False},
        suspend=True,
        target={
            "secret": {"name": "orders-token", "labels": {"team": "orders"}, "annotations": {"note": "x"}},
            "redis": {"enabled": True},
        },
    )
    stored = _accepted(control_plane, namespace, obj)
    assert stored["spec"] == obj["spec"] | {"allowInsecureHttp": False}
    api.parse_spec(stored["spec"])


@pytest.mark.parametrize("url", [
    "https://idp.example.com/oauth2/token",
    "HTTPS://idp.example.com:8443/token?tenant=a",
    "https://10.0.0.1/token",
])
def test_https_token_urls_accepted(control_plane: ControlPlane, namespace: str, url: str) -> None:
    _accepted(control_plane, namespace, _endpoint(tokenUrl=url))


def test_http_token_url_accepted_with_allow_insecure_http(
    control_plane: ControlPlane, namespace: str,
) -> None:
    obj = _endpoint(tokenUrl="http://127.0.0.1:18080/oauth2/token", allowInsecureHttp=True)
    spec = _accepted(control_plane, namespace, obj)["spec"]
    assert spec["allowInsecureHttp"] is True


EXAMPLES = sorted(path.parent for path in (ROOT / "examples").glob("*/securedendpoint.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_is_accepted(control_plane: ControlPlane, namespace: str, example: Path) -> None:
    files = [arg for name in ("secret.yaml", "securedendpoint.yaml") if (example / name).exists()
             for arg in ("-f", str(example / name))]
    result = control_plane.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace, *files, check=False,
    )
    assert result.returncode == 0, result.stderr


# -- refused: tokenUrl ------------------------------------------------------------------------------------


def test_http_token_url_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(tokenUrl="http://idp.example.com/token"),
        "spec.tokenUrl", "tokenUrl must use https (set allowInsecureHttp: true to allow http)",
    )


@pytest.mark.parametrize("url", ["ftp://idp.example.com/token", "idp.example.com/token", "https://", "https:///x"])
def test_non_http_token_url_refused(control_plane: ControlPlane, namespace: str, url: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(tokenUrl=url, allowInsecureHttp=True),
        "spec.tokenUrl", "tokenUrl must be an absolute https:// URL",
    )


def test_empty_token_url_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(control_plane, namespace, _endpoint(tokenUrl=""), "spec.tokenUrl", "at least 1 chars long")


# -- refused: grant and client authentication -------------------------------------------------------------


def test_password_grant_without_password_secret_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(grantType="Password"),
        "spec.passwordSecretRef", "passwordSecretRef is required when grantType is Password",
    )


def test_client_credentials_with_password_secret_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(passwordSecretRef={"name": "orders-user"}),
        "spec.passwordSecretRef", "passwordSecretRef is only allowed when grantType is Password",
    )


def test_unknown_grant_type_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(grantType="AuthorizationCode"),
        "spec.grantType", 'Unsupported value: "AuthorizationCode"', '"ClientCredentials", "Password"',
    )


def test_unknown_client_auth_method_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(clientAuthMethod="PrivateKeyJwt"),
        "spec.clientAuthMethod", 'Unsupported value: "PrivateKeyJwt"',
    )


def test_missing_client_secret_ref_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(clientSecretRef=None), "spec.clientSecretRef: Required value",
    )


def test_secret_name_must_be_a_dns_subdomain(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(clientSecretRef={"name": "Orders_OAuth"}),
        "spec.clientSecretRef.name", "should match",
    )


# -- refused: refresh -------------------------------------------------------------------------------------


def test_both_refresh_before_fields_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(refresh={"refreshBeforeSeconds": 60, "refreshBeforePercent": 20}),
        "spec.refresh", "refreshBeforeSeconds and refreshBeforePercent are mutually exclusive",
    )


@pytest.mark.parametrize(("percent", "message"), [
    (0, "should be greater than or equal to 1"),
    (95, "should be less than or equal to 90"),
])
def test_refresh_before_percent_out_of_range_refused(
    control_plane: ControlPlane, namespace: str, percent: int, message: str,
) -> None:
    _refused(
        control_plane, namespace, _endpoint(refresh={"refreshBeforePercent": percent}),
        "spec.refresh.refreshBeforePercent", message,
    )


def test_short_default_lifetime_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(refresh={"defaultExpiresInSeconds": 5}),
        "spec.refresh.defaultExpiresInSeconds", "should be greater than or equal to 10",
    )


# -- refused: parameters ----------------------------------------------------------------------------------


def test_parameter_with_value_and_value_from_refused(control_plane: ControlPlane, namespace: str) -> None:
    parameter = {"name": "tenant", "value": "a", "valueFrom": {"secretKeyRef": KEY_REF}}
    _refused(
        control_plane, namespace, _endpoint(parameters=[parameter]),
        "spec.parameters[0]", "exactly one of value and valueFrom must be set",
    )


def test_parameter_without_value_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(parameters=[{"name": "tenant"}]),
        "spec.parameters[0]", "exactly one of value and valueFrom must be set",
    )


@pytest.mark.parametrize("name", sorted(api.RESERVED_PARAMETERS))
def test_reserved_parameter_name_refused(control_plane: ControlPlane, namespace: str, name: str) -> None:
    _refused(
        control_plane, namespace, _endpoint(parameters=[{"name": name, "value": "x"}]),
        "spec.parameters[0].name", f"'{name}' is set by the operator and cannot be a parameter",
    )


def test_duplicate_parameter_names_refused(control_plane: ControlPlane, namespace: str) -> None:
    parameters = [
        {"name": "tenant", "value": "a"},
        {"name": "resource", "value": "r"},
        {"name": "tenant", "value": "b"},
    ]
    _refused(
        control_plane, namespace, _endpoint(parameters=parameters),
        "spec.parameters", "parameter names must be unique",
    )


# -- refused: trust store ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trust_store", [{"configMapRef": KEY_REF, "secretRef": KEY_REF}, {}], ids=["both", "neither"],
)
def test_trust_store_needs_exactly_one_ref(
    control_plane: ControlPlane, namespace: str, trust_store: dict[str, Any],
) -> None:
    _refused(
        control_plane, namespace, _endpoint(trustStore=trust_store),
        "spec.trustStore", "exactly one of configMapRef and secretRef must be set",
    )


# -- refused: unknown fields ------------------------------------------------------------------------------


def test_unknown_spec_field_refused(control_plane: ControlPlane, namespace: str) -> None:
    _refused(control_plane, namespace, _endpoint(clientSecret="s3cr3t"), 'unknown field "spec.clientSecret"')


@pytest.mark.parametrize(("changes", "field"), [
    ({"clientSecretRef": {"name": "orders-oauth", "namespace": "other"}}, "spec.clientSecretRef.namespace"),
    ({"grantType": "Password", "passwordSecretRef": {"name": "u", "namespace": "other"}},
     "spec.passwordSecretRef.namespace"),
    ({"trustStore": {"configMapRef": KEY_REF | {"namespace": "other"}}},
     "spec.trustStore.configMapRef.namespace"),
    ({"parameters": [{"name": "t", "valueFrom": {"secretKeyRef": KEY_REF | {"namespace": "other"}}}]},
     "spec.parameters[0].valueFrom.secretKeyRef.namespace"),
], ids=["clientSecretRef", "passwordSecretRef", "trustStore", "parameter"])
def test_references_have_no_namespace(
    control_plane: ControlPlane, namespace: str, changes: dict[str, Any], field: str,
) -> None:
    _refused(control_plane, namespace, _endpoint(**changes), f'unknown field "{field}"')


# -- refused on update ------------------------------------------------------------------------------------


def test_update_to_an_invalid_spec_refused(control_plane: ControlPlane, namespace: str) -> None:
    _accepted(control_plane, namespace, _endpoint())
    _refused(
        control_plane, namespace, _endpoint(tokenUrl="http://idp.example.com/token"),
        "tokenUrl must use https",
    )
    assert _get(control_plane, namespace, "orders")["spec"]["tokenUrl"] == MINIMAL_SPEC["tokenUrl"]


# -- status -----------------------------------------------------------------------------------------------


STATUS: dict[str, Any] = {
    "observedGeneration": 1,
    "conditions": [{
        "type": "Ready", "status": "True", "reason": "TokenIssued", "message": "token issued",
        "observedGeneration": 1, "lastTransitionTime": "2026-11-28T16:00:00Z",
    }],
    "tokenType": "Bearer",
    "scope": "orders.read",
    "expiresAt": "2099-01-01T00:00:00Z",
    "lastRefreshTime": "2026-11-28T16:00:00Z",
    "nextRefreshTime": "2098-12-31T23:00:00Z",
    "consecutiveFailures": 0,
    "tokenFingerprint": "sha256:1f2e3d4c5b6a",
    "tokenConfigHash": "sha256:0123456789abcdef",
    "sourceVersions": {"Secret/orders-oauth": "42"},
    "lastRefreshRequest": "2026-11-28T15:00:00Z",
    "targets": {"secret": {"name": "orders-token"}, "redis": {"key": "secured-endpoint:shop:orders"}},
    "lastFailureTime": "2026-11-28T15:30:00Z",
}


def test_status_cannot_be_set_through_the_main_resource(control_plane: ControlPlane, namespace: str) -> None:
    obj = _endpoint() | {"status": STATUS}
    assert "status" not in _accepted(control_plane, namespace, obj)
    control_plane.kubectl(
        "patch", RESOURCE, "orders", "-n", namespace, "--type=merge", "-p", json.dumps({"status": STATUS}),
    )
    assert "status" not in _get(control_plane, namespace, "orders")


def test_status_subresource_takes_every_operator_field(control_plane: ControlPlane, namespace: str) -> None:
    _accepted(control_plane, namespace, _endpoint())
    result = _patch_status(control_plane, namespace, "orders", STATUS)
    assert result.returncode == 0, result.stderr
    assert _get(control_plane, namespace, "orders")["status"] == STATUS


def test_status_schema_is_closed(control_plane: ControlPlane, namespace: str) -> None:
    _accepted(control_plane, namespace, _endpoint())
    status = {"tokenType": "Bearer", "kopf": {"progress": {}}}
    result = _patch_status(control_plane, namespace, "orders", status)
    assert result.returncode == 0, result.stderr
    assert _get(control_plane, namespace, "orders")["status"] == {"tokenType": "Bearer"}


def test_condition_status_must_be_true_false_or_unknown(control_plane: ControlPlane, namespace: str) -> None:
    _accepted(control_plane, namespace, _endpoint())
    status = {"conditions": [{"type": "Ready", "status": "Yes"}]}
    result = _patch_status(control_plane, namespace, "orders", status)
    assert result.returncode != 0
    assert "status.conditions[0].status" in result.stderr
    assert 'Unsupported value: "Yes"' in result.stderr


def test_status_times_must_be_rfc3339(control_plane: ControlPlane, namespace: str) -> None:
    _accepted(control_plane, namespace, _endpoint())
    result = _patch_status(control_plane, namespace, "orders", {"expiresAt": "tomorrow"})
    assert result.returncode != 0
    assert "status.expiresAt" in result.stderr
    assert "must be of type date-time" in result.stderr


# -- discovery: printer columns, short name, category, explain --------------------------------------------


def test_printer_columns(control_plane: ControlPlane, namespace: str) -> None:
    _accepted(control_plane, namespace, _endpoint())
    assert _patch_status(control_plane, namespace, "orders", STATUS).returncode == 0
    header, row = control_plane.kubectl("get", "sep", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "READY", "REASON", "EXPIRES", "NEXT", "REFRESH", "AGE"]
    # Expires and Next Refresh are string columns: a date column would show "<invalid>" for a time in the future.
    assert row.split()[:5] == ["orders", "True", "TokenIssued", STATUS["expiresAt"], STATUS["nextRefreshTime"]]
    wide_header = control_plane.kubectl("get", "sep", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert "TOKEN URL" in wide_header


@pytest.mark.parametrize("name", ["sep", "securedendpoint", "securedendpoints", "secured-endpoint"])
def test_short_name_and_category(control_plane: ControlPlane, namespace: str, name: str) -> None:
    _accepted(control_plane, namespace, _endpoint())
    output = control_plane.kubectl("get", name, "-n", namespace, "-o", "name").stdout
    assert output.split() == [f"{api.KIND.lower()}.{api.GROUP}/orders"]


def test_explain_shows_descriptions(control_plane: ControlPlane) -> None:
    output = " ".join(control_plane.kubectl("explain", "sep.spec.passwordSecretRef").stdout.split())
    assert "Required when grantType is Password, not allowed otherwise." in output
    assert "usernameKey" in output
