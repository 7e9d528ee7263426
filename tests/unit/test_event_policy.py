"""``publisher.announced``: which changes of the ``Ready`` condition post an Event (docs/contract.md §1.4).

An Event for each change of Ready's status (first Ready, a failure, a recovery) and each change of the reason
while not Ready (one failure turning into another); none for a refresh (``TokenIssued`` → ``TokenRefreshed``)
and none when nothing changed.
"""

from __future__ import annotations

import pytest

from secured_endpoint.publisher import announced
from secured_endpoint.status import Condition


def ready(status: str, reason: str) -> Condition:
    return Condition(type="Ready", status=status, reason=reason, message="m", observed_generation=1,
                     last_transition_time="2026-12-02T00:00:00Z")


@pytest.mark.parametrize(("before", "after", "posted"), [
    (None, ready("True", "TokenIssued"), True),  # the first token
    (None, ready("False", "CredentialsNotFound"), True),
    (ready("True", "TokenIssued"), ready("False", "TokenRequestFailed"), True),  # a failure
    (ready("False", "TokenRequestFailed"), ready("True", "TokenRefreshed"), True),  # the recovery
    (ready("False", "TokenRequestFailed"), ready("False", "InvalidCredentials"), True),  # another failure
    (ready("True", "TokenIssued"), ready("True", "TokenRefreshed"), False),  # the first refresh
    (ready("True", "TokenRefreshed"), ready("True", "TokenRefreshed"), False),
    (ready("False", "TokenRequestFailed"), ready("False", "TokenRequestFailed"), False),  # the same failure again
    (ready("True", "TokenRefreshed"), None, False),
])
def test_which_changes_post_an_event(before: Condition | None, after: Condition | None, posted: bool) -> None:
    assert announced(before, after) is posted
