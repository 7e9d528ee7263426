"""What the chaos scenarios share: sizes, an operator of their own, a sampler of every token Secret, figures.

- ``FULL`` (``SEP_CHAOS_FULL=1``): the issue's sizes; otherwise the CI sizes that ``make test`` runs.
- ``chaos``: a fresh ``c-…`` namespace (no session operator serves it) and an operator process for it that the
  test starts, kills and restarts as it likes; at teardown an operator runs again so that the namespace's
  endpoints are released through it (a stuck finalizer fails the test, as in tests/conftest.py).
- ``TokenSampler``: follows every token Secret of the namespace (one LIST, then a watch) and judges them every
  interval, recording what a gateway would have read wrongly: an expired token (by the token server's own
  record of its expiry, not the Secret's ``expires_at``), a Secret whose keys are incomplete or disagree, a
  token Secret that vanished while its endpoint lives.
- ``report``: prints a scenario's figures and keeps them for the terminal summary, so that one run gives the
  numbers of every scenario.
- ``garbage_collector``: a real kube-controller-manager running only its garbage collector against the session
  control plane, started when the test says so and stopped at its end; what it deleted is read from the
  apiserver's audit log (see :class:`GarbageCollector`).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes import client as k8s

from secured_endpoint import api
from secured_endpoint_devenv.node import Controllers
from secured_endpoint_devenv.tokenserver import TokenServer
from secured_endpoint_gateway import wire
from tests.conftest import TEST_OPERATOR_ENV, Kube, OperatorProcess, _namespace

FULL = os.environ.get("SEP_CHAOS_FULL", "") not in ("", "0")

FIGURES: list[tuple[str, dict[str, Any]]] = []


def size(ci: int, full: int) -> int:
    return full if FULL else ci


def report(scenario: str, **figures: Any) -> None:
    FIGURES.append((scenario, figures))
    print(f"chaos figures: {scenario}: " + ", ".join(f"{key}={value}" for key, value in figures.items()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section(f"chaos figures ({'full' if FULL else 'CI'} sizes)")
        for scenario, figures in FIGURES:
            terminalreporter.write_line(f"{scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@dataclass
class Chaos:
    kube: Kube
    namespace: str
    operator: OperatorProcess
    tmp_path: Path

    def new_operator(self, **env: str) -> OperatorProcess:
        """Replace the (stopped or killed) operator by a fresh process with other settings."""
        assert self.operator.process is None or self.operator.process.poll() is not None
        self.operator = OperatorProcess(kubeconfig=self.operator.kubeconfig, log_path=self.operator.log_path,
                                        scope=self.operator.scope, env={**self.operator.env, **env})
        return self.operator

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a node loss does it."""
        process = self.operator.process
        assert process is not None, "the operator was never started"
        assert process.poll() is None, "the operator is not running"
        process.kill()
        process.wait(timeout=10)

    def running(self) -> bool:
        return self.operator.process is not None and self.operator.process.poll() is None

    def endpoints(self) -> list[dict[str, Any]]:
        return list(self.kube.custom.list_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, api.PLURAL)["items"])

    def token_secrets(self) -> list[Any]:
        return list(self.kube.core.list_namespaced_secret(
            self.namespace, label_selector=f"{api.MANAGED_BY_LABEL}={api.MANAGED_BY_VALUE}").items)


def ready_for_generation(endpoint: dict[str, Any]) -> bool:
    """Ready=True and describing the endpoint's current spec."""
    status = endpoint.get("status") or {}
    generation = endpoint["metadata"].get("generation")
    for condition in status.get("conditions") or ():
        if condition.get("type") == api.CONDITION_READY:
            return bool(condition.get("status") == "True" and condition.get("observedGeneration") == generation
                        and status.get("observedGeneration") == generation)
    return False


def chaos_env(**env: str) -> dict[str, str]:
    return {**TEST_OPERATOR_ENV, **env}


@pytest.fixture
def chaos(kube: Kube, tmp_path: Path) -> Iterator[Chaos]:
    namespaces = _namespace(kube, "c")
    namespace = next(namespaces)
    operator = OperatorProcess(kubeconfig=kube.control_plane.kubeconfig_path, log_path=tmp_path / "operator.log",
                               scope=("--namespace", namespace), env=chaos_env())
    state = Chaos(kube, namespace, operator, tmp_path)
    try:
        yield state
    finally:
        if not state.running():
            state.new_operator().start()
        for _ in namespaces:  # deletes the endpoints through the operator, then the namespace
            pass
        state.operator.stop()
        if os.environ.get("SEP_SHOW_OPERATOR_LOG"):
            print(state.operator.log_text())


def decode(secret: Any) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}


def inconsistent(data: dict[str, str]) -> str | None:
    """Why a token Secret's keys do not form one complete, consistent token, or None."""
    missing = [key for key in wire.SECRET_KEYS if not data.get(key)]
    if missing:
        return f"missing {missing}"
    token = data["access_token"]
    if data["fingerprint"] != wire.fingerprint(token):
        return "fingerprint does not match access_token"
    if data["authorization"] != f"{data['token_type']} {token}" or data["credential"] != data["authorization"]:
        return "authorization/credential do not carry access_token"
    return None


class TokenSampler(threading.Thread):
    """What a reader of every token Secret of a namespace would have seen, until stopped; see the module docstring.

    It holds the namespace's token Secrets as they are, from one LIST and then a watch of their changes (relisted
    when the watch breaks or is too old), and judges what it holds every ``interval``: so it misses no moment
    but those when the apiserver cannot be read (counted in ``errors``), and costs the apiserver only the changes,
    not a LIST of every Secret ten times a second, which would take from the operator the CPU it is tested on.
    ``alive`` tells which endpoint names exist right now (the test's own book-keeping), so that a Secret
    missing for a deleted endpoint is not counted as a lost token."""

    def __init__(self, kube: Kube, namespace: str, servers: list[TokenServer], *,
                 alive: Callable[[], set[str]] = set, interval: float = 0.1) -> None:
        super().__init__(name="token-sampler", daemon=True)
        self.kube, self.namespace, self.servers, self.alive, self.interval = kube, namespace, servers, alive, interval
        self.rounds = self.reads = self.errors = 0
        self.expired: list[tuple[str, float]] = []  # (secret, seconds past expiry)
        self.broken: list[tuple[str, str]] = []
        self.lost: list[str] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, str, str | None]] = {}  # name -> (version, token, what is wrong)
        self._synced = False  # what is held is what the apiserver holds (up to a watch event in flight)
        self._seen: set[str] = set()  # token Secrets seen at least once
        self._expiries: dict[str, float] = {}  # token -> when the token server says it expires
        self._follower = threading.Thread(target=self._follow, name="token-sampler-watch", daemon=True)
        self._watch: Any = None

    def start(self) -> None:
        self._follower.start()
        deadline = time.monotonic() + 10
        while not self._synced and time.monotonic() < deadline:  # judging starts from a complete picture
            time.sleep(0.01)
        super().start()

    # -- following the apiserver ---------------------------------------------------------------------

    def _follow(self) -> None:
        selector = f"{api.MANAGED_BY_LABEL}={api.MANAGED_BY_VALUE}"
        while not self._halt.is_set():
            try:
                answer = self.kube.core.list_namespaced_secret(self.namespace, label_selector=selector,
                                                               _preload_content=False)
                listed = json.loads(answer.data)
                with self._lock:
                    self._held = {item["metadata"]["name"]: self._judged(item) for item in listed["items"]}
                    self._synced = True
                version = listed["metadata"]["resourceVersion"]
                while not self._halt.is_set():
                    version = self._follow_from(selector, version)
            except Exception:  # the apiserver may be down on purpose (urllib3 errors, ApiException, OSError)
                with self._lock:
                    self._synced = False
                self._halt.wait(0.1)

    def _follow_from(self, selector: str, version: str) -> str:
        """Apply the watch's events from ``version`` until it ends; the version to go on from. Raises when the
        watch broke or is too old (410), so that the caller lists again."""
        self._watch = kubernetes.watch.Watch()
        for event in self._watch.stream(self.kube.core.list_namespaced_secret, self.namespace,
                                        label_selector=selector, resource_version=version, timeout_seconds=5,
                                        allow_watch_bookmarks=True, deserialize=False):
            kind, item = event["type"], event["raw_object"]
            if kind == "ERROR":
                raise RuntimeError(f"watch error: {item.get('code')} {item.get('reason')}")
            version = item["metadata"]["resourceVersion"]
            if kind == "BOOKMARK":
                continue
            name = item["metadata"]["name"]
            with self._lock:
                if kind == "DELETED":
                    self._held.pop(name, None)
                else:
                    self._held[name] = self._judged(item)
        return version

    @staticmethod
    def _judged(secret: dict[str, Any]) -> tuple[str, str, str | None]:
        """(resourceVersion, token, why its keys are wrong or None), judged once per version of the Secret."""
        decoded = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
        return secret["metadata"]["resourceVersion"], decoded.get("access_token", ""), inconsistent(decoded)

    # -- judging -------------------------------------------------------------------------------------

    def sample(self) -> None:
        with self._lock:
            if not self._synced:
                self.errors += 1
                return
            held = dict(self._held)
        now = time.time()
        for name, (_, token, why) in held.items():
            self._seen.add(name)
            self.reads += 1
            if why is not None:
                self.broken.append((name, why))
                continue
            expires = self._expiry(token)
            if expires is None:
                self.broken.append((name, "a token the token server never issued"))
            elif expires <= now:
                self.expired.append((name, round(now - expires, 2)))
        alive = self.alive()
        for name in self._seen - held.keys():
            endpoint = name.removesuffix("-token")
            if endpoint in alive:
                self.lost.append(name)
        self.rounds += 1

    def _expiry(self, token: str) -> float | None:
        if token not in self._expiries:
            self._expiries = {issued.access_token: issued.expires_at
                              for server in self.servers for issued in server.issued_tokens}
        return self._expiries.get(token)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        if self._watch is not None:
            self._watch.stop()
        self.join(timeout=10)
        self._follower.join(timeout=6)  # its watch ends within 5 s


class LogWatcher(threading.Thread):
    """Follows an operator's log (across restarts: the file is appended to) and notes when each line containing
    ``needle`` appeared, to within ``interval``: the log carries no timestamps of its own."""

    def __init__(self, path: Path, needle: str, *, interval: float = 0.02) -> None:
        super().__init__(name="log-watcher", daemon=True)
        self.path, self.needle, self.interval = path, needle, interval
        self.seen: list[tuple[float, str]] = []
        self._halt = threading.Event()
        self._offset = 0
        self._partial = b""

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        now = time.monotonic()
        self.seen += [(now, line.decode(errors="replace")) for line in lines if self.needle.encode() in line]

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.poll()


# kube-controller-manager gives each controller's client a user agent ending in the controller's name.
GC_USER_AGENT_SUFFIX = "/generic-garbage-collector"


class GarbageCollector:
    """kube-controller-manager with only its garbage collector, against the session control plane, for one test.

    The session control plane runs no controllers (envtest-like) and the rest of the suite relies on that
    (namespaces stay Terminating, no service accounts): the collector runs from :meth:`start` to the end of the
    test that asked for it. :meth:`deletions` reads from the apiserver's audit log (since :meth:`start`) what the
    collector itself deleted, so that a test proves who deleted an object, not only that it went."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.controllers: Controllers | None = None
        self.started_at = 0.0  # time.monotonic() when start() was called
        self._audit_offset = 0

    def start(self) -> float:
        """Start it; return kube-controller-manager's start time (to a healthy /healthz), in seconds."""
        assert self.controllers is None, "the garbage collector is started once"
        self._audit_offset = self.kube.control_plane.audit_log_path.stat().st_size
        self.started_at = time.monotonic()
        self.controllers = Controllers(self.kube.control_plane, controllers=("garbagecollector",),
                                       scheduler=False).start()
        return self.controllers.startup_seconds

    def stop(self) -> None:
        if self.controllers is not None:
            self.controllers.stop()
            self.controllers = None

    def plant_canary(self, namespace: str) -> str:
        """A Secret (not a token Secret: no managed-by label) owned, as controller, by a SecuredEndpoint uid that
        never existed: once it is gone, the collector has had its chance at that namespace."""
        name = f"gc-canary-{uuid.uuid4().hex[:6]}"
        owner = k8s.V1OwnerReference(api_version=f"{api.GROUP}/{api.VERSION}", kind=api.KIND, name=name,
                                     uid=str(uuid.uuid4()), controller=True, block_owner_deletion=True)
        self.kube.core.create_namespaced_secret(namespace, k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name, owner_references=[owner])))
        return name

    def deletions(self, namespace: str, resource: str = "secrets") -> dict[str, str]:
        """What the collector deleted in ``namespace`` since the start: name -> uid, from the audit log. An
        audit event is written as its request completes, which may be just after a reader saw the object go:
        wait for it rather than read once."""
        deleted: dict[str, str] = {}
        with self.kube.control_plane.audit_log_path.open("rb") as log:
            log.seek(self._audit_offset)
            for line in log:
                if not line.endswith(b"\n"):  # still being written: the next read has it
                    break
                event = json.loads(line)
                ref, status = event.get("objectRef") or {}, event.get("responseStatus") or {}
                if (event.get("verb") == "delete" and event.get("stage") == "ResponseComplete"
                        and str(event.get("userAgent", "")).endswith(GC_USER_AGENT_SUFFIX)
                        and ref.get("namespace") == namespace and ref.get("resource") == resource
                        and 200 <= status.get("code", 0) < 300):
                    deleted[ref["name"]] = (status.get("details") or {}).get("uid", "")
        return deleted


@pytest.fixture
def garbage_collector(kube: Kube) -> Iterator[GarbageCollector]:
    collector = GarbageCollector(kube)
    try:
        yield collector
    finally:
        collector.stop()
