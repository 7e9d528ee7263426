"""A small but real HTTP proxy for tests: ``CONNECT`` tunnels (https token URLs) and absolute-URI requests
(http token URLs), optional Basic proxy authentication, optionally TLS to the proxy itself (an ``https://``
proxy, with a CA of its own: ``ca_pem``), and counters of what went through it.

Loopback only, both ways: it listens on 127.0.0.1 and connects only to loopback destinations (anything
else gets ``403``), so a test cannot turn it into a way out. Standard library only, one thread per
connection::

    with HttpProxy(credentials=("proxy-user", "s3cret")) as proxy:
        ...  # point a client at proxy.url
        proxy.connects          # ["127.0.0.1:41234", ...]: every CONNECT it tunnelled
        proxy.plain_requests    # ["http://127.0.0.1:41235/oauth2/token", ...]
        proxy.refused           # requests answered 407/403/502
"""

from __future__ import annotations

import base64
import binascii
import hmac
import http.client
import ipaddress
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from secured_endpoint_devenv.loopback import LoopbackHTTPServer

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te",
                         "trailer", "transfer-encoding", "upgrade", "proxy-authenticate"})
_MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Refusal:
    status: int
    target: str


class HttpProxy:
    """An HTTP/1.1 forward proxy on 127.0.0.1. ``port`` 0 picks a free one at the first ``start()``."""

    def __init__(self, *, port: int = 0, credentials: tuple[str, str] | None = None,
                 connect_timeout: float = 5.0, tls: bool = False) -> None:
        from secured_endpoint_devenv.tokenserver import _server_ssl_context, generate_ca

        self._ca = generate_ca("secured-endpoint devenv proxy CA") if tls else None
        self._ssl_context = (_server_ssl_context(*self._ca.issue_server_certificate(["127.0.0.1", "localhost"]))
                             if self._ca is not None else None)
        self._port = port
        self.credentials = credentials
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._connects: list[str] = []
        self._plain: list[str] = []
        self._refused: list[Refusal] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", self._port), self, self._ssl_context)
        self._port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"proxy:{self._port}", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.close_all()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the proxy has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        """The CA of the proxy's own certificate (``tls=True`` only)."""
        if self._ca is None:
            raise RuntimeError("the proxy runs without TLS")
        return self._ca.cert_pem

    # -- what went through --

    @property
    def connects(self) -> list[str]:
        with self._lock:
            return list(self._connects)

    @property
    def plain_requests(self) -> list[str]:
        with self._lock:
            return list(self._plain)

    @property
    def refused(self) -> list[Refusal]:
        with self._lock:
            return list(self._refused)

    def reset(self) -> None:
        with self._lock:
            self._connects.clear()
            self._plain.clear()
            self._refused.clear()

    # -- used by the handler --

    def _authorized(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            return False
        expected = f"{self.credentials[0]}:{self.credentials[1]}".encode()
        return hmac.compare_digest(decoded, expected)

    def _record(self, kind: str, target: str) -> None:
        with self._lock:
            (self._connects if kind == "connect" else self._plain).append(target)

    def _refuse(self, status: int, target: str) -> None:
        with self._lock:
            self._refused.append(Refusal(status, target))


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(LoopbackHTTPServer):
    def __init__(self, address: tuple[str, int], app: HttpProxy, ssl_context: ssl.SSLContext | None) -> None:
        self.app = app
        super().__init__(address, _Handler, ssl_context)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "secured-endpoint-devenv-proxy"
    timeout = 30
    rbufsize = 0  # unbuffered: nothing of a tunnel's first bytes may hide in a read buffer

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent."""

    def _deny(self, status: int, target: str, *, close: bool = True) -> None:
        self.server.app._refuse(status, target)
        self.send_response(status)
        if status == 407:
            self.send_header("Proxy-Authenticate", 'Basic realm="devenv-proxy"')
        self.send_header("Content-Length", "0")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def do_CONNECT(self) -> None:
        target = self.path
        host, _, port_text = target.rpartition(":")
        if not self.server.app._authorized(self.headers.get("Proxy-Authorization")):
            self._deny(407, target)
            return
        if not port_text.isdigit() or not _loopback(host):
            self._deny(403, target)
            return
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port_text)),
                                                timeout=self.server.app.connect_timeout)
        except OSError:
            self._deny(502, target)
            return
        self.server.app._record("connect", target)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            _relay(self.connection, upstream, idle_timeout=self.timeout)
        finally:
            upstream.close()

    def _forward(self) -> None:
        """A plain request in absolute form (``POST http://host:port/path``), forwarded with http.client."""
        target = self.path
        if not self.server.app._authorized(self.headers.get("Proxy-Authorization")):
            self._deny(407, target, close=False)
            self._discard_body()
            return
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname or not _loopback(parts.hostname):
            self._deny(403, target)
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= _MAX_BODY:
            self._deny(413, target)
            return
        body = _read_exactly(self.rfile, length) if length else None
        headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        connection = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                timeout=self.server.app.connect_timeout)
        try:
            connection.request(self.command, path, body=body, headers=headers)
            answer = connection.getresponse()
            content = answer.read()
        except OSError:
            self._deny(502, target)
            return
        finally:
            connection.close()
        self.server.app._record("plain", target)
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def _discard_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= _MAX_BODY:
            _read_exactly(self.rfile, length)

    do_GET = _forward
    do_POST = _forward


def _read_exactly(stream: Any, length: int) -> bytes:
    chunks, left = [], length
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _relay(client: socket.socket, upstream: socket.socket, *, idle_timeout: float) -> None:
    """Copy bytes both ways until either side closes, in this one thread (an ``ssl.SSLSocket`` must not
    be read and written from two threads at once)."""
    for sock in (client, upstream):
        sock.settimeout(idle_timeout)
    while True:
        readable: list[socket.socket]
        if isinstance(client, ssl.SSLSocket) and client.pending():
            readable = [client]  # decrypted bytes already buffered: select() would not see them
        else:
            readable, _, _ = select.select([client, upstream], [], [], idle_timeout)
        if not readable:
            return
        for sock in readable:
            other = upstream if sock is client else client
            try:
                chunk = sock.recv(65536)
            except ssl.SSLWantReadError:
                continue
            except OSError:
                return
            if not chunk:
                return
            try:
                other.sendall(chunk)
            except OSError:
                return
