"""The token response parser (RFC 6749 §5.1/§5.2), its error classification, and the token helpers."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secured_endpoint import api
from secured_endpoint.tokens import (
    InvalidCredentialsError,
    InvalidTokenResponseError,
    TokenError,
    TokenRequestFailedError,
    TokenResponse,
    TrustStoreInvalidError,
    fingerprint,
    jwt_expiry,
    jwt_lifetime,
    parse_token_response,
)
from secured_endpoint.tokens.errors import sanitize_excerpt
from secured_endpoint.tokens.response import MAX_RESPONSE_BYTES

JSON = "application/json;charset=UTF-8"
ACCESS_TOKEN = "eyJhbGciOi.opaque-access-token-value-0123456789"
REFRESH_TOKEN = "refresh-token-value-9876543210"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def ok(**fields: Any) -> TokenResponse:
    document = {"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 3600} | fields
    return parse_token_response(200, JSON, json.dumps({k: v for k, v in document.items() if v is not ...})
                                .encode())


# -- success ---------------------------------------------------------------------------------------------


def test_a_complete_response_is_parsed() -> None:
    response = ok(scope="orders.read orders.write", refresh_token=REFRESH_TOKEN)
    assert response.access_token.get_secret_value() == ACCESS_TOKEN
    assert response.token_type == "Bearer"
    assert response.expires_in == 3600
    assert response.scope == "orders.read orders.write"
    assert response.refresh_token is not None
    assert response.refresh_token.get_secret_value() == REFRESH_TOKEN


def test_repr_of_a_response_hides_the_tokens() -> None:
    text = repr(ok(refresh_token=REFRESH_TOKEN))
    assert ACCESS_TOKEN not in text
    assert REFRESH_TOKEN not in text


def test_optional_fields_may_be_missing() -> None:
    response = ok(expires_in=..., scope=...)
    assert response.expires_in is None
    assert response.scope is None
    assert response.refresh_token is None


@pytest.mark.parametrize("token_type", ["bearer", "BEARER", "Bearer", " bearer "])
def test_bearer_is_normalised(token_type: str) -> None:
    assert ok(token_type=token_type).token_type == "Bearer"


@pytest.mark.parametrize("token_type", ["mac", "DPoP", "N_A"])
def test_other_token_types_are_refused(token_type: str) -> None:
    # a gateway can only send a Bearer token as is (DPoP and MAC need a proof per request)
    with pytest.raises(InvalidTokenResponseError, match=f"token_type '{token_type}'; only Bearer"):
        ok(token_type=token_type)


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [(3600, 3600), ("3600", 3600), (" 60 ", 60), (3600.0, 3600), (59.9, 59), ("1.5", 1), (None, None),
     (10**12, 10**12)],
)
def test_expires_in_accepts_numbers_and_numeric_strings(expires_in: object, expected: int | None) -> None:
    assert ok(expires_in=expires_in).expires_in == expected


@pytest.mark.parametrize("expires_in", [0, -1, 0.5, "0", "-30", "abc", "", True, [], {}, "nan", "inf"])
def test_bad_expires_in_is_an_invalid_response(expires_in: object) -> None:
    with pytest.raises(InvalidTokenResponseError, match="expires_in"):
        ok(expires_in=expires_in)


@pytest.mark.parametrize(
    ("scope", "expected"),
    [("a  b", "a b"), (["a", "b"], "a b"), ("", None), (42, None), ({"a": 1}, None)],
)
def test_scope_is_informative_and_never_refused(scope: object, expected: str | None) -> None:
    assert ok(scope=scope).scope == expected


def test_an_empty_refresh_token_counts_as_none() -> None:
    assert ok(refresh_token="").refresh_token is None


def test_any_2xx_with_a_token_is_a_success() -> None:
    assert parse_token_response(201, JSON, body(access_token="t", token_type="Bearer")).token_type == "Bearer"


def test_the_content_type_is_not_required_to_be_json() -> None:
    response = parse_token_response(200, "text/plain", body(access_token="t", token_type="bearer"))
    assert response.access_token.get_secret_value() == "t"


# -- invalid success responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "payload", "match"),
    [
        ("text/html", b"<html><body>Sign in</body></html>", "content type text/html"),
        (JSON, b'{"access_token": "abc', "not a JSON object"),
        (JSON, b"[1, 2, 3]", "not a JSON object"),
        (JSON, b'"a string"', "not a JSON object"),
        (JSON, b"", "empty body"),
        (None, b"\xff\xfe garbage", "no content type"),
        (JSON, body(token_type="Bearer"), "has no access_token"),
        (JSON, body(access_token="", token_type="Bearer"), "empty access_token"),
        (JSON, body(access_token="   ", token_type="Bearer"), "empty access_token"),
        (JSON, body(access_token=42, token_type="Bearer"), "not a string"),
        (JSON, body(access_token=["x"], token_type="Bearer"), "not a string"),
        (JSON, body(access_token="abc\r\nX-Injected: yes", token_type="Bearer"), "printable ASCII"),
        (JSON, body(access_token="t\u00f6ken", token_type="Bearer"), "printable ASCII"),
        (JSON, body(access_token="abc", token_type="Bearer extra"), "short printable name"),
        (JSON, body(access_token="abc", token_type="x" * 101), "short printable name"),
        (JSON, body(access_token="abc"), "has no token_type"),
        (JSON, body(access_token="abc", token_type=""), "token_type"),
        (JSON, body(access_token="abc", token_type=1), "token_type"),
    ],
)
def test_answers_that_are_no_token_response(content_type: str | None, payload: bytes, match: str) -> None:
    with pytest.raises(InvalidTokenResponseError, match=match) as caught:
        parse_token_response(200, content_type, payload)
    assert caught.value.permanent is False
    assert caught.value.reason is api.Reason.INVALID_TOKEN_RESPONSE
    assert caught.value.status_code == 200


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_invalid_responses(status: int) -> None:
    with pytest.raises(InvalidTokenResponseError, match="redirect"):
        parse_token_response(status, "text/html", b"")


def test_an_oversized_body_is_refused_before_parsing() -> None:
    huge = b'{"access_token": "' + b"a" * MAX_RESPONSE_BYTES + b'", "token_type": "Bearer"}'
    with pytest.raises(InvalidTokenResponseError, match="larger than"):
        parse_token_response(200, JSON, huge)


@pytest.mark.parametrize("status", [100, 101, 199, 600, 999])
def test_odd_statuses_are_invalid_responses(status: int) -> None:
    with pytest.raises(InvalidTokenResponseError, match=f"HTTP {status}"):
        parse_token_response(status, JSON, body(access_token="a", token_type="Bearer"))


# -- error responses: the classification table (docs/contract.md §1) -------------------------------------------------


def oauth_error(error: str, description: str | None = None) -> bytes:
    return body(error=error, **({} if description is None else {"error_description": description}))


CLASSIFICATION = [
    # status, content type, body, exception, permanent
    (401, JSON, oauth_error("invalid_client"), InvalidCredentialsError, True),
    (400, JSON, oauth_error("invalid_client"), InvalidCredentialsError, True),
    (400, JSON, oauth_error("invalid_grant", "bad password"), InvalidCredentialsError, True),
    (400, JSON, oauth_error("unauthorized_client"), InvalidCredentialsError, True),
    (401, "text/plain", b"Unauthorized", InvalidCredentialsError, True),
    (401, None, b"", InvalidCredentialsError, True),
    (400, JSON, oauth_error("invalid_request"), TokenRequestFailedError, True),
    (400, JSON, oauth_error("invalid_scope"), TokenRequestFailedError, True),
    (400, JSON, oauth_error("unsupported_grant_type"), TokenRequestFailedError, True),
    (400, JSON, oauth_error("some_vendor_error"), TokenRequestFailedError, True),
    (403, "text/html", b"<html>forbidden</html>", TokenRequestFailedError, True),
    (404, "text/html", b"<html>not found</html>", TokenRequestFailedError, True),
    (400, JSON, b"[]", TokenRequestFailedError, True),
    (400, JSON, body(error=42), TokenRequestFailedError, True),
    (408, "text/plain", b"timeout", TokenRequestFailedError, False),
    (429, "text/plain", b"Too Many Requests", TokenRequestFailedError, False),
    (500, "text/plain", b"Internal Server Error", TokenRequestFailedError, False),
    (500, JSON, oauth_error("server_error"), TokenRequestFailedError, False),
    (502, "text/html", b"<html>Bad Gateway</html>", TokenRequestFailedError, False),
    (503, JSON, oauth_error("temporarily_unavailable"), TokenRequestFailedError, False),
    (400, JSON, oauth_error("temporarily_unavailable"), TokenRequestFailedError, False),
    (504, None, b"", TokenRequestFailedError, False),
    # A 5xx that names bad credentials is still about the credentials.
    (500, JSON, oauth_error("invalid_client"), InvalidCredentialsError, True),
    # Some servers answer errors with 200.
    (200, JSON, oauth_error("invalid_grant"), InvalidCredentialsError, True),
]


@pytest.mark.parametrize(("status", "content_type", "payload", "kind", "permanent"), CLASSIFICATION)
def test_error_classification(
    status: int, content_type: str | None, payload: bytes, kind: type[TokenError], permanent: bool
) -> None:
    with pytest.raises(kind) as caught:
        parse_token_response(status, content_type, payload)
    error = caught.value
    assert type(error) is kind
    assert error.permanent is permanent
    assert error.reason is kind.reason
    assert error.status_code == status
    assert f"HTTP {status}" in str(error)


def test_the_oauth_error_code_and_description_are_in_the_message() -> None:
    with pytest.raises(InvalidCredentialsError) as caught:
        parse_token_response(400, JSON, oauth_error("invalid_grant", "Invalid user credentials"))
    assert str(caught.value) == (
        "token endpoint refused the request (HTTP 400, invalid_grant: Invalid user credentials)")
    assert caught.value.oauth_error == "invalid_grant"


def test_server_text_is_sanitized_and_shortened() -> None:
    description = "line one\nline two\t\x00\x1b[31m \"quoted\" \\ " + "x" * 500
    with pytest.raises(TokenRequestFailedError) as caught:
        parse_token_response(400, JSON, oauth_error("invalid_request\r\nX-Injected: 1", description))
    message = str(caught.value)
    assert "\n" not in message
    assert "\x1b" not in message
    assert '"' not in message
    assert len(message) < 260


def test_the_raw_body_of_a_non_oauth_error_is_not_repeated() -> None:
    with pytest.raises(TokenRequestFailedError) as caught:
        parse_token_response(500, "text/html", b"<html>stack trace: password=hunter2</html>")
    assert "hunter2" not in str(caught.value)
    assert "content type text/html" in str(caught.value)


def test_a_token_echoed_in_an_error_description_is_redacted() -> None:
    payload = body(error="invalid_request", error_description=f"token {ACCESS_TOKEN} is odd",
                   access_token=ACCESS_TOKEN)
    with pytest.raises(TokenRequestFailedError) as caught:
        parse_token_response(400, JSON, payload)
    assert ACCESS_TOKEN not in str(caught.value)
    assert "[redacted]" in str(caught.value)


# -- the exception tree ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason", "permanent"),
    [
        (InvalidCredentialsError, api.Reason.INVALID_CREDENTIALS, True),
        (TokenRequestFailedError, api.Reason.TOKEN_REQUEST_FAILED, False),
        (InvalidTokenResponseError, api.Reason.INVALID_TOKEN_RESPONSE, False),
        (TrustStoreInvalidError, api.Reason.TRUST_STORE_INVALID, False),
    ],
)
def test_each_error_has_its_reason_and_default_permanence(
    kind: type[TokenError], reason: api.Reason, permanent: bool
) -> None:
    error = kind("something failed")
    assert isinstance(error, TokenError)
    assert error.reason is reason
    assert error.permanent is permanent
    assert kind("x", permanent=not permanent).permanent is not permanent


def test_redact_removes_secrets_from_the_message_in_place() -> None:
    error = TokenRequestFailedError("server said: my-secret-value and my-secret-value-2")
    error.redact(["my-secret-value", "my-secret-value-2", ""])
    assert str(error) == "server said: [redacted] and [redacted]"
    assert "my-secret" not in repr(error)


def test_sanitize_excerpt_keeps_short_text_untouched() -> None:
    assert sanitize_excerpt("invalid_grant") == "invalid_grant"
    assert sanitize_excerpt("a" * 200, 10) == "aaaaaaa..."


# -- jwt_expiry and fingerprint --------------------------------------------------------------------------


def make_jwt(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, "a-signing-key-the-client-never-knows-0123", algorithm="HS256")


def test_jwt_lifetime_is_exp_minus_iat() -> None:
    assert jwt_lifetime(make_jwt({"iat": 1_900_000_000, "exp": 1_900_000_300})) == timedelta(seconds=300)
    assert jwt_lifetime(make_jwt({"exp": 1_900_000_300})) is None
    assert jwt_lifetime(make_jwt({"iat": 1_900_000_300, "exp": 1_900_000_300})) is None
    assert jwt_lifetime(make_jwt({"iat": True, "exp": 1_900_000_300})) is None
    assert jwt_lifetime("opaque-token") is None


def test_jwt_expiry_reads_exp_without_the_key() -> None:
    assert jwt_expiry(make_jwt({"exp": 1_900_000_000, "sub": "x"})) == datetime.fromtimestamp(
        1_900_000_000, UTC)


def test_jwt_expiry_ignores_an_expired_token_signature_and_all() -> None:
    expiry = jwt_expiry(make_jwt({"exp": 1000}))
    assert expiry == datetime(1970, 1, 1, 0, 16, 40, tzinfo=UTC)
    assert expiry is not None
    assert expiry.tzinfo is UTC


def test_jwt_expiry_accepts_a_fractional_exp() -> None:
    expiry = jwt_expiry(make_jwt({"exp": 1_900_000_000.5}))
    assert expiry is not None
    assert expiry.timestamp() == 1_900_000_000.5


@pytest.mark.parametrize(
    "token",
    [
        "opaque-token",
        "",
        "a.b.c",
        "not base64!.x.y",
        "a.b",
        "a.b.c.d",
        make_jwt({"sub": "no exp"}),
        make_jwt({"exp": "tomorrow"}),
        make_jwt({"exp": True}),
        make_jwt({"exp": 10**30}),
        make_jwt({"exp": None}),
    ],
)
def test_jwt_expiry_is_none_for_anything_else(token: str) -> None:
    assert jwt_expiry(token) is None


def test_fingerprint_is_a_short_sha256() -> None:
    token = "some-access-token"
    assert fingerprint(token) == "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]
    assert len(fingerprint(token)) == len("sha256:") + 12
    assert fingerprint("a") != fingerprint("b")


# -- properties ------------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    status=st.integers(min_value=0, max_value=1000),
    content_type=st.none() | st.sampled_from([JSON, "text/html", "text/plain", ""]) | st.text(max_size=40),
    payload=st.binary(max_size=2048),
)
def test_the_parser_raises_only_token_errors_on_arbitrary_bytes(
    status: int, content_type: str | None, payload: bytes
) -> None:
    outcome: TokenResponse | TokenError
    try:
        outcome = parse_token_response(status, content_type, payload)
    except TokenError as error:
        outcome = error
    if isinstance(outcome, TokenError):
        assert isinstance(outcome.permanent, bool)
        assert isinstance(outcome.reason, api.Reason)
    else:
        assert isinstance(outcome, TokenResponse)


TOKEN_ALPHABET = "QXZVWY0123456789-_.~+/"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children,
                                                                      max_size=3),
    max_leaves=8,
)


@settings(max_examples=300)
@given(
    status=st.integers(min_value=100, max_value=599),
    # Characters that never form a 16-character run of the message templates, so a hit is a real leak.
    secret=st.text(alphabet=TOKEN_ALPHABET, min_size=16, max_size=64),
    refresh=st.text(alphabet=TOKEN_ALPHABET, min_size=16, max_size=64),
    extra=st.dictionaries(
        st.sampled_from(["error", "error_description", "token_type", "expires_in", "scope", "error_uri"]),
        json_values,
        max_size=5,
    ),
    echo=st.booleans(),
)
def test_no_token_ever_appears_in_an_error_message(
    status: int, secret: str, refresh: str, extra: dict[str, Any], echo: bool
) -> None:
    document: dict[str, Any] = {"access_token": secret, "refresh_token": refresh, **extra}
    if echo:  # a server that repeats the tokens in its error text
        document["error"] = "invalid_request"
        document["error_description"] = f"got {secret} and {refresh}"
    try:
        parse_token_response(status, JSON, json.dumps(document).encode())
    except TokenError as error:
        for text in (str(error), repr(error)):
            assert secret not in text
            assert refresh not in text


@settings(max_examples=300)
@given(
    # Letters that the message template never contains, plus characters the sanitizer rewrites.
    secret=st.text(alphabet='QXZ0123456789"\\€ \n\t', min_size=12, max_size=80)
    .filter(lambda s: len(sanitize_excerpt(s, 200)) >= 12),
    before=st.text(max_size=150),
    after=st.text(max_size=50),
)
def test_an_echoed_client_secret_is_redacted_even_when_cut_short(
    secret: str, before: str, after: str
) -> None:
    """A server echoes the client secret inside a long description; the client redacts it afterwards."""
    with pytest.raises(TokenError) as caught:
        parse_token_response(400, JSON, oauth_error("invalid_request", before + secret + after))
    caught.value.redact([secret])
    message = str(caught.value)
    visible = sanitize_excerpt(secret, 200)
    # No run of 8 characters of the secret (as the message would show it) survives.
    for start in range(len(visible) - 7):
        assert visible[start:start + 8] not in message.replace("[redacted]", "\x00")
