"""The Redis target against a real redis-server (``secured_endpoint.targets.redis``; docs/contract.md §3 and §4).

No Kubernetes here: each test runs its own ``RedisServer`` (tens of milliseconds) and talks to it through
``RedisSettings`` exactly as the operator would.

Cases:
- write → the hash at <prefix>:<namespace>:<name> has exactly the docs/contract.md §3 fields (expires_at integer unix
  seconds, scope "" when none) and a PTTL that matches the token's expiry; read() gives the token back; read of
  a missing key → None; not configured → from_settings() is None.
- a second write → ":previous" holds the old token with its own expiry, the key the new one; a third write
  replaces ":previous"; rewriting the same token leaves ":previous" alone; a custom key prefix is used for keys
  and channels.
- a subscriber on <prefix>:updated receives "<namespace>/<name>" for writes and for deletes.
- delete removes both keys.
- ACL user + password from a file + db 3 (the default user disabled): keys land in db 3 only.
- TLS listener with CA and a required client certificate; without the client certificate, or with a CA
  that did not sign the server's certificate → TargetError.
- wrong password → TargetError whose message (and the log) has no password; a server that accepts but never
  answers → TargetError at the operation deadline (connect + 2 socket timeouts + 1 s): nothing blocks for ever.
- refresh_requests yields well-formed requests and skips malformed ones (wrong shape, bad names, too long,
  not UTF-8); it survives a Redis kill + restart (a request published afterwards still arrives); a
  subscription whose server stops answering (CLIENT PAUSE) is noticed by its keepalive and replaced.
- watch_availability: up at start (no callback), down after a kill (available False, one warning), on_restored
  called once after the restart; a write that failed during the outage works after it; FLUSHALL and a restart
  quicker than the probe interval (data lost, no failed operation) → on_restored too; start-up with Redis down
  → callback when it comes up.
- Sentinel: a real redis-sentinel monitoring the server; write/read and the refresh subscription go through
  SEP_REDIS_SENTINELS and SEP_REDIS_SENTINEL_MASTER with the master's password.
- no token or password ever appears in the log (checked after every test).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from secured_endpoint import api
from secured_endpoint.settings import RedisSettings, load_redis_settings
from secured_endpoint.targets.base import IssuedToken, Owner, TargetError
from secured_endpoint.targets.redis import RedisTarget
from secured_endpoint_devenv.redisserver import RedisSentinel, RedisServer, generate_certificates

pytestmark = pytest.mark.e2e

MARKER = "s3cr3t"  # in every token and password below: the log must never show it
OWNER = Owner("shop", "orders-backend", "uid-1")
REDIS_SPEC = api.parse_spec({"tokenUrl": "https://idp.example/token", "clientSecretRef": {"name": "oauth"},
                             "target": {"redis": {"enabled": True}}})


def key_of(target: RedisTarget) -> str:
    """Where ``target`` keeps OWNER's token (its own prefix)."""
    where = target.location(OWNER, REDIS_SPEC)
    assert where is not None
    return where


def token(lifetime: float = 600.0, *, scope: str | None = None) -> IssuedToken:
    value = f"{MARKER}-token-{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    return IssuedToken(access_token=SecretStr(value), token_type="Bearer", scope=scope, issued_at=now,
                       expires_at=now + timedelta(seconds=lifetime), fingerprint=f"sha256:{uuid.uuid4().hex[:12]}")


def settings(**env: str) -> RedisSettings:
    return load_redis_settings({f"SEP_REDIS_{key.upper()}": value for key, value in env.items()})


def make_target(redis_settings: RedisSettings, **options: Any) -> RedisTarget:
    options = {"ping_interval": 0.1, "keepalive_interval": 0.5, "reconnect_base": 0.05, "reconnect_cap": 0.5,
               **options}
    target = RedisTarget.from_settings(redis_settings, **options)
    assert target is not None
    return target


async def eventually(predicate: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, what: str = "condition"
                     ) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def no_secrets_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    assert MARKER not in caplog.text


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(password=f"{MARKER}-admin") as running:
        yield running


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url(), decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def target(server: RedisServer) -> AsyncIterator[RedisTarget]:
    redis_target = make_target(settings(url=server.url()))
    yield redis_target
    await redis_target.aclose()


# -- the hash ---------------------------------------------------------------------------------------------


async def test_write_stores_the_spec_hash_with_expiry(target: RedisTarget, admin: aioredis.Redis) -> None:
    issued = token(600, scope="orders.read orders.write")
    await target.write(OWNER, REDIS_SPEC, key_of(target), issued)
    key = "secured-endpoint:shop:orders-backend"
    assert target.key("shop", "orders-backend") == key
    assert await admin.hgetall(key) == {
        "access_token": issued.access_token.get_secret_value(), "token_type": "Bearer",
        "expires_at": str(int(issued.expires_at.timestamp())), "scope": "orders.read orders.write",
        "fingerprint": issued.fingerprint,
    }
    expected_ms = (issued.expires_at - datetime.now(UTC)).total_seconds() * 1000
    assert abs(await admin.pttl(key) - expected_ms) < 1000
    assert await admin.exists(target.previous_key("shop", "orders-backend")) == 0

    back = await target.read(OWNER, key_of(target))
    assert back is not None
    assert back.access_token.get_secret_value() == issued.access_token.get_secret_value()
    assert (back.token_type, back.scope, back.fingerprint) == ("Bearer", "orders.read orders.write",
                                                               issued.fingerprint)
    assert back.expires_at == issued.expires_at.replace(microsecond=0)
    assert await target.read(Owner("shop", "missing", "uid-2"), target.key("shop", "missing")) is None


async def test_no_scope_is_an_empty_string(target: RedisTarget, admin: aioredis.Redis) -> None:
    await target.write(OWNER, REDIS_SPEC, key_of(target), token(scope=None))
    assert await admin.hget(target.key(OWNER.namespace, OWNER.name), "scope") == ""
    back = await target.read(OWNER, key_of(target))
    assert back is not None
    assert back.scope is None


def test_not_configured_means_no_target() -> None:
    assert RedisTarget.from_settings(settings()) is None


async def test_previous_token_stays_readable_until_its_own_expiry(target: RedisTarget, admin: aioredis.Redis
                                                                 ) -> None:
    key, previous = target.key(OWNER.namespace, OWNER.name), target.previous_key(OWNER.namespace, OWNER.name)
    assert previous == key + ":previous"
    first, second, third = token(300), token(900), token(1200)
    await target.write(OWNER, REDIS_SPEC, key_of(target), first)
    await target.write(OWNER, REDIS_SPEC, key_of(target), second)
    assert (await admin.hgetall(key))["fingerprint"] == second.fingerprint
    kept = await admin.hgetall(previous)
    assert kept["access_token"] == first.access_token.get_secret_value()
    assert kept["fingerprint"] == first.fingerprint
    assert set(kept) == {"access_token", "token_type", "expires_at", "scope", "fingerprint"}
    # the previous key expires with the old token (300 s), not with the new one (900 s)
    assert abs(await admin.pttl(previous) - (first.expires_at - datetime.now(UTC)).total_seconds() * 1000) < 1000
    assert abs(await admin.pttl(key) - (second.expires_at - datetime.now(UTC)).total_seconds() * 1000) < 1000

    # a rewrite of the same token (after a restart): previous untouched
    await target.write(OWNER, REDIS_SPEC, key_of(target), second)
    assert (await admin.hgetall(previous))["fingerprint"] == first.fingerprint

    await target.write(OWNER, REDIS_SPEC, key_of(target), third)
    assert (await admin.hgetall(previous))["fingerprint"] == second.fingerprint
    assert (await admin.hgetall(key))["fingerprint"] == third.fingerprint


async def test_updated_channel_announces_writes_and_deletes(target: RedisTarget, admin: aioredis.Redis) -> None:
    pubsub = admin.pubsub()
    await pubsub.subscribe("secured-endpoint:updated")
    assert target.updated_channel == "secured-endpoint:updated"
    await target.write(OWNER, REDIS_SPEC, key_of(target), token())
    await target.delete(OWNER, key_of(target))
    received: list[str] = []
    deadline = time.monotonic() + 5
    while len(received) < 2 and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            received.append(message["data"])
    await pubsub.aclose()
    assert received == ["shop/orders-backend", "shop/orders-backend"]


async def test_delete_removes_both_keys(target: RedisTarget, admin: aioredis.Redis) -> None:
    await target.write(OWNER, REDIS_SPEC, key_of(target), token())
    await target.write(OWNER, REDIS_SPEC, key_of(target), token())
    assert await admin.exists(target.key(OWNER.namespace, OWNER.name),
                              target.previous_key(OWNER.namespace, OWNER.name)) == 2
    await target.delete(OWNER, key_of(target))
    assert await admin.keys("*") == []
    await target.delete(OWNER, key_of(target))  # nothing left: still fine


async def test_custom_prefix(server: RedisServer, admin: aioredis.Redis) -> None:
    redis_target = make_target(settings(url=server.url(), key_prefix="gw"))
    try:
        await redis_target.write(OWNER, REDIS_SPEC, key_of(redis_target), token())
        assert await admin.keys("*") == ["gw:shop:orders-backend"]
        assert (redis_target.updated_channel, redis_target.refresh_channel) == ("gw:updated", "gw:refresh")
    finally:
        await redis_target.aclose()


# -- authentication, databases, TLS -----------------------------------------------------------------------


async def test_acl_user_password_file_and_db(tmp_path: Path) -> None:
    password = f"{MARKER}-gateway pass"
    password_file = tmp_path / "password"
    password_file.write_text(password + "\n")
    with RedisServer(acl_user=("operator", password), disable_default_user=True) as acl_server:
        redis_target = make_target(settings(host="127.0.0.1", port=str(acl_server.port), username="operator",
                                            password_file=str(password_file), db="3"))
        db3 = aioredis.Redis.from_url(acl_server.url(3), decode_responses=True)
        db0 = aioredis.Redis.from_url(acl_server.url(0), decode_responses=True)
        try:
            await redis_target.write(OWNER, REDIS_SPEC, key_of(redis_target), token())
            assert await db3.keys("*") == ["secured-endpoint:shop:orders-backend"]
            assert await db0.keys("*") == []
            assert await redis_target.read(OWNER, key_of(redis_target)) is not None
            anonymous = aioredis.Redis(host="127.0.0.1", port=acl_server.port, protocol=2,
                                       retry=Retry(NoBackoff(), 0))
            with pytest.raises(Exception, match=r"NOAUTH|[Aa]uthenticat"):
                await anonymous.ping()
            await anonymous.aclose()
        finally:
            await redis_target.aclose()
            await db3.aclose()
            await db0.aclose()


async def test_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    with RedisServer(password=f"{MARKER}-tls", tls=True, tls_client_auth="yes") as tls_server:
        base = {"host": "127.0.0.1", "port": str(tls_server.tls_port), "password": f"{MARKER}-tls", "tls": "true",
                "ca_file": str(tls_server.ca_path)}
        full = make_target(settings(**base, cert_file=str(tls_server.client_cert_path),
                                    key_file=str(tls_server.client_key_path)))
        try:
            issued = token()
            await full.write(OWNER, REDIS_SPEC, key_of(full), issued)
            back = await full.read(OWNER, key_of(full))
            assert back is not None
            assert back.fingerprint == issued.fingerprint
        finally:
            await full.aclose()
        # the same data over the plain port: TLS really was the only difference
        plain = aioredis.Redis.from_url(tls_server.url(), decode_responses=True)
        assert await plain.keys("*") == ["secured-endpoint:shop:orders-backend"]
        await plain.aclose()

        no_client_cert = make_target(settings(**base))
        try:
            with pytest.raises(TargetError) as caught:
                await no_client_cert.write(OWNER, REDIS_SPEC, key_of(no_client_cert), token())
            assert "127.0.0.1" in caught.value.message
        finally:
            await no_client_cert.aclose()

        other_ca = tmp_path / "other"
        other_ca.mkdir()
        generate_certificates(other_ca)
        wrong_ca = make_target(settings(**{**base, "ca_file": str(other_ca / "ca.crt")},
                                        cert_file=str(tls_server.client_cert_path),
                                        key_file=str(tls_server.client_key_path)))
        try:
            with pytest.raises(TargetError, match=r"(?i)certificate"):
                await wrong_ca.write(OWNER, REDIS_SPEC, key_of(wrong_ca), token())
        finally:
            await wrong_ca.aclose()


async def test_rediss_url(tmp_path: Path) -> None:
    with RedisServer(password=f"{MARKER}-tls", tls=True) as tls_server:
        redis_target = make_target(settings(url=tls_server.url(2, tls=True), ca_file=str(tls_server.ca_path)))
        try:
            await redis_target.write(OWNER, REDIS_SPEC, key_of(redis_target), token())
            assert redis_target.where == f"Redis at 127.0.0.1:{tls_server.tls_port} db 2 (TLS)"
        finally:
            await redis_target.aclose()


async def test_wrong_password_is_a_target_error_without_the_password(server: RedisServer,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    wrong = f"{MARKER}-wrong"
    redis_target = make_target(settings(host="127.0.0.1", port=str(server.port), password=wrong))
    try:
        with pytest.raises(TargetError) as caught:
            await redis_target.write(OWNER, REDIS_SPEC, key_of(redis_target), token())
        message = str(caught.value)
        assert caught.value.target == "Redis"
        assert message.startswith("Redis: cannot write shop/orders-backend at Redis at 127.0.0.1:")
        assert wrong not in message
        assert MARKER not in message
        with pytest.raises(TargetError):
            await redis_target.read(OWNER, key_of(redis_target))
        assert not redis_target.available
    finally:
        await redis_target.aclose()
    assert wrong not in caplog.text


async def test_a_server_that_never_answers_does_not_block(unused_tcp_port: int) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)

    silent = await asyncio.start_server(hold, "127.0.0.1", unused_tcp_port)
    redis_target = make_target(settings(host="127.0.0.1", port=str(unused_tcp_port),
                                        connect_timeout_seconds="0.2", socket_timeout_seconds="0.2"))
    try:
        started = time.monotonic()
        with pytest.raises(TargetError, match=r"no answer within 1\.6 s"):  # connect + 2 reads + 1 s
            await redis_target.write(OWNER, REDIS_SPEC, key_of(redis_target), token())
        assert time.monotonic() - started < 2.5
        assert not await redis_target.ping()
    finally:
        await redis_target.aclose()
        silent.close()


# -- refresh requests -------------------------------------------------------------------------------------


class Collector:
    """Runs ``target.refresh_requests()`` in a task and queues what it yields."""

    def __init__(self, target: RedisTarget) -> None:
        self.queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(target))

    async def _run(self, target: RedisTarget) -> None:
        async for request in target.refresh_requests():
            self.queue.put_nowait(request)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def subscribed(client: aioredis.Redis, channel: str) -> bool:
    return bool(dict(await client.pubsub_numsub(channel)).get(channel))


async def test_refresh_requests_yield_well_formed_and_skip_malformed(target: RedisTarget, admin: aioredis.Redis
                                                                     ) -> None:
    collector = Collector(target)
    try:
        await eventually(lambda: subscribed(admin, "secured-endpoint:refresh"), what="the subscription")
        malformed: list[str | bytes] = [
            "", "shop/orders", "shop/orders sha256:1 extra", "shop orders sha256:1", "/orders sha256:1",
            "shop/ sha256:1", "Shop/orders sha256:1", "shop/orders_x sha256:1", "shop/orders\tsha256:1",
            "a" * 64 + "/orders sha256:1", "shop/orders " + "f" * 129, "shop/orders " + "x" * 600,
            b"\xff\xfe/orders sha256:1", "shop/orders  sha256:1",
        ]
        for data in malformed:
            await admin.publish("secured-endpoint:refresh", data)
        await admin.publish("secured-endpoint:refresh", "shop/orders-backend sha256:1f2e3d4c5b6a")
        await admin.publish("secured-endpoint:refresh", "team-a/api.v2 sha256:abc")
        first = await asyncio.wait_for(collector.queue.get(), 5)
        second = await asyncio.wait_for(collector.queue.get(), 5)
        assert [first, second] == [("shop", "orders-backend", "sha256:1f2e3d4c5b6a"),
                                   ("team-a", "api.v2", "sha256:abc")]
        assert collector.queue.empty()
    finally:
        await collector.stop()


async def test_refresh_requests_survive_a_restart(server: RedisServer, target: RedisTarget,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    collector = Collector(target)
    try:
        admin = aioredis.Redis.from_url(server.url(), decode_responses=True)
        await eventually(lambda: subscribed(admin, "secured-endpoint:refresh"), what="the subscription")
        await admin.publish("secured-endpoint:refresh", "shop/before sha256:1")
        assert await asyncio.wait_for(collector.queue.get(), 5) == ("shop", "before", "sha256:1")
        await admin.aclose()

        server.kill()
        await asyncio.sleep(0.5)  # a few failed resubscriptions with backoff
        server.restart()
        admin = aioredis.Redis.from_url(server.url(), decode_responses=True)
        await eventually(lambda: subscribed(admin, "secured-endpoint:refresh"), what="the new subscription")
        await admin.publish("secured-endpoint:refresh", "shop/after sha256:2")
        assert await asyncio.wait_for(collector.queue.get(), 5) == ("shop", "after", "sha256:2")
        await admin.aclose()
        assert "Lost the subscription" in caplog.text
        assert "Subscribed to secured-endpoint:refresh again" in caplog.text
    finally:
        await collector.stop()


async def test_a_subscription_that_stops_answering_is_replaced(server: RedisServer, admin: aioredis.Redis,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # CLIENT PAUSE holds every reply, our keepalive PING's too: to the subscriber it looks like a dead link
    redis_target = make_target(settings(url=server.url()), keepalive_interval=0.3, operation_timeout=1.0)
    collector = Collector(redis_target)
    try:
        await eventually(lambda: subscribed(admin, "secured-endpoint:refresh"), what="the subscription")
        await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        await asyncio.sleep(3.2)
        assert "Lost the subscription" in caplog.text
        await eventually(lambda: subscribed(admin, "secured-endpoint:refresh"), what="the new subscription")
        await admin.publish("secured-endpoint:refresh", "shop/orders-backend sha256:3")
        assert await asyncio.wait_for(collector.queue.get(), 5) == ("shop", "orders-backend", "sha256:3")
    finally:
        await collector.stop()
        await redis_target.aclose()


# -- availability -----------------------------------------------------------------------------------------


async def test_watch_availability_calls_on_restored_after_an_outage(server: RedisServer, target: RedisTarget,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    restored: list[float] = []

    async def on_restored() -> None:
        restored.append(time.monotonic())
        # what the operator does: rewrite every current token
        await target.write(OWNER, REDIS_SPEC, key_of(target), pending)

    pending = token()
    watcher = asyncio.create_task(target.watch_availability(on_restored))
    try:
        await eventually(lambda: asyncio.sleep(0, target.available), what="available")
        assert restored == []  # up from the start: nothing to restore

        server.kill()
        await eventually(lambda: asyncio.sleep(0, not target.available), what="unavailable")
        with pytest.raises(TargetError):
            await target.write(OWNER, REDIS_SPEC, key_of(target), pending)
        await asyncio.sleep(0.3)
        assert caplog.text.count("is unreachable") == 1  # logged once per outage, not once per ping

        server.restart()
        await eventually(lambda: asyncio.sleep(0, bool(restored)), what="on_restored")
        assert target.available
        admin = aioredis.Redis.from_url(server.url(), decode_responses=True)
        key = target.key(OWNER.namespace, OWNER.name)
        assert (await admin.hgetall(key))["fingerprint"] == pending.fingerprint
        await asyncio.sleep(0.3)
        assert len(restored) == 1
        assert "is reachable again" in caplog.text

        # Redis answers throughout but loses the data: the _alive marker tells
        await admin.flushall()
        await eventually(lambda: asyncio.sleep(0, len(restored) == 2), what="on_restored after FLUSHALL")
        assert await admin.exists(key, target.alive_key) == 2
        assert "has lost the operator's keys" in caplog.text

        # a restart quicker than the probe interval (no persistence: the data is gone)
        await admin.aclose()
        server.restart()
        await eventually(lambda: asyncio.sleep(0, len(restored) == 3), what="on_restored after a quick restart")
        admin = aioredis.Redis.from_url(server.url(), decode_responses=True)
        assert await admin.exists(key) == 1
        await admin.aclose()
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


async def test_redis_down_at_start_up_is_restored_when_it_comes(unused_tcp_port: int) -> None:
    redis_target = make_target(settings(host="127.0.0.1", port=str(unused_tcp_port), password=f"{MARKER}-pw"))
    restored = asyncio.Event()

    async def on_restored() -> None:
        restored.set()

    watcher = asyncio.create_task(redis_target.watch_availability(on_restored))
    try:
        await asyncio.sleep(0.3)
        assert not redis_target.available
        assert not restored.is_set()
        with RedisServer(password=f"{MARKER}-pw", port=unused_tcp_port):
            await asyncio.wait_for(restored.wait(), 10)
            assert redis_target.available
            await redis_target.write(OWNER, REDIS_SPEC, key_of(redis_target), token())
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        await redis_target.aclose()


# -- Sentinel ---------------------------------------------------------------------------------------------


async def test_sentinel_mode(server: RedisServer, admin: aioredis.Redis) -> None:
    with RedisSentinel(server, master_name="tokens") as sentinel:
        redis_target = make_target(settings(sentinels=f"{sentinel.address}", sentinel_master="tokens",
                                            password=f"{MARKER}-admin"))
        try:
            assert redis_target.where == f"Redis master 'tokens' via sentinels {sentinel.address} db 0"
            issued = token()
            await redis_target.write(OWNER, REDIS_SPEC, key_of(redis_target), issued)
            back = await redis_target.read(OWNER, key_of(redis_target))
            assert back is not None
            assert back.fingerprint == issued.fingerprint
            assert (await admin.hgetall(redis_target.key(OWNER.namespace, OWNER.name)))["fingerprint"] \
                == issued.fingerprint
            assert await redis_target.ping()
            collector = Collector(redis_target)  # the subscription goes to the master as well
            try:
                await eventually(lambda: subscribed(admin, "secured-endpoint:refresh"), what="the subscription")
                await admin.publish("secured-endpoint:refresh", "shop/orders-backend sha256:4")
                assert await asyncio.wait_for(collector.queue.get(), 5) == ("shop", "orders-backend", "sha256:4")
            finally:
                await collector.stop()
        finally:
            await redis_target.aclose()
