"""50 gateways hit the same revoked token: the shared, operator-refreshed token vs. one token per gateway.

    .venv/bin/python benchmarks/reactive_refresh.py [--gateways 50] [--rounds 20]

Both models run in the same process against the same token server and backend (which accepts only
currently valid tokens). Each round revokes what the gateways use, while every gateway keeps calling the
backend; a gateway that gets a 401 recovers and retries once.

- operator model: one SecuredEndpoint with the Redis target; each gateway reads it through the client
  library (RedisTokenSource + TokenAuth), and on a 401 publishes a refresh request with the fingerprint.
- per-gateway model (the baseline): each gateway holds its own client-credentials token and, on a 401,
  fetches a new one itself.

Printed: token requests to the IdP per revocation, failed client requests, and for the operator model
the time from each gateway's refresh request to the new token announced in Redis (p50/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import httpx
import redis
import redis.asyncio
from kubernetes import client as k8s

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.redisserver import RedisServer
from secured_endpoint_devenv.tokenserver import TokenServer
from secured_endpoint_gateway import RedisTokenSource, TokenAuth

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bench"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateways", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    controlplane.ensure_binaries()
    with controlplane.ControlPlane() as plane, TokenServer() as server, RedisServer() as redis_server, \
            tempfile.TemporaryDirectory() as workdir:
        server.add_client("bench", "bench-secret")
        _prepare_cluster(plane, server)
        log = Path(workdir) / "operator.log"
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path), "SEP_REDIS_URL": redis_server.url(),
               "SEP_REDIS_KEY_PREFIX": PREFIX, "SEP_REACTIVE_FLOOR_SECONDS": "0.5"}
        with log.open("wb") as handle:
            operator = subprocess.Popen([sys.executable, "-m", "secured_endpoint.cli", "run", "-A"],
                                        env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            _wait_for_key(redis_server.url(), f"{PREFIX}:bench:shared")
            shared = asyncio.run(_operator_model(server, redis_server.url(), args.gateways, args.rounds))
            own = asyncio.run(_per_gateway_model(server, args.gateways, args.rounds))
        finally:
            operator.terminate()
            operator.wait(15)
    print(f"\n{args.gateways} gateways, {args.rounds} revocations each model")
    print(f"{'':28}{'operator (shared token)':>26}{'per-gateway tokens':>22}")
    per_round = f"{shared.requests_per_round:>22.2f}{own.requests_per_round:>22.2f}"
    print(f"{'IdP token requests / revocation':<32}{per_round}")
    print(f"{'client requests':<32}{shared.client_requests:>22d}{own.client_requests:>22d}")
    print(f"{'failed client requests':<32}{shared.failed:>22d}{own.failed:>22d}")
    for label, outcome in (("operator", shared), ("per-gateway", own)):
        if outcome.errors:
            print(f"failures ({label}): " + ", ".join(f"{what} x{count}" for what, count in outcome.errors.items()))
    fetches = sorted(_OwnToken.fetch_seconds)
    if fetches:
        p50, p99 = statistics.median(fetches), fetches[int(0.99 * (len(fetches) - 1))]
        print(f"per-gateway token fetch (what each gateway waits for after a 401): "
              f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {fetches[-1] * 1000:.1f} ms")
    latencies = sorted(shared.latencies)
    if latencies:
        print(f"refresh request -> new token in Redis over {len(latencies)} requests: "
              f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    return 0


class Outcome:
    def __init__(self) -> None:
        self.client_requests = 0
        self.failed = 0
        self.token_requests = 0
        self.rounds = 0
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    @property
    def requests_per_round(self) -> float:
        return self.token_requests / max(self.rounds, 1)


def _prepare_cluster(plane: controlplane.ControlPlane, server: TokenServer) -> None:
    plane.install_crds(ROOT / "crds")
    api_client = plane.api_client()
    core, custom = k8s.CoreV1Api(api_client), k8s.CustomObjectsApi(api_client)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="bench")))
    core.create_namespaced_secret("bench", k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="oauth"), string_data={"client_id": "bench", "client_secret": "bench-secret"}))
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, "bench", api.PLURAL, {
        "apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": "shared"},
        "spec": {"tokenUrl": server.token_url, "allowInsecureHttp": True, "clientSecretRef": {"name": "oauth"},
                 "target": {"redis": {"enabled": True}}}})


def _wait_for_key(url: str, key: str) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60
    while not client.exists(key):
        if time.monotonic() > deadline:
            raise SystemExit(f"{key} never appeared in Redis")
        time.sleep(0.05)
    client.close()


async def _operator_model(server: TokenServer, url: str, gateways: int, rounds: int) -> Outcome:
    outcome = Outcome()
    stop = asyncio.Event()
    key = f"{PREFIX}:bench:shared"
    requested: list[tuple[float, str]] = []  # (time, fingerprint) of every refresh request seen
    announced: dict[str, float] = {}  # fingerprint replaced -> when its successor was announced

    async def monitor() -> None:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        pubsub = client.pubsub()
        await pubsub.subscribe(f"{PREFIX}:refresh", f"{PREFIX}:updated")
        current = await client.hget(key, "fingerprint")
        try:
            async for message in _messages(pubsub, stop):
                now = time.perf_counter()
                if message["channel"] == f"{PREFIX}:refresh":
                    requested.append((now, message["data"].rsplit(" ", 1)[-1]))
                else:
                    new = await client.hget(key, "fingerprint")
                    if new != current:
                        announced.setdefault(current, now)
                        current = new
        finally:
            await pubsub.aclose()
            await client.aclose()

    async def gateway() -> None:
        async with RedisTokenSource(redis.asyncio.Redis.from_url(url), "bench", "shared", prefix=PREFIX,
                                    refresh_wait=10) as source, \
                httpx.AsyncClient(auth=TokenAuth(source), timeout=10) as http:
            await _call_until(http, server, stop, outcome)

    watcher = asyncio.create_task(monitor())
    await asyncio.sleep(0.2)
    before = server.token_requests
    gateways_done = asyncio.gather(*(gateway() for _ in range(gateways)))
    await _revoke_rounds(rounds, stop, outcome, lambda: server.revoke_all())
    await gateways_done
    await watcher
    outcome.token_requests = server.token_requests - before
    outcome.latencies = [announced[fingerprint] - at for at, fingerprint in requested
                         if announced.get(fingerprint, 0) >= at]
    return outcome


async def _per_gateway_model(server: TokenServer, gateways: int, rounds: int) -> Outcome:
    outcome = Outcome()
    stop = asyncio.Event()

    async def gateway() -> None:
        async with httpx.AsyncClient(auth=_OwnToken(server.token_url), timeout=10) as http:
            await _call_until(http, server, stop, outcome)

    before = server.token_requests
    gateways_done = asyncio.gather(*(gateway() for _ in range(gateways)))
    await asyncio.sleep(0.5)  # every gateway has fetched its first token
    first_tokens = server.token_requests - before
    await _revoke_rounds(rounds, stop, outcome, lambda: server.revoke_all())
    await gateways_done
    outcome.token_requests = server.token_requests - before - first_tokens
    return outcome


class _OwnToken(httpx.Auth):
    """The baseline: a gateway that fetches its own token, and a new one on a 401."""

    fetch_seconds: list[float] = []  # shared by all baseline gateways: how long the IdP took

    def __init__(self, token_url: str) -> None:
        self._token_url = token_url
        self._token: str | None = None

    async def async_auth_flow(self, request: httpx.Request) -> AsyncIterator[httpx.Request]:  # type: ignore[override]
        if self._token is None:
            self._token = await self._fetch()
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:
            self._token = await self._fetch()
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise TypeError("async only")

    async def _fetch(self) -> str:
        started = time.perf_counter()
        try:
            return await self._post()
        finally:
            self.fetch_seconds.append(time.perf_counter() - started)

    async def _post(self) -> str:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(self._token_url, data={"grant_type": "client_credentials"},
                                         auth=("bench", "bench-secret"))
            response.raise_for_status()
            return str(response.json()["access_token"])


async def _call_until(http: httpx.AsyncClient, server: TokenServer, stop: asyncio.Event, outcome: Outcome) -> None:
    while not stop.is_set():
        try:
            response = await http.get(f"{server.url}/api/echo")
            ok = response.status_code == 200
            what = f"HTTP {response.status_code}"
        except Exception as exc:
            ok, what = False, type(exc).__name__
        if not ok:
            outcome.errors[what] = outcome.errors.get(what, 0) + 1
        outcome.client_requests += 1
        outcome.failed += 0 if ok else 1
        await asyncio.sleep(0.05)


async def _revoke_rounds(rounds: int, stop: asyncio.Event, outcome: Outcome, revoke: object) -> None:
    for _ in range(rounds):
        await asyncio.sleep(1.0)
        revoke()  # type: ignore[operator]
        outcome.rounds += 1
    await asyncio.sleep(1.5)
    stop.set()


async def _messages(pubsub: redis.asyncio.client.PubSub, stop: asyncio.Event) -> AsyncIterator[dict[str, str]]:
    while not stop.is_set():
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            yield message


if __name__ == "__main__":
    sys.exit(main())
