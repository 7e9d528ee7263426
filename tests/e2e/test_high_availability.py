"""Two operator replicas on one Lease (docs/contract.md §7), with the default lease timings (15 s / 10 s / 2 s).

Cases:
- exactly one replica leads; the follower fetches no token and writes nothing, yet is ready (a warm standby:
  its watches are listed and it has seen the Lease), and both answer /livez;
- SIGKILL of the leader: the follower takes over within lease duration + retry periods (≤ 20 s) and refreshes
  what came due; a sampler reading every token Secret every 100 ms never sees an expired token, and no
  refresh cycle asks the token server twice for one endpoint;
- SIGTERM of the leader hands the Lease over at once: the follower leads within a few retry periods;
- a replica whose event loop is frozen (SIGSTOP) answers no probe; thawed (SIGCONT), it answers again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from secured_endpoint import api
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import TEST_OPERATOR_ENV, Kube, OperatorProcess, Setup, wait_for

pytestmark = pytest.mark.e2e

LEADING = "Leading: refreshing the tokens"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _probe(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Replica:
    def __init__(self, process: OperatorProcess, health_port: int) -> None:
        self.process = process
        self.health_port = health_port

    @property
    def leading(self) -> bool:
        return LEADING in self.process.log_text()

    @property
    def fetches(self) -> int:
        return self.process.log_text().count("Fetching a token for ")


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A namespace only these replicas serve (the session's operators serve ``t-*`` and ``r-*``)."""
    from tests.conftest import _namespace

    yield from _namespace(kube, "ha")


@pytest.fixture
def replicas(control_plane: object, kube: Kube, namespace: str, tmp_path: Path,
             operator_processes: list[OperatorProcess]) -> Iterator[list[Replica]]:
    lease = f"sep-ha-{uuid.uuid4().hex[:8]}"
    started: list[Replica] = []
    for index in range(2):
        port = _free_port()
        process = OperatorProcess(
            kubeconfig=control_plane.kubeconfig_path,  # type: ignore[attr-defined]
            log_path=tmp_path / f"replica-{index}.log", scope=("--namespace", namespace),
            env={**TEST_OPERATOR_ENV, "SEP_LEASE_NAME": lease, "SEP_LEASE_NAMESPACE": "default",
                 "SEP_HEALTH_PORT": str(port)})
        operator_processes.append(process)
        process.start()
        started.append(Replica(process, port))
    wait_for(lambda: sum(replica.leading for replica in started) == 1, timeout=10, message="one leader")
    yield started
    for replica in started:  # a frozen one would hold the clean-up up
        if replica.process.process is not None and replica.process.process.poll() is None:
            os.kill(replica.process.process.pid, signal.SIGCONT)
    # the endpoints go while a replica still runs: it removes their finalizers
    for item in kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)["items"]:
        kube.delete_endpoint(namespace, item["metadata"]["name"])
    wait_for(lambda: not kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace,
                                                                   api.PLURAL)["items"],
             timeout=30, message="the endpoints released by a replica")
    for replica in started:
        if replica.process.process is not None and replica.process.process.poll() is None:
            os.kill(replica.process.process.pid, signal.SIGCONT)
        replica.process.stop()


def _leader_and_follower(replicas: list[Replica]) -> tuple[Replica, Replica]:
    leader = next(replica for replica in replicas if replica.leading)
    follower = next(replica for replica in replicas if replica is not leader)
    return leader, follower


class ExpirySampler(threading.Thread):
    """Reads every token Secret every 100 ms and remembers any token it saw past its expires_at."""

    def __init__(self, kube: Kube, namespace: str, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.kube, self.namespace, self.names = kube, namespace, names
        self.expired: list[tuple[str, str]] = []
        self.reads = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for name in self.names:
                data = self.kube.secret_data(self.namespace, f"{name}-token") or {}
                if "expires_at" in data:
                    self.reads += 1
                    expires = datetime.fromisoformat(data["expires_at"].replace("Z", "+00:00"))
                    if expires <= datetime.now(UTC):
                        self.expired.append((name, data["expires_at"]))
            self._halt.wait(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def test_one_leader_and_a_warm_follower(replicas: list[Replica], kube: Kube, namespace: str,
                                        token_server: TokenServer, secret_values: set[str]) -> None:
    leader, follower = _leader_and_follower(replicas)
    setup = Setup(kube, namespace, secret_values)
    setup.client(token_server)
    for name in ("a", "b", "c"):
        setup.endpoint(name, token_server)
    for name in ("a", "b", "c"):
        kube.wait_ready(namespace, name)
    assert token_server.token_requests == 3
    assert follower.fetches == 0, "the follower asks the token server for nothing"
    assert leader.fetches == 3
    for replica, role in ((leader, "leader"), (follower, "following")):
        status, body = _probe(replica.health_port, "/readyz")
        assert status == 200, body
        assert role in json.dumps(body)
        assert _probe(replica.health_port, "/livez")[0] == 200


def test_the_follower_takes_over_from_a_killed_leader(replicas: list[Replica], kube: Kube, namespace: str,
                                                      token_server: TokenServer, secret_values: set[str]) -> None:
    token_server.lifetime_seconds = 60  # refreshed 36 to 40 s after issue: a takeover (≤ ~20 s) fits before expiry
    leader, follower = _leader_and_follower(replicas)
    setup = Setup(kube, namespace, secret_values)
    setup.client(token_server)
    names = ["k1", "k2"]
    for name in names:
        setup.endpoint(name, token_server)
    for name in names:
        kube.wait_ready(namespace, name)
    sampler = ExpirySampler(kube, namespace, names)
    sampler.start()
    try:
        time.sleep(20)  # the kill lands in the middle of the tokens' refresh window
        assert leader.process.process is not None
        killed_at = time.monotonic()
        leader.process.process.kill()
        wait_for(lambda: follower.leading, timeout=25, message="the follower to take over")
        takeover = time.monotonic() - killed_at
        # after the tokens' refresh times (40 s after issue at the latest): every endpoint refreshed once
        wait_for(lambda: follower.fetches >= len(names), timeout=45, message="the new leader's refreshes")
        time.sleep(2)
    finally:
        sampler.stop()
    print(f"takeover after SIGKILL: {takeover:.1f} s; sampler reads: {sampler.reads}")
    assert takeover <= 20.0
    assert sampler.reads > 100
    assert sampler.expired == [], "a target held an expired token"
    assert follower.fetches == len(names), "one refresh per endpoint per cycle, none twice"
    assert token_server.token_requests == 2 * len(names)


def test_sigterm_hands_the_lease_over_at_once(replicas: list[Replica]) -> None:
    leader, follower = _leader_and_follower(replicas)
    stopped_at = time.monotonic()
    leader.process.stop()
    wait_for(lambda: follower.leading, timeout=10, message="the follower to take over")
    handover = time.monotonic() - stopped_at
    print(f"handover after SIGTERM: {handover:.1f} s")
    assert handover < 8.0, "within a few retry periods, not a lease duration"
    assert leader.process.process is not None
    assert leader.process.process.returncode == 0


def test_a_frozen_replica_answers_no_probe(replicas: list[Replica]) -> None:
    _, follower = _leader_and_follower(replicas)
    assert _probe(follower.health_port, "/livez")[0] == 200
    assert follower.process.process is not None
    pid = follower.process.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises((TimeoutError, urllib.error.URLError, OSError)):
            _probe(follower.health_port, "/livez")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: _probe(follower.health_port, "/livez")[0] == 200, timeout=10, message="live again")
