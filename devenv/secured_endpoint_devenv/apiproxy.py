"""A fault-injecting reverse proxy in front of the real kube-apiserver, for the chaos scenarios.

It listens on plain HTTP on 127.0.0.1 (loopback only: the bearer token crosses it in the clear, so it never
leaves the machine) and forwards every request to the apiserver over TLS, trusting the control plane's CA and
passing the client's ``Authorization`` header on. Responses are streamed, so watches work through it.
:meth:`ApiProxy.write_kubeconfig` writes a kubeconfig naming the proxy, which the operator and kopf both take.

Knobs, changeable while it runs and from any thread (the tests drive it from theirs)::

    with ApiProxy(plane) as proxy:
        proxy.write_kubeconfig(path)
        proxy.add_fault(Fault(THROTTLE, share=0.3, retry_after=1))       # 429 + Retry-After, not forwarded
        proxy.add_fault(Fault(FAIL_AFTER, share=0.05))                   # forwarded, then answered 503
        proxy.add_fault(Fault(FAIL_BEFORE, share=0.05, match=Match(path=r"/events$")))  # 503, not forwarded
        hold = proxy.hold(Match(methods={"PATCH"}, path=r"/secrets/e-1-token$"))
        hold.held.wait(10)      # a matching request is being held
        hold.release()          # forwarded (dropped instead if its client has gone meanwhile)
        hold.drop()             # never forwarded; its connection is closed
        proxy.exchanges()       # every request: method, path, fault, upstream and answered status, ...
        proxy.counts()          # {("PATCH", "secrets"): 12, ...}

Faults are drawn per request: one uniform draw against the matching faults' shares laid end to end, so
``share`` is the fraction of matching requests each fault takes (:func:`choose_fault`). Only requests the
:class:`Match` accepts are eligible: by default the writes (POST, PUT, PATCH, DELETE). Watches are never faulted.

A request's ``digest`` (method, path, query and body) is the same for a client's retry of it, which is how
:func:`retry_gaps` pairs a 429 with the retry that followed it. Bodies are not kept, except of requests whose
path matches ``keep_bodies`` (say, Events, which carry no secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiohttp
from aiohttp import web

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
THROTTLE = "429"
FAIL_BEFORE = "503-before"  # answered 503 without forwarding: the server never saw it
FAIL_AFTER = "503-after"  # forwarded, the server acted, then answered 503: the client cannot know
HELD_DROPPED = "held-dropped"  # held, then dropped (or its client went away): never forwarded
FAULT_KINDS = frozenset({THROTTLE, FAIL_BEFORE, FAIL_AFTER})

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "proxy-authenticate", "host", "content-length"})


@dataclass(frozen=True)
class Match:
    """Which requests: a method among ``methods`` and a path (without the query) that ``path`` searches."""

    methods: Collection[str] = WRITES
    path: str | None = None

    def matches(self, method: str, path: str) -> bool:
        if method.upper() not in {m.upper() for m in self.methods}:
            return False
        return self.path is None or re.search(self.path, path) is not None


@dataclass(frozen=True)
class Fault:
    kind: str  # THROTTLE, FAIL_BEFORE or FAIL_AFTER
    share: float  # of the matching requests, 0..1
    match: Match = Match()
    retry_after: int = 1  # seconds, for THROTTLE

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError("a fault's share is between 0 and 1")


def choose_fault(faults: Sequence[Fault], method: str, path: str, draw: float) -> Fault | None:
    """The fault a request gets for a uniform ``draw`` in [0, 1): the matching faults' shares laid end to end
    (in order); past their sum, none. Shares summing to more than 1 leave the later faults starved."""
    edge = 0.0
    for fault in faults:
        if not fault.match.matches(method, path):
            continue
        edge += fault.share
        if draw < edge:
            return fault
    return None


_CORE = re.compile(r"^/api/v1/(?:namespaces/[^/]+/)?(?P<rest>.*)$")
_GROUPED = re.compile(r"^/apis/[^/]+/[^/]+/(?:namespaces/[^/]+/)?(?P<rest>.*)$")


def path_kind(path: str) -> str:
    """What a request path addresses, without names: ``secrets``, ``events``, ``securedendpoints/status``,
    ``namespaces`` (a namespace itself), or the path itself for anything else (discovery, /readyz)."""
    if path.startswith("/api/v1/namespaces/") and path.count("/") <= 4:
        return "namespaces"
    found = _CORE.match(path) or _GROUPED.match(path)
    if found is None:
        return path
    parts = [part for part in found["rest"].split("/") if part]
    if not parts:
        return path
    return f"{parts[0]}/{parts[2]}" if len(parts) >= 3 else parts[0]


def request_digest(method: str, path: str, query: str, body: bytes) -> str:
    """The same for a request and a client's exact retry of it."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), query.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Exchange:
    """One request through the proxy. ``at``: monotonic seconds when it arrived; ``upstream_status``: what the
    apiserver answered (None: never forwarded); ``status``: what the client was answered (0: nothing);
    ``answered_at``: monotonic seconds when the proxy began to send that answer (its headers); ``wall``: the
    arrival as ``time.time()``, to find it in the operator's log; ``user_agent``: which client sent it (the
    operator's own client, kopf's, a test's)."""

    at: float
    method: str
    path: str
    digest: str
    fault: str | None
    upstream_status: int | None
    status: int
    body: bytes | None = None
    answered_at: float | None = None
    wall: float | None = None
    user_agent: str | None = None

    @property
    def kind(self) -> str:
        return path_kind(self.path)

    @property
    def forwarded(self) -> bool:
        return self.upstream_status is not None


class _Timed(Protocol):
    @property
    def at(self) -> float: ...

    @property
    def digest(self) -> str: ...

    @property
    def status(self) -> int: ...


def retry_gaps(exchanges: Iterable[_Timed]) -> list[float]:
    """For every request answered 429, the seconds until the same request (by digest) came again; a 429 that
    no retry followed is left out."""
    ordered = sorted(exchanges, key=lambda exchange: exchange.at)
    gaps: list[float] = []
    for index, exchange in enumerate(ordered):
        if exchange.status != 429:
            continue
        retry = next((later for later in ordered[index + 1:] if later.digest == exchange.digest), None)
        if retry is not None:
            gaps.append(retry.at - exchange.at)
    return gaps


class Hold:
    """Holds the first ``count`` requests that ``match`` accepts until :meth:`release` or :meth:`drop`; later
    ones pass. ``held`` is set once one is being held; ``client_gone`` once a held request's client left."""

    def __init__(self, proxy: ApiProxy, match: Match, count: int) -> None:
        self.match, self.count = match, count
        self.held = threading.Event()
        self.client_gone = threading.Event()
        self.taken = 0
        self.decision: str | None = None  # "release" or "drop"
        self.outcomes: list[str] = []  # per held request: "forwarded" or "dropped"
        self._proxy = proxy
        self._decided = asyncio.Event()

    def release(self) -> None:
        """Forward the held requests — but only those whose client is still there."""
        self._decide("release")

    def drop(self) -> None:
        """Never forward the held requests; close their connections."""
        self._decide("drop")

    def _decide(self, decision: str) -> None:
        with self._proxy._lock:
            if self.decision is None:
                self.decision = decision
            if self in self._proxy._holds:
                self._proxy._holds.remove(self)
        self._proxy._loop.call_soon_threadsafe(self._decided.set)


class ApiProxy:
    """The proxy, its event loop in a thread of its own. ``upstream``: the apiserver's URL; ``ca_path``: the
    CA its serving certificate is signed by."""

    def __init__(self, upstream: str, ca_path: Path | str, *, token: str | None = None, port: int = 0,
                 keep_bodies: str | None = None, seed: int | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_path = str(ca_path)
        self.token = token  # for write_kubeconfig
        self.keep_bodies = keep_bodies
        self._port = port
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._holds: list[Hold] = []
        self._log: list[Exchange] = []
        self._rng = random.Random(seed)  # noqa: S311 - fault selection, not security
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_control_plane(cls, plane: Any, **options: Any) -> ApiProxy:
        """In front of a :class:`~secured_endpoint_devenv.controlplane.ControlPlane`, with its admin token."""
        return cls(plane.server, plane.ca_path, token=plane.admin_token, **options)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop.run_forever, name="apiproxy", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        with self._lock:
            holds, self._holds = list(self._holds), []
        for hold in holds:
            hold.drop()
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose server is the proxy (plain HTTP: no CA), with the upstream's bearer token."""
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "apiproxy", "cluster": {"server": self.url}}],
            "users": [{"name": "apiproxy", "user": {"token": self.token}}],
            "contexts": [{"name": "apiproxy", "context": {"cluster": "apiproxy", "user": "apiproxy"}}],
            "current-context": "apiproxy",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    # -- knobs (any thread) ------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def hold(self, match: Match, *, count: int = 1) -> Hold:
        hold = Hold(self, match, count)
        with self._lock:
            self._holds.append(hold)
        return hold

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._log)

    def counts(self) -> Counter[tuple[str, str]]:
        """Requests by (method, path kind)."""
        return Counter((exchange.method, exchange.kind) for exchange in self.exchanges())

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- the server (the proxy's loop) ---------------------------------------------------------------

    async def _start(self) -> None:
        tls = ssl.create_default_context(cafile=self.ca_path)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=0), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0))
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # a handler is cancelled when its client goes away: a held request of a killed operator knows it
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        server = getattr(site, "_server", None)
        if self._port == 0 and server is not None and server.sockets:
            self._port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _pick(self, method: str, path: str, watch: bool) -> tuple[Hold | None, Fault | None]:
        with self._lock:
            for hold in self._holds:
                if hold.decision is None and hold.taken < hold.count and hold.match.matches(method, path):
                    hold.taken += 1
                    return hold, None
            if watch:
                return None, None
            return None, choose_fault(self._faults, method, path, self._rng.random())

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self._log.append(exchange)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived, wall = time.monotonic(), time.time()
        body = await request.read()
        method, path, query = request.method.upper(), request.path, request.query_string
        watch = request.query.get("watch") in ("true", "1")
        hold, fault = self._pick(method, path, watch)
        digest = request_digest(method, path, query, body)
        kept = body if self.keep_bodies and re.search(self.keep_bodies, path) else None

        def record(fault_kind: str | None, upstream: int | None, status: int) -> None:
            self._record(Exchange(arrived, method, path, digest, fault_kind, upstream, status, kept,
                                  answered_at=time.monotonic(), wall=wall,
                                  user_agent=request.headers.get("User-Agent")))

        if hold is not None:
            with self._lock:
                hold.held.set()
            try:
                await hold._decided.wait()
            except asyncio.CancelledError:
                hold.outcomes.append("dropped")
                hold.client_gone.set()
                record(HELD_DROPPED, None, 0)
                raise
            if hold.decision == "drop" or request.transport is None or request.transport.is_closing():
                hold.outcomes.append("dropped")
                record(HELD_DROPPED, None, 0)
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=503)
            hold.outcomes.append("forwarded")
        if fault is not None and fault.kind == THROTTLE:
            record(THROTTLE, None, 429)
            return _status_response(429, "TooManyRequests", "the proxy throttles this request",
                                    {"Retry-After": str(fault.retry_after)})
        if fault is not None and fault.kind == FAIL_BEFORE:
            record(FAIL_BEFORE, None, 503)
            return _status_response(503, "ServiceUnavailable", "the proxy failed this request before forwarding")
        assert self._session is not None
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _HOP_BY_HOP}
        url = self.upstream + path + (f"?{query}" if query else "")
        try:
            async with self._session.request(method, url, headers=headers, data=body or None) as upstream:
                if fault is not None:  # FAIL_AFTER: the server acted; the client hears otherwise
                    await upstream.read()
                    record(FAIL_AFTER, upstream.status, 503)
                    return _status_response(503, "ServiceUnavailable",
                                            "the proxy failed this request after forwarding")
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        response.headers.add(name, value)
                record(None, upstream.status, upstream.status)
                await response.prepare(request)
                with contextlib.suppress(ConnectionResetError):
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                return response
        except aiohttp.ClientConnectorError:  # the apiserver is down: as a load balancer in front of it says
            record(None, None, 502)
            return _status_response(502, "BadGateway", "the proxy cannot reach the apiserver")


def _status_response(status: int, reason: str, message: str,
                     headers: dict[str, str] | None = None) -> web.Response:
    document = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": status}
    return web.json_response(document, status=status, headers=headers)


__all__ = ["FAIL_AFTER", "FAIL_BEFORE", "HELD_DROPPED", "THROTTLE", "WRITES", "ApiProxy", "Exchange", "Fault",
           "Hold", "Match", "choose_fault", "path_kind", "request_digest", "retry_gaps"]

