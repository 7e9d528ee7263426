"""The typed status (secured_endpoint.status): reading what the apiserver holds, writing it back, the Ready
condition's transition time, and the merge patch that sends only what changed.

Covers: a full status round-trips; malformed fields read as absent, never raise; lastTransitionTime moves only
when Ready flips; merge_patch sends changed fields, nulls removed ones (nested maps too) and nothing when equal.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from secured_endpoint import api
from secured_endpoint.status import EndpointStatus, merge_patch

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

FULL: dict[str, Any] = {
    "observedGeneration": 3,
    "conditions": [{"type": "Ready", "status": "True", "reason": "TokenRefreshed", "message": "ok",
                    "observedGeneration": 3, "lastTransitionTime": "2026-12-01T11:00:00Z"}],
    "tokenType": "Bearer", "scope": "a b", "expiresAt": "2026-12-01T13:00:00Z",
    "lastRefreshTime": "2026-12-01T12:00:00Z", "nextRefreshTime": "2026-12-01T12:40:00Z",
    "consecutiveFailures": 0, "tokenFingerprint": "sha256:1f2e3d4c5b6a", "tokenConfigHash": "sha256:abc",
    "sourceVersions": {"Secret/oauth": "17"}, "lastRefreshRequest": "x",
    "targets": {"secret": {"name": "t"}, "redis": {"key": "p:ns:n"}},
}


def test_a_full_status_round_trips() -> None:
    status = EndpointStatus.from_json(FULL)
    assert status.to_json() == FULL
    assert status.expires_at == datetime(2026, 12, 1, 13, tzinfo=UTC)
    assert status.location("redis", "key") == "p:ns:n"
    assert status.ready is not None
    assert status.ready.reason == "TokenRefreshed"


def test_malformed_fields_read_as_absent() -> None:
    status = EndpointStatus.from_json({"observedGeneration": "3", "expiresAt": "tomorrow", "conditions": "no",
                                       "consecutiveFailures": -2, "sourceVersions": ["x"], "targets": {"a": 1}})
    assert status == EndpointStatus()


def test_transition_time_moves_only_when_ready_flips() -> None:
    status = EndpointStatus.from_json(FULL)
    refreshed = status.with_ready(ready=True, reason=api.Reason.TOKEN_REFRESHED, message="new", generation=4,
                                  now=NOW)
    assert refreshed.ready is not None
    assert refreshed.ready.last_transition_time == "2026-12-01T11:00:00Z"
    assert refreshed.observed_generation == 4
    failed = refreshed.with_ready(ready=False, reason=api.Reason.TOKEN_REQUEST_FAILED, message="down",
                                  generation=4, now=NOW + timedelta(minutes=1))
    assert failed.ready is not None
    assert failed.ready.last_transition_time == "2026-12-01T12:01:00Z"


def test_merge_patch_sends_only_the_difference() -> None:
    before = EndpointStatus.from_json(FULL)
    after = dataclasses.replace(before, source_versions={"Secret/other": "3"}, scope=None,
                                targets={"secret": {"name": "t"}})
    patch = merge_patch(before.to_json(), after.to_json())
    assert patch == {"scope": None, "sourceVersions": {"Secret/oauth": None, "Secret/other": "3"},
                     "targets": {"redis": None}}
    assert merge_patch(before.to_json(), before.to_json()) == {}
