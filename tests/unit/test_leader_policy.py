"""The leader election's pure decisions (secured_endpoint.leader), with the clock as an argument.

Covers: the timing rules client-go enforces (and that the settings' defaults pass them); the lease duration
written as whole seconds, rounded up; client-go's jitter ``[p, 2.2 p)``, cut short to the holder's expiry (so a
dead leader is replaced within lease + 2.2 retry periods of its last renewal); the renew deadline counted from
the start of the last successful write; the observedTime rule — a record's clock restarts only when the record
changes, expiry uses the record's own duration, and the record's timestamps (another node's clock, however
skewed) never count; who may take the Lease (nobody holds it, we hold it, expired by our clock); the records
written when creating, renewing, taking over and releasing (transitions, acquire/renew times as MicroTime);
reading a Lease's spec, defaults for missing or malformed fields; the bodies sent (create; replace keeps the
metadata and so the resourceVersion precondition); identities (POD_NAME, host name, unique per process); an
elector built from the settings.
"""

from __future__ import annotations

import random
import re
import ssl
from datetime import UTC, datetime, timedelta, timezone

import pytest

from secured_endpoint import kube, leader
from secured_endpoint.leader import LeaseRecord, Observation, Timing
from secured_endpoint.settings import load_settings

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
ME, RIVAL = "pod-a_1111", "pod-b_2222"
DEFAULT = Timing()


def held_by(holder: str, *, duration: int = 15, renewed: str = "2026-12-01T11:59:58.000000Z",
            transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder=holder, lease_duration_seconds=duration, acquire_time="2026-12-01T11:00:00.000000Z",
                       renew_time=renewed, transitions=transitions)


# -- timing ---------------------------------------------------------------------------------------------------


def test_the_defaults_are_client_gos_and_the_settings_agree() -> None:
    assert (DEFAULT.lease_duration, DEFAULT.renew_deadline, DEFAULT.retry_period) == (15.0, 10.0, 2.0)
    assert DEFAULT.jitter_factor == 1.2
    assert Timing.from_settings(load_settings({})) == DEFAULT


def test_from_settings_takes_the_three_durations() -> None:
    settings = load_settings({"SEP_LEASE_DURATION_SECONDS": "3", "SEP_RENEW_DEADLINE_SECONDS": "2",
                              "SEP_RETRY_PERIOD_SECONDS": "0.5"})
    assert Timing.from_settings(settings) == Timing(lease_duration=3, renew_deadline=2, retry_period=0.5)


@pytest.mark.parametrize(("lease", "renew", "retry", "problem"), [
    (10, 10, 2, "lease duration (10 s) must be greater than the renew deadline (10 s)"),
    (9, 10, 2, "lease duration (9 s) must be greater than the renew deadline"),
    (15, 2.4, 2, "renew deadline (2.4 s) must be greater than 1.2 times the retry period (2 s)"),
    (15, 10, 0, "the retry period must be greater than zero"),
    (15, -1, 2, "the renew deadline must be greater than zero"),
])
def test_timing_that_client_go_refuses_is_refused(lease: float, renew: float, retry: float, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        Timing(lease_duration=lease, renew_deadline=renew, retry_period=retry)


def test_a_renew_deadline_just_above_1_2_retry_periods_is_accepted() -> None:
    Timing(lease_duration=3, renew_deadline=2.41, retry_period=2)
    with pytest.raises(ValueError, match="jitter factor"):
        Timing(jitter_factor=-0.1)


@pytest.mark.parametrize(("duration", "written"), [(15.0, 15), (3.0, 3), (2.5, 3), (0.2, 1), (14.0001, 15)])
def test_the_written_lease_duration_is_rounded_up_to_whole_seconds(duration: float, written: int) -> None:
    # rounded down, a rival would wait less than the leader's renew deadline allows for
    timing = Timing(lease_duration=duration, renew_deadline=duration / 2, retry_period=duration / 5)
    assert timing.lease_duration_seconds == written


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(("u", "wait"), [(0.0, 2.0), (0.5, 3.2), (0.999999, 4.4)])
def test_a_followers_wait_is_client_gos_jitter(u: float, wait: float) -> None:
    assert leader.jittered(2.0, 1.2, _Fixed(u)) == pytest.approx(wait, abs=1e-5)


def test_jitter_spreads_over_the_whole_range_and_zero_means_none() -> None:
    rng = random.Random(7)
    waits = [leader.jittered(2.0, 1.2, rng) for _ in range(2000)]
    assert 2.0 <= min(waits) < 2.1
    assert 4.3 < max(waits) < 4.4
    assert leader.jittered(2.0, 0.0, rng) == 2.0


def test_a_follower_tries_again_when_the_holders_lease_runs_out_if_that_comes_first() -> None:
    half = _Fixed(0.5)  # a jittered wait of 3.2 s
    seen = leader.observe(None, held_by(RIVAL), 0.0)  # runs out at 15.0
    assert leader.follower_wait(seen, ME, DEFAULT, 1.0, half) == pytest.approx(3.2), "a live lease: jittered"
    assert leader.follower_wait(seen, ME, DEFAULT, 14.0, half) == pytest.approx(1.0), "cut short to the expiry"
    assert leader.follower_wait(seen, ME, DEFAULT, 15.0, half) == pytest.approx(3.2), "past it (the API failing)"
    assert leader.follower_wait(seen, ME, DEFAULT, 20.0, half) == pytest.approx(3.2), "never a busy loop"
    assert leader.follower_wait(None, ME, DEFAULT, 0.0, half) == pytest.approx(3.2), "nothing seen yet"
    for holder in ("", ME):
        own = leader.observe(None, held_by(holder), 0.0)
        assert leader.follower_wait(own, ME, DEFAULT, 14.0, half) == pytest.approx(3.2)


def test_a_dead_leader_is_replaced_within_lease_plus_one_jittered_period_of_its_last_renewal() -> None:
    slowest = _Fixed(0.999999)  # always the longest wait: 4.4 s
    renewed = 100.0  # the leader's last renewal; it dies right after
    # the worst case: the follower read the Lease just before, so it sees that renewal one longest wait later
    now = renewed + leader.jittered(DEFAULT.retry_period, DEFAULT.jitter_factor, slowest)
    seen = leader.observe(None, held_by(RIVAL), now)
    while not leader.may_take(seen, ME, now):
        now += leader.follower_wait(seen, ME, DEFAULT, now, slowest)
        seen = leader.observe(seen, held_by(RIVAL), now)  # unchanged: nobody renews it any more
    assert now == pytest.approx(seen.observed_at + DEFAULT.lease_duration), "the moment it ran out, not later"
    assert now - renewed <= DEFAULT.lease_duration + DEFAULT.retry_period * (1 + DEFAULT.jitter_factor)


def test_the_renew_deadline_counts_from_the_start_of_the_last_successful_write() -> None:
    started = 100.0
    assert not leader.renew_deadline_passed(started, DEFAULT, 100.0)
    assert not leader.renew_deadline_passed(started, DEFAULT, 109.999)
    assert leader.renew_deadline_passed(started, DEFAULT, 110.0)
    assert leader.renew_deadline_passed(-float("inf"), DEFAULT, 0.0), "never renewed: not leading"


def test_the_leader_stops_before_any_rival_may_take_over() -> None:
    # the write started at 100; the rival cannot have seen it before then, so it waits at least until 115
    started = 100.0
    rival = leader.observe(None, held_by(ME), started)  # the earliest moment a rival can see the write
    assert leader.renew_deadline_passed(started, DEFAULT, 110.0)
    assert not leader.may_take(rival, RIVAL, 114.999), "5 s after the leader stopped, still not"
    assert leader.may_take(rival, RIVAL, 115.0)


# -- the observedTime rule ------------------------------------------------------------------------------------


def test_an_unchanged_record_keeps_its_first_observation_time() -> None:
    record = held_by(RIVAL)
    first = leader.observe(None, record, 10.0)
    assert first == Observation(record, 10.0)
    assert leader.observe(first, held_by(RIVAL), 14.0) is first


def test_a_renewal_restarts_the_clock() -> None:
    first = leader.observe(None, held_by(RIVAL), 10.0)
    renewed = leader.observe(first, held_by(RIVAL, renewed="2026-12-01T12:00:00.000000Z"), 14.0)
    assert renewed.observed_at == 14.0
    assert not leader.lease_expired(renewed, 28.9)
    assert leader.lease_expired(renewed, 29.0)


def test_expiry_uses_the_records_own_duration_not_ours() -> None:
    seen = leader.observe(None, held_by(RIVAL, duration=60), 0.0)
    assert not leader.may_take(seen, ME, 59.0)
    assert leader.may_take(seen, ME, 60.0)


@pytest.mark.parametrize("renewed", [
    "2020-01-01T00:00:00.000000Z",  # the holder's clock years behind ours: looks long expired by its timestamp
    "2099-01-01T00:00:00.000000Z",  # the holder's clock far ahead: looks valid for ever by its timestamp
])
def test_the_records_timestamps_never_count_only_our_clock_does(renewed: str) -> None:
    seen = leader.observe(None, held_by(RIVAL, renewed=renewed), 50.0)
    assert not leader.may_take(seen, ME, 50.0)
    assert not leader.may_take(seen, ME, 64.9)
    assert leader.may_take(seen, ME, 65.0)


def test_a_record_we_keep_seeing_unchanged_expires_even_if_we_read_it_often() -> None:
    observation = None
    for now in range(0, 16):
        observation = leader.observe(observation, held_by(RIVAL), float(now))
    assert observation == Observation(held_by(RIVAL), 0.0)
    assert leader.may_take(observation, ME, 15.0)


def test_who_may_take_the_lease() -> None:
    live = leader.observe(None, held_by(RIVAL), 0.0)
    assert not leader.may_take(live, ME, 1.0), "a rival's live lease is respected"
    assert leader.may_take(leader.observe(None, held_by(""), 0.0), ME, 0.0), "nobody holds it: at once"
    assert leader.may_take(leader.observe(None, held_by(ME), 0.0), ME, 0.0), "ours already"
    assert leader.may_take(leader.observe(None, held_by(RIVAL, duration=0), 0.0), ME, 0.0), "no duration"


# -- the records written --------------------------------------------------------------------------------------


def test_creating_the_lease_writes_no_transition_yet() -> None:
    record = leader.next_record(None, ME, DEFAULT, NOW)
    assert record == LeaseRecord(holder=ME, lease_duration_seconds=15, acquire_time="2026-12-01T12:00:00.000000Z",
                                 renew_time="2026-12-01T12:00:00.000000Z", transitions=0)


def test_renewing_keeps_the_acquire_time_and_the_transitions() -> None:
    record = leader.next_record(held_by(ME, transitions=4), ME, DEFAULT, NOW + timedelta(microseconds=250))
    assert record.holder == ME
    assert record.acquire_time == "2026-12-01T11:00:00.000000Z"
    assert record.renew_time == "2026-12-01T12:00:00.000250Z"
    assert record.transitions == 4


@pytest.mark.parametrize("previous", [RIVAL, ""])
def test_taking_over_counts_one_more_transition_and_starts_a_term(previous: str) -> None:
    record = leader.next_record(held_by(previous, transitions=4), ME, Timing(3, 2, 0.5), NOW)
    assert record == LeaseRecord(holder=ME, lease_duration_seconds=3, acquire_time="2026-12-01T12:00:00.000000Z",
                                 renew_time="2026-12-01T12:00:00.000000Z", transitions=5)


def test_renewing_a_record_without_an_acquire_time_fills_it_in() -> None:
    record = leader.next_record(LeaseRecord(holder=ME, lease_duration_seconds=15), ME, DEFAULT, NOW)
    assert record.acquire_time == record.renew_time == "2026-12-01T12:00:00.000000Z"


def test_releasing_empties_the_holder_with_a_one_second_lease() -> None:
    record = leader.release_record(held_by(ME, transitions=4), NOW)
    assert record == LeaseRecord(holder="", lease_duration_seconds=1, acquire_time="2026-12-01T12:00:00.000000Z",
                                 renew_time="2026-12-01T12:00:00.000000Z", transitions=4)
    assert record.spec()["holderIdentity"] == "", "written as empty, as client-go does"


def test_micro_time_is_utc_with_microseconds() -> None:
    assert leader.micro_time(NOW) == "2026-12-01T12:00:00.000000Z"
    two_hours_east = timezone(timedelta(hours=2))
    assert leader.micro_time(datetime(2026, 12, 1, 14, 0, 0, 123456, tzinfo=two_hours_east)) == \
        "2026-12-01T12:00:00.123456Z"
    with pytest.raises(ValueError, match="naive"):
        leader.micro_time(datetime(2026, 12, 1, 12, 0, 0))  # naive: the case under test


# -- reading and writing Leases -------------------------------------------------------------------------------


def test_a_leases_spec_reads_into_a_record_and_back() -> None:
    spec = {"holderIdentity": ME, "leaseDurationSeconds": 15, "acquireTime": "2026-12-01T11:00:00.000000Z",
            "renewTime": "2026-12-01T11:59:58.000000Z", "leaseTransitions": 3}
    record = LeaseRecord.from_lease({"spec": spec})
    assert record == held_by(ME)
    assert record.spec() == spec


@pytest.mark.parametrize("spec", [None, {}, {"holderIdentity": None, "leaseDurationSeconds": "15",
                                              "leaseTransitions": True, "renewTime": ""}])
def test_a_missing_or_malformed_spec_reads_as_nobody_holding_it(spec: object) -> None:
    assert LeaseRecord.from_lease({"spec": spec}) == LeaseRecord()
    assert leader.may_take(leader.observe(None, LeaseRecord.from_lease({"spec": spec}), 0.0), ME, 0.0)


def test_the_bodies_sent() -> None:
    record = leader.next_record(None, ME, DEFAULT, NOW)
    assert leader.new_lease("sys", "sep", record) == {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "sep", "namespace": "sys"},
        "spec": record.spec()}
    read = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "sep", "namespace": "sys", "resourceVersion": "42", "labels": {"team": "x"}},
            "spec": {**held_by(RIVAL).spec(), "preferredHolder": RIVAL}}
    body = leader.updated_lease(read, record)
    assert body["metadata"] == read["metadata"], "labels kept; the resourceVersion is the precondition"
    assert body["spec"] == record.spec()
    assert read["spec"]["holderIdentity"] == RIVAL, "the Lease read is left as it was"


# -- identity -------------------------------------------------------------------------------------------------


def test_the_identity_is_the_pod_name_plus_a_random_part() -> None:
    first = leader.default_identity({"POD_NAME": "sep-operator-7d9f-abcde"}, hostname="node-1")
    second = leader.default_identity({"POD_NAME": "sep-operator-7d9f-abcde"}, hostname="node-1")
    assert second.startswith("sep-operator-7d9f-abcde_")
    assert first != second, "two processes on one host (or a restart) are two candidates"
    assert re.fullmatch(r"sep-operator-7d9f-abcde_[0-9a-f-]{36}", first)


def test_without_pod_name_the_host_name_is_used() -> None:
    assert leader.default_identity({}, hostname="laptop").startswith("laptop_")
    assert leader.default_identity({"POD_NAME": "  "}, hostname="laptop").startswith("laptop_")
    assert leader.default_identity({}, hostname="").startswith("secured-endpoint-operator_")
    assert leader.default_identity({}).split("_")[0], "the real host name"


# -- building an elector (no I/O until run) -------------------------------------------------------------------


def _client() -> kube.KubeClient:
    return kube.KubeClient(kube.Credentials(server="https://127.0.0.1:1", tls=ssl.create_default_context()))


def test_an_elector_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "sep-operator-0")
    settings = load_settings({"SEP_LEASE_NAME": "sep-lock", "SEP_LEASE_NAMESPACE": "sep-system",
                              "SEP_LEASE_DURATION_SECONDS": "20", "SEP_RENEW_DEADLINE_SECONDS": "12"})
    elector = leader.LeaderElector.from_settings(_client(), settings)
    assert (elector.namespace, elector.name) == ("sep-system", "sep-lock")
    assert elector.timing == Timing(lease_duration=20, renew_deadline=12, retry_period=2)
    assert elector.identity.startswith("sep-operator-0_")
    assert not elector.is_leader
    assert elector.leader is None
    assert not elector.leading.is_set()
    assert str(elector) == "Lease sep-system/sep-lock"
    assert leader.LeaderElector.from_settings(_client(), settings, identity="x", namespace="other").identity == "x"


def test_an_elector_needs_an_identity() -> None:
    with pytest.raises(ValueError, match="empty holderIdentity means nobody"):
        leader.LeaderElector(_client(), namespace="ns", name="lease", identity="")
