"""The controller's decisions, rule by rule (secured_endpoint.policy), with a fixed clock.

Covers: deletion with and without our finalizer; invalid spec and suspension reported once per generation;
every reason for a new token (none yet, settings changed, a source rotated, refresh due, forced past the
floor) and the failed-inputs rule that lets backoff decide; the floor's clock-went-back rule; rewrites after a
lost or failed target write, and waiting for the write retry; a new generation without token changes;
next_due for each case; the ready reason; failure retry times (credentials safety net, Retry-After honoured and
capped, permanent vs transient, last chance before expiry); an apiserver's Retry-After holding every action of
the endpoint, whatever is due, until it is over.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

import pytest

from secured_endpoint import api, policy, schedule
from secured_endpoint.policy import (
    Action,
    FailureKind,
    Inputs,
    Situation,
    decide,
    failure_retry,
    next_due,
    ready_reason,
)
from secured_endpoint.status import EndpointStatus

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
INPUTS = Inputs("sha256:aaaa", (("Secret/oauth", "100"),))


def served(**changes: object) -> EndpointStatus:
    """The status of an endpoint that holds a good token issued with INPUTS, at generation 1."""
    base = EndpointStatus(observed_generation=1, token_fingerprint="sha256:111111111111",
                          token_config_hash=INPUTS.config_hash, source_versions={"Secret/oauth": "100"},
                          expires_at=NOW + timedelta(minutes=30))
    base = base.with_ready(ready=True, reason=api.Reason.TOKEN_ISSUED, message="ok", generation=1,
                           now=NOW - timedelta(minutes=10))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def situation(**changes: object) -> Situation:
    base = Situation(now=NOW, generation=1, deleting=False, has_finalizer=True, spec_valid=True, suspended=False,
                     recorded=served(), inputs=INPUTS, refresh_at=NOW + timedelta(minutes=20))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# -- deletion, invalid spec, suspension --------------------------------------------------------------------


def test_deleting_with_our_finalizer_cleans_up() -> None:
    assert decide(situation(deleting=True)).action is Action.CLEAN_UP
    assert next_due(situation(deleting=True)) == NOW


def test_deleting_without_our_finalizer_does_nothing() -> None:
    assert decide(situation(deleting=True, has_finalizer=False)).action is Action.NOTHING
    assert next_due(situation(deleting=True, has_finalizer=False)) is None


def test_an_invalid_spec_is_reported_once_per_generation() -> None:
    fresh = situation(spec_valid=False, inputs=None)
    assert decide(fresh).action is Action.REPORT_INVALID_SPEC
    assert next_due(fresh) == NOW
    reported = served().with_ready(ready=False, reason=api.Reason.INVALID_SPEC, message="x", generation=1, now=NOW)
    assert decide(situation(spec_valid=False, inputs=None, recorded=reported)).action is Action.NOTHING
    assert next_due(situation(spec_valid=False, inputs=None, recorded=reported)) is None
    # the same reason for an older generation is news again
    assert decide(situation(spec_valid=False, inputs=None, recorded=reported, generation=2)).action \
        is Action.REPORT_INVALID_SPEC


def test_suspension_is_reported_once_and_nothing_is_fetched() -> None:
    due = situation(suspended=True, refresh_at=NOW - timedelta(seconds=1))
    assert decide(due).action is Action.SUSPEND
    reported = served().with_ready(ready=False, reason=api.Reason.SUSPENDED, message="x", generation=1, now=NOW)
    assert decide(dataclasses.replace(due, recorded=reported)).action is Action.NOTHING
    assert next_due(dataclasses.replace(due, recorded=reported)) is None


# -- a new token -------------------------------------------------------------------------------------------


def test_no_token_yet() -> None:
    decision = decide(situation(recorded=EndpointStatus()))
    assert decision.action is Action.FETCH
    assert decision.why == ("no token yet",)


def test_token_settings_changed() -> None:
    decision = decide(situation(inputs=Inputs("sha256:bbbb", INPUTS.source_versions)))
    assert decision.why == ("token settings changed",)


def test_a_rotated_source_names_the_object() -> None:
    decision = decide(situation(inputs=Inputs(INPUTS.config_hash, (("Secret/oauth", "101"),))))
    assert decision.why == ("Secret/oauth changed",)


def test_a_source_that_vanished_counts_as_changed() -> None:
    decision = decide(situation(inputs=Inputs(INPUTS.config_hash, (("Secret/oauth", None),))))
    assert decision.why == ("Secret/oauth changed",)


def test_refresh_due() -> None:
    decision = decide(situation(refresh_at=NOW))
    assert decision.action is Action.FETCH
    assert decision.why == ("refresh due",)
    assert not decision.forced


def test_steady_state_waits_for_the_refresh_time() -> None:
    s = situation()
    assert decide(s).action is Action.WAIT
    assert next_due(s) == NOW + timedelta(minutes=20)


def test_after_a_failed_fetch_only_new_inputs_retry_at_once() -> None:
    changed = Inputs(INPUTS.config_hash, (("Secret/oauth", "101"),))
    retry_at = NOW + timedelta(seconds=30)
    same = situation(inputs=changed, failed_inputs=changed, refresh_at=retry_at)
    assert decide(same).action is Action.WAIT
    assert next_due(same) == retry_at
    fixed = situation(inputs=Inputs(INPUTS.config_hash, (("Secret/oauth", "102"),)), failed_inputs=changed,
                      refresh_at=retry_at)
    assert decide(fixed).why == ("Secret/oauth changed",)


def test_the_annotation_forces_one_refresh_per_value() -> None:
    asked = situation(refresh_request="2026-12-01T12:00:00Z")
    decision = decide(asked)
    assert decision.action is Action.FETCH
    assert decision.forced
    assert decision.why == ("refresh requested",)
    handled = situation(refresh_request="2026-12-01T12:00:00Z",
                        recorded=served(last_refresh_request="2026-12-01T12:00:00Z"))
    assert decide(handled).action is Action.WAIT


def test_a_second_forced_refresh_runs_at_once() -> None:
    s = situation(reactive_fingerprint="sha256:111111111111", recent_forced=(NOW - timedelta(seconds=2),),
                  floor=timedelta(seconds=5))
    assert decide(s).forced
    assert next_due(s) == NOW


def test_a_third_forced_refresh_waits_for_the_floor() -> None:
    s = situation(reactive_fingerprint="sha256:111111111111",
                  recent_forced=(NOW - timedelta(seconds=2), NOW - timedelta(seconds=1)), floor=timedelta(seconds=5))
    assert decide(s).action is Action.WAIT
    assert next_due(s) == NOW - timedelta(seconds=2) + timedelta(seconds=5)
    later = dataclasses.replace(s, now=NOW + timedelta(seconds=3))
    assert decide(later).forced


def test_the_floor_does_not_block_when_the_clock_went_back() -> None:
    s = situation(reactive_fingerprint="sha256:111111111111",
                  recent_forced=(NOW + timedelta(minutes=5), NOW + timedelta(minutes=6)))
    assert decide(s).forced


# -- rewrites ------------------------------------------------------------------------------------------------


def test_a_lost_target_is_rewritten_at_once() -> None:
    s = situation(targets_dirty=True)
    assert decide(s).action is Action.REWRITE
    assert next_due(s) == NOW


def test_a_failed_write_waits_for_its_retry_time() -> None:
    s = situation(targets_dirty=True, rewrite_at=NOW + timedelta(seconds=8))
    assert decide(s).action is Action.WAIT
    assert next_due(s) == NOW + timedelta(seconds=8)
    assert decide(dataclasses.replace(s, now=NOW + timedelta(seconds=8))).action is Action.REWRITE


def test_a_new_generation_without_token_changes_rewrites_and_reports() -> None:
    assert decide(situation(generation=2)).action is Action.REWRITE


def test_a_missing_finalizer_is_added_first() -> None:
    s = situation(has_finalizer=False)
    decision = decide(s)
    assert decision.needs_finalizer
    assert decision.action is Action.WAIT
    assert next_due(s) == NOW


# -- reasons and retries ---------------------------------------------------------------------------------------


def test_ready_reason() -> None:
    assert ready_reason(first_token=True, fetched=True, current=EndpointStatus()) is api.Reason.TOKEN_ISSUED
    assert ready_reason(first_token=False, fetched=True, current=served()) is api.Reason.TOKEN_REFRESHED
    # a rewrite of the same token keeps what Ready says
    assert ready_reason(first_token=False, fetched=False, current=served()) is api.Reason.TOKEN_ISSUED
    failed = served().with_ready(ready=False, reason=api.Reason.TARGET_WRITE_FAILED, message="x", generation=1,
                                 now=NOW)
    assert ready_reason(first_token=False, fetched=False, current=failed) is api.Reason.TOKEN_REFRESHED


def retry(kind: FailureKind, **changes: object) -> datetime:
    arguments: dict[str, object] = {"kind": kind, "now": NOW, "failures": 1, "permanent": False,
                                    "retry_after_seconds": None, "served_until": None,
                                    "credentials_retry": timedelta(seconds=300), "rng": random.Random(7)}
    arguments.update(changes)
    return failure_retry(**arguments)  # type: ignore[arg-type]


def test_a_missing_secret_retries_only_as_a_safety_net() -> None:
    at = retry(FailureKind.CREDENTIALS)
    assert NOW + timedelta(seconds=270) <= at <= NOW + timedelta(seconds=300)


def test_transient_failures_back_off_exponentially() -> None:
    first, fifth = retry(FailureKind.TOKEN), retry(FailureKind.TOKEN, failures=5)
    assert NOW + timedelta(seconds=0.5) <= first <= NOW + timedelta(seconds=1)
    assert NOW + timedelta(seconds=8) <= fifth <= NOW + timedelta(seconds=16)


def test_refused_clients_are_not_hammered() -> None:
    at = retry(FailureKind.TOKEN, permanent=True)
    assert NOW + timedelta(seconds=30) <= at <= NOW + timedelta(seconds=60)
    # only the token server's refusal is permanent; a Kubernetes API error is transient whatever it says
    assert retry(FailureKind.KUBE, permanent=True) <= NOW + timedelta(seconds=1)


@pytest.mark.parametrize(("header", "expected"), [(120.0, 120.0), (10 ** 9, schedule.MAX_RETRY_AFTER_SECONDS)])
def test_retry_after_is_honoured_and_capped(header: float, expected: float) -> None:
    assert retry(FailureKind.TOKEN, retry_after_seconds=header) == NOW + timedelta(seconds=expected)


def test_one_last_chance_before_a_valid_token_expires() -> None:
    expiry = NOW + timedelta(seconds=60)
    at = retry(FailureKind.TOKEN, failures=9, served_until=expiry)  # backoff alone would wait minutes
    assert expiry - timedelta(seconds=40) <= at <= expiry - timedelta(seconds=30)


def test_a_failure_status_that_calls_an_expired_token_usable_is_corrected() -> None:
    failing = situation(usable_claimed_until=NOW + timedelta(seconds=30), refresh_at=NOW + timedelta(minutes=10))
    assert decide(failing).action is Action.WAIT
    assert next_due(failing) == NOW + timedelta(seconds=30), "looked at again when the token expires"
    expired = dataclasses.replace(failing, now=NOW + timedelta(seconds=30))
    assert decide(expired).action is Action.REPORT_EXPIRED
    # a fetch that is due comes first: its report says the truth anyway
    assert decide(dataclasses.replace(expired, refresh_at=NOW)).action is Action.FETCH


# -- the start-up spread ---------------------------------------------------------------------------------------


def test_overdue_refreshes_of_valid_tokens_are_spread_within_half_their_remaining_life() -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    rng = random.Random(3)
    long_lived = [policy.startup_delay(now=now, served_until=now + timedelta(minutes=5), spread_seconds=10, rng=rng)
                  for _ in range(500)]
    assert 0 <= min(long_lived) < 1
    assert 9 < max(long_lived) <= 10
    nearly_expired = [policy.startup_delay(now=now, served_until=now + timedelta(seconds=4), spread_seconds=10,
                                           rng=rng) for _ in range(500)]
    assert max(nearly_expired) <= 2  # half of the 4 s left


@pytest.mark.parametrize("served_until", [None, "expired", "now"])
def test_an_endpoint_without_a_valid_token_is_not_delayed(served_until: str | None) -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    until = {None: None, "expired": now - timedelta(seconds=30), "now": now}[served_until]
    assert policy.startup_delay(now=now, served_until=until, spread_seconds=10, rng=random.Random(1)) == 0.0


def test_no_spread_when_it_is_switched_off() -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    assert policy.startup_delay(now=now, served_until=now + timedelta(hours=1), spread_seconds=0,
                                rng=random.Random(1)) == 0.0


# -- the apiserver's Retry-After holds every write of the endpoint -------------------------------------------


@pytest.mark.parametrize("busy", [
    {"refresh_at": NOW - timedelta(seconds=1)},  # a refresh due
    {"targets_dirty": True, "rewrite_at": NOW - timedelta(seconds=1)},  # a failed target write due again
    {"has_finalizer": False},  # the finalizer PATCH that was throttled
    {"deleting": True},  # the clean-up writes too
    {"spec_valid": False},  # and so does the InvalidSpec report
], ids=["refresh", "rewrite", "finalizer", "clean-up", "invalid-spec"])
def test_nothing_is_written_before_the_apiservers_retry_after_is_over(busy: dict[str, object]) -> None:
    until = NOW + timedelta(seconds=1)
    s = situation(throttled_until=until, **busy)
    assert decide(s) == policy.Decision(Action.WAIT, ("the apiserver asked to wait (Retry-After)",))
    assert next_due(s) == until
    after = dataclasses.replace(s, now=until)
    assert decide(after).action is not Action.WAIT or decide(after).needs_finalizer
    assert next_due(after) == until  # due at once, now that the wait is over


def test_a_retry_after_that_is_over_changes_nothing() -> None:
    s = situation(throttled_until=NOW - timedelta(milliseconds=1))
    assert decide(s) == decide(situation())
    assert next_due(s) == next_due(situation()) == NOW + timedelta(minutes=20)


def test_how_long_writes_wait_after_a_retry_after() -> None:
    later = NOW + timedelta(seconds=30)
    assert policy.throttled_until(failed_at=NOW, retry_after_seconds=None, current=None) is None
    assert policy.throttled_until(failed_at=NOW, retry_after_seconds=None, current=later) == later
    assert policy.throttled_until(failed_at=NOW, retry_after_seconds=2, current=None) == NOW + timedelta(seconds=2)
    assert policy.throttled_until(failed_at=NOW, retry_after_seconds=2, current=later) == later  # the longer
    assert policy.throttled_until(failed_at=NOW, retry_after_seconds=90, current=later) == \
        NOW + timedelta(seconds=90)
    assert policy.throttled_until(failed_at=NOW, retry_after_seconds=1e9, current=None) == \
        NOW + timedelta(seconds=schedule.MAX_RETRY_AFTER_SECONDS)
