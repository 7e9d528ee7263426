"""Bad input matrix: every way the input can be wrong, and the Ready reason and message each must give.

Groups (the test ids start with the group):
- ``schema-*``: specs the apiserver refuses (OpenAPI schema and CEL rules), with the message the user sees;
  cases already in test_crd_schema.py are not repeated. The same specs sent as updates to a running
  endpoint are refused too, and its token stays.
- ``spec-*``: specs the schema accepts but the operator must judge (a tokenUrl no HTTP client can use or
  that carries credentials, a parameter from a missing key, a target that is a Secret the operator does
  not own, ...).
- ``secret-*``/``password-*``/``param-*``/``truststore-*``: the referenced Secrets and ConfigMaps — missing,
  wrong key, empty, only a newline, a trailing newline (works: stripped), non-UTF-8 bytes, a trust store
  that is no PEM bundle, ...
- ``response-*``: what the token server answers — HTML, empty, bad JSON, an array, no/empty
  access_token, no/odd token_type, negative/zero/absurd/non-numeric expires_in, more than 1 MiB, a
  redirect, 4xx/5xx, the OAuth error codes, too slow, a body cut short.
- ``net-*``: DNS failure, connection refused, TLS mismatches.

Every case runs from the start (``test_bad_input_from_the_start``: Ready=False with the reason, a message
naming the field/object/cause and saying that no valid token is in the targets, no token Secret); the
cases marked ``after_good`` also run after a good token was issued (``test_bad_input_after_a_good_token``):
the token stays in its Secret, unchanged, and the message says until when it stays usable. Accepted odd
inputs (a trailing newline, token_type bearer, an absurd expires_in, ...) must give a working token.
A 503/429 with ``Retry-After`` must not be retried sooner than the server asked
(``test_retry_after_is_honoured``).

Every secret the module hands out or its scripted server issues goes into ``secret_values`` (the session's
leak scan in test_secrets_never_leak.py runs after this module) and is looked for in the operator's log and
in every Event by the last test here, which also checks that the operator survived the whole matrix.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import re
import socket
import socketserver
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from secured_endpoint import api, tokens
from secured_endpoint_devenv.tokenserver import TokenServer, generate_ca
from tests.conftest import Kube, OperatorProcess

pytestmark = pytest.mark.e2e

NAME = "matrix"
TOKEN_SECRET = f"{NAME}-token"
WAIT = 10.0  # seconds for the operator to report a case
# Every secret value this module used; the last test looks for each in the operator log and the Events.
MATRIX_SECRETS: set[str] = set()
# Secrets that the spec itself carries (a tokenUrl with a password): scanned in the log and Events only,
# since the object that holds them is stored by the apiserver as written.
SPEC_SECRETS: set[str] = set()


def _random_secret(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- a scripted token server: answers whatever a case needs --------------------------------------------------

TOKEN_MARK = "<<TOKEN>>"  # replaced by a fresh random access token in every answer
JSON = "application/json;charset=UTF-8"


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    cut_short: bool = False  # announce more body than is sent, then hang up


def json_answer(document: Any, status: int = 200, **options: Any) -> Answer:
    return Answer(status=status, body=json.dumps(document).encode(), **options)


GOOD_ANSWER = json_answer({"access_token": TOKEN_MARK, "token_type": "Bearer", "expires_in": 3600})


class _ScriptedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: ScriptedServer, ssl_context: ssl.SSLContext | None) -> None:
        self.app = app
        self.closing = threading.Event()
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self) -> None:  # no FQDN lookup (it stalls on hosts without DNS)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up or refuse the certificate are part of the matrix."""


class _ScriptedHandler(BaseHTTPRequestHandler):
    server: _ScriptedHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 10

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        answer, body = self.server.app.reply(self.path)
        if answer.delay and self.server.closing.wait(answer.delay):
            self.close_connection = True
            return
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(body) + (100 if answer.cut_short else 0)))
        for name, value in answer.headers:
            self.send_header(name, value)
        if answer.cut_short:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        with contextlib.suppress(OSError):  # the client stops reading a huge body early
            self.wfile.write(body)


class ScriptedServer:
    """An HTTP(S) token endpoint on loopback that answers ``self.answer`` to every POST /oauth2/token
    (a fresh random access token wherever the answer has TOKEN_MARK), 404 to anything else. It does not
    check client credentials: cases that need a strict server use the devenv TokenServer."""

    def __init__(self, secrets: set[str], *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.answer = GOOD_ANSWER
        self.paths: list[str] = []
        self.issued: list[str] = []
        self._secrets = secrets
        self._lock = threading.Lock()
        self._http = _ScriptedHTTPServer(self, ssl_context)
        self._scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._http.server_address[1])

    @property
    def token_url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}/oauth2/token"

    @property
    def token_requests(self) -> int:
        with self._lock:
            return sum(1 for path in self.paths if path == "/oauth2/token")

    def reply(self, path: str) -> tuple[Answer, bytes]:
        with self._lock:
            self.paths.append(path)
            answer = self.answer
        if path != "/oauth2/token":
            return Answer(404, b"not found\n", "text/plain"), b"not found\n"
        body = answer.body
        if TOKEN_MARK.encode() in body:
            token = _random_secret("mtx-token")
            MATRIX_SECRETS.add(token)
            self._secrets.add(token)
            with self._lock:
                self.issued.append(token)
            body = body.replace(TOKEN_MARK.encode(), token.encode())
        return answer, body

    def stop(self) -> None:
        self._http.closing.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


def _server_ssl_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="matrix-tls-") as directory:
        cert, key = Path(directory, "tls.crt"), Path(directory, "tls.key")
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        context.load_cert_chain(cert, key)
    return context


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- one case's world: a namespace, a token server, credentials, and the endpoint's spec ---------------------


def _merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
    """JSON merge patch semantics (RFC 7386), as the apiserver applies ``patch_endpoint``."""
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass
class Env:
    kube: Kube
    namespace: str
    secret_values: set[str]
    request: pytest.FixtureRequest
    spec: dict[str, Any] = field(default_factory=dict)
    server: TokenServer | ScriptedServer | None = None
    client_id: str = ""
    client_secret: str = ""
    created: bool = False
    extra_servers: list[ScriptedServer] = field(default_factory=list)

    # -- baselines: a setup that gives a good token --

    def baseline(self, kind: Literal["http", "tls", "scripted"]) -> None:
        self.client_id = f"client-{uuid.uuid4().hex[:8]}"
        self.client_secret = self.remember(f"s3cr3t:{uuid.uuid4().hex}&+%")
        if kind == "scripted":
            self.server = self.scripted()
        else:
            server: TokenServer = self.request.getfixturevalue("token_server" if kind == "http"
                                                              else "tls_token_server")
            server.add_client(self.client_id, self.client_secret)
            self.server = server
        self.put_secret("oauth", {"client_id": self.client_id, "client_secret": self.client_secret})
        self.spec = {"tokenUrl": self.server.token_url, "clientSecretRef": {"name": "oauth"}}
        if kind == "tls":
            assert isinstance(self.server, TokenServer)
            self.put_configmap("idp-ca", {"ca.crt": self.server.ca_pem.decode()})
            self.spec["trustStore"] = {"configMapRef": {"name": "idp-ca", "key": "ca.crt"}}
        else:
            self.spec["allowInsecureHttp"] = True

    @property
    def tokens(self) -> TokenServer:
        assert isinstance(self.server, TokenServer), "this case needs the devenv token server"
        return self.server

    @property
    def scripted_server(self) -> ScriptedServer:
        assert isinstance(self.server, ScriptedServer), "this case needs the scripted server"
        return self.server

    def scripted(self, ssl_context: ssl.SSLContext | None = None) -> ScriptedServer:
        server = ScriptedServer(self.secret_values, ssl_context=ssl_context)
        self.extra_servers.append(server)
        return server

    def remember(self, secret: str) -> str:
        MATRIX_SECRETS.add(secret)
        self.secret_values.add(secret)
        return secret

    # -- what a case changes (before the endpoint exists, or on a running one) --

    def set_spec(self, **changes: Any) -> None:
        _merge(self.spec, changes)
        if self.created:
            self.kube.patch_endpoint(self.namespace, NAME, {"spec": changes})

    def answer(self, answer: Answer) -> None:
        self.scripted_server.answer = answer

    def put_secret(self, name: str, values: dict[str, str | bytes]) -> None:
        data = {key: base64.b64encode(value if isinstance(value, bytes) else value.encode()).decode()
                for key, value in values.items()}
        body = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), data=data)
        try:
            self.kube.core.replace_namespaced_secret(name, self.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.kube.core.create_namespaced_secret(self.namespace, body)

    def set_client_secret(self, value: str | bytes) -> None:
        self.put_secret("oauth", {"client_id": self.client_id, "client_secret": value})

    def delete_secret(self, name: str) -> None:
        self.kube.core.delete_namespaced_secret(name, self.namespace)

    def put_configmap(self, name: str, data: dict[str, str] | None = None,
                      binary: dict[str, bytes] | None = None) -> None:
        body = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name), data=data, binary_data={
            key: base64.b64encode(value).decode() for key, value in (binary or {}).items()} or None)
        try:
            self.kube.core.replace_namespaced_config_map(name, self.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.kube.core.create_namespaced_config_map(self.namespace, body)

    def delete_configmap(self, name: str) -> None:
        self.kube.core.delete_namespaced_config_map(name, self.namespace)

    def use_password_grant(self, *, password: str | bytes | None = None) -> None:
        username = f"user-{uuid.uuid4().hex[:8]}"
        real = self.remember(f"pa55:{uuid.uuid4().hex}")
        self.tokens.add_user(username, real)
        self.put_secret("user", {"username": username, "password": real if password is None else password})
        self.set_spec(grantType="Password", passwordSecretRef={"name": "user"})

    # -- the endpoint --

    def create(self) -> None:
        self.kube.create_endpoint(self.namespace, NAME, self.spec)
        self.created = True

    def force_refresh(self) -> None:
        self.kube.patch_endpoint(self.namespace, NAME, {"metadata": {"annotations": {
            api.REFRESH_ANNOTATION: uuid.uuid4().hex}}})

    def status(self) -> dict[str, Any]:
        return dict((self.kube.get_endpoint(self.namespace, NAME) or {}).get("status") or {})

    def token_secret(self, name: str = TOKEN_SECRET) -> dict[str, str] | None:
        return self.kube.secret_data(self.namespace, name)

    def wait(self, reason: str, *, ready: bool, timeout: float = WAIT) -> dict[str, Any]:
        """The Ready condition once it has this status and reason; on timeout, fail showing what it was."""
        wanted = "True" if ready else "False"
        deadline = time.monotonic() + timeout
        condition: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            condition = self.kube.ready(self.namespace, NAME)
            if condition and condition["status"] == wanted and condition["reason"] == reason:
                return condition
            time.sleep(0.05)
        pytest.fail(f"no Ready={wanted}/{reason} within {timeout:g}s; Ready is {condition!r}")


@pytest.fixture
def env(kube: Kube, namespace: str, secret_values: set[str], request: pytest.FixtureRequest,
        operator: OperatorProcess) -> Iterator[Env]:
    world = Env(kube, namespace, secret_values, request)
    yield world
    for server in world.extra_servers:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def log_offset(operator: OperatorProcess) -> int:
    """Where the operator's log stood when the matrix began."""
    return len(operator.log_text())


# -- the cases ---------------------------------------------------------------------------------------------

Check = Callable[[Env, dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    id: str
    baseline: Literal["http", "tls", "scripted"]
    breaks: Callable[[Env], None]  # applies the bad input (before the endpoint exists, or to a running one)
    reason: str
    fragments: tuple[str, ...]  # each must be in the Ready message
    after_good: bool = False  # also run it after a good token was issued
    check: Check | None = None  # extra assertions

    @property
    def ready(self) -> bool:
        return self.reason in (api.Reason.TOKEN_ISSUED, api.Reason.TOKEN_REFRESHED)


def _url_with_password(env: Env, template: str) -> None:
    password = f"urlpass{uuid.uuid4().hex}"
    SPEC_SECRETS.add(password)
    env.set_spec(tokenUrl=template.format(password=password))


def _no_spec_secret_in_message(env: Env, condition: dict[str, Any]) -> None:
    for secret in SPEC_SECRETS:
        assert secret not in condition["message"], "the password of the tokenUrl is in the message"


def _parameter_from(secret: str, key: str) -> dict[str, Any]:
    return {"parameters": [{"name": "tenant", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}]}


def _server_saw_the_stripped_secret(env: Env, condition: dict[str, Any]) -> None:
    [request] = [r for r in env.tokens.requests if r.status == 200]
    assert request.client_id == env.client_id  # the server checked the secret without the newline


def _credentials_secret_untouched(env: Env, condition: dict[str, Any]) -> None:
    assert env.kube.secret_data(env.namespace, "oauth") == {
        "client_id": env.client_id, "client_secret": env.client_secret}
    secret = env.kube.core.read_namespaced_secret("oauth", env.namespace)
    assert not secret.metadata.owner_references


def _token_type_kept(expected: str) -> Check:
    def check(env: Env, condition: dict[str, Any]) -> None:
        data = env.token_secret()
        assert data is not None
        assert data["token_type"] == expected
        assert data["authorization"] == data["credential"] == f"{expected} {data['access_token']}"
        assert env.status()["tokenType"] == expected
        assert data["access_token"] in env.scripted_server.issued
    return check


def _lifetime_between(low: timedelta, high: timedelta) -> Check:
    def check(env: Env, condition: dict[str, Any]) -> None:
        status = env.status()
        issued = datetime.fromisoformat(status["lastRefreshTime"].replace("Z", "+00:00"))
        expires = datetime.fromisoformat(status["expiresAt"].replace("Z", "+00:00"))
        assert low <= expires - issued <= high, f"lifetime {expires - issued}"
        data = env.token_secret()
        assert data is not None
        assert data["expires_at"] == status["expiresAt"]
    return check


def _no_request_followed_the_redirect(env: Env, condition: dict[str, Any]) -> None:
    assert "/login" not in env.scripted_server.paths, "the redirect was followed (credentials re-sent)"


def _client_secret_redacted(env: Env, condition: dict[str, Any]) -> None:
    assert env.client_secret not in condition["message"]
    assert tokens.client.form_urlencode(env.client_secret) not in condition["message"]
    assert "[redacted]" in condition["message"]


def _refresh_not_in_a_loop(env: Env, condition: dict[str, Any]) -> None:
    status = env.status()
    issued = datetime.fromisoformat(status["lastRefreshTime"].replace("Z", "+00:00"))
    refresh = datetime.fromisoformat(status["nextRefreshTime"].replace("Z", "+00:00"))
    assert refresh - issued >= timedelta(minutes=30), "refreshBeforeSeconds > lifetime: default third expected"
    time.sleep(1)
    assert env.tokens.token_requests == 1


def _non_ascii_client_secret(env: Env) -> None:
    secret = env.remember(f"pässwörd-€-{uuid.uuid4().hex}")
    env.tokens.add_client(env.client_id, secret)
    env.set_client_secret(secret)


def _other_ca_pem() -> str:
    return generate_ca("some other CA").cert_pem.decode()


def _hostname_mismatch(env: Env) -> None:
    ca = generate_ca("mismatch CA")
    server = env.scripted(_server_ssl_context(*ca.issue_server_certificate(["idp.other.invalid"])))
    env.put_configmap("idp-ca", {"ca.crt": ca.cert_pem.decode()})
    env.set_spec(tokenUrl=server.token_url)


def _https_to_a_plain_server(env: Env) -> None:
    env.set_spec(tokenUrl=env.scripted().token_url.replace("http://", "https://"), allowInsecureHttp=None)


def _private_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _huge_answer() -> Answer:
    padding = "x" * (3 * 1024 * 1024 // 2)  # 1.5 MiB of otherwise valid JSON
    return json_answer({"access_token": TOKEN_MARK, "token_type": "Bearer", "expires_in": 3600, "pad": padding})


def _token_answer(**fields: Any) -> Answer:
    document: dict[str, Any] = {"access_token": TOKEN_MARK, "token_type": "Bearer", "expires_in": 3600}
    for key, value in fields.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return json_answer(document)


def _oauth_error(code: str, status: int = 400) -> Answer:
    return json_answer({"error": code, "error_description": f"scripted {code}"}, status)


R = api.Reason
CA_KEY = "ConfigMap/idp-ca key 'ca.crt'"
NO_TOKEN = "no valid token is in the targets"

SPEC_CASES = [
    Case("spec-tokenurl-with-credentials", "http",
         lambda env: _url_with_password(env, "https://matrix:{password}@idp.invalid/oauth2/token"),
         R.INVALID_SPEC, ("spec", "tokenUrl must not carry credentials"), after_good=True,
         check=_no_spec_secret_in_message),
    # U+FF03 (fullwidth #) is not '#' for the CRD's pattern, but NFKC-normalizes to it for urlsplit.
    Case("spec-tokenurl-credentials-with-fullwidth-char", "http",
         lambda env: _url_with_password(env, "https://matrix:{password}\uff03x@idp.invalid/oauth2/token"),
         R.INVALID_SPEC, ("spec", "tokenUrl"), check=_no_spec_secret_in_message),
    Case("spec-tokenurl-broken-ipv6-host", "http",
         lambda env: env.set_spec(tokenUrl="https://[::1/oauth2/token"),
         R.INVALID_SPEC, ("tokenUrl",)),
    Case("spec-tokenurl-port-not-a-number", "http",
         lambda env: env.set_spec(tokenUrl="https://127.0.0.1:abc/oauth2/token"),
         R.INVALID_SPEC, ("tokenUrl",), after_good=True),
    Case("spec-tokenurl-port-out-of-range", "http",
         lambda env: env.set_spec(tokenUrl="https://127.0.0.1:99999/oauth2/token"),
         R.INVALID_SPEC, ("tokenUrl",)),
    Case("spec-tokenurl-malformed-idna-host", "http",
         lambda env: env.set_spec(tokenUrl="https://xn--/oauth2/token"),
         R.INVALID_SPEC, ("tokenUrl",)),
    Case("spec-tokenurl-host-not-a-dns-name", "http",
         lambda env: env.set_spec(tokenUrl="https://bad_host!.invalid/oauth2/token"),
         R.TOKEN_REQUEST_FAILED, ("bad_host!.invalid",)),
    Case("spec-parameter-from-missing-key", "http",
         lambda env: (env.put_secret("params", {"region": "eu"}),
                      env.set_spec(**_parameter_from("params", "tenant"))),
         R.CREDENTIALS_NOT_FOUND, ("Secret/params has no key 'tenant'", "spec.parameters[0].valueFrom.secretKeyRef"),
         after_good=True),
    Case("spec-parameter-from-missing-secret", "http",
         lambda env: env.set_spec(**_parameter_from("params", "tenant")),
         R.CREDENTIALS_NOT_FOUND, ("Secret/params not found",)),
    Case("spec-target-is-the-credentials-secret", "http",
         lambda env: env.set_spec(target={"secret": {"name": "oauth"}}),
         R.TARGET_WRITE_FAILED, ("Secret/oauth", "not managed by this SecuredEndpoint"), after_good=True,
         check=_credentials_secret_untouched),
    Case("spec-refresh-before-longer-than-lifetime", "http",
         lambda env: env.set_spec(refresh={"refreshBeforeSeconds": 7200}),
         R.TOKEN_ISSUED, ("valid until",), check=_refresh_not_in_a_loop),
]

SECRET_CASES = [
    Case("secret-missing", "http", lambda env: env.delete_secret("oauth"),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth not found in namespace",), after_good=True),
    Case("secret-key-missing", "http", lambda env: env.put_secret("oauth", {"client_id": env.client_id}),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth has no key 'client_secret'", "spec.clientSecretRef.clientSecretKey"),
         after_good=True),
    Case("secret-wrong-key-name", "http", lambda env: env.set_spec(clientSecretRef={"clientSecretKey": "secret"}),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth has no key 'secret'", "spec.clientSecretRef.clientSecretKey")),
    Case("secret-empty-value", "http", lambda env: env.set_client_secret(""),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth key 'client_secret' is empty", "spec.clientSecretRef"),
         after_good=True),
    Case("secret-only-newline", "http", lambda env: env.set_client_secret("\n"),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth key 'client_secret' is empty",)),
    Case("secret-only-crlf", "http", lambda env: env.set_client_secret("\r\n"),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth key 'client_secret' is empty",)),
    Case("secret-trailing-newline-is-stripped", "http", lambda env: env.set_client_secret(env.client_secret + "\n"),
         R.TOKEN_ISSUED, ("valid until",), check=_server_saw_the_stripped_secret),
    Case("secret-trailing-crlf-is-stripped", "http", lambda env: env.set_client_secret(env.client_secret + "\r\n"),
         R.TOKEN_ISSUED, ("valid until",), check=_server_saw_the_stripped_secret),
    Case("secret-two-trailing-newlines", "http", lambda env: env.set_client_secret(env.client_secret + "\n\n"),
         R.INVALID_CREDENTIALS, ("invalid_client",)),
    Case("secret-trailing-space-is-kept", "http", lambda env: env.set_client_secret(env.client_secret + " "),
         R.INVALID_CREDENTIALS, ("invalid_client",)),
    Case("secret-not-utf8", "http", lambda env: env.set_client_secret(b"\xff\xfe\x00secret"),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth key 'client_secret' is not UTF-8 text",
                                   "spec.clientSecretRef.clientSecretKey"), after_good=True),
    Case("secret-client-id-not-utf8", "http",
         lambda env: env.put_secret("oauth", {"client_id": b"\xc3\x28", "client_secret": env.client_secret}),
         R.CREDENTIALS_NOT_FOUND,
         ("Secret/oauth key 'client_id' is not UTF-8 text", "spec.clientSecretRef.clientIdKey")),
    Case("secret-client-id-empty", "http",
         lambda env: env.put_secret("oauth", {"client_id": "", "client_secret": env.client_secret}),
         R.CREDENTIALS_NOT_FOUND, ("Secret/oauth key 'client_id' is empty",)),
    Case("secret-wrong-client-secret", "http", lambda env: env.set_client_secret(env.remember(_random_secret("wrong"))),
         R.INVALID_CREDENTIALS, ("invalid_client", "HTTP 401"), after_good=True),
    Case("secret-non-ascii-utf8-works", "http", _non_ascii_client_secret, R.TOKEN_ISSUED, ("valid until",)),
    Case("password-key-missing", "http",
         lambda env: (env.use_password_grant(), env.put_secret("user", {"username": "someone"})),
         R.CREDENTIALS_NOT_FOUND, ("Secret/user has no key 'password'", "spec.passwordSecretRef.passwordKey")),
    Case("password-empty", "http", lambda env: env.use_password_grant(password=""),
         R.CREDENTIALS_NOT_FOUND, ("Secret/user key 'password' is empty", "spec.passwordSecretRef.passwordKey")),
    Case("password-wrong", "http",
         lambda env: env.use_password_grant(password=env.remember(_random_secret("wrong-password"))),
         R.INVALID_CREDENTIALS, ("invalid_grant",), after_good=True),
    Case("param-value-not-utf8", "http",
         lambda env: (env.put_secret("params", {"tenant": b"\xfe\xff"}),
                      env.set_spec(**_parameter_from("params", "tenant"))),
         R.CREDENTIALS_NOT_FOUND, ("Secret/params key 'tenant' is not UTF-8 text", "spec.parameters[0]")),
    Case("truststore-not-pem", "tls", lambda env: env.put_configmap("idp-ca", {"ca.crt": "this is not a certificate"}),
         R.TRUST_STORE_INVALID, (CA_KEY, "PEM", "spec.trustStore.configMapRef"), after_good=True),
    Case("truststore-empty", "tls", lambda env: env.put_configmap("idp-ca", {"ca.crt": ""}),
         R.TRUST_STORE_INVALID, (CA_KEY, "PEM", "spec.trustStore.configMapRef")),
    Case("truststore-configmap-missing", "tls", lambda env: env.delete_configmap("idp-ca"),
         R.CREDENTIALS_NOT_FOUND, ("ConfigMap/idp-ca not found",), after_good=True),
    Case("truststore-key-missing", "tls", lambda env: env.put_configmap("idp-ca", {"other.crt": _other_ca_pem()}),
         R.CREDENTIALS_NOT_FOUND, ("ConfigMap/idp-ca has no key 'ca.crt'", "spec.trustStore.configMapRef.key")),
    Case("truststore-garbage-pem", "tls",
         lambda env: env.put_configmap("idp-ca", {"ca.crt": "-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                                                            "-----END CERTIFICATE-----\n"}),
         R.TRUST_STORE_INVALID, (CA_KEY, "cannot be parsed", "spec.trustStore.configMapRef")),
    Case("truststore-binary-not-utf8", "tls",
         lambda env: env.put_configmap("idp-ca", binary={"ca.crt": b"\xff\xfe\x00\x01"}),
         R.TRUST_STORE_INVALID, (CA_KEY, "PEM", "spec.trustStore.configMapRef")),
    Case("truststore-private-key-only", "tls", lambda env: env.put_configmap("idp-ca", {"ca.crt": _private_key_pem()}),
         R.TRUST_STORE_INVALID, (CA_KEY, "PEM", "spec.trustStore.configMapRef")),
    Case("truststore-secret-not-pem", "tls",
         lambda env: (env.put_secret("idp-ca-secret", {"ca.crt": "plain text"}),
                      env.set_spec(trustStore={"configMapRef": None,
                                               "secretRef": {"name": "idp-ca-secret", "key": "ca.crt"}})),
         R.TRUST_STORE_INVALID, ("Secret/idp-ca-secret key 'ca.crt'", "PEM", "spec.trustStore.secretRef")),
]

RESPONSE_CASES = [
    Case("response-html", "http", lambda env: env.tokens.configure(fault="html"),
         R.INVALID_TOKEN_RESPONSE, ("not a JSON object", "content type text/html"), after_good=True),
    Case("response-empty-body", "http", lambda env: env.tokens.configure(fault="empty_body"),
         R.INVALID_TOKEN_RESPONSE, ("not a JSON object", "empty body"), after_good=True),
    Case("response-bad-json", "http", lambda env: env.tokens.configure(fault="bad_json"),
         R.INVALID_TOKEN_RESPONSE, ("not a JSON object",)),
    Case("response-json-array", "scripted", lambda env: env.answer(json_answer([{"access_token": TOKEN_MARK}])),
         R.INVALID_TOKEN_RESPONSE, ("not a JSON object",)),
    Case("response-deeply-nested-json", "scripted", lambda env: env.answer(Answer(body=b"[" * 100_000)),
         R.INVALID_TOKEN_RESPONSE, ("not a JSON object",)),
    Case("response-not-utf8", "scripted", lambda env: env.answer(Answer(body=b'\xff\xfe{"access_token": 1}')),
         R.INVALID_TOKEN_RESPONSE, ("not a JSON object",)),
    Case("response-missing-access-token", "http", lambda env: env.tokens.configure(fault="missing_access_token"),
         R.INVALID_TOKEN_RESPONSE, ("has no access_token",), after_good=True),
    Case("response-empty-access-token", "scripted", lambda env: env.answer(_token_answer(access_token="")),
         R.INVALID_TOKEN_RESPONSE, ("has an empty access_token",)),
    Case("response-access-token-a-number", "scripted", lambda env: env.answer(_token_answer(access_token=12345)),
         R.INVALID_TOKEN_RESPONSE, ("access_token that is not a string",)),
    Case("response-access-token-with-crlf", "scripted",
         lambda env: env.answer(_token_answer(access_token=TOKEN_MARK + "\r\nX-Injected: yes")),
         R.INVALID_TOKEN_RESPONSE, ("access_token with characters outside printable ASCII",)),
    Case("response-missing-token-type", "http", lambda env: env.tokens.configure(fault="missing_token_type"),
         R.INVALID_TOKEN_RESPONSE, ("has no token_type",)),
    Case("response-token-type-with-space", "scripted", lambda env: env.answer(_token_answer(token_type="Bearer x")),
         R.INVALID_TOKEN_RESPONSE, ("token_type that is not a short printable name",)),
    # RFC 6749 §7.1: any registered type is a valid answer; the Secret says which type it is.
    # only Bearer tokens can be handed to gateways as they are (DPoP and MAC need a proof per request)
    Case("response-token-type-mac", "scripted", lambda env: env.answer(_token_answer(token_type="mac")),
         R.INVALID_TOKEN_RESPONSE, ("token_type 'mac'", "only Bearer")),
    Case("response-token-type-dpop", "scripted", lambda env: env.answer(_token_answer(token_type="DPoP")),
         R.INVALID_TOKEN_RESPONSE, ("token_type 'DPoP'", "only Bearer")),
    Case("response-token-type-lowercase-bearer", "scripted", lambda env: env.answer(_token_answer(token_type="bearer")),
         R.TOKEN_ISSUED, ("valid until",), check=_token_type_kept("Bearer")),
    Case("response-expires-in-negative", "scripted", lambda env: env.answer(_token_answer(expires_in=-300)),
         R.INVALID_TOKEN_RESPONSE, ("expires_in that is not positive",), after_good=True),
    Case("response-expires-in-zero", "scripted", lambda env: env.answer(_token_answer(expires_in=0)),
         R.INVALID_TOKEN_RESPONSE, ("expires_in that is not positive",)),
    Case("response-expires-in-not-a-number", "scripted", lambda env: env.answer(_token_answer(expires_in="soon")),
         R.INVALID_TOKEN_RESPONSE, ("expires_in that is not a number",)),
    Case("response-expires-in-infinite", "scripted", lambda env: env.answer(_token_answer(expires_in="1e999")),
         R.INVALID_TOKEN_RESPONSE, ("expires_in that is not a finite number",)),
    # clamped by schedule.token_expiry to 366 days
    Case("response-expires-in-absurd", "scripted", lambda env: env.answer(_token_answer(expires_in=10**12)),
         R.TOKEN_ISSUED, ("valid until",), check=_lifetime_between(timedelta(days=365), timedelta(days=366))),
    Case("response-expires-in-numeric-string", "scripted", lambda env: env.answer(_token_answer(expires_in="900")),
         R.TOKEN_ISSUED, ("valid until",), check=_lifetime_between(timedelta(seconds=899), timedelta(seconds=901))),
    Case("response-larger-than-1-mib", "scripted", lambda env: env.answer(_huge_answer()),
         R.INVALID_TOKEN_RESPONSE, ("larger than 1024 KiB",), after_good=True),
    Case("response-redirect-302", "scripted",
         lambda env: env.answer(Answer(302, b"", "text/plain", headers=(
             ("Location", env.scripted_server.token_url.replace("/oauth2/token", "/login")),))),
         R.INVALID_TOKEN_RESPONSE, ("redirect (HTTP 302)", "not followed"), after_good=True,
         check=_no_request_followed_the_redirect),
    Case("response-http-500", "http", lambda env: env.tokens.configure(fault="500"),
         R.TOKEN_REQUEST_FAILED, ("HTTP 500",), after_good=True),
    Case("response-http-503-retry-after", "http", lambda env: env.tokens.configure(fault="503"),
         R.TOKEN_REQUEST_FAILED, ("HTTP 503", "temporarily_unavailable"), after_good=True),
    Case("response-http-429", "http", lambda env: env.tokens.configure(fault="429"),
         R.TOKEN_REQUEST_FAILED, ("HTTP 429",)),
    Case("response-http-404-wrong-path", "scripted",
         lambda env: env.set_spec(tokenUrl=env.scripted_server.token_url.replace("/oauth2/token", "/wrong/path")),
         R.TOKEN_REQUEST_FAILED, ("HTTP 404", "content type text/plain")),
    Case("response-bare-401", "scripted", lambda env: env.answer(Answer(401, b"Unauthorized\n", "text/plain")),
         R.INVALID_CREDENTIALS, ("refused the client credentials (HTTP 401",)),
    Case("response-invalid-client", "http", lambda env: env.tokens.configure(fault="invalid_client"),
         R.INVALID_CREDENTIALS, ("invalid_client",), after_good=True),
    Case("response-invalid-grant", "http", lambda env: env.tokens.configure(fault="invalid_grant"),
         R.INVALID_CREDENTIALS, ("invalid_grant",), after_good=True),
    Case("response-unauthorized-client", "http",
         lambda env: env.tokens.add_client(env.client_id, env.client_secret, grant_types=["password"]),
         R.INVALID_CREDENTIALS, ("unauthorized_client", "client_credentials grant")),
    Case("response-invalid-scope", "http",
         lambda env: (env.tokens.add_client(env.client_id, env.client_secret, scopes=["orders.read"]),
                      env.set_spec(scopes=["orders.admin"])),
         R.TOKEN_REQUEST_FAILED, ("invalid_scope",)),
    Case("response-error-with-http-200", "scripted", lambda env: env.answer(_oauth_error("invalid_grant", 200)),
         R.INVALID_CREDENTIALS, ("invalid_grant", "HTTP 200")),
    Case("response-echoes-the-request", "http",
         lambda env: (env.set_spec(clientAuthMethod="ClientSecretPost"), env.tokens.configure(fault="echo_request")),
         R.TOKEN_REQUEST_FAILED, ("invalid_request", "HTTP 400"), check=_client_secret_redacted),
    Case("response-slower-than-the-timeout", "http", lambda env: env.tokens.configure(delay_seconds=3.5),
         R.TOKEN_REQUEST_FAILED, ("timed out after 2s",), after_good=True),
    Case("response-body-cut-short", "scripted", lambda env: env.answer(
        Answer(body=b'{"access_token": "' + TOKEN_MARK.encode(), cut_short=True)),
         R.TOKEN_REQUEST_FAILED, ("failed", "peer closed connection")),
]

NETWORK_CASES = [
    # The message names the host whether the resolver fails at once ("cannot connect to ...") or is too slow.
    Case("net-dns-failure", "http", lambda env: env.set_spec(tokenUrl="https://does-not-exist.invalid/oauth2/token"),
         R.TOKEN_REQUEST_FAILED, ("does-not-exist.invalid",), after_good=True),
    Case("net-connection-refused", "http",
         lambda env: env.set_spec(tokenUrl=f"http://127.0.0.1:{_closed_port()}/oauth2/token"),
         R.TOKEN_REQUEST_FAILED, ("cannot connect to 127.0.0.1:",), after_good=True),
    Case("net-server-down", "http", lambda env: env.tokens.stop(),
         R.TOKEN_REQUEST_FAILED, ("cannot connect to 127.0.0.1:",), after_good=True),
    Case("net-tls-no-trust-store", "tls", lambda env: env.set_spec(trustStore=None),
         R.TRUST_STORE_INVALID, ("does not verify against the system CAs",), after_good=True),
    Case("net-tls-other-ca", "tls", lambda env: env.put_configmap("idp-ca", {"ca.crt": _other_ca_pem()}),
         R.TRUST_STORE_INVALID, ("does not verify against the trust store", "127.0.0.1"), after_good=True),
    Case("net-tls-hostname-mismatch", "tls", _hostname_mismatch,
         R.TRUST_STORE_INVALID, ("does not verify against the trust store", "mismatch")),
    Case("net-https-to-a-plain-http-server", "tls", _https_to_a_plain_server,
         R.TOKEN_REQUEST_FAILED, ("TLS handshake with 127.0.0.1", "failed")),
    Case("net-http-to-a-tls-server", "tls",
         lambda env: env.set_spec(tokenUrl=env.tokens.token_url.replace("https://", "http://"), allowInsecureHttp=True),
         R.TOKEN_REQUEST_FAILED, ("token request to 127.0.0.1", "failed")),
]

CASES = [*SPEC_CASES, *SECRET_CASES, *RESPONSE_CASES, *NETWORK_CASES]


# -- (a) refused by the apiserver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaCase:
    id: str
    changes: dict[str, Any] | None  # merged into a valid spec; None: no spec at all
    fragments: tuple[str, ...]  # each must be in the apiserver's message


VALID_SPEC: dict[str, Any] = {"tokenUrl": "https://idp.example.com/oauth2/token", "clientSecretRef": {"name": "oauth"}}

SCHEMA_CASES = [
    SchemaCase("schema-spec-missing", None, ("spec: Required value",)),
    SchemaCase("schema-tokenurl-missing", {"tokenUrl": None}, ("spec.tokenUrl: Required value",)),
    SchemaCase("schema-tokenurl-with-a-space", {"tokenUrl": "https://idp.example.com/oauth 2/token"},
               ("spec.tokenUrl", "tokenUrl must be an absolute https:// URL")),
    SchemaCase("schema-tokenurl-too-long", {"tokenUrl": "https://idp.example.com/" + "a" * 2048},
               ("spec.tokenUrl", "Too long", "2048")),
    SchemaCase("schema-tokenurl-not-a-string", {"tokenUrl": 42}, ("spec.tokenUrl", "must be of type string")),
    SchemaCase("schema-allow-insecure-http-a-string", {"allowInsecureHttp": "true"},
               ("spec.allowInsecureHttp", "must be of type boolean")),
    SchemaCase("schema-grant-type-rfc-spelling", {"grantType": "client_credentials"},
               ("spec.grantType", 'Unsupported value: "client_credentials"')),
    SchemaCase("schema-client-secret-ref-name-empty", {"clientSecretRef": {"name": ""}},
               ("spec.clientSecretRef.name", "at least 1 chars long")),
    SchemaCase("schema-client-secret-key-with-slash", {"clientSecretRef": {"clientSecretKey": "oauth/secret"}},
               ("spec.clientSecretRef.clientSecretKey", "should match")),
    SchemaCase("schema-password-key-with-space",
               {"grantType": "Password", "passwordSecretRef": {"name": "user", "passwordKey": "pass word"}},
               ("spec.passwordSecretRef.passwordKey", "should match")),
    SchemaCase("schema-scopes-a-string", {"scopes": "orders.read"}, ("spec.scopes", "must be of type array")),
    SchemaCase("schema-scopes-too-many", {"scopes": [f"s{i}" for i in range(65)]},
               ("spec.scopes", "must have at most 64 items")),
    SchemaCase("schema-scope-too-long", {"scopes": ["s" * 257]}, ("spec.scopes[0]", "Too long")),
    SchemaCase("schema-audience-too-long", {"audience": "a" * 2049}, ("spec.audience", "Too long")),
    SchemaCase("schema-parameters-too-many", {"parameters": [{"name": f"p{i}", "value": "v"} for i in range(33)]},
               ("spec.parameters", "must have at most 32 items")),
    SchemaCase("schema-parameter-name-empty", {"parameters": [{"name": "", "value": "v"}]},
               ("spec.parameters[0].name", "at least 1 chars long")),
    SchemaCase("schema-parameter-value-too-long", {"parameters": [{"name": "p", "value": "v" * 4097}]},
               ("spec.parameters[0].value", "Too long")),
    SchemaCase("schema-parameter-secret-key-ref-without-key",
               {"parameters": [{"name": "tenant", "valueFrom": {"secretKeyRef": {"name": "params"}}}]},
               ("spec.parameters[0].valueFrom.secretKeyRef.key: Required value",)),
    SchemaCase("schema-trust-store-without-key", {"trustStore": {"configMapRef": {"name": "idp-ca"}}},
               ("spec.trustStore.configMapRef.key: Required value",)),
    SchemaCase("schema-refresh-before-seconds-negative", {"refresh": {"refreshBeforeSeconds": -1}},
               ("spec.refresh.refreshBeforeSeconds", "greater than or equal to 0")),
    SchemaCase("schema-default-expires-in-above-366-days", {"refresh": {"defaultExpiresInSeconds": 31622401}},
               ("spec.refresh.defaultExpiresInSeconds", "less than or equal to 31622400")),
    SchemaCase("schema-default-expires-in-a-string", {"refresh": {"defaultExpiresInSeconds": "3600"}},
               ("spec.refresh.defaultExpiresInSeconds", "must be of type integer")),
    SchemaCase("schema-refresh-percent-a-fraction", {"refresh": {"refreshBeforePercent": 20.5}},
               ("spec.refresh.refreshBeforePercent", "must be of type integer")),
    SchemaCase("schema-suspend-a-string", {"suspend": "yes"}, ("spec.suspend", "must be of type boolean")),
    SchemaCase("schema-target-secret-name-uppercase", {"target": {"secret": {"name": "Orders-Token"}}},
               ("spec.target.secret.name", "should match")),
    SchemaCase("schema-target-label-not-a-string", {"target": {"secret": {"labels": {"team": 1}}}},
               ("spec.target.secret.labels.team", "must be of type string")),
    SchemaCase("schema-endpoints-too-many", {"endpoints": {f"env{i}": "https://x.internal" for i in range(17)}},
               ("spec.endpoints", "must have at most 16 items")),
]


def _apiserver_refusal(caught: pytest.ExceptionInfo[ApiException], case: SchemaCase) -> str:
    assert caught.value.status == 422, caught.value.body
    answer = json.loads(caught.value.body)
    assert answer["reason"] == "Invalid"
    for fragment in case.fragments:
        assert fragment in answer["message"], answer["message"]
    return str(answer["message"])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SCHEMA_CASES])
def test_refused_by_the_apiserver(kube: Kube, namespace: str, case: SchemaCase) -> None:
    body: dict[str, Any] = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                            "metadata": {"name": NAME, "namespace": namespace}}
    if case.changes is not None:
        body["spec"] = copy.deepcopy(VALID_SPEC)
        _merge(body["spec"], case.changes)
    with pytest.raises(ApiException) as caught:
        kube.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    _apiserver_refusal(caught, case)
    assert kube.get_endpoint(namespace, NAME) is None


def test_refused_updates_leave_the_running_endpoint_and_its_token_alone(env: Env) -> None:
    env.baseline("http")
    env.create()
    env.wait(R.TOKEN_ISSUED, ready=True)
    before = env.token_secret()
    generation = (env.kube.get_endpoint(env.namespace, NAME) or {})["metadata"]["generation"]
    for case in SCHEMA_CASES:
        with pytest.raises(ApiException) as caught:
            env.kube.patch_endpoint(env.namespace, NAME, {"spec": case.changes})
        _apiserver_refusal(caught, case)
    assert (env.kube.get_endpoint(env.namespace, NAME) or {})["metadata"]["generation"] == generation
    env.wait(R.TOKEN_ISSUED, ready=True, timeout=1)
    assert env.token_secret() == before
    assert env.tokens.token_requests == 1


# -- (b), (c), (d), (e): what the operator must judge -------------------------------------------------------


def _assert_message(condition: dict[str, Any], case: Case) -> None:
    for fragment in case.fragments:
        assert fragment in condition["message"], condition["message"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_from_the_start(env: Env, case: Case) -> None:
    env.baseline(case.baseline)
    case.breaks(env)
    env.create()
    condition = env.wait(case.reason, ready=case.ready)
    _assert_message(condition, case)
    if case.ready:
        data = env.token_secret()
        assert data is not None
        assert data["fingerprint"] == env.status()["tokenFingerprint"]
    else:
        assert NO_TOKEN in condition["message"], condition["message"]
        assert env.token_secret() is None
        assert env.status().get("consecutiveFailures", 0) >= 1
    if case.check is not None:
        case.check(env, condition)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.after_good])
def test_bad_input_after_a_good_token(env: Env, case: Case) -> None:
    env.baseline(case.baseline)
    env.create()
    env.wait(R.TOKEN_ISSUED, ready=True)
    before = env.token_secret()
    assert before is not None
    status_before = env.status()

    case.breaks(env)
    env.force_refresh()
    condition = env.wait(case.reason, ready=False)
    _assert_message(condition, case)
    assert f"the previous token stays usable until {before['expires_at']}" in condition["message"], \
        condition["message"]
    assert env.token_secret() == before, "a bad input cost the valid token"
    status = env.status()
    assert status["tokenFingerprint"] == status_before["tokenFingerprint"] == before["fingerprint"]
    assert status["expiresAt"] == before["expires_at"]
    if case.check is not None:
        case.check(env, condition)


@pytest.mark.parametrize(("fault", "status"), [("503", 503), ("429", 429)])
def test_retry_after_is_honoured(env: Env, fault: str, status: int) -> None:
    """A 503/429 with Retry-After: the next attempt is not planned before the server said."""
    env.baseline("scripted")
    env.answer(Answer(status, b"busy\n", "text/plain", headers=(("Retry-After", "20"),)))
    env.create()
    condition = env.wait(R.TOKEN_REQUEST_FAILED, ready=False)
    assert f"HTTP {status}" in condition["message"]
    recorded = env.status()
    failed = datetime.fromisoformat(recorded["lastFailureTime"].replace("Z", "+00:00"))
    retry = datetime.fromisoformat(recorded["nextRefreshTime"].replace("Z", "+00:00"))
    assert retry - failed >= timedelta(seconds=19), f"retry planned {retry - failed} after a Retry-After of 20 s"
    time.sleep(2)
    assert env.scripted_server.token_requests == 1


# -- after the whole matrix ---------------------------------------------------------------------------------


def test_the_operator_survived_the_matrix_and_leaked_nothing(operator: OperatorProcess, kube: Kube,
                                                             secret_values: set[str], log_offset: int) -> None:
    """Runs last in this module: the operator is alive, it hit no unexpected exception, and no secret the
    matrix used is in its log or in an Event (the session's leak scan looks again, with everything else)."""
    assert MATRIX_SECRETS, "the matrix handed out no secrets?"
    secret_values.update(MATRIX_SECRETS | SPEC_SECRETS)
    log = operator.log_text()
    events = json.dumps([event.to_dict() for event in kube.core.list_event_for_all_namespaces().items],
                        default=str)
    problems: list[str] = []
    for value in sorted(MATRIX_SECRETS | SPEC_SECRETS):
        for form in (value, base64.b64encode(value.encode()).decode().rstrip("=")):
            if form in log:
                problems.append(f"a secret value is in the operator log:\n{_excerpt(log, form)}")
            if form in events:
                problems.append("a secret value is in an Event")

    assert operator.process is not None
    if operator.process.poll() is not None:
        problems.append(f"the operator died during the matrix (exit code {operator.process.returncode})")
    matrix_log = log[log_offset:]
    if "Traceback" in matrix_log:
        problems.append("an unexpected exception in the operator:\n" + _excerpt(matrix_log, "Traceback"))
    if (unexpected := re.search(r"Reconciling \S+ failed \(.*", matrix_log)) is not None:
        problems.append(f"a reconcile failed with an exception that became no condition: {unexpected.group()}")
    assert not problems, "\n".join(problems)


def _excerpt(text: str, marker: str) -> str:
    start = text.find(marker)
    return text[max(0, start - 300): start + 1500] if start >= 0 else ""
