"""Chaos 1: the operator SIGKILLed again and again while endpoints are created, changed, rotated and deleted.

A workload thread creates endpoints, changes their spec (a new scope: a new generation and a new token),
rotates the one credential Secret shared by half of them (a new client at the token server, then the Secret)
and deletes some, while the test kills the operator at random moments and starts it again at once. Token
lifetime 60 s, so that no kill can legitimately outlast a token. After the last restart, within 30 s:
- every live endpoint is Ready for its current generation, and those on the shared Secret were issued with its
  current resourceVersion;
- every deleted endpoint is gone (its finalizer released) and every live one has exactly one token Secret;
  no token Secret belongs to an endpoint that no longer exists, except one whose create was applied after the
  operator that sent it was killed and its successor had released the deletion: that one is owned (controller
  ownerReference) by the deleted uid, which leaves it to the garbage collector;
- then a real garbage collector (kube-controller-manager running only that controller; the session control
  plane runs none) is started: within GC_BOUND_S it deletes exactly those Secrets and a canary (the audit log names
  it as the deleter), every other Secret of the namespace stays the same object, and no token Secret of a
  deleted endpoint is left;
- a sampler reading every token Secret throughout never saw an expired token, a half-written Secret, or a
  live endpoint's Secret gone.
CI: 60 endpoints, 5 kills. ``SEP_CHAOS_FULL=1``: 1,000 endpoints, 20 kills. A CI-sized run rarely leaves the
collector anything: the second test makes that case on purpose.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client as k8s

from secured_endpoint import api
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.chaos.conftest import Chaos, GarbageCollector, TokenSampler, ready_for_generation, report, size
from tests.conftest import RECORD, Setup, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

SHARED = "shared"
# kube-controller-manager syncs its picture of every resource in the cluster first: 0.7-1.6 s on the CI-sized
# namespace, 19 s after the full-sized run (1,000 endpoints and the session's leftovers)
GC_BOUND_S = 60
OWN = "own"


class Workload(threading.Thread):
    """Creates, changes, rotates and deletes, spread over ``duration`` seconds; keeps the book of what lives."""

    def __init__(self, setup: Setup, server: TokenServer, first: int, total: int, updates: int, rotations: int,
                 deletes: int, duration: float) -> None:
        super().__init__(name="chaos-workload", daemon=True)
        self.setup, self.server = setup, server
        self.lock = threading.Lock()
        self.alive: set[str] = {f"e-{index}" for index in range(first)}
        self.deleted: set[str] = set()
        self.next_index = first
        ops = ["create"] * (total - first) + ["update"] * updates + ["rotate"] * rotations + ["delete"] * deletes
        random.shuffle(ops)
        self.ops = ops
        self.delay = duration / max(1, len(ops))
        self.done: dict[str, int] = {"create": 0, "update": 0, "rotate": 0, "delete": 0}
        self.failures: list[str] = []
        self._halt = threading.Event()

    def names(self) -> set[str]:
        with self.lock:
            return set(self.alive)

    def run(self) -> None:
        for op in self.ops:
            if self._halt.wait(self.delay):
                return
            try:
                getattr(self, op)()
                self.done[op] += 1
            except Exception as exc:  # recorded and asserted on: the apiserver never goes away here
                self.failures.append(f"{op}: {type(exc).__name__}")

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def create(self) -> None:
        with self.lock:
            name = f"e-{self.next_index}"
            self.next_index += 1
        self.setup.endpoint(name, self.server, clientSecretRef={"name": secret_for(name)})
        with self.lock:
            self.alive.add(name)

    def update(self) -> None:
        with self.lock:
            name = random.choice(sorted(self.alive))
        self.setup.kube.patch_endpoint(self.setup.namespace, name, {"spec": {"scopes": [f"s{uuid.uuid4().hex[:6]}"]}})

    def rotate(self) -> None:
        rotate(self.setup, self.server)

    def delete(self) -> None:
        with self.lock:
            name = random.choice(sorted(self.alive))
            self.alive.discard(name)
            self.deleted.add(name)
        self.setup.kube.delete_endpoint(self.setup.namespace, name)


def secret_for(name: str) -> str:
    return SHARED if int(name.split("-")[1]) % 2 == 0 else OWN


def rotate(setup: Setup, server: TokenServer) -> None:
    """A new client at the token server first (the old one keeps working, as during a real rotation), then the
    shared Secret names it: a new resourceVersion that every endpoint on it must pick up."""
    client_id, client_secret = f"client-{uuid.uuid4().hex[:8]}", f"r0tated:{uuid.uuid4().hex}"
    server.add_client(client_id, client_secret)
    setup.secret_values.add(client_secret)
    RECORD.client_ids[client_secret] = client_id
    setup.kube.update_secret(setup.namespace, SHARED, {"client_id": client_id, "client_secret": client_secret})


def unsettled(chaos: Chaos, alive: set[str], shared_version: str) -> list[str]:
    """What still keeps the namespace from the state the scenario demands (empty once it is reached)."""
    problems: list[str] = []
    seen: set[str] = set()
    for endpoint in chaos.endpoints():
        name = endpoint["metadata"]["name"]
        seen.add(name)
        if name not in alive:
            problems.append(f"{name}: deleted, still there")
        elif not ready_for_generation(endpoint):
            problems.append(f"{name}: not Ready for generation {endpoint['metadata'].get('generation')}")
        elif secret_for(name) == SHARED and \
                (endpoint.get("status") or {}).get("sourceVersions", {}).get(f"Secret/{SHARED}") != shared_version:
            problems.append(f"{name}: not issued with the rotated Secret")
    problems += [f"{name}: missing" for name in alive - seen]
    return problems


def test_sigkill_during_creates_updates_rotations_and_deletes(chaos: Chaos, garbage_collector: GarbageCollector,
                                                              token_server: TokenServer,
                                                              secret_values: set[str]) -> None:
    total, kills = size(60, 1000), size(5, 20)
    first = total * 2 // 3
    token_server.lifetime_seconds = 60  # refreshed 40 s after issue: a kill and restart (~2 s) cannot outlast one
    token_server.delay_seconds = 0.05  # token requests in flight when a kill lands
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    setup.client(token_server, secret_name=SHARED)
    setup.client(token_server, secret_name=OWN)
    chaos.operator.start()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: setup.endpoint(f"e-{i}", token_server, clientSecretRef={"name": secret_for(f"e-{i}")}),
                      range(first)))
    gaps = [random.uniform(1.5, 4.0) for _ in range(kills)]
    workload = Workload(setup, token_server, first, total, updates=total // 2, rotations=max(3, kills // 2),
                        deletes=total // 4, duration=sum(gaps))
    sampler = TokenSampler(chaos.kube, chaos.namespace, [token_server], alive=workload.names, interval=0.1)
    sampler.start()
    workload.start()
    started = time.monotonic()
    try:
        for gap in gaps:
            time.sleep(gap)
            chaos.kill()
            chaos.new_operator().start()
        workload.join(timeout=60)
        assert not workload.is_alive(), "the workload finished"
        last_restart = time.monotonic()
        shared_version = chaos.kube.core.read_namespaced_secret(SHARED, chaos.namespace).metadata.resource_version
        alive = workload.names()
        deadline = last_restart + 30
        problems = unsettled(chaos, alive, shared_version)
        while problems and time.monotonic() < deadline:
            time.sleep(0.25)
            problems = unsettled(chaos, alive, shared_version)
        recovery = time.monotonic() - last_restart
        time.sleep(1)  # the sampler sees the settled state too
    finally:
        sampler.stop()
        workload.stop()

    # A token Secret create sent just before a SIGKILL can still be applied after the next operator, finding no
    # Secret, has released the endpoint's deletion. Its controller ownerReference then names an endpoint uid that
    # no longer exists: the garbage collector's to delete. This control plane runs none, so one is started now,
    # after the operator's own clean-up was judged without it, and must delete exactly those (and a canary).
    before_gc = chaos.token_secrets()
    live_uids = {endpoint["metadata"]["uid"] for endpoint in chaos.endpoints()}
    collectable = {secret.metadata.name: secret.metadata.uid for secret in before_gc
                   if left_to_the_garbage_collector(secret, live_uids)}
    owners_before = owners_of(before_gc)
    uncollectable = sorted(owner for owner in set(owners_before) - alive
                           if not set(owners_before[owner]) <= set(collectable))
    namespace_before = all_secrets(chaos)
    canary = garbage_collector.plant_canary(chaos.namespace)
    kcm_start = garbage_collector.start()
    expected = {*collectable, canary}
    gc_deadline = garbage_collector.started_at + GC_BOUND_S
    while (still := expected & set(all_secrets(chaos))) and time.monotonic() < gc_deadline:
        time.sleep(0.1)
    collected_in = time.monotonic() - garbage_collector.started_at  # kube-controller-manager's start included
    deleted_by_gc = garbage_collector.deletions(chaos.namespace)
    while not still and set(deleted_by_gc) < expected and time.monotonic() < gc_deadline + 5:  # see deletions()
        time.sleep(0.1)
        deleted_by_gc = garbage_collector.deletions(chaos.namespace)
    namespace_after = all_secrets(chaos)
    after_gc = chaos.token_secrets()
    owners = owners_of(after_gc)
    orphaned = sorted(owner for owner in set(owners) - alive)
    not_one = sorted(name for name in alive if owners.get(name) != [f"{name}-token"])
    fetches = chaos.operator.log_text().count("Fetching a token for ")
    figures: dict[str, Any] = {
        "endpoints": total, "kills": kills, **{f"{op}s": count for op, count in workload.done.items()},
        "live_at_end": len(alive), "token_requests": token_server.token_requests, "fetches_logged": fetches,
        "recovery_after_last_restart_s": round(recovery, 1), "chaos_phase_s": round(last_restart - started, 1),
        "sampler_reads": sampler.reads, "expired_tokens_observed": len(sampler.expired),
        "half_written_observed": len(sampler.broken), "tokens_lost": len(sampler.lost) + len(not_one),
        "collected_by_the_garbage_collector": len(collectable), "gc_collected_in_s": round(collected_in, 1),
        "kcm_start_s": round(kcm_start, 1), "orphaned_secrets": len(set(orphaned) | set(uncollectable)),
    }
    report("1 operator SIGKILL", **figures)
    assert workload.failures == []
    assert problems == [], f"not settled 30 s after the last restart: {problems[:10]}"
    assert uncollectable == [], f"token Secrets of deleted endpoints, not the garbage collector's: " \
        f"{[owners_before[o] for o in uncollectable][:10]}"
    assert not still, f"not collected {GC_BOUND_S} s after the garbage collector started: {sorted(still)[:10]}"
    assert set(deleted_by_gc) == expected, \
        f"the garbage collector deleted {sorted(deleted_by_gc)}, not exactly {sorted(expected)}"
    assert all(deleted_by_gc[name] == uid for name, uid in collectable.items()), "the very Secrets, by uid"
    assert namespace_after == {name: uid for name, uid in namespace_before.items() if name not in collectable}, \
        "the garbage collector deleted (or the operator replaced) a Secret it had no business with"
    assert orphaned == [], f"token Secrets of deleted endpoints: {[owners[o] for o in orphaned][:10]}"
    assert not_one == [], f"live endpoints without exactly one token Secret: {not_one[:10]}"
    assert sampler.rounds > 20
    assert sampler.expired == [], sampler.expired[:10]
    assert sampler.broken == [], sampler.broken[:10]
    assert sampler.lost == [], sampler.lost[:10]
    assert all(s.metadata.labels.get(api.MANAGED_BY_LABEL) == api.MANAGED_BY_VALUE for s in after_gc)


def owners_of(secrets: list[Any]) -> dict[str, list[str]]:
    """Endpoint name (the Secret's endpoint annotation) -> the names of its token Secrets."""
    owners: dict[str, list[str]] = {}
    for secret in secrets:
        owner = (secret.metadata.annotations or {}).get(api.ENDPOINT_ANNOTATION, "?")
        owners.setdefault(owner, []).append(secret.metadata.name)
    return owners


def left_to_the_garbage_collector(secret: Any, live_uids: set[str]) -> bool:
    """Owned, as controller, by a SecuredEndpoint, and by no object that still exists."""
    references = secret.metadata.owner_references or ()
    return bool(references) and all(ref.uid not in live_uids for ref in references) and any(
        ref.controller and ref.kind == api.KIND for ref in references)


def all_secrets(chaos: Chaos) -> dict[str, str]:
    """Every Secret of the namespace, token Secret or not: name -> uid."""
    return {secret.metadata.name: secret.metadata.uid
            for secret in chaos.kube.core.list_namespaced_secret(chaos.namespace).items}


def test_the_garbage_collector_deletes_a_late_applied_token_secret_and_nothing_else(
        chaos: Chaos, garbage_collector: GarbageCollector, token_server: TokenServer,
        secret_values: set[str]) -> None:
    """The case scenario 1 leaves to the garbage collector, made on purpose (a CI-sized run rarely hits it): the
    body of an endpoint's token Secret create, applied once the endpoint has been deleted and released (the
    operator deleted its Secret). A real garbage collector then deletes it within GC_BOUND_S, and nothing else: the
    live endpoint's token Secret and the credential Secret stay, the very same objects."""
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    setup.client(token_server)
    chaos.operator.start()
    for name in ("e-live", "e-gone"):
        setup.endpoint(name, token_server)
    for name in ("e-live", "e-gone"):
        chaos.kube.wait_ready(chaos.namespace, name, timeout=15)
    gone_uid = chaos.kube.get_endpoint(chaos.namespace, "e-gone")["metadata"]["uid"]  # type: ignore[index]
    sent = chaos.kube.core.read_namespaced_secret("e-gone-token", chaos.namespace)
    assert [(ref.kind, ref.uid, ref.controller) for ref in sent.metadata.owner_references] == \
        [(api.KIND, gone_uid, True)]
    chaos.kube.delete_endpoint(chaos.namespace, "e-gone")
    wait_for(lambda: chaos.kube.get_endpoint(chaos.namespace, "e-gone") is None
             and "e-gone-token" not in all_secrets(chaos), timeout=15,
             message="e-gone released and its token Secret deleted by the operator")
    late = chaos.kube.core.create_namespaced_secret(chaos.namespace, k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=sent.metadata.name, labels=sent.metadata.labels,
                                  annotations=sent.metadata.annotations,
                                  owner_references=sent.metadata.owner_references),
        type=sent.type, data=sent.data))
    live_uids = {endpoint["metadata"]["uid"] for endpoint in chaos.endpoints()}
    assert left_to_the_garbage_collector(late, live_uids), "what scenario 1 counts as the collector's"
    before = all_secrets(chaos)
    assert set(before) == {"e-live-token", "e-gone-token", "oauth"}

    kcm_start = garbage_collector.start()
    wait_for(lambda: "e-gone-token" not in all_secrets(chaos), timeout=GC_BOUND_S, interval=0.1,
             message="the garbage collector deleting e-gone-token")
    collected_in = time.monotonic() - garbage_collector.started_at
    deleted = wait_for(lambda: garbage_collector.deletions(chaos.namespace), timeout=5,
                       message="the deletion in the audit log")  # see GarbageCollector.deletions
    # Dependents whose owners the collector's graph holds are never queued for deletion; e-live-token's owner
    # lives, so once the queued one is done, what is left stays.
    after = all_secrets(chaos)
    report("1 operator SIGKILL: a late-applied token Secret", kcm_start_s=round(kcm_start, 1),
           gc_collected_in_s=round(collected_in, 1), deleted_by_the_garbage_collector=sorted(deleted))
    assert deleted == {"e-gone-token": late.metadata.uid}, "by the garbage collector, that very Secret"
    assert after == {name: uid for name, uid in before.items() if name != "e-gone-token"}
    assert chaos.kube.ready(chaos.namespace, "e-live")["status"] == "True"  # type: ignore[index]
