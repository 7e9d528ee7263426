"""Chaos 4: SIGTERM in the middle of a refresh storm.

Many endpoints are created at once, so their tokens (8 s) all come due within a second or two; the token server
answers slowly (0.2 s), so that dozens of refreshes are in flight when the operator gets SIGTERM. Asserted:
- the process exits 0 within the Deployment's grace period (30 s, manifests/deployment.yaml);
- no half-written Secret: every token Secret read during the storm and afterwards is one complete token (the six
  keys, ``fingerprint`` and the ``token-fingerprint`` annotation naming its ``access_token``, ``authorization``
  and ``credential`` carrying it) that the token server issued;
- a new operator carries on: every token Secret holds a valid token again, every endpoint is Ready.
CI: 100 endpoints. ``SEP_CHAOS_FULL=1``: 500.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from secured_endpoint_devenv.tokenserver import TokenServer
from tests.chaos.conftest import Chaos, TokenSampler, decode, inconsistent, ready_for_generation, report, size
from tests.conftest import Setup, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

GRACE_SECONDS = 30.0  # terminationGracePeriodSeconds of the manifests and the chart


def test_sigterm_during_a_refresh_storm(chaos: Chaos, token_server: TokenServer, secret_values: set[str]) -> None:
    count = size(100, 500)
    token_server.lifetime_seconds = 8
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    setup.client(token_server)
    chaos.operator.start()
    names = [f"storm-{index}" for index in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: setup.endpoint(name, token_server), names))
    wait_for(lambda: token_server.token_requests >= count, timeout=60, message="every first token")
    token_server.delay_seconds = 0.2  # the refreshes pile up in flight
    sampler = TokenSampler(chaos.kube, chaos.namespace, [token_server], interval=0.05)
    sampler.start()
    try:
        # mid-storm: a quarter of the refreshes answered, the pool of 32 full
        wait_for(lambda: token_server.token_requests >= count + count // 4, timeout=30, message="the refresh storm")
        in_flight_at_term = token_server.token_requests
        process = chaos.operator.process
        assert process is not None
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=GRACE_SECONDS)
        except Exception:
            process.kill()
            raise
        exit_seconds = time.monotonic() - signalled
        time.sleep(0.5)
    finally:
        sampler.stop()
    after = {secret.metadata.name: secret for secret in chaos.token_secrets()}
    broken_after: list[tuple[str, str]] = []
    issued = {token.access_token for token in token_server.issued_tokens}
    for name, secret in after.items():
        data = decode(secret)
        why = inconsistent(data)
        annotation = (secret.metadata.annotations or {}).get("secured-endpoint.io/token-fingerprint")
        if why is None and annotation != data["fingerprint"]:
            why = "token-fingerprint annotation does not match"
        if why is None and data["access_token"] not in issued:
            why = "a token the server never issued"
        if why is not None:
            broken_after.append((name, why))
    refreshed_before_term = in_flight_at_term - count

    token_server.delay_seconds = 0.0
    chaos.new_operator().start()
    restarted = time.monotonic()

    def all_fresh() -> bool:
        expiries = {token.access_token: token.expires_at for token in token_server.issued_tokens}
        secrets = chaos.token_secrets()
        return len(secrets) == count and all(
            expiries.get(decode(secret).get("access_token", ""), 0) > time.time() + 1 for secret in secrets)

    wait_for(all_fresh, timeout=60, interval=0.2, message="every token Secret fresh after the restart")
    assert sum(map(ready_for_generation, chaos.endpoints())) == count
    report("4 SIGTERM during a refresh storm", endpoints=count, refreshes_answered_before_sigterm=refreshed_before_term,
           exit_code=code, exit_after_sigterm_s=round(exit_seconds, 2), grace_s=GRACE_SECONDS,
           sampler_reads=sampler.reads, half_written_observed=len(sampler.broken) + len(broken_after),
           secrets_after=len(after), all_fresh_after_restart_s=round(time.monotonic() - restarted, 1))
    assert code == 0, chaos.operator.log_text()[-3000:]
    assert exit_seconds < GRACE_SECONDS
    assert sorted(after) == sorted(f"{name}-token" for name in names)
    assert broken_after == [], broken_after[:10]
    assert sampler.broken == [], sampler.broken[:10]
    assert sampler.reads > count
