"""The scale suite: the operator on the local real stack, beside its targets and beside the floor, in one run.

    .venv/bin/python benchmarks/scale_suite.py                 # everything: 25-45 min on 2 cores
    .venv/bin/python benchmarks/scale_suite.py --only B1       # one scenario (comma-separated list)
    .venv/bin/python benchmarks/scale_suite.py --quick         # everything, sized down: a smoke run (~4 min)
    .venv/bin/python benchmarks/scale_suite.py --profile       # also py-spy profiles of the operator

Each scenario gets a fresh local control plane (kube-apiserver + etcd, watch cache on); one token server (its
own process, so that it never shares an interpreter with the driver) and one redis-server serve them all. The
operator is always its own process, started as users start it (``run --all-namespaces``, Redis configured),
and measured from ``/proc/<pid>``: VmRSS, VmHWM (peak) and utime + stime (CPU), sampled every 0.1 s.

- **B0 unrelated Secrets**: 0 / 10,000 / 50,000 Secrets of 1 KiB (plus, from the first non-zero step, 500
  Helm-release-sized ones of 100 KiB) in 50 other namespaces; a fresh operator with 5 waiting endpoints:
  start → first token, peak RSS, CPU until the tokens are written. Startup spread 0, so that the figure is the
  watches' cost, not the spread's random delay.
- **B1 burst**: 1, 100, 1,000 SecuredEndpoints created at once (50 creates in flight) → all Ready: per
  endpoint create → Ready p50/p99/max, all Ready after the first create, throughput; the operator's API calls
  per endpoint (counted by the apiserver). Beside it the **floor**: a plain httpx client, no operator, that
  does for each (pre-created) endpoint what the product must do at least — the token request, the token
  Secret create, the status patch — with the operator's concurrency (32 jobs, 20 API requests in flight); and
  the floor again with the creates in the same burst.
- **B2 steady state**: 10,000 endpoints with 120-s tokens on one replica (created before the operator starts;
  its cold start is timed: spawn → every endpoint taken in → every endpoint holding a token), then three
  refresh cycles watched: RSS, CPU, token requests per endpoint per cycle (from the token server's log: the
  gaps between one endpoint's consecutive requests over the expected gap; 1.00 when every endpoint asks once per
  cycle, less when refreshes are late), API requests per refresh (the apiserver's ``apiserver_request_total``
  before and after, LIST/WATCH left out: those are the driver's), and the smallest remaining lifetime of any
  token Secret at any moment (a watch of every token Secret: what a reader of any of them could see). Then a
  restart: time to hand over every endpoint again, and the token requests sent for tokens that were not due.
- **B3 rotation**: one credential Secret shared by 1,000 endpoints is rotated (to a second client of the token
  server) → every token Secret holds a new token: per endpoint p50/p99/max.
- **K kopf's watch** (issue 8 part 5): 10,000 suspended endpoints — no token, no refresh, only kopf's watch
  of them — a cold start (the operator writes each one's status once) and a restart (it writes nothing):
  spawn → every endpoint taken in, CPU per endpoint, peak RSS.
- **H the HTTP client**: CPU per request to the apiserver of httpx (the token client's; HTTP/2 too when
  the ``h2`` package is importable) and of aiohttp (kopf's, and since that measurement the operator's Kubernetes
  API client), with 20 and 64 connections.

Prints every figure beside its target and writes ``scale_suite.json`` and ``scale_suite-B*.png`` into
``--output`` (default ``docs/benchmarks/``; ``--quick`` defaults to a temporary directory so that a smoke run
never overwrites the committed figures). ``--only`` updates just those scenarios in an existing JSON.
``--profile`` records each measured phase with ``py-spy record`` (attached to the operator's pid, non-blocking)
and writes a summary of the top frames per phase to ``profiles/``. A benchmark, not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import collections
import contextlib
import itertools
import json
import os
import platform
import re
import resource as rusage
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.redisserver import RedisServer
from secured_endpoint_devenv.tokenserver import TokenServer
from secured_endpoint_gateway import wire

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "benchmarks"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("B0", "B1", "B2", "B3", "K", "H")
MANAGED = f"{api.MANAGED_BY_LABEL}={api.MANAGED_BY_VALUE}"
SEP_PATH = f"/apis/{api.GROUP}/{api.VERSION}"
# the operator's defaults (SEP_REFRESH_CONCURRENCY, SEP_KUBE_MAX_IN_FLIGHT): the floor works with the same
REFRESH_CONCURRENCY, KUBE_IN_FLIGHT = 32, 20
CREATES_IN_FLIGHT = 50  # the driver's "at once"
# How often the driver reads the operator's /metrics while it waits: a scrape of an operator with 10,000
# endpoints costs it tens of milliseconds of CPU (a series per endpoint), so not more often than this.
SCRAPE_INTERVAL = 1.0

TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "B0": {"first_token_seconds": ("<=", 10.0), "peak_rss_mib": ("<=", 150.0)},
    "B1": {"all_ready_seconds": ("<=", 5.0), "throughput_vs_floor": (">=", 0.5)},
    "B2": {"rss_mib": ("<=", 400.0), "cpu_cores": ("<=", 0.3), "token_requests_per_cycle": ("==", 1.0),
           "min_remaining_seconds": (">", 0.0)},
    "B3": {"p99_seconds": ("<=", 5.0)},
}


@dataclass(frozen=True)
class Sizes:
    b0_counts: tuple[int, ...] = (0, 10_000, 50_000)
    b0_big: int = 500  # Helm-release-sized Secrets, added with the first non-zero step
    b0_namespaces: int = 50
    b1_bursts: tuple[int, ...] = (1, 100, 1_000)
    b2_endpoints: int = 10_000
    b2_lifetime: int = 120
    b2_cycles: int = 3
    b3_endpoints: int = 1_000
    b3_rotations: int = 2
    b1_redis: bool = True  # B1 once more at the largest size, the token to Redis only


QUICK = Sizes(b0_counts=(0, 2_000), b0_big=20, b0_namespaces=10, b1_bursts=(1, 100), b2_endpoints=300,
              b2_lifetime=30, b2_cycles=3, b3_endpoints=100, b3_rotations=1, b1_redis=False)


# -- measuring a process -----------------------------------------------------------------------------------


def process_cpu(pids: Iterable[int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process, by its command name (``kube-apiserver``, ``etcd``…)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def proc_figures(pid: int) -> tuple[int, int, float]:
    """(VmRSS KiB, VmHWM KiB, CPU seconds user + system) of a live process."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, hwm, (int(stat[11]) + int(stat[12])) / CLOCK_TICKS


@dataclass
class Sampler:
    """Samples a process's /proc every ``interval`` seconds in a thread: (monotonic, RSS KiB, HWM KiB, CPU s)."""

    pid: int
    interval: float = 0.1
    history: list[tuple[float, int, int, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sampler:
        threading.Thread(target=self._run, daemon=True, name=f"sampler {self.pid}").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.history.append((time.monotonic(), *proc_figures(self.pid)))
            except (OSError, IndexError, ValueError):
                return  # the process is gone
            self._stop.wait(self.interval)

    def now(self) -> tuple[float, int, int, float]:
        return (time.monotonic(), *proc_figures(self.pid))

    def peak_mib(self) -> float:
        return max((hwm for _, _, hwm, _ in self.history), default=0) / 1024

    def between(self, start: float, end: float) -> list[tuple[float, int, int, float]]:
        return [row for row in self.history if start <= row[0] <= end]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the token server, in a process of its own -------------------------------------------------------------


def serve_idp(port_file: Path, clients: list[str]) -> int:
    """The child: a TokenServer plus a second loopback port that hands out its request log."""
    server = TokenServer()
    for pair in clients:
        client_id, _, secret = pair.partition(":")
        server.add_client(client_id, secret)
    server.start()

    class Log(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            after = int(parse_qs(urlsplit(self.path).query).get("after", ["0"])[0])
            rows = [[r.time, r.client_id, r.form.get("resource"), r.status] for r in server.requests[after:]]
            body = json.dumps(rows).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    log = ThreadingHTTPServer(("127.0.0.1", 0), Log)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=log.shutdown).start())
    port_file.write_text(json.dumps({"token_url": server.token_url, "admin": server.url,
                                     "log": f"http://127.0.0.1:{log.server_address[1]}"}))
    log.serve_forever()
    server.stop()
    return 0


class Idp:
    """The driver's handle on the token server process."""

    def __init__(self, workdir: Path, clients: dict[str, str]) -> None:
        self._port_file = workdir / "idp.json"
        self._clients = clients
        self.process: subprocess.Popen[bytes] | None = None
        self.token_url = self.admin = self.log = ""

    def __enter__(self) -> Idp:
        args = [f"{client_id}:{secret}" for client_id, secret in self._clients.items()]
        self.process = subprocess.Popen([sys.executable, __file__, "--serve-idp", str(self._port_file), *args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._port_file.exists() or not self._port_file.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the token server did not start")
            time.sleep(0.05)
        urls = json.loads(self._port_file.read_text())
        self.token_url, self.admin, self.log = urls["token_url"], urls["admin"], urls["log"]
        return self

    def __exit__(self, *_: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)

    def configure(self, **knobs: Any) -> None:
        request = urllib.request.Request(f"{self.admin}/admin/config", data=json.dumps(knobs).encode(),  # noqa: S310
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback
            pass

    def requests(self, after: int = 0) -> list[tuple[float, str, str | None, int]]:
        """Every token request so far (from index ``after``): (wall time, client id, resource, status)."""
        with urllib.request.urlopen(f"{self.log}/?after={after}", timeout=60) as response:  # noqa: S310
            return [tuple(row) for row in json.loads(response.read())]  # type: ignore[misc]

    def count(self) -> int:
        with urllib.request.urlopen(f"{self.admin}/admin/stats", timeout=10) as response:  # noqa: S310
            return int(json.loads(response.read())["token_requests"])


# -- the driver's Kubernetes client (plain httpx) -----------------------------------------------------------


class Api:
    """The driver's own access to the control plane, as its admin: bounded, and watches on connections of their
    own. aiohttp, not httpx: it costs a tenth of the CPU per request (scenario H), CPU the operator and the
    apiserver need more on 2 cores. The floor uses httpx, as the operator does."""

    def __init__(self, plane: controlplane.ControlPlane, in_flight: int = CREATES_IN_FLIGHT) -> None:
        self.plane = plane
        self._tls = ssl.create_default_context(cafile=str(plane.ca_path))
        self._headers = {"Authorization": f"Bearer {plane.admin_token}", "Accept": "application/json"}
        self._in_flight = in_flight
        self._http: aiohttp.ClientSession | None = None
        self._watches: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:  # made on the running loop
            self._http = aiohttp.ClientSession(
                self.plane.server, headers=self._headers, timeout=aiohttp.ClientTimeout(total=120),
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=self._in_flight))
        return self._http

    @property
    def watches(self) -> aiohttp.ClientSession:
        if self._watches is None:
            self._watches = aiohttp.ClientSession(
                self.plane.server, headers=self._headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=0))
        return self._watches

    async def aclose(self) -> None:
        for session in (self._http, self._watches):
            if session is not None:
                await session.close()

    async def call(self, method: str, path: str, body: Any = None, *, merge: bool = False,
                   params: dict[str, str] | None = None, missing_ok: bool = False,
                   conflict_ok: bool = False) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json" if merge else "application/json"}
        data = json.dumps(body) if body is not None else None
        for attempt in range(8):
            async with self.http.request(method, path, data=data, params=params, headers=headers) as response:
                text = await response.read()
                status = response.status
            if status in (429, 500, 503, 504) and attempt < 7:
                await asyncio.sleep(0.2 * 2 ** attempt)
                continue
            if (status == 404 and missing_ok) or (status == 409 and conflict_ok):
                return {}
            if status >= 400:
                raise RuntimeError(f"{method} {path}: {status} {text[:300]!r}")
            return json.loads(text) if text else {}  # type: ignore[no-any-return]
        raise AssertionError("unreachable")

    async def namespace(self, name: str) -> None:
        await self.call("POST", "/api/v1/namespaces", {"metadata": {"name": name}}, conflict_ok=True)

    async def secret(self, namespace: str, name: str, values: dict[str, str], **meta: Any) -> dict[str, Any]:
        body = {"metadata": {"name": name, **meta}, "stringData": values}
        return await self.call("POST", f"/api/v1/namespaces/{namespace}/secrets", body)

    async def gather_bounded(self, jobs: Iterable[Callable[[], Awaitable[Any]]], workers: int) -> None:
        """Run the jobs, ``workers`` at a time (a fixed pool of coroutines: never thousands at once)."""
        queue = iter(jobs)

        async def worker() -> None:
            for job in queue:
                await job()

        await asyncio.gather(*(worker() for _ in range(workers)))

    @contextlib.asynccontextmanager
    async def watch(self, path: str, on_event: Callable[[str, dict[str, Any], float], None], *,
                    label_selector: str = "") -> AsyncIterator[None]:
        """Watch ``path`` (a collection) from now on; ``on_event(type, object, monotonic time)`` per event."""
        params = {"limit": "1"}
        if label_selector:
            params["labelSelector"] = label_selector
        listed = await self.call("GET", path, params=params)
        version = listed["metadata"]["resourceVersion"]
        established = asyncio.Event()

        async def run() -> None:
            watch_params = {"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                            "timeoutSeconds": "3600"}
            if label_selector:
                watch_params["labelSelector"] = label_selector
            async with self.watches.get(path, params=watch_params) as response:
                established.set()
                buffer = b""
                async for chunk in response.content.iter_any():
                    at = time.monotonic()
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            event = json.loads(line)
                            if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                                on_event(event["type"], event["object"], at)

        task = asyncio.create_task(run())
        await asyncio.wait_for(established.wait(), 30)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def apiserver_requests(plane: controlplane.ControlPlane) -> collections.Counter[tuple[str, str]]:
    """``apiserver_request_total`` summed over codes: (verb, resource[/subresource]) -> count."""
    status, text = plane.get("/metrics", timeout=60)
    if status != 200:
        raise RuntimeError(f"apiserver /metrics: {status}")
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels_text, value = line[len("apiserver_request_total{"):].rsplit("} ", 1)
            labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[(labels.get("verb", ""), resource)] += int(float(value))
    return counts


def request_diff(before: collections.Counter[tuple[str, str]], after: collections.Counter[tuple[str, str]],
                 *, minus: dict[tuple[str, str], int] | None = None) -> dict[str, int]:
    """What was asked in between, without LIST/WATCH (the driver's) and without ``minus`` (the driver's
    known writes): ``{"VERB resource": count}``."""
    diff = after.copy()
    diff.subtract(before)
    for key, count in (minus or {}).items():
        diff[key] -= count
    return {f"{verb} {resource}": count for (verb, resource), count in sorted(diff.items())
            if count > 0 and verb not in ("LIST", "WATCH")}


# -- the operator ------------------------------------------------------------------------------------------


class Operator:
    """The operator as users run it, its own process; figures from /proc, endpoints from its /metrics."""

    def __init__(self, ctx: Context, name: str, *, env: dict[str, str] | None = None,
                 scope: tuple[str, ...] = ("--all-namespaces",)) -> None:
        self.ctx = ctx
        self.name = name
        self.env = env or {}
        self.scope = scope
        self.log_path = ctx.workdir / f"operator-{name}.log"
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None
        self.spawned = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Operator:
        environment = {**os.environ, "KUBECONFIG": str(self.ctx.plane.kubeconfig_path),
                       "SEP_METRICS_PORT": str(self.metrics_port), "SEP_REDIS_URL": self.ctx.redis_url,
                       **self.env}
        with self.log_path.open("ab") as log:
            self.spawned = time.monotonic()
            command = [self.ctx.operator_script] if self.ctx.operator_script else ["-m", "secured_endpoint.cli"]
            self.process = subprocess.Popen([sys.executable, *command, "run", *self.scope],
                                            env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.sampler = Sampler(self.process.pid).start()
        atexit.register(self._kill)  # never an operator left behind, whatever ends the driver
        return self

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def wait_started(self, limit: float = 120) -> float:
        """Until it logs that it started; the monotonic time it was seen."""
        deadline = time.monotonic() + limit
        while "secured-endpoint-operator started" not in self.log_path.read_text(errors="replace"):
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"operator {self.name} did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.02)
        return time.monotonic()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self, grace: float = 10.0) -> tuple[float, bool]:
        """SIGTERM, then SIGKILL after ``grace`` seconds: (seconds until it was gone, whether it exited by
        itself)."""
        if self.sampler is not None:
            self.sampler.stop()
        if self.process is None or self.process.poll() is not None:
            return 0.0, True
        started = time.monotonic()
        self.process.terminate()
        try:
            self.process.wait(grace)
            exited = True
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            exited = False
        return time.monotonic() - started, exited

    @contextlib.contextmanager
    def profiled(self, phase: str) -> Iterator[None]:
        """py-spy record of this phase (with ``--profile``): a summary of the top frames into profiles/."""
        if not self.ctx.profile:
            yield
            return
        raw = self.ctx.workdir / f"{phase}.collapsed"
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(self.pid),
                                "--format", "raw", "--rate", "100", "--nonblocking", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
            if raw.exists():
                self.ctx.profiles[phase] = summarise_profile(raw, self.ctx.output / "profiles" / f"{phase}.txt")


# -- profiles ----------------------------------------------------------------------------------------------


LIBRARIES = ("secured_endpoint_gateway", "secured_endpoint", "kopf", "httpx", "httpcore", "h11", "anyio", "aiohttp",
             "pydantic", "pydantic_core", "prometheus_client", "redis", "kubernetes", "yaml", "jwt", "cryptography")


def _module(frame: str) -> str:
    """The top-level module of a py-spy frame ``function (path/to/file.py:line)``."""
    path = frame[frame.rfind("(") + 1:].rstrip(")") if "(" in frame else frame
    for library in LIBRARIES:
        if path.startswith(library + "/") or f"/{library}/" in path:
            return library
    return path.split("/")[0].split(".py")[0] if "/" in path else path.split(".py")[0].split(":")[0]


def _library(frames: list[str]) -> str:
    """Who spends a sample: the innermost frame in a library or in the operator; the standard library's time
    (asyncio, ssl, json, …) is charged to whoever called it."""
    for frame in reversed(frames):
        module = _module(frame)
        if module in LIBRARIES:
            return module
    return "stdlib (event loop, no library)"


def summarise_profile(raw: Path, out: Path) -> dict[str, Any]:
    """py-spy's collapsed stacks → where the CPU went: by package (self time), top functions self and
    inclusive. Written to ``out`` as text; returned as a dict for the JSON."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.strip() for frame in stack.split(";") if frame.strip()]
        frames = [frame for frame in frames if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        own[leaf] += count
        packages[_library(frames)] += count
        leaves[_module(leaf)] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"samples": 0}

    def share(count: int) -> float:
        return round(100 * count / total, 1)

    summary = {
        "samples": total,
        "by_library_percent": {name: share(count) for name, count in packages.most_common()},
        "by_leaf_module_percent": {name: share(count) for name, count in leaves.most_common(15)},
        "top_self": [[frame, share(count)] for frame, count in own.most_common(20)],
        "top_inclusive": [[frame, share(count)] for frame, count in inclusive.most_common(40)
                          if not frame.startswith(("<module>", "run (asyncio", "run_forever", "_run_once",
                                                   "_run (asyncio/events", "run_until_complete"))][:30],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"py-spy record, 100 Hz, non-blocking: {total} samples of the operator's CPU", "",
             "by library (%; the standard library's time is charged to the library that called it):"]
    lines += [f"  {share(count):5.1f}  {name}" for name, count in packages.most_common()]
    lines += ["", "by the module of the innermost frame (%):"]
    lines += [f"  {share(count):5.1f}  {name}" for name, count in leaves.most_common(15)]
    lines += ["", "top functions, self time (%):"]
    lines += [f"  {percent:5.1f}  {frame}" for frame, percent in summary["top_self"]]
    lines += ["", "top functions, inclusive (%):"]
    lines += [f"  {percent:5.1f}  {frame}" for frame, percent in summary["top_inclusive"]]
    out.write_text("\n".join(lines) + "\n")
    return summary


# -- shared context ----------------------------------------------------------------------------------------


@dataclass
class Context:
    sizes: Sizes
    workdir: Path
    output: Path
    idp: Idp
    redis_url: str
    profile: bool
    operator_script: str | None = None  # a patched build to compare, instead of -m secured_endpoint.cli
    plane: controlplane.ControlPlane = field(init=False)
    profiles: dict[str, Any] = field(default_factory=dict)


def endpoint_body(ctx: Context, name: str, *, secret: str = "oauth",  # noqa: S107 - a Secret's name
                  target: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"tokenUrl": ctx.idp.token_url, "allowInsecureHttp": True,
                            "clientSecretRef": {"name": secret},
                            # the token server's log tells the endpoints apart by this parameter
                            "parameters": [{"name": "resource", "value": f"urn:sep:{name}"}]}
    if target is not None:
        spec["target"] = target
    return {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def endpoints_path(namespace: str) -> str:
    return f"{SEP_PATH}/namespaces/{namespace}/{api.PLURAL}"


def is_ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or ())


def token_of(secret: dict[str, Any]) -> tuple[str, float] | None:
    """(fingerprint, expires_at as a POSIX time) of a token Secret."""
    data = secret.get("data") or {}
    try:
        fingerprint = base64.b64decode(data["fingerprint"]).decode()
        expires = wire.parse_expires_at(base64.b64decode(data["expires_at"]).decode()).timestamp()
    except (KeyError, ValueError):
        return None
    return fingerprint, expires


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"p50": round(at(0.5), 3), "p90": round(at(0.9), 3), "p99": round(at(0.99), 3),
            "max": round(ordered[-1], 3), "min": round(ordered[0], 3)}


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# -- B0: unrelated Secrets ---------------------------------------------------------------------------------


async def b0(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    client = Api(ctx.plane, in_flight=64)
    rows: list[dict[str, Any]] = []
    created_small = created_big = 0
    try:
        for index in range(sizes.b0_namespaces):
            await client.namespace(f"bulk-{index:02d}")
        for step, count in enumerate(sizes.b0_counts):
            big = sizes.b0_big if count and not created_big else 0
            if count > created_small or big:
                started = time.monotonic()
                await create_unrelated(client, first=created_small, last=count, big=big,
                                       namespaces=sizes.b0_namespaces)
                seconds = time.monotonic() - started
                print(f"  B0: created {count - created_small:,} Secrets of 1 KiB"
                      + (f" and {big} of 100 KiB" if big else "") + f" in {seconds:.0f} s", flush=True)
                created_small, created_big = count, created_big + big
            rows.append(await b0_start(ctx, client, step=step, unrelated=created_small, big=created_big))
            row = rows[-1]
            print(f"  B0 {created_small:,} (+{created_big} big): first token {row['spawn_to_first_token_s']} s "
                  f"after spawn, peak RSS {row['peak_rss_mib']} MiB, CPU {row['cpu_to_all_tokens_s']} s", flush=True)
    finally:
        await client.aclose()
    last = rows[-1]
    return {"rows": rows, "at": last["unrelated_secrets"],
            "figures": {"first_token_seconds": last["spawn_to_first_token_s"], "peak_rss_mib": last["peak_rss_mib"]}}


async def create_unrelated(client: Api, *, first: int, last: int, big: int, namespaces: int) -> None:
    """Secrets ``first`` … ``last - 1`` of 1 KiB of random data, and ``big`` Helm-release-like ones of 100 KiB."""
    def small(number: int) -> Callable[[], Awaitable[Any]]:
        body = {"metadata": {"name": f"app-{number:06d}", "labels": {"app": f"app-{number % 97}"}}, "type": "Opaque",
                "data": {"blob": base64.b64encode(os.urandom(768)).decode()}}  # 1 KiB once base64-encoded
        return lambda: client.call("POST", f"/api/v1/namespaces/bulk-{number % namespaces:02d}/secrets", body)

    def release(number: int) -> Callable[[], Awaitable[Any]]:
        body = {"metadata": {"name": f"sh.helm.release.v1.app-{number:03d}.v1",
                             "labels": {"owner": "helm", "name": f"app-{number:03d}", "status": "deployed"}},
                "type": "helm.sh/release.v1", "data": {"release": base64.b64encode(os.urandom(75 * 1024)).decode()}}
        return lambda: client.call("POST", f"/api/v1/namespaces/bulk-{number % namespaces:02d}/secrets", body)

    jobs = [*(release(number) for number in range(big)), *(small(number) for number in range(first, last))]
    await client.gather_bounded(jobs, workers=64)


async def b0_start(ctx: Context, client: Api, *, step: int, unrelated: int, big: int, endpoints: int = 5
                   ) -> dict[str, Any]:
    namespace = f"b0-{step}"
    await client.namespace(namespace)
    await client.secret(namespace, "oauth", {"client_id": "bench", "client_secret": "bench-secret"})
    for number in range(endpoints):
        await client.call("POST", endpoints_path(namespace), endpoint_body(ctx, f"ep-{number}"))
    operator = Operator(ctx, f"b0-{step}", env={"SEP_STARTUP_SPREAD_SECONDS": "0"}).start()
    assert operator.sampler is not None
    try:
        with operator.profiled(f"B0-{unrelated}-start"):
            started = await operator.wait_started()
            first = None
            deadline = time.monotonic() + 600
            while True:
                listed = await client.call("GET", f"/api/v1/namespaces/{namespace}/secrets",
                                           params={"labelSelector": MANAGED})
                tokens = len(listed["items"])
                now = time.monotonic()
                if tokens and first is None:
                    first = now
                if tokens >= endpoints:
                    break
                if now > deadline or operator.process is None or operator.process.poll() is not None:
                    raise SystemExit(f"B0: no tokens with {unrelated} Secrets:\n{operator.log_tail()}")
                await asyncio.sleep(0.02)
            cpu_all = operator.sampler.now()[3]
        assert first is not None
        await asyncio.sleep(3)
        _, rss, hwm, _ = operator.sampler.now()
        return {"unrelated_secrets": unrelated, "big_secrets": big, "endpoints": endpoints,
                "spawn_to_started_s": round(started - operator.spawned, 2),
                "spawn_to_first_token_s": round(first - operator.spawned, 2),
                "started_to_first_token_s": round(first - started, 2),
                "spawn_to_all_tokens_s": round(now - operator.spawned, 2),
                "peak_rss_mib": round(max(hwm, max(h for _, _, h, _ in operator.sampler.history)) / 1024, 1),
                "settled_rss_mib": round(rss / 1024, 1), "cpu_to_all_tokens_s": round(cpu_all, 2),
                "load_average": load_average()}
    finally:
        operator.stop()


# -- B1: burst ---------------------------------------------------------------------------------------------


async def b1(ctx: Context) -> dict[str, Any]:
    client = Api(ctx.plane)
    rows: list[dict[str, Any]] = []
    try:
        await client.secret("default", "oauth", {"client_id": "bench", "client_secret": "bench-secret"})
        floors: dict[int, dict[str, Any]] = {}
        for count in ctx.sizes.b1_bursts:  # no operator runs yet: the floor has the control plane to itself
            floors[count] = await floor(ctx, client, count, with_creates=False)
            floors[count]["with_creates"] = await floor(ctx, client, count, with_creates=True)
            print(f"  B1 floor {count:,}: {floors[count]['seconds']} s ({floors[count]['throughput_per_s']}/s); "
                  f"with the creates {floors[count]['with_creates']['seconds']} s", flush=True)
        operator = Operator(ctx, "b1").start()
        try:
            await operator.wait_started()
            await asyncio.sleep(2)
            for count in ctx.sizes.b1_bursts:
                row = await burst(ctx, client, operator, count, label=str(count))
                row["floor"] = floors[count]
                row["throughput_vs_floor"] = round(row["throughput_per_s"] / floors[count]["throughput_per_s"], 2)
                row["throughput_vs_floor_with_creates"] = round(
                    row["throughput_per_s"] / floors[count]["with_creates"]["throughput_per_s"], 2)
                rows.append(row)
                print(f"  B1 {count:,}: all Ready {row['all_ready_s']} s, p50/p99/max {row['latency_s'].get('p50')}/"
                      f"{row['latency_s'].get('p99')}/{row['latency_s'].get('max')} s, {row['throughput_per_s']}/s "
                      f"= {row['throughput_vs_floor']} x the floor; {row['api_requests_per_endpoint']} API requests "
                      f"per endpoint", flush=True)
            if ctx.sizes.b1_redis:
                count = ctx.sizes.b1_bursts[-1]
                row = await burst(ctx, client, operator, count, label=f"{count} redis",
                                  target={"redis": {"enabled": True}})
                rows.append(row)
                print(f"  B1 {count:,} to Redis: all Ready {row['all_ready_s']} s", flush=True)
        finally:
            operator.stop()
    finally:
        await client.aclose()
    largest = next(row for row in rows if row["label"] == str(ctx.sizes.b1_bursts[-1]))
    return {"rows": rows, "at": largest["endpoints"],
            "figures": {"all_ready_seconds": largest["all_ready_s"],
                        "throughput_vs_floor": largest["throughput_vs_floor"]}}


async def burst(ctx: Context, client: Api, operator: Operator, count: int, *, label: str,
                target: dict[str, Any] | None = None) -> dict[str, Any]:
    namespace = f"burst-{label.replace(' ', '-')}"
    await client.namespace(namespace)
    await client.secret(namespace, "oauth", {"client_id": "bench", "client_secret": "bench-secret"})
    created: dict[str, float] = {}
    ready: dict[str, float] = {}
    done = asyncio.Event()

    def on_event(kind: str, obj: dict[str, Any], at: float) -> None:
        name = obj["metadata"]["name"]
        if kind != "DELETED" and name not in ready and is_ready(obj):
            ready[name] = at
            if len(ready) == count:
                done.set()

    def create(name: str) -> Callable[[], Awaitable[None]]:
        async def job() -> None:
            await client.call("POST", endpoints_path(namespace), endpoint_body(ctx, name, target=target))
            created[name] = time.monotonic()
        return job

    assert operator.sampler is not None
    async with client.watch(endpoints_path(namespace), on_event):
        before = await asyncio.to_thread(apiserver_requests, ctx.plane)
        idp_before = await asyncio.to_thread(ctx.idp.count)
        cpu_before = operator.sampler.now()[3]
        with operator.profiled(f"B1-{label.replace(' ', '-')}"):
            first = time.monotonic()
            await client.gather_bounded([create(f"ep-{n:05d}") for n in range(count)], workers=CREATES_IN_FLIGHT)
            created_all = time.monotonic() - first
            await asyncio.wait_for(done.wait(), 600)
            last = max(ready.values())
        cpu = operator.sampler.now()[3] - cpu_before
        await asyncio.sleep(1)  # the last status patch's Event
        after = await asyncio.to_thread(apiserver_requests, ctx.plane)
        idp_after = await asyncio.to_thread(ctx.idp.count)
    calls = request_diff(before, after, minus={("POST", api.PLURAL): count})
    latencies = [ready[name] - created[name] for name in ready]
    elapsed = last - first
    return {"label": label, "endpoints": count, "target": "redis" if target else "secret",
            "creates_s": round(created_all, 2), "all_ready_s": round(elapsed, 2),
            "throughput_per_s": round(count / elapsed, 1), "latency_s": percentiles(latencies),
            "operator_cpu_s": round(cpu, 2), "cpu_ms_per_endpoint": round(cpu * 1000 / count, 1),
            "token_requests": idp_after - idp_before, "api_requests": calls,
            "api_requests_per_endpoint": round(sum(calls.values()) / count, 2), "load_average": load_average()}


async def floor(ctx: Context, client: Api, count: int, *, with_creates: bool) -> dict[str, Any]:
    """The least the work can cost: per endpoint one token request, one Secret create, one status patch, with
    the operator's concurrency (32 jobs, 20 API requests in flight) and the operator's HTTP clients, used plainly:
    aiohttp for the apiserver, httpx for the token server."""
    namespace = f"floor-{count}-{'c' if with_creates else 'w'}"
    await client.namespace(namespace)
    names = [f"ep-{n:05d}" for n in range(count)]
    uids: dict[str, str] = {}
    if not with_creates:  # created beforehand, not timed
        async def make(name: str) -> None:
            uids[name] = (await client.call("POST", endpoints_path(namespace), endpoint_body(ctx, name)))[
                "metadata"]["uid"]
        await client.gather_bounded([lambda name=name: make(name) for name in names], workers=CREATES_IN_FLIGHT)
    tls = ssl.create_default_context(cafile=str(ctx.plane.ca_path))
    kube = aiohttp.ClientSession(ctx.plane.server, connector=aiohttp.TCPConnector(ssl=tls, limit=KUBE_IN_FLIGHT),
                                 timeout=aiohttp.ClientTimeout(total=60),
                                 headers={"Authorization": f"Bearer {ctx.plane.admin_token}"})
    tokens = httpx.AsyncClient(timeout=30, auth=("bench", "bench-secret"),
                               limits=httpx.Limits(max_connections=REFRESH_CONCURRENCY))
    finished: list[float] = []
    creates = asyncio.Semaphore(CREATES_IN_FLIGHT)
    try:
        async def job(name: str) -> None:
            if with_creates:
                async with creates:
                    uids[name] = (await client.call("POST", endpoints_path(namespace), endpoint_body(ctx, name)))[
                        "metadata"]["uid"]
            async with refresh_slots:
                answer = await tokens.post(ctx.idp.token_url, data={"grant_type": "client_credentials",
                                                                    "resource": f"urn:sep:{name}"})
                answer.raise_for_status()
                token = answer.json()
                now = datetime.now(UTC)
                expires = now + timedelta(seconds=int(token["expires_in"]))
                fingerprint = "sha256:" + base64.b16encode(os.urandom(6)).decode().lower()
                secret = {"metadata": {"name": f"{name}-token", "labels": {api.MANAGED_BY_LABEL: api.MANAGED_BY_VALUE},
                                       "ownerReferences": [{"apiVersion": f"{api.GROUP}/{api.VERSION}",
                                                            "kind": api.KIND, "name": name, "uid": uids[name],
                                                            "controller": True, "blockOwnerDeletion": True}]},
                          "type": "Opaque", "stringData": {
                              "access_token": token["access_token"], "token_type": "Bearer",
                              "expires_at": wire.format_expires_at(expires),
                              "authorization": f"Bearer {token['access_token']}",
                              "credential": f"Bearer {token['access_token']}", "fingerprint": fingerprint}}
                async with kube.post(f"/api/v1/namespaces/{namespace}/secrets", json=secret) as response:
                    response.raise_for_status()
                    await response.read()
                stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
                status = {"status": {
                    "observedGeneration": 1, "tokenType": "Bearer", "expiresAt": wire.format_expires_at(expires),
                    "lastRefreshTime": stamp, "nextRefreshTime": stamp, "consecutiveFailures": 0,
                    "tokenFingerprint": fingerprint, "sourceVersions": {"Secret/oauth": "1"},
                    "targets": {"secret": {"name": f"{name}-token"}},
                    "conditions": [{"type": "Ready", "status": "True", "reason": "TokenIssued",
                                    "message": "token valid", "observedGeneration": 1,
                                    "lastTransitionTime": stamp}]}}
                async with kube.patch(f"{endpoints_path(namespace)}/{name}/status", data=json.dumps(status),
                                      headers={"Content-Type": "application/merge-patch+json"}) as response:
                    response.raise_for_status()
                    await response.read()
            finished.append(time.monotonic())

        refresh_slots = asyncio.Semaphore(REFRESH_CONCURRENCY)
        started = time.monotonic()
        # every job at once (the operator's scheduler likewise holds them all), the semaphores bound the work
        await asyncio.gather(*(job(name) for name in names))
        elapsed = max(finished) - started
    finally:
        await kube.close()
        await tokens.aclose()
    # clean up without an operator: no finalizers were added, the token Secrets go by label
    await client.call("DELETE", endpoints_path(namespace))
    await client.call("DELETE", f"/api/v1/namespaces/{namespace}/secrets", params={"labelSelector": MANAGED})
    return {"endpoints": count, "seconds": round(elapsed, 3), "throughput_per_s": round(count / elapsed, 1)}


# -- B2: steady state --------------------------------------------------------------------------------------


@dataclass
class TokenWatch:
    """Every token Secret's current token, from a watch: refreshes and the smallest remaining lifetime."""

    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # namespace/name -> (fingerprint, expires)
    refreshes: list[tuple[float, float, str]] = field(default_factory=list)  # (monotonic, wall, name) new tokens
    # (wall time, remaining lifetime of the token replaced then): the least any reader could have seen
    replaced: list[tuple[float, float]] = field(default_factory=list)
    deleted: int = 0

    def on_event(self, kind: str, obj: dict[str, Any], at: float) -> None:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        if kind == "DELETED":
            self.tokens.pop(key, None)
            self.deleted += 1
            return
        token = token_of(obj)
        if token is None:
            return
        now = time.time()
        old = self.tokens.get(key)
        if old is None or old[0] != token[0]:
            if old is not None:
                self.replaced.append((now, old[1] - now))
            self.tokens[key] = token
            self.refreshes.append((at, now, key))

    def min_remaining(self, now: float | None = None) -> float | None:
        """Now: the shortest remaining lifetime among the tokens the Secrets hold."""
        if not self.tokens:
            return None
        return min(expires for _, expires in self.tokens.values()) - (now or time.time())

    def min_remaining_between(self, start: float, end: float) -> float | None:
        """The least remaining lifetime any Secret showed at any moment in [start, end] (wall times): at each
        replacement the old token's, and at ``end`` every current one's."""
        values = [left for at, left in self.replaced if start <= at <= end]
        current = self.min_remaining(end)
        if current is not None:
            values.append(current)
        return min(values) if values else None


async def b2(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    count, lifetime = sizes.b2_endpoints, sizes.b2_lifetime
    cycle = lifetime * 2 / 3  # the default refresh: a third of the lifetime before expiry
    window = sizes.b2_cycles * cycle
    client = Api(ctx.plane)
    watch = TokenWatch()
    ctx.idp.configure(lifetime_seconds=lifetime)
    namespace = "steady"
    result: dict[str, Any] = {"endpoints": count, "lifetime_s": lifetime, "cycles": sizes.b2_cycles,
                              "window_s": round(window, 1)}
    try:
        await client.namespace(namespace)
        await client.secret(namespace, "oauth", {"client_id": "bench", "client_secret": "bench-secret"})
        # created before the operator runs: the driver's creates are not what is measured here
        first = time.monotonic()
        await client.gather_bounded(
            [lambda n=n: client.call("POST", endpoints_path(namespace), endpoint_body(ctx, f"ep-{n:05d}"))
             for n in range(count)], workers=CREATES_IN_FLIGHT)
        created = time.monotonic() - first
        print(f"  B2: {count:,} endpoints created in {created:.0f} s (no operator running)", flush=True)
        idp_start = await asyncio.to_thread(ctx.idp.count)
        async with client.watch("/api/v1/secrets", watch.on_event, label_selector=MANAGED):
            operator = Operator(ctx, "b2").start()
            assert operator.sampler is not None
            try:
                # -- a cold start with 10,000 endpoints and no token yet: kopf lists them, the operator fetches
                with operator.profiled("B2-cold-start"):
                    started = await operator.wait_started()
                    seen_all = None
                    limit = max(600.0, count / 10)
                    while len(watch.tokens) < count and time.monotonic() - started < limit:
                        if seen_all is None and (operator.metric("secured_endpoint_endpoints_managed") or 0) >= count:
                            seen_all = time.monotonic()
                        await asyncio.sleep(SCRAPE_INTERVAL)
                now = time.monotonic()
                result["cold_start"] = {
                    "creates_s": round(created, 1), "spawn_to_started_s": round(started - operator.spawned, 2),
                    "spawn_to_all_endpoints_s": round((seen_all or now) - operator.spawned, 2),
                    "spawn_to_all_tokens_s": round(now - operator.spawned, 1), "tokens": len(watch.tokens),
                    "throughput_per_s": round(len(watch.tokens) / (now - started), 1),
                    "peak_rss_mib": round(operator.sampler.peak_mib(), 1), "cpu_s": round(operator.sampler.now()[3], 1),
                    "load_average": load_average()}
                print(f"  B2 cold start: every endpoint seen {result['cold_start']['spawn_to_all_endpoints_s']} s "
                      f"after spawn, {len(watch.tokens):,} tokens after {now - operator.spawned:.0f} s", flush=True)
                # -- the steady window
                result["window"] = await b2_window(ctx, operator, watch, window=window, lifetime=lifetime,
                                                   count=count, idp_start=idp_start)
                print(f"  B2 window: RSS {result['window']['rss_mib']} MiB, CPU {result['window']['cpu_cores']} "
                      f"cores, {result['window']['refreshes']} refreshes, "
                      f"{result['window']['api_requests_per_refresh']} API requests each, min remaining "
                      f"{result['window']['min_remaining_s']} s", flush=True)
                print("  B2 window, cores by process: " + ", ".join(
                    f"{name} {value}" for name, value in result["window"]["cores_by_process"].items()), flush=True)
                # -- the restart: kopf's watch of every endpoint (part 5)
                result["restart"] = await b2_restart(ctx, operator, watch, count=count, lifetime=lifetime)
                operator = result["restart"].pop("operator")
                print(f"  B2 restart: started {result['restart']['spawn_to_started_s']} s, every endpoint seen "
                      f"{result['restart']['spawn_to_all_endpoints_s']} s after spawn; "
                      f"{result['restart']['token_requests_not_due']} token requests for tokens not due", flush=True)
            finally:
                operator.stop()
    finally:
        await client.aclose()
    window_result = result["window"]
    result["figures"] = {"rss_mib": window_result["rss_mib"], "cpu_cores": window_result["cpu_cores"],
                         "token_requests_per_cycle": window_result["token_requests_per_cycle"],
                         "min_remaining_seconds": window_result["min_remaining_s"]}
    result["at"] = count
    return result


async def b2_window(ctx: Context, operator: Operator, watch: TokenWatch, *, window: float, lifetime: int,
                    count: int, idp_start: int) -> dict[str, Any]:
    assert operator.sampler is not None
    before = await asyncio.to_thread(apiserver_requests, ctx.plane)
    # where the machine's two cores go: the control plane, the token server and this driver beside the operator
    idp_pids = [ctx.idp.process.pid] if ctx.idp.process is not None else []
    plane_start, driver_start = process_cpu(ctx.plane.pids), sum(os.times()[:2])
    idp_cpu_start = sum(process_cpu(idp_pids).values())
    start_mono, start_wall = time.monotonic(), time.time()
    cpu_start = operator.sampler.now()[3]
    refreshes_start = len(watch.refreshes)
    series: list[list[float]] = []  # [t, refreshes so far, min remaining now, RSS MiB, CPU s]
    with operator.profiled("B2-steady"):
        while (elapsed := time.monotonic() - start_mono) < window:
            _, rss, _, cpu = operator.sampler.now()
            remaining = watch.min_remaining()
            series.append([round(elapsed, 1), len(watch.refreshes) - refreshes_start,
                           round(remaining, 1) if remaining is not None else -1, round(rss / 1024, 1),
                           round(cpu - cpu_start, 2)])
            await asyncio.sleep(1.0)
    end_mono, end_wall = time.monotonic(), time.time()
    _, rss_end, _, cpu_end = operator.sampler.now()
    plane_end, driver_end = process_cpu(ctx.plane.pids), sum(os.times()[:2])
    span = end_mono - start_mono
    cores = {name: round((plane_end[name] - plane_start.get(name, 0.0)) / span, 3) for name in plane_end}
    cores.update({"token server": round((sum(process_cpu(idp_pids).values()) - idp_cpu_start) / span, 3),
                  "operator": round((cpu_end - cpu_start) / span, 3),
                  "driver": round((driver_end - driver_start) / span, 3)})
    after = await asyncio.to_thread(apiserver_requests, ctx.plane)
    calls = request_diff(before, after)
    refreshes = len(watch.refreshes) - refreshes_start
    # token requests per endpoint per cycle: the gaps between one endpoint's consecutive requests
    requests = [row for row in await asyncio.to_thread(ctx.idp.requests, idp_start) if row[3] == 200]
    in_window = [row for row in requests if start_wall <= row[0] <= end_wall]
    by_endpoint: dict[str, list[float]] = collections.defaultdict(list)
    for at, _client, resource, _status in requests:
        if at <= end_wall and resource:
            by_endpoint[resource].append(at)
    gaps = [later - earlier for times in by_endpoint.values() for earlier, later in itertools.pairwise(times)
            if later >= start_wall]
    # a refresh is due a third of the lifetime before expiry, moved earlier by a jitter of up to a tenth of that
    nominal = lifetime * 2 / 3
    jitter = min(0.1 * lifetime / 3, 60.0)
    expected_gap = nominal - jitter / 2
    early = [gap for gap in gaps if gap < nominal - jitter - 1.0]  # a second request within one cycle
    late = [gap for gap in gaps if gap > nominal + 5.0]  # a cycle without a request, or a late one
    # requests over the cycles the gaps span: 1.00 when every endpoint asks once per cycle
    per_cycle = round(len(gaps) / (sum(gaps) / expected_gap), 2) if gaps else None
    in_window_rss = [row[1] for row in operator.sampler.between(start_mono, end_mono)]
    replaced = [left for at, left in watch.replaced if start_wall <= at <= end_wall]
    return {
        "seconds": round(end_mono - start_mono, 1), "refreshes": refreshes,
        "rss_mib": round(max(in_window_rss) / 1024, 1) if in_window_rss else round(rss_end / 1024, 1),
        "rss_end_mib": round(rss_end / 1024, 1), "peak_rss_mib": round(operator.sampler.peak_mib(), 1),
        "cpu_s": round(cpu_end - cpu_start, 1), "cpu_cores": round((cpu_end - cpu_start) / (end_mono - start_mono), 3),
        "cpu_ms_per_refresh": round((cpu_end - cpu_start) * 1000 / max(refreshes, 1), 1),
        "token_requests": len(in_window), "token_requests_per_cycle": per_cycle,
        "gap_between_requests_s": percentiles(gaps), "gaps_shorter_than_a_cycle": len(early),
        "gaps_longer_than_a_cycle": len(late), "endpoints_with_requests": len(by_endpoint),
        "api_requests": calls, "api_requests_per_refresh": round(sum(calls.values()) / max(refreshes, 1), 2),
        "min_remaining_s": round(watch.min_remaining_between(start_wall, end_wall) or 0, 1),
        "remaining_at_replacement_s": percentiles(replaced),
        "series_columns": ["t_s", "refreshes", "min_remaining_s", "rss_mib", "cpu_s"], "series": series,
        "refresh_times_s": [round(at - start_mono, 2) for at, _, _ in watch.refreshes[refreshes_start:]],
        "load_average": load_average(), "endpoints": count, "cores_by_process": cores,
    }


async def b2_restart(ctx: Context, operator: Operator, watch: TokenWatch, *, count: int, lifetime: int
                     ) -> dict[str, Any]:
    """Stop the operator, start it again: how long kopf takes to hand over every endpoint, and whether any
    token is asked for that was not due."""
    current = dict(watch.tokens)  # the tokens held when it stopped
    stop_seconds, exited = operator.stop(grace=30.0)  # the Deployment's terminationGracePeriodSeconds
    idp_before = await asyncio.to_thread(ctx.idp.count)
    stopped_wall = time.time()
    restarted = Operator(ctx, "b2-restart").start()
    assert restarted.sampler is not None
    with restarted.profiled("B2-restart"):
        started = await restarted.wait_started()
        while (restarted.metric("secured_endpoint_endpoints_managed") or 0) < count:
            if time.monotonic() - restarted.spawned > 600:
                raise SystemExit(f"B2 restart: not every endpoint seen after 10 min:\n{restarted.log_tail()}")
            await asyncio.sleep(SCRAPE_INTERVAL)
        seen_all = time.monotonic()
        cpu_seen = restarted.sampler.now()[3]
    await asyncio.sleep(15)  # overdue refreshes are spread over SEP_STARTUP_SPREAD_SECONDS (10 s)
    requests = [row for row in await asyncio.to_thread(ctx.idp.requests, idp_before)]
    due_margin = lifetime / 3 + min(0.1 * lifetime / 3, 60.0) + 1.0  # refresh at the earliest this long before expiry
    not_due, firsts = 0, set()
    for at, _client, resource, _status in requests:
        if resource is None or resource in firsts:
            continue
        firsts.add(resource)
        key = f"steady/{resource.removeprefix('urn:sep:')}"
        held = current.get(key)
        if held is not None and at < held[1] - due_margin:
            not_due += 1
    restart_end = time.time()
    return {"operator": restarted, "stop_s": round(stop_seconds, 1), "exited_on_sigterm": exited,
            "spawn_to_started_s": round(started - restarted.spawned, 2),
            "spawn_to_all_endpoints_s": round(seen_all - restarted.spawned, 2),
            "started_to_all_endpoints_s": round(seen_all - started, 2),
            "cpu_to_all_endpoints_s": round(cpu_seen, 2),
            "cpu_ms_per_endpoint": round(cpu_seen * 1000 / count, 2),
            "peak_rss_mib": round(restarted.sampler.peak_mib(), 1),
            "token_requests": len(requests), "token_requests_not_due": not_due,
            "min_remaining_s": round(watch.min_remaining_between(stopped_wall, restart_end) or 0, 1)}


# -- B3: rotation ------------------------------------------------------------------------------------------


async def b3(ctx: Context) -> dict[str, Any]:
    count = ctx.sizes.b3_endpoints
    client = Api(ctx.plane)
    ctx.idp.configure(lifetime_seconds=3600)
    namespace = "rotation"
    tokens: dict[str, str] = {}
    changed: dict[str, float] = {}
    waiting: set[str] = set()
    all_changed = asyncio.Event()

    def on_event(kind: str, obj: dict[str, Any], at: float) -> None:
        token = token_of(obj) if kind != "DELETED" else None
        if token is None:
            return
        name = obj["metadata"]["name"]
        if name in waiting and tokens.get(name) != token[0]:
            waiting.discard(name)
            changed[name] = at
            if not waiting:
                all_changed.set()
        tokens[name] = token[0]

    rows: list[dict[str, Any]] = []
    try:
        await client.namespace(namespace)
        await client.secret(namespace, "shared", {"client_id": "rot-a", "client_secret": "rot-a-secret"})
        operator = Operator(ctx, "b3").start()
        assert operator.sampler is not None
        try:
            async with client.watch(f"/api/v1/namespaces/{namespace}/secrets", on_event, label_selector=MANAGED):
                await operator.wait_started()
                await client.gather_bounded(
                    [lambda n=n: client.call("POST", endpoints_path(namespace),
                                             endpoint_body(ctx, f"ep-{n:05d}", secret="shared"))
                     for n in range(count)], workers=CREATES_IN_FLIGHT)
                deadline = time.monotonic() + 600
                while len(tokens) < count:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"B3: only {len(tokens)} tokens:\n{operator.log_tail()}")
                    await asyncio.sleep(0.2)
                await asyncio.sleep(3)  # settled: every status written
                for rotation in range(ctx.sizes.b3_rotations):
                    pair = ("rot-b", "rot-b-secret") if rotation % 2 == 0 else ("rot-a", "rot-a-secret")
                    changed.clear()
                    waiting.update(tokens)
                    all_changed.clear()
                    before = await asyncio.to_thread(apiserver_requests, ctx.plane)
                    idp_before = await asyncio.to_thread(ctx.idp.count)
                    cpu_before = operator.sampler.now()[3]
                    with operator.profiled(f"B3-rotation-{rotation + 1}"):
                        await client.call("PATCH", f"/api/v1/namespaces/{namespace}/secrets/shared",
                                          {"stringData": {"client_id": pair[0], "client_secret": pair[1]}}, merge=True)
                        rotated = time.monotonic()
                        await asyncio.wait_for(all_changed.wait(), 600)
                    cpu = operator.sampler.now()[3] - cpu_before
                    await asyncio.sleep(3)
                    after = await asyncio.to_thread(apiserver_requests, ctx.plane)
                    idp_after = await asyncio.to_thread(ctx.idp.count)
                    latencies = [at - rotated for at in changed.values()]
                    calls = request_diff(before, after, minus={("PATCH", "secrets"): 1})
                    rows.append({"rotation": rotation + 1, "endpoints": count, "latency_s": percentiles(latencies),
                                 "token_requests": idp_after - idp_before, "operator_cpu_s": round(cpu, 2),
                                 "api_requests": calls,
                                 "api_requests_per_endpoint": round(sum(calls.values()) / count, 2),
                                 "latencies_s": sorted(round(value, 3) for value in latencies),
                                 "load_average": load_average()})
                    print(f"  B3 rotation {rotation + 1}: p50/p99/max {rows[-1]['latency_s']['p50']}/"
                          f"{rows[-1]['latency_s']['p99']}/{rows[-1]['latency_s']['max']} s, "
                          f"{rows[-1]['token_requests']} token requests", flush=True)
                    await asyncio.sleep(2)
        finally:
            operator.stop()
    finally:
        await client.aclose()
    worst = max(rows, key=lambda row: row["latency_s"]["p99"])
    return {"rows": rows, "at": count, "figures": {"p99_seconds": worst["latency_s"]["p99"]}}


# -- K: kopf's watch of 10,000 SecuredEndpoints (issue 8 part 5) -----------------------------------------


async def k_kopf_watch(ctx: Context) -> dict[str, Any]:
    """10,000 suspended endpoints: no token, no refresh, so what is left is kopf's watch. A cold start (kopf
    lists them, the operator writes each one's Suspended status once), then a restart with every status in
    place (kopf lists them and hands each to a per-object worker, the operator writes nothing): spawn → every
    endpoint taken in (the operator's ``endpoints_managed``), CPU, peak RSS, and the API requests it sent."""
    count = ctx.sizes.b2_endpoints
    client = Api(ctx.plane)
    namespace = "kopf"
    result: dict[str, Any] = {"endpoints": count}
    try:
        await client.namespace(namespace)
        await client.secret(namespace, "oauth", {"client_id": "bench", "client_secret": "bench-secret"})

        def suspended(number: int) -> dict[str, Any]:
            body = endpoint_body(ctx, f"ep-{number:05d}")
            body["spec"]["suspend"] = True
            return body

        await client.gather_bounded(
            [lambda n=n: client.call("POST", endpoints_path(namespace), suspended(n)) for n in range(count)],
            workers=CREATES_IN_FLIGHT)
        for phase in ("cold", "restart"):
            before = await asyncio.to_thread(apiserver_requests, ctx.plane)
            operator = Operator(ctx, f"k-{phase}").start()
            assert operator.sampler is not None
            try:
                with operator.profiled(f"K-{phase}"):
                    started = await operator.wait_started()
                    while (operator.metric("secured_endpoint_endpoints_managed") or 0) < count:
                        if time.monotonic() - started > 900:
                            raise SystemExit(f"K: not every endpoint taken in after 15 min:\n{operator.log_tail()}")
                        await asyncio.sleep(SCRAPE_INTERVAL)
                    seen = time.monotonic()
                    cpu_seen = operator.sampler.now()[3]
                    if phase == "cold":  # until every Suspended status is written
                        listed = {"items": []}
                        while True:
                            listed = await client.call("GET", endpoints_path(namespace))
                            if all((item.get("status") or {}).get("conditions") for item in listed["items"]):
                                break
                            await asyncio.sleep(1.0)
                done = time.monotonic()
                cpu_done = operator.sampler.now()[3]
                await asyncio.sleep(2)
                after = await asyncio.to_thread(apiserver_requests, ctx.plane)
                calls = request_diff(before, after)
                result[phase] = {
                    "spawn_to_started_s": round(started - operator.spawned, 2),
                    "spawn_to_all_endpoints_s": round(seen - operator.spawned, 2),
                    "started_to_all_endpoints_s": round(seen - started, 2),
                    "cpu_to_all_endpoints_s": round(cpu_seen, 2),
                    "cpu_ms_per_endpoint": round(cpu_seen * 1000 / count, 2),
                    "spawn_to_done_s": round(done - operator.spawned, 2), "cpu_to_done_s": round(cpu_done, 2),
                    "peak_rss_mib": round(operator.sampler.peak_mib(), 1),
                    "rss_done_mib": round(operator.sampler.now()[1] / 1024, 1),
                    "api_requests": calls, "load_average": load_average()}
                print(f"  K {phase}: every endpoint taken in {result[phase]['spawn_to_all_endpoints_s']} s after "
                      f"spawn ({result[phase]['cpu_ms_per_endpoint']} ms CPU each), peak RSS "
                      f"{result[phase]['peak_rss_mib']} MiB; {sum(calls.values())} API requests", flush=True)
            finally:
                operator.stop()
    finally:
        await client.aclose()
    return result


# -- H: what one HTTP request to the apiserver costs the client ---------------------------------------------


def cpu_self() -> float:
    usage = rusage.getrusage(rusage.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def h_clients(ctx: Context) -> dict[str, Any]:
    """CPU per request of the operator's HTTP client (httpx, HTTP/1.1; HTTP/2 too if ``h2`` is installed)
    and of aiohttp (installed with kopf), ``requests`` GETs and merge PATCHes of a Secret with 20 and 64
    connections: the profile of B1 and B2 puts most of the operator's CPU in its HTTP client."""
    plane = ctx.plane
    driver = Api(plane)
    await driver.secret("default", "probe", {"blob": "x" * 1024})
    await driver.aclose()
    headers = {"Authorization": f"Bearer {plane.admin_token}"}
    requests = 2000 if ctx.sizes.b1_redis else 500
    patch = {"metadata": {"annotations": {"probe": "1"}}}

    def tls() -> ssl.SSLContext:  # one each: httpx sets ALPN on the context it is given
        return ssl.create_default_context(cafile=str(plane.ca_path))

    async def measure(send: Callable[[int], Awaitable[None]], connections: int) -> dict[str, float]:
        slots = asyncio.Semaphore(connections)

        async def one(number: int) -> None:
            async with slots:
                await send(number)

        await asyncio.gather(*(one(number) for number in range(connections * 4)))  # connections open, warm
        started, cpu = time.monotonic(), cpu_self()
        await asyncio.gather(*(one(number) for number in range(requests)))
        return {"cpu_ms_per_request": round((cpu_self() - cpu) * 1000 / requests, 3),
                "requests_per_s": round(requests / (time.monotonic() - started))}

    rows: list[dict[str, Any]] = []
    variants = [("httpx HTTP/1.1", False)]
    with contextlib.suppress(ImportError):
        import h2  # noqa: F401 - httpx's HTTP/2 needs it; not a dependency of the operator

        variants.append(("httpx HTTP/2", True))
    for connections in (KUBE_IN_FLIGHT, 64):
        for name, http2 in variants:
            async with httpx.AsyncClient(base_url=plane.server, verify=tls(), headers=headers, http2=http2,
                                         limits=httpx.Limits(max_connections=None,
                                                             max_keepalive_connections=connections)) as client:
                async def httpx_send(number: int, client: httpx.AsyncClient = client) -> None:
                    if number % 2:
                        response = await client.get("/api/v1/namespaces/default/secrets/probe")
                    else:
                        response = await client.patch("/api/v1/namespaces/default/secrets/probe", json=patch,
                                                      headers={"Content-Type": "application/merge-patch+json"})
                    response.raise_for_status()

                rows.append({"client": name, "connections": connections, **await measure(httpx_send, connections)})
        async with aiohttp.ClientSession(plane.server, headers=headers,
                                         connector=aiohttp.TCPConnector(ssl=tls(), limit=connections)) as session:
            async def aiohttp_send(number: int, session: aiohttp.ClientSession = session) -> None:
                if number % 2:
                    async with session.get("/api/v1/namespaces/default/secrets/probe") as response:
                        await response.read()
                else:
                    async with session.patch("/api/v1/namespaces/default/secrets/probe", data=json.dumps(patch),
                                             headers={"Content-Type": "application/merge-patch+json"}) as response:
                        await response.read()
                response.raise_for_status()

            rows.append({"client": "aiohttp", "connections": connections, **await measure(aiohttp_send, connections)})
    for row in rows:
        print(f"  H {row['client']:15} {row['connections']:>3} connections: {row['cpu_ms_per_request']} ms CPU "
              f"per request, {row['requests_per_s']} requests/s", flush=True)
    return {"rows": rows, "requests": requests}


# -- report, JSON, plots ----------------------------------------------------------------------------------


def verdict(op: str, value: float | None, target: float) -> str:
    if value is None:
        return "—"
    good = {"<=": value <= target, ">=": value >= target, ">": value > target,
            "==": abs(value - target) <= 0.02}[op]
    return "meets" if good else "MISSES"


def report(results: dict[str, Any]) -> list[str]:
    lines = [f"{'scenario':8} {'figure':28} {'measured':>10} {'target':>10}  verdict"]
    for name in SCENARIOS:
        scenario = results.get(name)
        if not scenario or name not in TARGETS or "figures" not in scenario:
            continue
        for key, (op, target) in TARGETS[name].items():
            value = scenario["figures"].get(key)
            lines.append(f"{name:8} {key:28} {value if value is not None else '—':>10} {op + ' ' + str(target):>10}"
                         f"  {verdict(op, value, target)}")
    return lines


def plots(results: dict[str, Any], output: Path, only: Iterable[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = output / f"scale_suite-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if "B0" in only and "B0" in results:
        rows = results["B0"]["rows"]
        x = [row["unrelated_secrets"] for row in rows]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(x, [row["spawn_to_first_token_s"] for row in rows], "o-", label="spawn → first token")
        left.plot(x, [row["cpu_to_all_tokens_s"] for row in rows], "s--", label="CPU until the tokens (s)")
        left.axhline(10, color="red", linestyle=":", label="target 10 s")
        left.set(xlabel="unrelated Secrets in the cluster", ylabel="seconds", title="B0 start-up")
        left.legend()
        right.plot(x, [row["peak_rss_mib"] for row in rows], "o-", label="peak RSS (VmHWM)")
        right.plot(x, [row["settled_rss_mib"] for row in rows], "s--", label="RSS after the tokens")
        right.axhline(150, color="red", linestyle=":", label="target 150 MiB")
        right.set(xlabel="unrelated Secrets in the cluster", ylabel="MiB", title="B0 operator memory", ylim=(0, None))
        right.legend()
        save(fig, "B0")
    if "B1" in only and "B1" in results:
        rows = [row for row in results["B1"]["rows"] if row["target"] == "secret"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        labels = [f"{row['endpoints']:,}" for row in rows]
        positions = range(len(rows))
        left.bar([p - 0.2 for p in positions], [row["all_ready_s"] for row in rows], 0.4, label="operator: all Ready")
        left.bar([p + 0.2 for p in positions], [row["floor"]["seconds"] for row in rows], 0.4, label="floor")
        left.axhline(5, color="red", linestyle=":", label="target 5 s at 1,000")
        left.set_xticks(list(positions), labels)
        left.set(xlabel="endpoints created at once", ylabel="seconds", title="B1 burst → all Ready")
        left.legend()
        right.bar([p - 0.2 for p in positions], [row["throughput_per_s"] for row in rows], 0.4, label="operator")
        right.bar([p + 0.2 for p in positions], [row["floor"]["throughput_per_s"] for row in rows], 0.4,
                  label="floor")
        right.set_xticks(list(positions), labels)
        right.set(xlabel="endpoints created at once", ylabel="endpoints / s", title="B1 throughput")
        right.legend()
        save(fig, "B1")
    if "B2" in only and "B2" in results and "window" in results["B2"]:
        window = results["B2"]["window"]
        series = window["series"]
        t = [row[0] for row in series]
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        bins = max(1, int(window["seconds"] // 5) + 1)
        axes[0][0].hist(window["refresh_times_s"], bins=bins, range=(0, bins * 5))
        axes[0][0].set(xlabel="s into the window", ylabel="refreshes per 5 s",
                       title=f"B2 refreshes over time ({window['endpoints']:,} endpoints)")
        axes[0][1].plot(t, [row[2] for row in series])
        axes[0][1].axhline(0, color="red", linestyle=":")
        axes[0][1].set(xlabel="s into the window", ylabel="s", title="shortest remaining token lifetime",
                       ylim=(min(-1, min(row[2] for row in series) - 1), None))
        axes[1][0].plot(t, [row[3] for row in series])
        axes[1][0].axhline(400, color="red", linestyle=":", label="target 400 MiB")
        axes[1][0].set(xlabel="s into the window", ylabel="MiB", title="operator RSS", ylim=(0, None))
        axes[1][0].legend()
        cores = [0.0] + [(series[i][4] - series[i - 1][4]) / max(series[i][0] - series[i - 1][0], 1e-6)
                         for i in range(1, len(series))]
        axes[1][1].plot(t, cores, linewidth=0.8, label="per second")
        axes[1][1].axhline(window["cpu_cores"], color="black", linestyle="--", label="average")
        axes[1][1].axhline(0.3, color="red", linestyle=":", label="target 0.3")
        axes[1][1].set(xlabel="s into the window", ylabel="cores", title="operator CPU")
        axes[1][1].legend()
        save(fig, "B2")
    if "B3" in only and "B3" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in results["B3"]["rows"]:
            values = row["latencies_s"]
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"rotation {row['rotation']}")
        ax.axvline(5, color="red", linestyle=":", label="target p99 5 s")
        ax.set(xlabel="s from the rotation to the new token in the Secret", ylabel="share of endpoints",
               title=f"B3 rotation of one Secret used by {results['B3']['at']:,} endpoints")
        ax.legend()
        save(fig, "B3")
    return written


def operator_revision() -> str:
    """The commit the operator was run from, and whether its code differed from it."""
    def git(*args: str) -> str:
        answer = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return answer.stdout.strip()

    dirty = git("status", "--porcelain", "--", "operator", "gateway")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


async def run_scenario(name: str, ctx: Context) -> dict[str, Any]:
    runner = {"B0": b0, "B1": b1, "B2": b2, "B3": b3, "K": k_kopf_watch, "H": h_clients}[name]
    return await runner(ctx)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios ({','.join(SCENARIOS)})")
    parser.add_argument("--quick", action="store_true", help="sized down: a smoke run of a few minutes")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles of each measured phase")
    parser.add_argument("--output", type=Path, default=None, help="where the JSON and plots go")
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="keep the operators' logs (and with --profile the raw py-spy stacks) here")
    parser.add_argument("--operator", default=None, metavar="SCRIPT",
                        help="run this script instead of `-m secured_endpoint.cli` (to compare a patched build)")
    parser.add_argument("--serve-idp", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_idp:
        return serve_idp(Path(args.serve_idp[0]), args.serve_idp[1:])
    only = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else Sizes()
    output = args.output or (Path(tempfile.mkdtemp(prefix="scale-suite-")) if args.quick else OUTPUT)
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "scale_suite.json"
    results: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    controlplane.ensure_binaries()
    revision = operator_revision()
    run_started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scale-suite-") as tmp, RedisServer() as redis, \
            Idp(Path(tmp), {"bench": "bench-secret", "rot-a": "rot-a-secret", "rot-b": "rot-b-secret"}) as idp:
        ctx = Context(sizes=sizes, workdir=Path(tmp), output=output, idp=idp, redis_url=redis.url(),
                      profile=args.profile, operator_script=args.operator)
        failed: list[str] = []
        try:
            for name in only:
                print(f"{name} …", flush=True)
                started = time.monotonic()
                idp.configure(lifetime_seconds=3600)
                try:
                    with controlplane.ControlPlane() as plane:
                        plane.install_crds(ROOT / "crds")
                        ctx.plane = plane
                        results[name] = asyncio.run(run_scenario(name, ctx))
                except (Exception, SystemExit) as exc:  # the other scenarios still run and are kept
                    print(f"  {name} failed: {str(exc)[-2000:]}", flush=True)
                    failed.append(name)
                    continue
                results[name]["seconds"] = round(time.monotonic() - started, 1)
                results[name]["sizes"] = "quick" if args.quick else "full"
                results[name]["load_average_after"] = load_average()
                save(results, json_path, revision, ctx)  # after each scenario: a later failure loses nothing
        finally:
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for kept in [*Path(tmp).glob("operator-*.log"), *Path(tmp).glob("*.collapsed")]:
                    shutil.copy(kept, args.keep_logs / kept.name)
    written = plots(results, output, [name for name in only if name not in failed])
    print()
    print("\n".join(report(results)))
    print(f"\n{time.monotonic() - run_started:.0f} s; wrote {json_path}"
          + "".join(f"\n      {path}" for path in written))
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def save(results: dict[str, Any], json_path: Path, revision: str, ctx: Context) -> None:
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "operator": revision,
                          "kubernetes": controlplane.kube_version(), "etcd": controlplane.etcd_version(),
                          "kernel": platform.release()}
    results["benchmark"] = "benchmarks/scale_suite.py"
    results["targets"] = {name: {key: f"{op} {value}" for key, (op, value) in targets.items()}
                          for name, targets in TARGETS.items()}
    if ctx.profiles:
        results.setdefault("profiles", {}).update(ctx.profiles)
    json_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
