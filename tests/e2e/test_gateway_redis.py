"""The gateway library against a real redis-server (and a real token server for TokenAuth).

Tokens are written the way docs/contract.md §3 says the operator writes them (HSET, PEXPIREAT, PUBLISH on
``<prefix>:updated``); every test uses its own key prefix, so its channels are its own too. Where the
reactive path needs an operator, ``SimulatedOperator`` stands in: a thread that listens on
``<prefix>:refresh``, acts only on requests naming the current fingerprint (as the real operator does),
fetches a new token from the token server (client_credentials) and writes it.

Cases:
- ``get()`` caches (a silent overwrite is not seen) and the updated channel invalidates the cache (only
  for its own ``<namespace>/<name>``); async and sync.
- Missing key, expired token, malformed hash → ``TokenUnavailable`` naming the endpoint and key, never
  the token.
- ``request_refresh`` publishes exactly ``<ns>/<name> <fingerprint>`` on ``<prefix>:refresh`` and returns
  once a newer token is written (announced, or found by polling when the announcement is missed); does
  not publish when the key already holds a newer token; times out after ``refresh_wait`` and then cools
  down (no second publish); concurrent callers in one process publish once; async and sync.
- Redis down under a running source: the last token read is served while it is valid; after the restart
  the new token is served; a key found missing is not bridged with the last token.
- TokenAuth against the token server's ``/api/echo``: the current token is revoked; 5 sources (separate
  connections, as 5 replicas) with 4 concurrent requests all succeed after one retry, and the operator acts
  on exactly ONE refresh request; the same once with the sync source and ``httpx.Client``.
- The example gateway (``examples/04-gateway/gateway.py``) as 3 replica processes against one Redis:
  requests through all three succeed before and after a revocation, with one refresh acted on; a Secret
  directory replica serves too; ``/healthz`` answers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from secured_endpoint_devenv.redisserver import RedisServer
from secured_endpoint_devenv.tokenserver import TokenServer
from secured_endpoint_gateway import (
    GatewayToken,
    RedisTokenSource,
    SyncRedisTokenSource,
    TokenAuth,
    TokenUnavailable,
)
from secured_endpoint_gateway.wire import fingerprint

pytestmark = pytest.mark.e2e

NAMESPACE, NAME = "shop", "orders-backend"
ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "examples" / "04-gateway" / "gateway.py"


# -- fixtures and helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"sep-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sync_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url(), decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def async_redis(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url())
    yield client
    await client.aclose()


def write_token(client: redis.Redis, prefix: str, access_token: str, *, lifetime: float = 3600,
                namespace: str = NAMESPACE, name: str = NAME, announce: bool = True) -> str:
    """Write a token as the operator does (docs/contract.md §3); returns its fingerprint."""
    key = f"{prefix}:{namespace}:{name}"
    expires_at = time.time() + lifetime
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={"access_token": access_token, "token_type": "Bearer",
                                "expires_at": str(int(expires_at)), "scope": "orders.read",
                                "fingerprint": fingerprint(access_token)})
        if lifetime > 0:
            pipe.pexpireat(key, int(expires_at * 1000))
        pipe.execute()
    if announce:
        client.publish(f"{prefix}:updated", f"{namespace}/{name}")
    return fingerprint(access_token)


async def eventually_async(source: RedisTokenSource, access_token: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (await source.get()).access_token.get_secret_value() != access_token:
        assert time.monotonic() < deadline, f"the source never served {access_token}"
        await asyncio.sleep(0.02)


def eventually_sync(source: SyncRedisTokenSource, access_token: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while source.get().access_token.get_secret_value() != access_token:
        assert time.monotonic() < deadline, f"the source never served {access_token}"
        time.sleep(0.02)


class RefreshListener:
    """Records what arrives on ``<prefix>:refresh`` (a thread, so it hears while the event loop waits)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.messages: list[str] = []
        self._pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(f"{prefix}:refresh")
        assert self._pubsub.get_message(timeout=2)["type"] == "subscribe"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if message is not None:
                self.messages.append(message["data"])

    def stop(self) -> list[str]:
        time.sleep(0.2)  # let stragglers arrive, so "exactly one" means exactly one
        self._stop.set()
        self._thread.join()
        self._pubsub.close()
        return self.messages


class SimulatedOperator:
    """The operator's reactive path in miniature: refresh only if the fingerprint is the current one."""

    def __init__(self, client: redis.Redis, prefix: str, server: TokenServer, *, lifetime: int = 3600) -> None:
        self.client = client
        self.prefix = prefix
        self.server = server
        self.client_id, self.client_secret = f"gw-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
        server.add_client(self.client_id, self.client_secret)
        server.configure(lifetime_seconds=lifetime)
        self.current: str | None = None
        self.acted: list[str] = []  # fingerprints refreshed on request
        self.ignored: list[str] = []  # requests naming a token that was no longer current
        self._stop = threading.Event()
        self._pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SimulatedOperator:
        self.issue()
        self._pubsub.subscribe(f"{self.prefix}:refresh")
        assert self._pubsub.get_message(timeout=2)["type"] == "subscribe"
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()

    @property
    def current_token(self) -> str:
        assert self.current is not None
        return self.current

    def issue(self) -> None:
        response = httpx.post(self.server.token_url, data={"grant_type": "client_credentials"},
                              auth=(self.client_id, self.client_secret))
        response.raise_for_status()
        body = response.json()
        write_token(self.client, self.prefix, body["access_token"], lifetime=body["expires_in"])
        self.current = body["access_token"]

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if message is None:
                continue
            endpoint, _, stale = message["data"].partition(" ")
            if endpoint == f"{NAMESPACE}/{NAME}" and self.current and stale == fingerprint(self.current):
                self.acted.append(stale)
                self.issue()
            else:
                self.ignored.append(stale)


@pytest.fixture
def tokens(sync_redis: redis.Redis, prefix: str, token_server: TokenServer) -> Iterator[SimulatedOperator]:
    operator = SimulatedOperator(sync_redis, prefix, token_server).start()
    yield operator
    operator.stop()


# -- get() and the updated channel ------------------------------------------------------------------------


async def test_get_caches_until_announced(async_redis: redis.asyncio.Redis, sync_redis: redis.Redis,
                                          prefix: str) -> None:
    write_token(sync_redis, prefix, "tok-A")
    async with RedisTokenSource(async_redis, NAMESPACE, NAME, prefix=prefix) as source:
        token = await source.get()
        assert token.access_token.get_secret_value() == "tok-A"
        assert token.scope == "orders.read"
        assert token.fingerprint == fingerprint("tok-A")
        assert 3590 < token.seconds_left() <= 3600

        write_token(sync_redis, prefix, "tok-B", announce=False)
        await asyncio.sleep(0.2)
        assert (await source.get()).access_token.get_secret_value() == "tok-A"  # served from memory

        sync_redis.publish(f"{prefix}:updated", f"{NAMESPACE}/other")  # someone else's update
        await asyncio.sleep(0.2)
        assert (await source.get()).access_token.get_secret_value() == "tok-A"

        sync_redis.publish(f"{prefix}:updated", f"{NAMESPACE}/{NAME}")
        await eventually_async(source, "tok-B", timeout=1)


def test_sync_get_caches_until_announced(sync_redis: redis.Redis, prefix: str) -> None:
    write_token(sync_redis, prefix, "tok-A")
    with SyncRedisTokenSource(sync_redis, NAMESPACE, NAME, prefix=prefix) as source:
        assert source.get().access_token.get_secret_value() == "tok-A"
        write_token(sync_redis, prefix, "tok-B", announce=False)
        time.sleep(0.2)
        assert source.get().access_token.get_secret_value() == "tok-A"
        sync_redis.publish(f"{prefix}:updated", f"{NAMESPACE}/{NAME}")
        eventually_sync(source, "tok-B", timeout=1)


async def test_missing_key(async_redis: redis.asyncio.Redis, prefix: str) -> None:
    async with RedisTokenSource(async_redis, NAMESPACE, NAME, prefix=prefix) as source:
        with pytest.raises(TokenUnavailable, match="does not exist") as caught:
            await source.get()
    assert f"{NAMESPACE}/{NAME}" in str(caught.value)
    assert f"{prefix}:{NAMESPACE}:{NAME}" in str(caught.value)


async def test_expired_and_malformed(async_redis: redis.asyncio.Redis, sync_redis: redis.Redis,
                                     prefix: str) -> None:
    write_token(sync_redis, prefix, "expired-secret-value", lifetime=-10)  # no PEXPIREAT: the key stays
    async with RedisTokenSource(async_redis, NAMESPACE, NAME, prefix=prefix) as source:
        with pytest.raises(TokenUnavailable, match="expired") as caught:
            await source.get()
        assert "expired-secret-value" not in str(caught.value)
        sync_redis.hdel(f"{prefix}:{NAMESPACE}:{NAME}", "expires_at")
        with pytest.raises(TokenUnavailable, match="no expires_at"):
            await source.get()


def test_sync_missing_key(sync_redis: redis.Redis, prefix: str) -> None:
    with SyncRedisTokenSource(sync_redis, NAMESPACE, NAME, prefix=prefix) as source, \
            pytest.raises(TokenUnavailable, match="does not exist"):
        source.get()


# -- request_refresh --------------------------------------------------------------------------------------


async def test_request_refresh_publishes_and_returns_the_new_token(
        async_redis: redis.asyncio.Redis, sync_redis: redis.Redis, prefix: str) -> None:
    write_token(sync_redis, prefix, "tok-A")
    listener = RefreshListener(sync_redis, prefix)
    async with RedisTokenSource(async_redis, NAMESPACE, NAME, prefix=prefix, refresh_wait=5) as source:
        stale = await source.get()
        started = time.monotonic()
        waiters = [asyncio.create_task(source.request_refresh(stale)) for _ in range(10)]
        deadline = time.monotonic() + 2
        while not listener.messages:
            assert time.monotonic() < deadline, "no refresh request was published"
            await asyncio.sleep(0.01)
        write_token(sync_redis, prefix, "tok-B")
        results = await asyncio.gather(*waiters)
        assert time.monotonic() - started < 2
        assert {token.access_token.get_secret_value() for token in results} == {"tok-B"}
        assert (await source.get()).access_token.get_secret_value() == "tok-B"
    assert listener.stop() == [f"{NAMESPACE}/{NAME} {fingerprint('tok-A')}"]  # once for all ten callers


async def test_request_refresh_polls_when_the_announcement_is_missed(
        async_redis: redis.asyncio.Redis, sync_redis: redis.Redis, prefix: str) -> None:
    write_token(sync_redis, prefix, "tok-A")
    listener = RefreshListener(sync_redis, prefix)
    async with RedisTokenSource(async_redis, NAMESPACE, NAME, prefix=prefix, refresh_wait=5) as source:
        stale = await source.get()
        waiter = asyncio.create_task(source.request_refresh(stale))
        await asyncio.sleep(0.3)
        write_token(sync_redis, prefix, "tok-B", announce=False)
        started = time.monotonic()
        assert (await waiter).access_token.get_secret_value() == "tok-B"
        assert time.monotonic() - started < 1
    assert len(listener.stop()) == 1


async def test_request_refresh_when_a_newer_token_is_already_there(
        async_redis: redis.asyncio.Redis, sync_redis: redis.Redis, prefix: str) -> None:
    write_token(sync_redis, prefix, "tok-A")
    listener = RefreshListener(sync_redis, prefix)
    async with RedisTokenSource(async_redis, NAMESPACE, NAME, prefix=prefix) as source:
        stale = await source.get()
        write_token(sync_redis, prefix, "tok-B", announce=False)  # another replica already had it refreshed
        assert (await source.request_refresh(stale)).access_token.get_secret_value() == "tok-B"
    assert listener.stop() == []


async def test_request_refresh_times_out_then_cools_down(
        async_redis: redis.asyncio.Redis, sync_redis: redis.Redis, prefix: str) -> None:
    write_token(sync_redis, prefix, "tok-A")
    listener = RefreshListener(sync_redis, prefix)
    async with RedisTokenSource(async_redis, NAMESPACE, NAME, prefix=prefix, refresh_wait=0.5,
                                refresh_cooldown=30) as source:
        stale = await source.get()
        started = time.monotonic()
        with pytest.raises(TokenUnavailable, match=r"no newer token arrived within 0\.5s"):
            await source.request_refresh(stale)
        assert 0.5 <= time.monotonic() - started < 2
        started = time.monotonic()
        with pytest.raises(TokenUnavailable, match="went unanswered"):
            await source.request_refresh(stale)
        assert time.monotonic() - started < 0.2
    assert len(listener.stop()) == 1  # the cooldown did not ask again


def test_sync_request_refresh(sync_redis: redis.Redis, prefix: str) -> None:
    write_token(sync_redis, prefix, "tok-A")
    listener = RefreshListener(sync_redis, prefix)
    with SyncRedisTokenSource(sync_redis, NAMESPACE, NAME, prefix=prefix, refresh_wait=5) as source:
        stale = source.get()
        results: list[GatewayToken] = []
        threads = [threading.Thread(target=lambda: results.append(source.request_refresh(stale)))
                   for _ in range(5)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 2
        while not listener.messages:
            assert time.monotonic() < deadline, "no refresh request was published"
            time.sleep(0.01)
        write_token(sync_redis, prefix, "tok-B")
        for thread in threads:
            thread.join(timeout=5)
        assert [token.access_token.get_secret_value() for token in results] == ["tok-B"] * 5
    assert listener.stop() == [f"{NAMESPACE}/{NAME} {fingerprint('tok-A')}"]


async def test_survives_a_redis_restart(prefix: str) -> None:
    with RedisServer() as server:
        writer = redis.Redis.from_url(server.url(), decode_responses=True)
        write_token(writer, prefix, "tok-A")
        async with RedisTokenSource.from_url(server.url(), NAMESPACE, NAME, prefix=prefix,
                                             socket_timeout=1, socket_connect_timeout=1) as source:
            await eventually_async(source, "tok-A")
            server.kill()  # an outage: the last token read is still valid, so it is still served
            for _ in range(5):
                assert (await source.get()).access_token.get_secret_value() == "tok-A"
                await asyncio.sleep(0.1)
            server.start()  # the data set is gone, and so is the subscription
            write_token(writer, prefix, "tok-B", announce=False)  # the announcement would be lost anyway
            await eventually_async(source, "tok-B", timeout=10)
            writer.delete(f"{prefix}:{NAMESPACE}:{NAME}")  # deleted and announced, as the operator does
            writer.publish(f"{prefix}:updated", f"{NAMESPACE}/{NAME}")
            deadline = time.monotonic() + 5
            while True:  # a missing key is not bridged with the last token
                try:
                    await source.get()
                except TokenUnavailable as exc:
                    reason = exc.reason
                    break
                assert time.monotonic() < deadline, "the deleted token was still served"
                await asyncio.sleep(0.05)
            assert reason.startswith("the key does not exist")
        writer.close()


def test_sync_survives_a_redis_outage(prefix: str) -> None:
    with RedisServer() as server:
        writer = redis.Redis.from_url(server.url(), decode_responses=True)
        write_token(writer, prefix, "tok-A")
        with SyncRedisTokenSource.from_url(server.url(), NAMESPACE, NAME, prefix=prefix, socket_timeout=1,
                                           socket_connect_timeout=1) as source:
            eventually_sync(source, "tok-A")
            server.kill()
            for _ in range(5):
                assert source.get().access_token.get_secret_value() == "tok-A"
                time.sleep(0.1)
            server.start()
            write_token(writer, prefix, "tok-B", announce=False)
            eventually_sync(source, "tok-B", timeout=10)
        writer.close()


# -- TokenAuth against a real backend ---------------------------------------------------------------------


async def test_revoked_token_many_replicas_one_refresh(redis_server: RedisServer, prefix: str,
                                                       tokens: SimulatedOperator,
                                                       token_server: TokenServer) -> None:
    echo = f"{token_server.url}/api/echo"
    sources = [RedisTokenSource.from_url(redis_server.url(), NAMESPACE, NAME, prefix=prefix, refresh_wait=5)
               for _ in range(5)]
    clients = [httpx.AsyncClient(auth=TokenAuth(source)) for source in sources]
    try:
        assert all(r.status_code == 200 for r in await asyncio.gather(*(c.get(echo) for c in clients)))
        first = tokens.current_token
        assert token_server.revoke(first)

        responses = await asyncio.gather(*(client.get(echo) for client in clients for _ in range(4)))
        assert [r.status_code for r in responses] == [200] * 20
        assert all([h.status_code for h in r.history] == [401] for r in responses)
        assert tokens.acted == [fingerprint(first)]  # exactly one refresh acted on
        assert len(token_server.issued_tokens) == 2
        assert len(tokens.ignored) <= 4  # at most one request per replica; the rest found the new token
        # And from now on no 401 at all.
        responses = await asyncio.gather(*(client.get(echo) for client in clients))
        assert all(r.status_code == 200 and not r.history for r in responses)
    finally:
        for client in clients:
            await client.aclose()
        for source in sources:
            await source.aclose()


def test_sync_revoked_token_refreshed_once(redis_server: RedisServer, prefix: str, tokens: SimulatedOperator,
                                           token_server: TokenServer) -> None:
    echo = f"{token_server.url}/api/echo"
    with SyncRedisTokenSource.from_url(redis_server.url(), NAMESPACE, NAME, prefix=prefix,
                                       refresh_wait=5) as source, httpx.Client(auth=TokenAuth(source)) as client:
        assert client.get(echo).status_code == 200
        first = tokens.current_token
        token_server.revoke(first)
        response = client.get(echo)
        assert response.status_code == 200
        assert [h.status_code for h in response.history] == [401]
        assert tokens.acted == [fingerprint(first)]
        assert client.get(echo).history == []


async def test_async_client_with_sync_source(redis_server: RedisServer, prefix: str, tokens: SimulatedOperator,
                                             token_server: TokenServer) -> None:
    echo = f"{token_server.url}/api/echo"
    with SyncRedisTokenSource.from_url(redis_server.url(), NAMESPACE, NAME, prefix=prefix,
                                       refresh_wait=5) as source:
        async with httpx.AsyncClient(auth=TokenAuth(source)) as client:
            token_server.revoke(tokens.current_token)
            response = await client.get(echo)
    assert response.status_code == 200
    assert len(tokens.acted) == 1


# -- the example gateway, as three replicas ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: a full pipe would block the gateway. Closed in stop().
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(GATEWAY), "--listen", f"127.0.0.1:{self.port}", *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the gateway exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        pytest.fail("the gateway did not come up")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


async def test_example_gateway_three_replicas(redis_server: RedisServer, prefix: str, tokens: SimulatedOperator,
                                              token_server: TokenServer, gateways: list[GatewayProcess]) -> None:
    for _ in range(3):
        gateways.append(GatewayProcess("--upstream", f"{token_server.url}/api", "--redis-url", redis_server.url(),
                                       "--endpoint", f"{NAMESPACE}/{NAME}", "--prefix", prefix))
    for gateway in gateways:
        gateway.wait_ready()
    async with httpx.AsyncClient(timeout=15) as client:
        # A caller's own Authorization is never forwarded: the gateway's token replaces it.
        responses = await asyncio.gather(*(client.get(f"{g.url}/echo", headers={"Authorization": "Bearer nope"})
                                           for g in gateways))
        assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
        assert responses[0].json()["client_id"] == tokens.client_id

        first = tokens.current_token
        token_server.revoke(first)
        responses = await asyncio.gather(*(client.get(f"{g.url}/echo") for g in gateways for _ in range(5)))
        assert [r.status_code for r in responses] == [200] * 15, [r.text for r in responses]
        assert tokens.acted == [fingerprint(first)]

        unknown = await client.get(f"{gateways[0].url}/no-such-path?x=1")
        assert unknown.status_code == 404  # the upstream's answer, passed through


async def test_example_gateway_secret_dir(tmp_path: Path, token_server: TokenServer,
                                          gateways: list[GatewayProcess]) -> None:
    token_server.add_client("dir-client", "dir-secret")
    body = httpx.post(token_server.token_url, data={"grant_type": "client_credentials"},
                      auth=("dir-client", "dir-secret")).json()
    directory = tmp_path / "token"
    directory.mkdir()
    expires_at = datetime.now(UTC) + timedelta(seconds=body["expires_in"])
    files: dict[str, Any] = {"access_token": body["access_token"], "token_type": "Bearer",
                             "expires_at": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                             "fingerprint": fingerprint(body["access_token"])}
    for key, value in files.items():
        (directory / key).write_text(value)
    gateway = GatewayProcess("--upstream", f"{token_server.url}/api", "--secret-dir", str(directory),
                             "--refresh-wait", "0.5")
    gateways.append(gateway)
    gateway.wait_ready()
    assert httpx.get(f"{gateway.url}/echo", timeout=10).status_code == 200
    token_server.revoke(body["access_token"])
    response = httpx.get(f"{gateway.url}/echo", timeout=10)
    assert response.status_code == 401  # no newer token in the directory: the upstream's 401, passed through
