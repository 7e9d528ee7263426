"""``intake.older_version``: which kopf events the leader's take-in LIST makes stale (docs/contract.md §5.7).

kopf may still be delivering a listing older than the leader's own LIST; only numeric resourceVersions are
compared, so an apiserver with another form of version never has an event dropped."""

from __future__ import annotations

import pytest

from secured_endpoint.intake import older_version


@pytest.mark.parametrize(("seen", "held", "older"), [
    ("99", "100", True),  # kopf's listing from before the take-in's
    ("100", "100", False),  # the same object: the window ends
    ("101", "100", False),  # newer: taken, and the window ends
    ("9", "10", True),  # numbers, not strings ("9" > "10" as text)
    ("", "100", False),
    ("abc", "100", False),
    ("99", "opaque", False),
])
def test_only_a_numerically_older_version_is_stale(seen: str, held: str, older: bool) -> None:
    assert older_version(seen, held) is older
