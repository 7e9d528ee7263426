"""Chaos 3: the token server away for ten token lifetimes: down (refused), then slow (past the operator's
timeout), then answering 500.

Asserted (docs/contract.md §1.4, §2.3, §5.4):
- the Secret keeps the last good token all along (never emptied, never replaced by anything else), and the
  status says it stays usable until its expiry while it is valid, and "no valid token is in the targets" once
  it is not (after its expiry, not before);
- every attempt during the outage follows the transient backoff: after the n-th failure the next attempt comes
  c/2 to c later, c = min(300 s, 1 s * 2^(n-1)) (plus the request's own duration: a timeout takes 2 s);
- once the token server answers again, a new token is in the Secret within the pending backoff step.
CI: 2-s tokens, 20-s outage. ``SEP_CHAOS_FULL=1``: 6-s tokens, 60-s outage.
The last-chance retry (30 to 40 s before expiry) needs tokens of minutes and is not exercised here.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from secured_endpoint_devenv.tokenserver import TokenServer
from tests.chaos.conftest import Chaos, LogWatcher, report, size
from tests.conftest import Setup, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

TIMEOUT = 2.0  # SEP_TOKEN_TIMEOUT_SECONDS of the test operators
NO_TOKEN = "no valid token is in the targets"


class StatusRecorder(threading.Thread):
    """Notes (time, Ready reason, message, access_token in the Secret) every 50 ms."""

    def __init__(self, chaos: Chaos, name: str) -> None:
        super().__init__(name="status-recorder", daemon=True)
        self.chaos, self.name = chaos, name
        self.seen: list[tuple[float, str, str, str | None]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            condition = self.chaos.kube.ready(self.chaos.namespace, self.name) or {}
            data = self.chaos.kube.secret_data(self.chaos.namespace, f"{self.name}-token") or {}
            self.seen.append((time.time(), str(condition.get("reason")), str(condition.get("message")),
                              data.get("access_token")))
            self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def test_an_idp_outage_of_ten_token_lifetimes(chaos: Chaos, token_server: TokenServer,
                                              secret_values: set[str]) -> None:
    lifetime = size(2, 6)
    outage = 10 * lifetime
    token_server.lifetime_seconds = lifetime
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    setup.client(token_server)
    chaos.operator.start()
    setup.endpoint("orders", token_server)
    chaos.kube.wait_ready(chaos.namespace, "orders")
    last_good = token_server.issued_tokens[-1]
    attempts = LogWatcher(chaos.operator.log_path, f"Fetching a token for {chaos.namespace}/orders:")
    attempts.start()
    recorder = StatusRecorder(chaos, "orders")
    recorder.start()
    try:
        token_server.go_down()
        went_down, requests_before = time.monotonic(), token_server.token_requests
        time.sleep(outage / 3)
        token_server.delay_seconds = TIMEOUT + 1.0  # slower than the operator waits
        token_server.come_up()
        time.sleep(outage / 3)
        token_server.configure(delay_seconds=0.0, fault="500")
        time.sleep(outage / 3)
        came_back = time.monotonic()
        during = token_server.token_requests - requests_before
        tries_during = len([seen for seen in list(attempts.seen) if seen[0] < came_back])
        status = (chaos.kube.get_endpoint(chaos.namespace, "orders") or {}).get("status") or {}
        failures_at_return = int(status.get("consecutiveFailures") or 0)
        token_server.fault = None
        wait_for(lambda: (chaos.kube.secret_data(chaos.namespace, "orders-token") or {}).get("access_token")
                 not in (None, last_good.access_token), timeout=310, interval=0.05, message="a new token")
        recovery = time.monotonic() - came_back
        chaos.kube.wait_ready(chaos.namespace, "orders", timeout=5)
    finally:
        recorder.stop()
        attempts.stop()

    # the backoff: each attempt after the first failure, against the failure count it followed
    times = [seen[0] for seen in attempts.seen if seen[0] >= went_down]
    steps: list[dict[str, Any]] = []
    for n, (previous, following) in enumerate(itertools.pairwise(times), start=1):
        c = min(300.0, 2.0 ** (n - 1))
        gap = following - previous
        steps.append({"n": n, "gap": round(gap, 2), "low": c / 2, "high": c + TIMEOUT + 0.3})
    off_schedule = [step for step in steps if not step["low"] - 0.1 <= step["gap"] <= step["high"]]
    pending_step = min(300.0, 2.0 ** (failures_at_return - 1)) if failures_at_return else 0.0

    outage_rows = [row for row in recorder.seen if row[3] is not None]
    replaced_during = [row for row in outage_rows if row[3] != last_good.access_token
                       and row[0] < went_down_wall(went_down) + outage]
    says_none_before_expiry = [row for row in recorder.seen if row[0] < last_good.expires_at - 0.5
                               and NO_TOKEN in row[2]]
    no_token_rows = [row for row in recorder.seen if NO_TOKEN in row[2]]
    # the status is rewritten only at an attempt: until the first one after expiry it still says "usable until"
    stale = round(no_token_rows[0][0] - last_good.expires_at, 2) if no_token_rows else None
    report("3 IdP outage", token_lifetime_s=lifetime, outage_s=outage, attempts_during_outage=tries_during,
           idp_requests_received_during_outage=during, failures_at_return=failures_at_return,
           attempt_gaps_s=[step["gap"] for step in steps], recovery_after_return_s=round(recovery, 2),
           pending_backoff_step_s=pending_step, status_still_said_usable_after_expiry_s=stale)
    assert replaced_during == [], "the Secret held the last good token throughout the outage"
    assert all(row[3] is not None for row in recorder.seen), "the Secret was never emptied"
    assert no_token_rows, "the status said that no valid token is left once the last one expired"
    assert says_none_before_expiry == [], "not before the token expired"
    # that the status says so at expiry, not at the next attempt: test_the_status_says_so_when_the_token_expires
    assert all(row[1] == "TokenRequestFailed" for row in recorder.seen
               if last_good.expires_at < row[0] < went_down_wall(went_down) + outage), "transient reason"
    assert tries_during >= 4
    assert off_schedule == [], f"attempts off the backoff schedule: {off_schedule} (all: {steps})"
    assert recovery <= pending_step + 1.5, f"recovered {recovery:.1f} s after return; pending step {pending_step} s"
    assert (chaos.kube.ready(chaos.namespace, "orders") or {}).get("reason") == "TokenRefreshed"


def went_down_wall(monotonic_moment: float) -> float:
    """A monotonic moment on the wall clock (the recorder and the token server use wall time)."""
    return time.time() - (time.monotonic() - monotonic_moment)


def test_the_status_says_so_when_the_token_expires(chaos: Chaos, token_server: TokenServer,
                                                   secret_values: set[str]) -> None:
    """A refused refresh (invalid_client: the next attempt 30 to 60 s later) of a 3-s token: within a second of
    the token's expiry the status says that no valid token is in the targets."""
    token_server.lifetime_seconds = 3
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    setup.client(token_server)
    chaos.operator.start()
    setup.endpoint("orders", token_server)
    chaos.kube.wait_ready(chaos.namespace, "orders")
    token_server.fault = "invalid_client"
    last_good = token_server.issued_tokens[-1]
    chaos.kube.wait_ready(chaos.namespace, "orders", status="False", reason="InvalidCredentials", timeout=5)
    time.sleep(max(0.0, last_good.expires_at - time.time()) + 1.0)
    message = str((chaos.kube.ready(chaos.namespace, "orders") or {}).get("message"))
    assert NO_TOKEN in message, message
