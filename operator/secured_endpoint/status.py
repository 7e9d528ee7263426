"""Pure helpers that turn an outcome into ``status`` (Kubernetes API conventions for conditions).

Conditions are a list keyed by ``type``; ``lastTransitionTime`` moves only when ``status`` flips, so
GitOps tools and ``kubectl wait`` see a stable object while a token is merely refreshed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from secured_endpoint import api


def timestamp(moment: datetime) -> str:
    """RFC 3339 UTC, second precision (what ``kubectl`` prints and the CRD's date-time expects)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def ready_condition(*, ready: bool, reason: api.Reason, message: str, generation: int, now: datetime,
                    previous: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The conditions list with ``Ready`` set; other condition types are kept as they were."""
    status = "True" if ready else "False"
    old = next((c for c in previous or () if c.get("type") == api.CONDITION_READY), None)
    transition = (old.get("lastTransitionTime") if old is not None and old.get("status") == status
                  else None) or timestamp(now)
    ready_entry = {
        "type": api.CONDITION_READY, "status": status, "reason": str(reason), "message": message,
        "observedGeneration": generation, "lastTransitionTime": transition,
    }
    others = [dict(c) for c in previous or () if c.get("type") != api.CONDITION_READY]
    return [ready_entry, *others]


def current_ready(status: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    for condition in (status or {}).get("conditions") or ():
        if condition.get("type") == api.CONDITION_READY:
            return condition  # type: ignore[no-any-return]
    return None


def still_usable(expires_at: datetime | None, now: datetime) -> str:
    """The sentence that tells a reader of a failure whether gateways still hold a working token."""
    if expires_at is None or expires_at <= now:
        return "no valid token is in the targets"
    return f"the previous token stays usable until {timestamp(expires_at)}"
