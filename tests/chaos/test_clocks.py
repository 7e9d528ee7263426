"""Chaos 5: clocks. An IdP whose clock runs minutes ahead of or behind ours (the JWT's ``iat``/``exp``), and
tokens shorter than the refresh margin.

Each case is an endpoint on a token server of its own, all served by one operator over one window; for each:
- no refresh loop: the token requests over the window are bounded by what the lifetime allows (a refresh at
  two thirds of the lifetime at the earliest, less 10 % jitter: at most window / (0.6 x lifetime) + 2);
- no expired token served: a sampler reading every token Secret every 50 ms never sees a token past its real
  expiry (the token server's own record), nor a half-written Secret.
Cases: JWTs with ``expires_in`` and the IdP 5 min ahead / behind; a 2-s token with ``refreshBeforeSeconds: 30``
(longer than the token lives). ``test_jwt_exp_alone_from_a_skewed_idp``: the same skews without ``expires_in``,
where only ``exp`` tells the lifetime.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from secured_endpoint_devenv.tokenserver import TokenServer
from tests.chaos.conftest import Chaos, TokenSampler, report, size
from tests.conftest import Setup, _token_server

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

SKEW = 300.0


@pytest.fixture
def servers(secret_values: set[str]) -> Iterator[list[TokenServer]]:
    made: list[Iterator[TokenServer]] = []
    started: list[TokenServer] = []
    for _ in range(3):
        generator = _token_server(secret_values, tls=False)
        made.append(generator)
        started.append(next(generator))
    yield started
    for generator in made:
        for _ in generator:
            pass


def run_cases(chaos: Chaos, secret_values: set[str], cases: list[tuple[str, TokenServer, dict[str, Any]]],
              window: float, scenario: str) -> dict[str, dict[str, Any]]:
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    chaos.operator.start()
    for name, server, spec in cases:
        setup.client(server, secret_name=f"{name}-oauth")
        setup.endpoint(name, server, clientSecretRef={"name": f"{name}-oauth"}, **spec)
    for name, _, _ in cases:
        chaos.kube.wait_ready(chaos.namespace, name)
    sampler = TokenSampler(chaos.kube, chaos.namespace, [server for _, server, _ in cases],
                           alive=lambda: {name for name, _, _ in cases}, interval=0.05)
    before = {name: server.token_requests for name, server, _ in cases}
    sampler.start()
    try:
        time.sleep(window)
    finally:
        sampler.stop()
    results: dict[str, dict[str, Any]] = {}
    for name, server, _ in cases:
        lifetime = server.lifetime_seconds
        results[name] = {"requests": server.token_requests - before[name],
                         "bound": int(window / (0.6 * lifetime)) + 2,
                         "expired_observed": len([e for e in sampler.expired if e[0] == f"{name}-token"])}
    report(scenario, window_s=window, sampler_reads=sampler.reads, half_written_observed=len(sampler.broken),
           **{name: f"{r['requests']} requests (bound {r['bound']}), {r['expired_observed']} expired seen"
              for name, r in results.items()})
    assert sampler.broken == [], sampler.broken[:5]
    assert sampler.rounds > 20
    return results


def test_skewed_idp_clocks_and_tokens_shorter_than_the_margin(chaos: Chaos, servers: list[TokenServer],
                                                              secret_values: set[str]) -> None:
    ahead, behind, short = servers
    for server, skew in ((ahead, SKEW), (behind, -SKEW)):
        server.configure(token_format="jwt", lifetime_seconds=4, clock_skew_seconds=skew)
    short.lifetime_seconds = 2
    results = run_cases(chaos, secret_values, [
        ("ahead", ahead, {}), ("behind", behind, {}),
        ("short", short, {"refresh": {"refreshBeforeSeconds": 30}}),
    ], window=float(size(12, 60)), scenario="5 clocks (expires_in given)")
    for name, result in results.items():
        assert result["requests"] <= result["bound"], f"{name}: a refresh loop ({result})"
        assert result["requests"] >= 1, f"{name}: refreshed at all"
        assert result["expired_observed"] == 0, f"{name}: an expired token served ({result})"


def test_jwt_exp_alone_from_a_skewed_idp(chaos: Chaos, servers: list[TokenServer], secret_values: set[str]) -> None:
    ahead, behind, _ = servers
    for server, skew in ((ahead, SKEW), (behind, -SKEW)):
        server.configure(token_format="jwt", lifetime_seconds=8, clock_skew_seconds=skew, omit_expires_in=True)
    results = run_cases(chaos, secret_values, [("ahead", ahead, {}), ("behind", behind, {})],
                        window=float(size(12, 60)), scenario="5 clocks (JWT exp alone)")
    for name, result in results.items():
        assert result["requests"] <= result["bound"], f"{name}: a refresh loop ({result})"
        assert result["expired_observed"] == 0, f"{name}: an expired token served ({result})"
