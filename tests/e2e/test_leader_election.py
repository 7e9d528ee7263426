"""Leader election (secured_endpoint.leader) against a real kube-apiserver + etcd, with short timings: lease 3 s,
renew deadline 2 s, retry period 0.5 s. Every test samples ``is_leader`` of every candidate every 50 ms, and the
Lease itself, and fails if two candidates ever lead at once.

- Two candidates in one event loop: exactly one leads, for several lease durations; the Lease names it, with
  ``leaseTransitions`` 0, MicroTime timestamps, a ``renewTime`` that moves and an ``acquireTime`` that does not;
  both were told who the leader is.
- A graceful stop releases the Lease (after ``on_stopped_leading``, which still finds it held) and the other
  candidate leads within one jittered retry period; measured over several handovers.
- A leader cut off from the apiserver (connections refused, or silently dropped so requests hang) stops leading
  within the renew deadline of its last renewal, and the other takes over only once the lease has run out.
- A third party writing its own holder into the Lease is respected: the leader steps down at its next renewal
  and nobody takes over before that holder's lease runs out (by the candidates' clocks).
- A leader that loses a conflicting write (409) to a rival steps down at once — on the fast path (its renewal
  over the version it wrote) and on the slow path (after re-reading); a 409 caused by an unrelated change (a
  label) costs nothing: it renews over the new version and keeps the label. A candidate whose create loses
  to a rival's follows it.
- RBAC: the leader-election Role of ``manifests/rbac-cluster.yaml`` and ``rbac-namespaced.yaml`` (the same in
  both) is all a ServiceAccount needs to create, hold, renew and release the Lease, and grants nothing more
  (no other Lease, no other namespace, no delete, no list).
- Two OS processes, each running an elector: SIGKILL of the leader → the other leads after the lease has run
  out, at most lease duration + one jittered retry period after the dead leader's last renewal; SIGTERM → it
  releases and the other leads within one jittered retry period. Measured over several kills.

Measured figures are printed (``-s`` shows them): ``handover`` lines give median and max.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from secured_endpoint import kube, leader
from secured_endpoint_devenv import controlplane
from tests.conftest import load_yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
LEADER_ELECTION_RBAC = "secured-endpoint-operator-leader-election"
FAST = leader.Timing(lease_duration=3.0, renew_deadline=2.0, retry_period=0.5)
LEASE = "secured-endpoint-operator"
SAMPLE_SECONDS = 0.05
# The longest a follower sleeps between two tries: client-go's jitter, up to 2.2 retry periods.
MAX_FOLLOWER_WAIT = FAST.retry_period * (1 + FAST.jitter_factor)
SLACK = 0.5  # requests, scheduling and sampling on a 2-core machine running the apiserver too


# -- fixtures and helpers -------------------------------------------------------------------------------------


@pytest.fixture
async def admin(control_plane: controlplane.ControlPlane) -> AsyncIterator[kube.KubeClient]:
    """The test's own hands on the cluster; every candidate gets a client of its own."""
    client = await new_client(control_plane)
    yield client
    await client.aclose()


@pytest.fixture
async def lease_namespace(admin: kube.KubeClient) -> AsyncIterator[str]:
    name = f"le-{uuid.uuid4().hex[:10]}"
    await admin.request("POST", "/api/v1/namespaces",
                        json_body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    await admin.request("DELETE", f"/api/v1/namespaces/{name}")


async def new_client(control_plane: controlplane.ControlPlane, *, server: str | None = None,
                     client_class: type[kube.KubeClient] = kube.KubeClient) -> kube.KubeClient:
    credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=str(control_plane.kubeconfig_path))
    if server is not None:
        credentials = dataclasses.replace(credentials, server=server)
    return client_class(credentials)


def wall_of(micro_time: str) -> float:
    return datetime.strptime(micro_time, leader.MICRO_TIME_FORMAT).replace(tzinfo=UTC).timestamp()


async def eventually(predicate: Callable[[], Any], *, timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out after {timeout:g} s waiting for {message}")


def report(what: str, seconds: list[float]) -> None:
    print(f"\nhandover {what}: median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s over "
          f"{len(seconds)} runs: {', '.join(f'{value:.3f}' for value in seconds)}")


class Candidate:
    """One elector on its own task, with what its callbacks saw and when (monotonic and wall clock)."""

    def __init__(self, client: kube.KubeClient, namespace: str, label: str, *,
                 on_stopped: Callable[[], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.events: list[tuple[str, float, float]] = []  # (what, monotonic, wall)
        self.leaders: list[str] = []
        self._on_stopped = on_stopped
        self.elector = leader.LeaderElector(
            client, namespace=namespace, name=LEASE, identity=f"{label}_{uuid.uuid4().hex[:8]}", timing=FAST,
            on_started_leading=lambda: self._note("started"), on_stopped_leading=self._stopped,
            on_new_leader=self.leaders.append)
        self.task: asyncio.Task[None] | None = None

    def _note(self, what: str) -> None:
        self.events.append((what, time.monotonic(), time.time()))

    async def _stopped(self) -> None:
        self._note("stopped")
        if self._on_stopped is not None:
            await self._on_stopped()

    @property
    def identity(self) -> str:
        return self.elector.identity

    def start(self) -> Candidate:
        self.task = asyncio.create_task(self.elector.run(), name=self.identity)
        return self

    def when(self, what: str) -> list[tuple[float, float]]:
        return [(mono, wall) for event, mono, wall in self.events if event == what]

    async def close(self) -> None:
        await self.elector.stop()
        if self.task is not None and self.task.done() and not self.task.cancelled():
            self.task.result()  # a callback's exception would surface here
        await self.client.aclose()


class Watcher:
    """Every 50 ms: who says it leads, and what the Lease holds. Fails the test on two leaders at once."""

    def __init__(self, admin: kube.KubeClient, namespace: str, candidates: list[Candidate]) -> None:
        self.admin, self.namespace, self.candidates = admin, namespace, candidates
        self.samples: list[tuple[float, list[str]]] = []  # (monotonic, identities leading)
        self.renewals: dict[str, float] = {}  # holder -> wall time of the latest renewTime seen
        self.records: list[leader.LeaseRecord] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            leading = [candidate.identity for candidate in self.candidates if candidate.elector.is_leader]
            self.samples.append((time.monotonic(), leading))
            lease = await self.admin.get_lease(self.namespace, LEASE)
            if lease is not None:
                record = leader.LeaseRecord.from_lease(lease)
                if not self.records or self.records[-1] != record:
                    self.records.append(record)
                if record.holder and record.renew_time:
                    self.renewals[record.holder] = wall_of(record.renew_time)
            await asyncio.sleep(SAMPLE_SECONDS)

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.assert_never_two_leaders()

    def assert_never_two_leaders(self) -> None:
        both = [(at, leading) for at, leading in self.samples if len(leading) > 1]
        assert not both, f"two leaders at once: {both[:3]}"
        assert len(self.samples) > 10, "the watcher sampled"

    def leading_now(self) -> list[str]:
        return [candidate.identity for candidate in self.candidates if candidate.elector.is_leader]


async def leader_among(*candidates: Candidate, timeout: float = 5.0) -> Candidate:
    found: Candidate = await eventually(lambda: next((c for c in candidates if c.elector.is_leader), None),
                                        timeout=timeout, message="a leader")
    return found


# -- one event loop, two candidates -----------------------------------------------------------------------------


async def test_exactly_one_of_two_candidates_leads(control_plane: controlplane.ControlPlane,
                                                   admin: kube.KubeClient, lease_namespace: str) -> None:
    async with asyncio.timeout(30):
        a = Candidate(await new_client(control_plane), lease_namespace, "a")
        b = Candidate(await new_client(control_plane), lease_namespace, "b")
        async with Watcher(admin, lease_namespace, [a, b]) as watcher:
            a.start()  # both find no Lease: both try to create it, one wins
            b.start()
            first = await leader_among(a, b)
            other = b if first is a else a
            await asyncio.sleep(3 * FAST.lease_duration)
            assert all(leading == [first.identity] for at, leading in watcher.samples
                       if at > first.when("started")[0][0]), "the same one led all along"
            lease = await admin.get_lease(lease_namespace, LEASE)
            await other.close()  # the follower first: it must not take over when the leader releases
            await first.close()
    assert lease is not None
    spec = lease["spec"]
    assert spec["holderIdentity"] == first.identity
    assert spec["leaseDurationSeconds"] == 3
    assert spec["leaseTransitions"] == 0
    for field in ("acquireTime", "renewTime"):
        assert wall_of(spec[field]) > 0, f"{field} is a MicroTime: {spec[field]}"
    held = [record for record in watcher.records if record.holder == first.identity]
    assert len({record.acquire_time for record in held}) == 1, "acquireTime stays for the whole term"
    assert len({record.renew_time for record in held}) >= 3 * FAST.lease_duration / FAST.retry_period / 2, \
        "renewed every retry period"
    assert len(first.when("started")) == 1
    assert other.when("started") == []
    assert other.elector.leader == first.identity
    assert first.leaders[0] == first.identity
    assert other.leaders[0] == first.identity


async def test_a_graceful_stop_releases_and_the_other_leads_within_a_retry_period(
        control_plane: controlplane.ControlPlane, admin: kube.KubeClient, lease_namespace: str) -> None:
    holders_at_stop: list[str] = []

    async def lease_holder_at_stop() -> None:  # on_stopped_leading: the Lease must still be ours here
        lease = await admin.get_lease(lease_namespace, LEASE)
        holders_at_stop.append(((lease or {}).get("spec") or {}).get("holderIdentity", ""))

    handovers: list[float] = []
    async with asyncio.timeout(60):
        candidates = [Candidate(await new_client(control_plane), lease_namespace, label,
                                on_stopped=lease_holder_at_stop).start() for label in ("a", "b")]
        async with Watcher(admin, lease_namespace, candidates) as watcher:
            current = await leader_among(*candidates)
            for run in range(6):
                await asyncio.sleep(1.0)  # the follower is polling
                follower = next(c for c in watcher.candidates if c is not current)
                stopped = time.monotonic()
                await current.close()  # run() cancelled: stop leading, then release
                assert not current.elector.is_leader
                await eventually(lambda f=follower: f.elector.is_leader, timeout=MAX_FOLLOWER_WAIT + SLACK,
                                 message="the follower to take over")
                handovers.append(follower.when("started")[-1][0] - stopped)
                assert holders_at_stop[-1] == current.identity, "released only after on_stopped_leading"
                lease = await admin.get_lease(lease_namespace, LEASE)
                assert lease is not None
                assert lease["spec"]["leaseTransitions"] == run + 1
                fresh = Candidate(await new_client(control_plane), lease_namespace, f"c{run}",
                                  on_stopped=lease_holder_at_stop).start()
                watcher.candidates = [follower, fresh]
                current = follower
            assert any(record.holder == "" and record.lease_duration_seconds == 1 for record in watcher.records), \
                "the release wrote an empty holder with a 1 s lease"
            for candidate in watcher.candidates:
                await candidate.close()
    report(f"after a graceful stop (retry period {FAST.retry_period:g} s, jitter up to "
           f"{MAX_FOLLOWER_WAIT:g} s)", handovers)
    assert max(handovers) < MAX_FOLLOWER_WAIT + SLACK


class Link:
    """A TCP forwarder on loopback between one candidate and the apiserver, which the test can cut: ``refuse``
    closes every connection and the port (connection refused); ``drop`` keeps the connections open but
    forwards nothing any more, on old and new ones (requests hang, as behind a dead network)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.mode = "open"
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Link:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.mode != "open":
            return  # accepted and kept open; nothing forwarded
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.append(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    def cut(self, mode: str) -> None:
        self.mode = mode
        for task in list(self._pumps):
            task.cancel()
        if mode == "refuse":
            self._close_all()

    def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()

    async def close(self) -> None:
        self.cut("refuse")
        await asyncio.sleep(0)


@pytest.mark.parametrize("mode", ["refuse", "drop"])
async def test_a_leader_that_cannot_renew_stops_before_the_lease_runs_out(
        control_plane: controlplane.ControlPlane, admin: kube.KubeClient, lease_namespace: str, mode: str) -> None:
    async with asyncio.timeout(30):
        link = await Link(control_plane.apiserver_port).start()
        a = Candidate(await new_client(control_plane, server=link.server), lease_namespace, "a").start()
        await leader_among(a)
        b = Candidate(await new_client(control_plane), lease_namespace, "b").start()
        async with Watcher(admin, lease_namespace, [a, b]) as watcher:
            await asyncio.sleep(1.5)  # b has seen a renew a few times
            cut_at = time.time()
            link.cut(mode)
            await eventually(lambda: b.elector.is_leader, timeout=FAST.lease_duration + 2 * MAX_FOLLOWER_WAIT + SLACK,
                             message="b to take over")
            last_renewal = watcher.renewals[a.identity]  # wall time of a's last renewTime the Lease held
            await asyncio.sleep(1.0)
            assert watcher.leading_now() == [b.identity]
            await b.close()
            await a.close()  # its release cannot get through, and must not be needed
            await link.close()
    a_stopped, b_started = a.when("stopped")[0][1], b.when("started")[0][1]
    print(f"\ncut ({mode}) {cut_at - last_renewal:.3f} s after a's last renewal: a stopped "
          f"{a_stopped - last_renewal:.3f} s after it, b led {b_started - last_renewal:.3f} s after it")
    assert a_stopped <= last_renewal + FAST.renew_deadline + 0.2, "stopped at the renew deadline"
    assert b_started >= last_renewal + FAST.lease_duration, "b waited for the lease to run out"
    assert b_started <= last_renewal + FAST.lease_duration + MAX_FOLLOWER_WAIT + SLACK, "and not much longer"
    assert b_started - a_stopped >= FAST.lease_duration - FAST.renew_deadline - 0.2
    assert len(a.when("stopped")) == 1
    assert len(a.when("started")) == 1, "a never came back: it still cannot reach the apiserver"


async def test_a_third_party_holder_is_respected(control_plane: controlplane.ControlPlane, admin: kube.KubeClient,
                                                 lease_namespace: str) -> None:
    async with asyncio.timeout(30):
        a = Candidate(await new_client(control_plane), lease_namespace, "a").start()
        await leader_among(a)
        b = Candidate(await new_client(control_plane), lease_namespace, "b").start()
        async with Watcher(admin, lease_namespace, [a, b]) as watcher:
            await asyncio.sleep(1.0)
            while True:  # as any writer of a Lease must: over the version read, again if a renewal came between
                lease = await admin.get_lease(lease_namespace, LEASE)
                assert lease is not None
                before = leader.LeaseRecord.from_lease(lease)
                written = time.monotonic()
                record = leader.next_record(before, "someone-else", FAST, datetime.now(UTC))
                try:
                    await admin.replace_lease(lease_namespace, LEASE, leader.updated_lease(lease, record))
                    break
                except kube.KubeError as exc:
                    if not exc.conflict:
                        raise
            stepped_down = await eventually(lambda: a.when("stopped"), timeout=FAST.retry_period + SLACK,
                                            message="a to step down")
            assert not a.elector.is_leader
            new = await leader_among(a, b, timeout=FAST.lease_duration + 2 * MAX_FOLLOWER_WAIT + SLACK)
            taken = time.monotonic()
            after = await admin.get_lease(lease_namespace, LEASE)
            await a.close()
            await b.close()
    print(f"\nthird-party holder: a stepped down {stepped_down[0][0] - written:.3f} s after the write, "
          f"{new.identity.split('_')[0]} took over {taken - written:.3f} s after it")
    assert stepped_down[0][0] - written < FAST.retry_period + SLACK
    assert taken - written >= FAST.lease_duration, "nobody took it before someone-else's lease ran out"
    assert not any(leading for at, leading in watcher.samples if stepped_down[0][0] < at < written + 2.9)
    assert after is not None
    assert after["spec"]["holderIdentity"] == new.identity
    assert after["spec"]["leaseTransitions"] == before.transitions + 2, "one to someone-else, one from it"
    assert a.leaders.count("someone-else") == 1
    assert b.leaders.count("someone-else") == 1


class RacingClient(kube.KubeClient):
    """A real client that, just before chosen Lease writes reach the apiserver, lets a rival write first (for
    real, through another client), so that the write meets a real 409."""

    races: list[Callable[[kube.JSON], Awaitable[None]] | None]
    creates: list[Callable[[kube.JSON], Awaitable[None]]]
    writes: int = 0

    async def replace_lease(self, namespace: str, name: str, body: kube.JSON) -> kube.JSON:
        self.writes += 1
        race = self.races.pop(0) if getattr(self, "races", None) else None
        if race is not None:
            await race(body)
        return await super().replace_lease(namespace, name, body)

    async def create_lease(self, namespace: str, body: kube.JSON) -> kube.JSON:
        if getattr(self, "creates", None):
            await self.creates.pop(0)(body)
        return await super().create_lease(namespace, body)


def rival_takes_over(admin: kube.KubeClient, namespace: str,
                     moments: list[float]) -> Callable[[kube.JSON], Awaitable[None]]:
    async def race(body: kube.JSON) -> None:
        # over the very version the candidate is about to write over: the rival wins, the candidate gets 409
        lease = await admin.get_lease(namespace, LEASE)
        assert lease is not None
        assert lease["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]
        record = leader.next_record(leader.LeaseRecord.from_lease(lease), "rival", FAST, datetime.now(UTC))
        moments.append(time.monotonic())
        await admin.replace_lease(namespace, LEASE, leader.updated_lease(lease, record))
    return race


def someone_labels_it(admin: kube.KubeClient, namespace: str) -> Callable[[kube.JSON], Awaitable[None]]:
    async def race(body: kube.JSON) -> None:
        await admin.request("PATCH", admin.lease_path(namespace, LEASE), json_body={
            "metadata": {"labels": {"team": "platform"}}}, content_type="application/merge-patch+json")
    return race


@pytest.mark.parametrize("path", ["fast", "slow"])
async def test_a_leader_that_loses_a_conflicting_write_steps_down(
        control_plane: controlplane.ControlPlane, admin: kube.KubeClient, lease_namespace: str, path: str) -> None:
    async with asyncio.timeout(30):
        client = await new_client(control_plane, client_class=RacingClient)
        assert isinstance(client, RacingClient)
        a = Candidate(client, lease_namespace, "a").start()
        await leader_among(a)
        async with Watcher(admin, lease_namespace, [a]) as watcher:
            await asyncio.sleep(1.0)
            raced: list[float] = []
            # fast: the renewal over a's own last version loses; slow: a label change sends a to re-read, and
            # its second write (over the version it just read) loses
            client.races = [rival_takes_over(admin, lease_namespace, raced)] if path == "fast" else \
                [someone_labels_it(admin, lease_namespace), rival_takes_over(admin, lease_namespace, raced)]
            stopped = await eventually(lambda: a.when("stopped"), timeout=FAST.retry_period + SLACK,
                                       message="a to step down")
            assert not a.elector.is_leader
            assert a.elector.leader == "rival"
            back = await eventually(lambda: len(a.when("started")) == 2 and a.when("started")[1],
                                    timeout=FAST.lease_duration + 2 * MAX_FOLLOWER_WAIT + SLACK,
                                    message="a to take the abandoned Lease back")
            await a.close()
    assert watcher.samples
    print(f"\n409 on the {path} path: a stepped down {stopped[0][0] - raced[0]:.3f} s after the rival's write")
    assert stopped[0][0] - raced[0] < 0.5, "at once, not at the renew deadline"
    assert back[0] - raced[0] >= FAST.lease_duration, "the rival's lease was respected until it ran out"


async def test_a_conflict_from_an_unrelated_change_costs_nothing(
        control_plane: controlplane.ControlPlane, admin: kube.KubeClient, lease_namespace: str) -> None:
    async with asyncio.timeout(30):
        client = await new_client(control_plane, client_class=RacingClient)
        assert isinstance(client, RacingClient)
        a = Candidate(client, lease_namespace, "a").start()
        await leader_among(a)
        async with Watcher(admin, lease_namespace, [a]) as watcher:
            client.races = [someone_labels_it(admin, lease_namespace)]
            writes = client.writes
            await eventually(lambda: client.writes >= writes + 4, timeout=5, message="a few more renewals")
            assert all(leading == [a.identity] for _, leading in watcher.samples)
            lease = await admin.get_lease(lease_namespace, LEASE)
            await a.close()
    assert lease is not None
    assert lease["metadata"]["labels"] == {"team": "platform"}, "the PUT kept what it read"
    assert lease["spec"]["holderIdentity"] == a.identity
    assert lease["spec"]["leaseTransitions"] == 0
    assert len(a.when("stopped")) == 1, "only the final stop"


async def test_a_candidate_whose_create_loses_follows_the_winner(
        control_plane: controlplane.ControlPlane, admin: kube.KubeClient, lease_namespace: str) -> None:
    async def rival_creates(body: kube.JSON) -> None:
        record = leader.next_record(None, "rival", FAST, datetime.now(UTC))
        await admin.create_lease(lease_namespace, leader.new_lease(lease_namespace, LEASE, record))

    async with asyncio.timeout(30):
        client = await new_client(control_plane, client_class=RacingClient)
        assert isinstance(client, RacingClient)
        client.creates = [rival_creates]
        a = Candidate(client, lease_namespace, "a")
        async with Watcher(admin, lease_namespace, [a]) as watcher:
            a.start()
            await eventually(lambda: a.elector.leader == "rival", timeout=2, message="a to see the rival")
            assert not a.elector.is_leader
            await asyncio.sleep(1.0)
            assert not a.elector.is_leader
            await a.close()
    assert a.when("started") == []
    assert a.leaders == ["rival"]
    assert all(record.holder == "rival" for record in watcher.records), "a never wrote over the rival"


# -- RBAC -----------------------------------------------------------------------------------------------------


def _can(control_plane: controlplane.ControlPlane, account: str, *args: str) -> bool:
    answer = control_plane.kubectl("auth", "can-i", *args, f"--as={account}", check=False).stdout.strip()
    return answer == "yes"


def test_both_manifests_grant_the_same_lease_rules() -> None:
    def lease_documents(manifest: str) -> list[dict[str, Any]]:
        return [document for document in load_yaml(MANIFESTS / manifest)
                if document["metadata"]["name"] == LEADER_ELECTION_RBAC]

    cluster, namespaced = lease_documents("rbac-cluster.yaml"), lease_documents("rbac-namespaced.yaml")
    assert cluster == namespaced
    assert [document["kind"] for document in cluster] == ["Role", "RoleBinding"], "nothing cluster-wide"
    assert {document["metadata"]["namespace"] for document in cluster} == {"secured-endpoint-system"}
    role = cluster[0]
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [LEASE],
         "verbs": ["get", "update"]}]


async def test_the_lease_role_is_all_an_elector_needs(control_plane: controlplane.ControlPlane,
                                                      admin: kube.KubeClient, lease_namespace: str) -> None:
    account_name = "secured-endpoint-operator"
    documents = [document for document in load_yaml(MANIFESTS / "rbac-cluster.yaml")
                 if document["metadata"]["name"] == LEADER_ELECTION_RBAC]
    for document in documents:  # the operator's namespace is this test's
        document["metadata"]["namespace"] = lease_namespace
        for subject in document.get("subjects", ()):
            subject["namespace"] = lease_namespace

    def setup() -> str:
        control_plane.kubectl("create", "serviceaccount", account_name, "-n", lease_namespace)
        control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                    "items": documents}))
        return control_plane.kubectl("create", "token", account_name, "-n", lease_namespace,
                                     "--duration=1h").stdout.strip()

    token = await asyncio.to_thread(setup)
    account = f"system:serviceaccount:{lease_namespace}:{account_name}"
    allowed = [("create", "leases"), ("get", f"leases/{LEASE}"), ("update", f"leases/{LEASE}")]
    refused = [("get", "leases/another"), ("update", "leases/another"), ("delete", f"leases/{LEASE}"),
               ("patch", f"leases/{LEASE}"), ("list", "leases"), ("watch", "leases")]
    for verb, resource in allowed:
        assert await asyncio.to_thread(_can, control_plane, account, verb, resource, "-n", lease_namespace), \
            f"{verb} {resource}"
    for verb, resource in refused:
        assert not await asyncio.to_thread(_can, control_plane, account, verb, resource, "-n", lease_namespace), \
            f"{verb} {resource}"
    assert not await asyncio.to_thread(_can, control_plane, account, "get", f"leases/{LEASE}", "-n", "default")

    async with asyncio.timeout(30):
        credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=str(control_plane.kubeconfig_path))
        client = kube.KubeClient(dataclasses.replace(credentials, token=token, configuration=None))
        a = Candidate(client, lease_namespace, "sa").start()  # creates the Lease
        await leader_among(a)
        await asyncio.sleep(2 * FAST.renew_deadline)  # renews, well past the deadline
        assert a.elector.is_leader
        await a.close()  # releases
    lease = await admin.get_lease(lease_namespace, LEASE)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "", "released"
    assert a.leaders == [a.identity]
    assert len(a.when("stopped")) == 1


# -- two OS processes -------------------------------------------------------------------------------------------

CANDIDATE_SCRIPT = """
import asyncio, json, signal, sys, time
from secured_endpoint import kube, leader

def say(event, identity):
    print(json.dumps({"event": event, "wall": time.time(), "identity": identity}), flush=True)

async def main(kubeconfig, namespace, name, label, lease, renew, retry):
    client = kube.KubeClient(await asyncio.to_thread(kube.load_credentials, kubeconfig=kubeconfig))
    identity = leader.default_identity({"POD_NAME": label})
    elector = leader.LeaderElector(
        client, namespace=namespace, name=name, identity=identity,
        timing=leader.Timing(float(lease), float(renew), float(retry)),
        on_started_leading=lambda: say("started", identity), on_stopped_leading=lambda: say("stopped", identity))
    task = asyncio.create_task(elector.run())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    say("running", identity)
    try:
        await task
    except asyncio.CancelledError:
        say("released", identity)
    await client.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


class CandidateProcess:
    def __init__(self, control_plane: controlplane.ControlPlane, namespace: str, label: str, workdir: Path,
                 timing: leader.Timing = FAST) -> None:
        self.out = workdir / f"{label}.out"
        with self.out.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", CANDIDATE_SCRIPT, str(control_plane.kubeconfig_path), namespace, LEASE, label,
                 str(timing.lease_duration), str(timing.renew_deadline), str(timing.retry_period)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def events(self) -> list[dict[str, Any]]:
        lines = self.out.read_text(errors="replace").splitlines() if self.out.exists() else []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def when(self, event: str) -> float | None:
        return next((item["wall"] for item in self.events() if item["event"] == event), None)

    @property
    def identity(self) -> str:
        return next((item["identity"] for item in self.events()), "")

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


async def test_two_processes_sigkill_and_sigterm_of_the_leader(control_plane: controlplane.ControlPlane,
                                                               admin: kube.KubeClient, lease_namespace: str,
                                                               tmp_path: Path) -> None:
    kills: list[float] = []
    terms: list[float] = []
    renewals: dict[str, float] = {}

    async def follow_lease() -> None:
        while True:
            lease = await admin.get_lease(lease_namespace, LEASE)
            record = leader.LeaseRecord.from_lease(lease or {})
            if record.holder and record.renew_time:
                renewals[record.holder] = wall_of(record.renew_time)
            await asyncio.sleep(SAMPLE_SECONDS)

    processes: list[CandidateProcess] = []
    follower_task = asyncio.create_task(follow_lease())
    try:
        async with asyncio.timeout(150):
            current = CandidateProcess(control_plane, lease_namespace, "p0", tmp_path)
            processes.append(current)
            await eventually(lambda: current.when("started"), timeout=15, message="the first process to lead")
            for run, how in enumerate(["kill"] * 6 + ["term"] * 4, start=1):
                follower = CandidateProcess(control_plane, lease_namespace, f"p{run}", tmp_path)
                processes.append(follower)
                await eventually(lambda f=follower: f.when("running"), timeout=15, message="the follower to run")
                await asyncio.sleep(1.5)  # it has read the Lease a few times
                assert follower.when("started") is None
                ended = time.time()
                current.process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
                started = await eventually(lambda f=follower: f.when("started"),
                                           timeout=FAST.lease_duration + 2 * MAX_FOLLOWER_WAIT + 2 * SLACK,
                                           message=f"the follower to lead after {how}")
                current.process.wait(timeout=10)
                if how == "kill":
                    kills.append(started - ended)
                    # the Lease ran out by the follower's clock: no earlier than the dead leader's last renewal
                    assert started >= renewals[current.identity] + FAST.lease_duration
                    assert started <= renewals[current.identity] + FAST.lease_duration + MAX_FOLLOWER_WAIT + SLACK
                else:
                    terms.append(started - ended)
                    stopped = current.when("stopped")
                    assert stopped is not None, "on_stopped_leading ran on SIGTERM"
                    assert stopped <= started
                    assert current.when("released") is not None
                current = follower
    finally:
        follower_task.cancel()
        for process in processes:
            process.end()
    report(f"after SIGKILL (lease {FAST.lease_duration:g} s, retry period {FAST.retry_period:g} s)", kills)
    report("after SIGTERM", terms)
    assert max(kills) < FAST.lease_duration + MAX_FOLLOWER_WAIT + SLACK
    assert max(terms) < MAX_FOLLOWER_WAIT + 2 * SLACK, "released: the follower's next try takes it"
    lease = await admin.get_lease(lease_namespace, LEASE)
    assert lease is not None
    assert lease["spec"]["leaseTransitions"] == 10
