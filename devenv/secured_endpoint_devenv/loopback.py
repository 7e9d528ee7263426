"""A threaded HTTP(S) server for the development stand-ins (token server, proxy) that really goes down.

``close_all`` stops accepting and cuts kept-alive connections, so a test that takes a server "down" sees
refused and reset connections, not a server that quietly keeps answering on old sockets.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restarting rebinds the same port right after going down
    request_queue_size = 256  # the default backlog of 5 drops bursts of concurrent connects

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 ssl_context: ssl.SSLContext | None) -> None:
        self.closing = threading.Event()  # wakes requests that wait (e.g. a slow answer) when going down
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)
        if ssl_context is not None:
            # the handshake happens in the handler thread (in its setup()), not in accept()
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on hosts without DNS
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up or reject the certificate are expected here; stay quiet."""

    def close_all(self) -> None:
        """Stop accepting, then cut kept-alive connections, so "down" really means down."""
        self.closing.set()
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)
