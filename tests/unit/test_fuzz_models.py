"""Property tests (hypothesis) of the spec models and, where test_token_response.py leaves a gap, the token
response parser.

Spec models (``api.parse_spec``):
- any JSON-like input, and any mutation of a valid spec (a key dropped, a value replaced, an unknown key
  added), gives a model or an ``api.SpecError`` — never another exception;
- a SpecError never repeats a string value of the input: every string the strategies generate may carry a
  marker, and the marker must not appear in the message (a spec holds URLs that may carry credentials);
- every tokenUrl the model accepts is one the HTTP client can use (httpx parses it, the port is valid):
  otherwise the operator fails later, with an exception that is no condition;
- a valid spec's ``model_dump(by_alias=True)`` parses back to an equal model;
- ``token_config_hash`` changes with each field that shapes the token, and ignores the fields that do not
  (every spec field is one or the other);
- ``referenced_sources`` holds exactly the Secrets and ConfigMaps the spec refers to.

Token responses (``tokens.parse_token_response``; arbitrary bytes and leak checks are in
test_token_response.py): every well-formed RFC 6749 §5.1 answer is accepted with its values, and whatever
JSON object comes back, a TokenResponse that is returned satisfies the invariants gateways rely on.
"""

from __future__ import annotations

import copy
import json
import re
import typing
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from secured_endpoint import api
from secured_endpoint.tokens import InvalidTokenResponseError, TokenError, TokenResponse, parse_token_response

MARK = "SeCrEtMaRk"
# Contract tests (a model or a SpecError, never an echoed value) get more examples than the properties of
# valid specs, whose strategy is costly to draw.
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _aliases(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[str]:
    """Every property name of the spec, at any depth."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for field in model.model_fields.values():
        names.add(field.alias or "")
        for annotation in _inner_types(field.annotation):
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                names |= _aliases(annotation, seen)
    return names - {""}


def _inner_types(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _inner_types(arg)


SPEC_FIELDS = {field.alias for field in api.SecuredEndpointSpec.model_fields.values()}
ALIASES = sorted(_aliases(api.SecuredEndpointSpec))

# -- strategies ------------------------------------------------------------------------------------------

# Characters that make URL parsers stumble: NFKC look-alikes of '/', '?', '#', '@', ':' and friends.
TRICKY = "\uff03\uff0f\uff1f\uff20\uff1a\u2100\u2047\ufe6b\u00a0 %[]@:/?#\\\t\n"
secret_text = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(TRICKY), max_size=12).map(
    lambda text: MARK + text)


@st.composite
def tricky_urls(draw: st.DrawFn, *, marked: bool = True) -> str:
    """URLs built from odd parts; with ``marked`` the user info (a password, say) carries the marker."""
    scheme = draw(st.sampled_from(["https", "http", "HTTPS", "ftp", ""]))
    userinfo = ""
    if marked and draw(st.booleans()):
        userinfo = draw(st.sampled_from(["", "user:", ":"])) + draw(secret_text) + draw(
            st.sampled_from(["@", "\uff20", "\uff03@", "\uff0f@", "@@"]))
    host = draw(st.sampled_from([
        "idp.example.com", "127.0.0.1", "localhost", "[::1]", "[::1", "::1]", "xn--", "xn--zz", "999.1.1.1",
        "1.2.3.4.5", "bad_host.invalid", "-bad-.invalid", "exa%20mple", "ex..ample", "h\uff0fx", "héllo.example",
        "a" * 64 + ".example", "", "[fe80::1%25eth0]", "[v1.x]",
    ]) | st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(TRICKY), max_size=10))
    port = draw(st.sampled_from(["", ":443", ":0", ":65535", ":65536", ":99999", ":abc", ":", ":-1", ": 1",
                                 ":\uff11"]))
    path = draw(st.sampled_from(["/oauth2/token", "", "/", "?a=b", "#frag", "/t?x=\uff03"]))
    return f"{scheme}://{userinfo}{host}{port}{path}" if scheme else f"{userinfo}{host}{port}{path}"


keys = st.sampled_from(ALIASES) | st.text(max_size=12).filter(lambda key: MARK not in key)
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | secret_text
           | tricky_urls())
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=20,
)

dns_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
dns_name = st.lists(dns_label, min_size=1, max_size=3).map(".".join).filter(lambda name: len(name) <= 253)
key_name = st.from_regex(r"[-._a-zA-Z0-9]{1,20}", fullmatch=True)
parameter_name = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(
    lambda name: name not in api.RESERVED_PARAMETERS)


@st.composite
def good_token_urls(draw: st.DrawFn) -> tuple[str, bool]:
    """A valid tokenUrl and whether it needs allowInsecureHttp."""
    scheme = draw(st.sampled_from(["https", "http", "HTTPS"]))
    host = draw(st.sampled_from(["127.0.0.1", "localhost", "[::1]", "10.0.0.1"]) | dns_name)
    port = draw(st.none() | st.integers(min_value=1, max_value=65535))
    path = draw(st.from_regex(r"(/[A-Za-z0-9._~-]{1,10}){0,3}", fullmatch=True))
    query = draw(st.sampled_from(["", "?tenant=a", "?a=1&b=2"]))
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{path}{query}"
    return url, scheme.lower() == "http"


def _selector() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"name": dns_name, "key": key_name})


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A raw spec as a user writes it (only some optional fields present) that the model must accept."""
    url, insecure = draw(good_token_urls())
    spec: dict[str, Any] = {"tokenUrl": url,
                            "clientSecretRef": {"name": draw(dns_name)}}
    client_ref = spec["clientSecretRef"]
    for alias in ("clientIdKey", "clientSecretKey"):
        if draw(st.booleans()):
            client_ref[alias] = draw(key_name)
    if insecure:
        spec["allowInsecureHttp"] = True
    elif draw(st.booleans()):
        spec["allowInsecureHttp"] = draw(st.booleans())
    if draw(st.booleans()):
        spec["grantType"] = "Password"
        spec["passwordSecretRef"] = {"name": draw(dns_name)}
        if draw(st.booleans()):
            spec["passwordSecretRef"]["passwordKey"] = draw(key_name)
    elif draw(st.booleans()):
        spec["grantType"] = "ClientCredentials"
    methods = ["ClientSecretBasic", "ClientSecretPost", "ClientSecretJWT", "PrivateKeyJWT"]
    if not insecure:
        methods.append("TLSClientAuth")
    method = draw(st.sampled_from(methods))
    if method != "ClientSecretBasic" or draw(st.booleans()):
        spec["clientAuthMethod"] = method
    if method == "PrivateKeyJWT":
        spec["clientAssertion"] = {"privateKeySecretRef": {"name": draw(dns_name)},
                                   "algorithm": draw(st.sampled_from(["RS256", "ES256", "PS512"]))}
    elif method == "ClientSecretJWT" and draw(st.booleans()):
        spec["clientAssertion"] = {"algorithm": draw(st.sampled_from(["HS256", "HS512"]))}
    elif method == "TLSClientAuth":
        spec["clientCertificateSecretRef"] = {"name": draw(dns_name)}
    if draw(st.booleans()):
        spec["scopes"] = draw(st.lists(st.text(max_size=20), max_size=4))
    if draw(st.booleans()):
        spec["audience"] = draw(st.text(max_size=30))
    if draw(st.booleans()):
        names = draw(st.lists(parameter_name, unique=True, max_size=4))
        spec["parameters"] = [
            {"name": name, "value": draw(st.text(max_size=20))} if draw(st.booleans())
            else {"name": name, "valueFrom": {"secretKeyRef": draw(_selector())}}
            for name in names
        ]
    if draw(st.booleans()):
        spec["trustStore"] = {draw(st.sampled_from(["configMapRef", "secretRef"])): draw(_selector())}
    if draw(st.booleans()):
        spec["proxy"] = {"url": draw(st.sampled_from(["http://proxy.internal:3128", "https://10.0.0.9"]))}
        if draw(st.booleans()):
            spec["proxy"]["credentialsSecretRef"] = {"name": draw(dns_name)}
    if draw(st.booleans()):
        refresh: dict[str, Any] = {}
        if draw(st.booleans()):
            refresh["defaultExpiresInSeconds"] = draw(st.integers(min_value=10, max_value=366 * 86400))
        before = draw(st.sampled_from(["seconds", "percent", None]))
        if before == "seconds":
            refresh["refreshBeforeSeconds"] = draw(st.integers(min_value=0, max_value=10**7))
        elif before == "percent":
            refresh["refreshBeforePercent"] = draw(st.integers(min_value=1, max_value=90))
        if draw(st.booleans()):
            refresh["reactive"] = draw(st.booleans())
        spec["refresh"] = refresh
    if draw(st.booleans()):
        spec["suspend"] = draw(st.booleans())
    if draw(st.booleans()):
        spec["endpoints"] = draw(st.dictionaries(key_name, st.text(max_size=30), max_size=3))
    if draw(st.booleans()):
        target: dict[str, Any] = {}
        if draw(st.booleans()):
            target["secret"] = {"name": draw(dns_name),
                                "labels": draw(st.dictionaries(key_name, key_name, max_size=2))}
        if draw(st.booleans()):
            target["redis"] = {"enabled": draw(st.booleans())}
        spec["target"] = target
    return spec


def _parse(raw: Any) -> api.SecuredEndpointSpec | api.SpecError:
    """The contract: a model or a SpecError, nothing else (any other exception fails the test)."""
    try:
        return api.parse_spec(raw)
    except api.SpecError as error:
        return error


def _assert_no_input_echoed(outcome: api.SecuredEndpointSpec | api.SpecError) -> None:
    if isinstance(outcome, api.SpecError):
        assert MARK not in str(outcome), f"a value of the spec is in the error: {outcome}"
        assert str(outcome).startswith("spec"), f"the error names no field: {outcome}"


# -- parse_spec: a model or a SpecError, never a value in the message -----------------------------------------


@FUZZ
@given(raw=st.dictionaries(keys, json_values, max_size=8))
def test_arbitrary_input_gives_a_model_or_a_spec_error(raw: dict[str, Any]) -> None:
    _assert_no_input_echoed(_parse(raw))


@FUZZ
@given(url=tricky_urls(), allow_http=st.booleans(), extra=st.dictionaries(keys, json_values, max_size=2))
def test_odd_token_urls_give_a_model_or_a_spec_error_without_the_url(url: str, allow_http: bool,
                                                                      extra: dict[str, Any]) -> None:
    raw = {**extra, "tokenUrl": url, "allowInsecureHttp": allow_http, "clientSecretRef": {"name": "oauth"}}
    _assert_no_input_echoed(_parse(raw))


@pytest.mark.parametrize("url", [
    "https://user:SeCrEtMaRk\uff03x@idp.example.com/token",
    "https://SeCrEtMaRk\uff0fabc/token",
    "https://idp.example.com\u2100SeCrEtMaRk/token",
])
def test_a_url_that_fails_nfkc_checks_is_not_repeated(url: str) -> None:
    """urlsplit's own ValueError quotes the netloc, user:password@ included; it must not reach the message."""
    outcome = _parse({"tokenUrl": url, "clientSecretRef": {"name": "oauth"}})
    assert isinstance(outcome, api.SpecError)
    _assert_no_input_echoed(outcome)
    assert "tokenUrl" in str(outcome)


def _locations(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into a JSON document (dict keys and list indexes)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key)
            yield from _locations(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*path, index)
            yield from _locations(item, (*path, index))


@FUZZ
@given(spec=valid_specs(), data=st.data())
def test_mutations_of_a_valid_spec_give_a_model_or_a_spec_error(spec: dict[str, Any], data: st.DataObject) -> None:
    mutated = copy.deepcopy(spec)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        locations = list(_locations(mutated))
        if not locations:
            break
        *parent_path, last = data.draw(st.sampled_from(locations))
        parent = mutated
        for step in parent_path:
            parent = parent[step]
        operation = data.draw(st.sampled_from(["delete", "replace", "add"]))
        if operation == "delete":
            del parent[last]
        elif operation == "replace":
            parent[last] = data.draw(json_values)
        elif isinstance(parent, dict):
            parent[data.draw(keys)] = data.draw(json_values)
        else:
            parent.append(data.draw(json_values))
    _assert_no_input_echoed(_parse(mutated))


# -- what an accepted spec promises ----------------------------------------------------------------------


@FUZZ
@given(url=tricky_urls(marked=False) | good_token_urls().map(lambda pair: pair[0]))
def test_every_accepted_token_url_is_usable_by_the_http_client(url: str) -> None:
    outcome = _parse({"tokenUrl": url, "allowInsecureHttp": True, "clientSecretRef": {"name": "oauth"}})
    assume(isinstance(outcome, api.SecuredEndpointSpec))
    assert isinstance(outcome, api.SecuredEndpointSpec)
    try:
        parsed = httpx.URL(outcome.token_url)
        split_port = urllib.parse.urlsplit(outcome.token_url).port
    except (httpx.InvalidURL, ValueError) as exc:  # IDNAError is a UnicodeError, a ValueError
        pytest.fail(f"spec.tokenUrl {url!r} passed the model but the HTTP client refuses it: "
                    f"{type(exc).__name__}: {exc}")
    assert parsed.host, f"spec.tokenUrl {url!r} passed the model but has no host for the HTTP client"
    assert parsed.scheme in ("http", "https")
    for port in (parsed.port, split_port):
        assert port is None or 1 <= port <= 65535, f"spec.tokenUrl {url!r} passed the model with port {port}"


@PROPERTY
@given(spec=valid_specs())
def test_valid_specs_parse_and_round_trip(spec: dict[str, Any]) -> None:
    model = _parse(spec)
    assert isinstance(model, api.SecuredEndpointSpec), f"{spec} refused: {model}"
    dumped = model.model_dump(mode="json", by_alias=True)
    assert api.parse_spec(dumped) == model
    assert api.parse_spec(model.model_dump(mode="json", by_alias=True, exclude_none=True)) == model


# Fields that do not shape the token: changing them costs no token request (docs/contract.md §5.3).
NOT_TOKEN_SHAPING = {"endpoints", "refresh", "suspend", "target"}
BASE_SPEC: dict[str, Any] = {"tokenUrl": "https://idp.example.com/token", "clientSecretRef": {"name": "oauth"}}
# For each field that shapes the token, a spec that differs from BASE_SPEC in it (and what it needs).
TOKEN_SHAPING_CHANGES: dict[str, dict[str, Any]] = {
    "tokenUrl": {"tokenUrl": "https://idp.example.com/other"},
    "allowInsecureHttp": {"allowInsecureHttp": True},
    "grantType": {"grantType": "Password", "passwordSecretRef": {"name": "user"}},
    "clientAuthMethod": {"clientAuthMethod": "ClientSecretPost"},
    "clientSecretRef": {"clientSecretRef": {"name": "oauth", "clientSecretKey": "secret"}},
    "passwordSecretRef": {"grantType": "Password", "passwordSecretRef": {"name": "user", "passwordKey": "pw"}},
    "scopes": {"scopes": ["orders.read"]},
    "audience": {"audience": "https://orders.internal"},
    "parameters": {"parameters": [{"name": "resource", "value": "https://orders.internal"}]},
    "clientAssertion": {"clientAuthMethod": "ClientSecretJWT", "clientAssertion": {"algorithm": "HS512"}},
    "clientCertificateSecretRef": {"clientCertificateSecretRef": {"name": "client-tls"}},
    "trustStore": {"trustStore": {"configMapRef": {"name": "idp-ca", "key": "ca.crt"}}},
    "proxy": {"proxy": {"url": "http://proxy.internal:3128"}},
}


def test_every_spec_field_shapes_the_token_or_not() -> None:
    assert set(TOKEN_SHAPING_CHANGES) | NOT_TOKEN_SHAPING == SPEC_FIELDS
    assert set(TOKEN_SHAPING_CHANGES).isdisjoint(NOT_TOKEN_SHAPING)


@pytest.mark.parametrize("field", sorted(TOKEN_SHAPING_CHANGES))
def test_token_config_hash_follows_each_field_that_shapes_the_token(field: str) -> None:
    base = api.parse_spec(BASE_SPEC)
    changed = api.parse_spec({**BASE_SPEC, **TOKEN_SHAPING_CHANGES[field]})
    assert changed.token_config_hash() != base.token_config_hash()
    # a pair of specs that differ in this field only, when the change needs another one too
    if field == "passwordSecretRef":
        assert changed.token_config_hash() != api.parse_spec(
            {**BASE_SPEC, **TOKEN_SHAPING_CHANGES["grantType"]}).token_config_hash()
    if field == "clientAssertion":
        assert changed.token_config_hash() != api.parse_spec(
            {**BASE_SPEC, "clientAuthMethod": "ClientSecretJWT"}).token_config_hash()


@PROPERTY
@given(spec=valid_specs(), suspend=st.booleans(), reactive=st.booleans(),
       endpoints=st.dictionaries(key_name, st.text(max_size=10), max_size=2),
       target_name=dns_name, default_lifetime=st.integers(min_value=10, max_value=86400))
def test_token_config_hash_ignores_what_does_not_shape_the_token(
        spec: dict[str, Any], suspend: bool, reactive: bool, endpoints: dict[str, str], target_name: str,
        default_lifetime: int) -> None:
    changed = {**spec, "suspend": suspend, "endpoints": endpoints,
               "refresh": {"defaultExpiresInSeconds": default_lifetime, "reactive": reactive},
               "target": {"secret": {"name": target_name}, "redis": {"enabled": True}}}
    assert api.parse_spec(changed).token_config_hash() == api.parse_spec(spec).token_config_hash()


@PROPERTY
@given(spec=valid_specs(), scope=st.text(min_size=1, max_size=10))
def test_token_config_hash_follows_the_scopes(spec: dict[str, Any], scope: str) -> None:
    before = api.parse_spec(spec)
    changed = api.parse_spec({**spec, "scopes": [*before.scopes, scope]})
    assert changed.token_config_hash() != before.token_config_hash()


def _referenced(raw: Any, under: str = "") -> set[tuple[str, str]]:
    """Every ``*Ref`` with a name in a raw spec: configMapRef names a ConfigMap, the others a Secret."""
    found: set[tuple[str, str]] = set()
    if isinstance(raw, dict):
        if under.endswith("Ref") and isinstance(raw.get("name"), str):
            found.add(("ConfigMap" if under == "configMapRef" else "Secret", raw["name"]))
        for key, value in raw.items():
            found |= _referenced(value, key)
    elif isinstance(raw, list):
        for item in raw:
            found |= _referenced(item, under)
    return found


@PROPERTY
@given(spec=valid_specs())
def test_referenced_sources_are_exactly_what_the_spec_names(spec: dict[str, Any]) -> None:
    sources = api.parse_spec(spec).referenced_sources()
    assert {(ref.kind, ref.name) for ref in sources} == _referenced(spec)
    assert all(str(ref) == f"{ref.kind}/{ref.name}" for ref in sources)


# -- token responses: what test_token_response.py's byte-level fuzzing rarely reaches ----------------------

_VSCHAR_TOKEN = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
                        max_size=60).filter(lambda token: token.strip() != "")
_TOKEN_TYPE = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"])  # other types are refused


@FUZZ
@given(access_token=_VSCHAR_TOKEN, token_type=_TOKEN_TYPE,
       expires_in=st.none() | st.integers(min_value=1, max_value=10**12),
       expires_as_text=st.booleans(),
       scope=st.none() | st.lists(st.from_regex(r"[!#-\[\]-~]{1,10}", fullmatch=True), min_size=1, max_size=4),
       refresh_token=st.none() | _VSCHAR_TOKEN, status=st.sampled_from([200, 201]),
       extra=st.dictionaries(st.sampled_from(["id_token", "issued_token_type", "x_vendor"]), st.text(max_size=10),
                             max_size=2))
def test_every_well_formed_token_response_is_accepted_with_its_values(
        access_token: str, token_type: str, expires_in: int | None, expires_as_text: bool,
        scope: list[str] | None, refresh_token: str | None, status: int, extra: dict[str, str]) -> None:
    document: dict[str, Any] = {**extra, "access_token": access_token, "token_type": token_type}
    if expires_in is not None:
        document["expires_in"] = str(expires_in) if expires_as_text else expires_in
    if scope is not None:
        document["scope"] = " ".join(scope)
    if refresh_token is not None:
        document["refresh_token"] = refresh_token
    response = parse_token_response(status, "application/json", json.dumps(document).encode())
    assert response.access_token.get_secret_value() == access_token
    assert response.token_type == "Bearer"
    assert response.expires_in == expires_in
    assert response.scope == (" ".join(scope) if scope else None)
    assert (response.refresh_token.get_secret_value() if response.refresh_token else None) == refresh_token


_ANY_FIELD = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | st.lists(
    st.text(max_size=5), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)


@FUZZ
@given(document=st.fixed_dictionaries({}, optional={
    "access_token": _ANY_FIELD | _VSCHAR_TOKEN, "token_type": _ANY_FIELD | st.sampled_from(["Bearer", "bearer",
                                                                                             "DPoP", " Bearer "]),
    "expires_in": _ANY_FIELD, "scope": _ANY_FIELD, "refresh_token": _ANY_FIELD, "error": _ANY_FIELD,
    "error_description": _ANY_FIELD}))
def test_any_json_object_gives_a_usable_token_or_an_invalid_response(document: dict[str, Any]) -> None:
    try:
        response = parse_token_response(200, "application/json", json.dumps(document).encode())
    except InvalidTokenResponseError:
        return
    except TokenError:
        # only an RFC 6749 §5.2 error document may be classified as something else than a bad answer
        assert "error" in document
        assert "access_token" not in document
        return
    assert isinstance(response, TokenResponse)
    token = response.access_token.get_secret_value()
    assert token.strip(), "an empty access token"
    assert re.fullmatch(r"[\x20-\x7e]+", token), "unusable in an Authorization header"
    assert re.fullmatch(r"[\x21-\x7e]{1,100}", response.token_type)
    assert response.token_type != "bearer"
    assert response.expires_in is None or (isinstance(response.expires_in, int) and response.expires_in >= 1)
    assert response.scope is None or (response.scope == " ".join(response.scope.split()) and response.scope)
