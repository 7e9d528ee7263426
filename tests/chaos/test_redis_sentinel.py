"""Chaos 5a: the Redis master SIGKILLed under the operator; three real sentinels fail over to the replica.

A master and one replica (``replicaof``), both with a password; three sentinels (quorum 2, down after 1 s)
that require a password of their own; the operator in Sentinel mode (``SEP_REDIS_SENTINELS``,
``SEP_REDIS_SENTINEL_PASSWORD_FILE``, ``SEP_REDIS_PASSWORD_FILE``) with six endpoints whose tokens live 6 s or
20 s, so refreshes fall into the failover. Then the master is SIGKILLed. Asserted:

- the sentinels promote the replica, and within a bounded time every endpoint is Ready (no write pending) and its
  key on the new master holds a token the token server issued and still honours, whose fingerprint is
  ``status.tokenFingerprint``; every
  endpoint is then refreshed again on the new master (the operator writes there, not only the replica's copy);
- a sampler reading every key through the sentinels (as a gateway would) throughout never read an expired
  token: a hash whose ``expires_at`` is past by a whole second (``expires_at`` is rounded down; the key itself
  expires at the exact millisecond) or whose token the token server's own record says has expired; nor a
  hash with fields missing, nor a key missing outside the failover (a 6-s token due while no master takes
  writes expires in Redis, and its key is gone until the operator writes the new token to the new master: that
  is counted, and must end by the recovery). Reads that fail during the failover are counted, not judged;
- a gateway (the library's ``RedisTokenSource`` over a Sentinel-managed client) asking for a refresh on
  ``<prefix>:refresh`` after the failover gets a new token: the operator's subscription followed the master.

Figures: failover (kill → sentinels name the replica), recovery (kill → every key current on the new master),
refreshed (kill → every endpoint refreshed on the new master), sampler reads and failed reads.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel

from secured_endpoint_devenv.redisserver import RedisServer, SentinelGroup, sentinel_group
from secured_endpoint_devenv.tokenserver import TokenServer
from secured_endpoint_gateway import GatewayToken, RedisTokenSource, wire
from tests.chaos.conftest import Chaos, ready_for_generation, report
from tests.conftest import Setup, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

MASTER = "tokens"
PREFIX = "sep-chaos"
RECOVERY_BOUND = 20.0  # s from the kill: the failover (~2-4 s) plus a probe and a rewrite, with room for CI


class KeySampler(threading.Thread):
    """Reads every endpoint's hash through the sentinels (HGETALL on the master they name) every ``interval``."""

    def __init__(self, sentinels: SentinelGroup, password: str, sentinel_password: str, keys: dict[str, str],
                 servers: list[TokenServer], interval: float = 0.05) -> None:
        super().__init__(name="redis-key-sampler", daemon=True)
        self.keys, self.servers, self.interval = keys, servers, interval
        hosts = [(sentinel.host, sentinel.port) for sentinel in sentinels.sentinels]
        self.sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs={"password": sentinel_password, "socket_timeout": 0.5},
            socket_timeout=0.5, socket_connect_timeout=0.5, decode_responses=True)
        self.client = self.sentinel.master_for(MASTER, password=password)
        self.reads = self.failed_reads = 0
        self.expired: list[tuple[str, str, float]] = []  # (key, why, seconds past)
        self.broken: list[tuple[str, str]] = []
        self.missing: list[tuple[str, float]] = []  # (key, when: time.monotonic())
        self._halt = threading.Event()

    def _expiries(self) -> dict[str, float]:
        return {issued.access_token: issued.expires_at for server in self.servers for issued in server.issued_tokens}

    def sample(self) -> None:
        for key in self.keys.values():
            try:
                fields = self.client.hgetall(key)
            except (redis.RedisError, OSError):
                self.failed_reads += 1
                continue
            self.reads += 1
            now = time.time()
            if not fields:
                self.missing.append((key, time.monotonic()))
                continue
            if set(fields) != set(wire.REDIS_FIELDS) or fields["fingerprint"] != wire.fingerprint(
                    fields["access_token"]):
                self.broken.append((key, f"fields {sorted(fields)}"))
                continue
            if int(fields["expires_at"]) + 1 <= now:
                self.expired.append((key, "expires_at past", round(now - int(fields["expires_at"]), 2)))
            real_expiry = self._expiries().get(fields["access_token"])
            if real_expiry is None:
                self.broken.append((key, "a token the token server never issued"))
            elif real_expiry <= now:
                self.expired.append((key, "expired at the token server", round(now - real_expiry, 2)))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.client.close()


def test_sentinel_failover_under_the_operator(chaos: Chaos, token_server: TokenServer, secret_values: set[str],
                                              tmp_path: Path) -> None:
    password, sentinel_password = f"redis-{uuid.uuid4().hex}", f"sentinel-{uuid.uuid4().hex}"
    secret_values.update({password, sentinel_password})
    long_lived = TokenServer()
    long_lived.start()
    token_server.lifetime_seconds, long_lived.lifetime_seconds = 6, 20
    try:
        with RedisServer(password=password) as master, \
                RedisServer(password=password, replica_of=master) as replica:
            wait_for(lambda: replica.info("replication").get("master_link_status") == "up",
                     message="the replica in sync")
            with sentinel_group(master, 3, master_name=MASTER, quorum=2, down_after_ms=1000,
                                failover_timeout_ms=5000, password=sentinel_password) as sentinels:
                wait_for(lambda: all(sentinel.known_replicas() == 1 for sentinel in sentinels.sentinels),
                         timeout=15, message="every sentinel knowing the replica")
                _failover(chaos, sentinels, master, replica, password, sentinel_password,
                          [token_server, long_lived], secret_values, tmp_path)
    finally:
        for issued in long_lived.issued_tokens:
            secret_values.add(issued.access_token)
        long_lived.stop()


def _failover(chaos: Chaos, sentinels: SentinelGroup, master: RedisServer, replica: RedisServer, password: str,
              sentinel_password: str, servers: list[TokenServer], secret_values: set[str], tmp_path: Path) -> None:
    (password_file := tmp_path / "redis-password").write_text(password + "\n")
    (sentinel_password_file := tmp_path / "sentinel-password").write_text(sentinel_password)
    chaos.new_operator(SEP_REDIS_SENTINELS=sentinels.addresses, SEP_REDIS_SENTINEL_MASTER=MASTER,
                       SEP_REDIS_PASSWORD_FILE=str(password_file),
                       SEP_REDIS_SENTINEL_PASSWORD_FILE=str(sentinel_password_file),
                       SEP_REDIS_KEY_PREFIX=PREFIX, SEP_REDIS_SOCKET_TIMEOUT_SECONDS="1",
                       SEP_REDIS_CONNECT_TIMEOUT_SECONDS="1").start()
    setup = Setup(chaos.kube, chaos.namespace, secret_values)
    names: dict[str, TokenServer] = {}
    for index, server in enumerate(servers):
        setup.client(server, secret_name=f"oauth-{index}")
        for number in range(3):
            name = f"e-{index}-{number}"
            setup.endpoint(name, server, clientSecretRef={"name": f"oauth-{index}"},
                           target={"redis": {"enabled": True}})
            names[name] = server
    keys = {name: wire.token_key(PREFIX, chaos.namespace, name) for name in names}
    for name in names:
        chaos.kube.wait_ready(chaos.namespace, name, timeout=15)

    sampler = KeySampler(sentinels, password, sentinel_password, keys, servers)
    sampler.start()
    try:
        time.sleep(3)  # refreshes of the 6-s tokens before the kill, too
        with master.admin() as client:
            before = {name: client.hget(key, "fingerprint") for name, key in keys.items()}
        master.kill()
        killed = time.monotonic()
        new_master = (replica.host, replica.port)
        wait_for(lambda: sentinels.master_address() == new_master, timeout=15,
                 message="the sentinels promoting the replica")
        failover = time.monotonic() - killed

        def current_on_new_master() -> bool:
            """Every endpoint Ready (no write pending: a token due during the failover is written) and its key on
            the new master holding the token the status names, which the token server honours."""
            with replica.admin() as client:
                for name, key in keys.items():
                    fields = client.hgetall(key)
                    endpoint = chaos.kube.get_endpoint(chaos.namespace, name) or {}
                    status = endpoint.get("status") or {}
                    if not ready_for_generation(endpoint) or not fields \
                            or fields["fingerprint"] != status.get("tokenFingerprint") \
                            or not names[name].is_valid(fields["access_token"]):
                        return False
            return True

        wait_for(current_on_new_master, timeout=RECOVERY_BOUND - (time.monotonic() - killed), interval=0.1,
                 message="every key current on the new master")
        recovery = time.monotonic() - killed

        def refreshed_on_new_master() -> bool:  # a token the operator wrote after the kill, on the new master
            with replica.admin() as client:
                return all(client.hget(key, "fingerprint") not in (None, before[name]) for name, key in keys.items())

        wait_for(refreshed_on_new_master, timeout=30, interval=0.1,
                 message="every endpoint refreshed on the new master")
        refreshed = time.monotonic() - killed
        for name in names:
            chaos.kube.wait_ready(chaos.namespace, name, timeout=10)

        answered = asyncio.run(_gateway_refresh(sentinels, password, sentinel_password, chaos.namespace, "e-1-0"))
        wait_for(lambda: (chaos.kube.get_endpoint(chaos.namespace, "e-1-0") or {})["status"]["tokenFingerprint"]
                 == answered.fingerprint, message="the status naming the token the gateway got")  # written after Redis
        assert servers[1].is_valid(answered.access_token.get_secret_value())
        time.sleep(1)  # the sampler sees the settled state too
    finally:
        sampler.stop()
    operator_log = chaos.operator.log_text()
    assert password not in operator_log
    assert sentinel_password not in operator_log
    for name in names:  # released through the operator while Redis is still there: the keys go too
        chaos.kube.delete_endpoint(chaos.namespace, name)
    wait_for(lambda: not chaos.endpoints(), timeout=20, message="the endpoints released")
    with replica.admin() as client:
        assert not any(client.exists(key) for key in keys.values()), "deleting an endpoint deletes its key"

    report("5a Redis Sentinel failover", endpoints=len(names), failover_s=round(failover, 2),
           recovery_s=round(recovery, 2), refreshed_s=round(refreshed, 2), sampler_reads=sampler.reads,
           failed_reads=sampler.failed_reads, expired_observed=len(sampler.expired),
           broken_observed=len(sampler.broken), missing_during_failover=len(sampler.missing))
    assert sampler.reads > 100
    assert sampler.expired == [], f"expired tokens read through the sentinels: {sampler.expired[:10]}"
    assert sampler.broken == [], f"malformed hashes read: {sampler.broken[:10]}"
    # A 6-s token due for refresh while no master takes writes expires in Redis; its key may be missing until the
    # operator writes the new one to the new master, never after that (nor before the kill).
    late = [(key, round(when - killed, 2)) for key, when in sampler.missing
            if not 0 <= when - killed <= recovery]
    assert late == [], f"keys missing outside the failover (key, s after the kill): {late[:10]}"
    assert recovery < RECOVERY_BOUND


async def _gateway_refresh(sentinels: SentinelGroup, password: str, sentinel_password: str, namespace: str,
                           name: str) -> GatewayToken:
    """A gateway's refresh request after the failover: the answer is a token newer than the refused one."""
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        [(s.host, s.port) for s in sentinels.sentinels], sentinel_kwargs={"password": sentinel_password})
    client = sentinel.master_for(MASTER, password=password)
    try:
        async with RedisTokenSource(client, namespace, name, prefix=PREFIX, refresh_wait=5.0) as source:
            refused = await source.get()
            newer = await source.request_refresh(refused)
            assert newer.fingerprint != refused.fingerprint
            return newer
    finally:
        await client.aclose()
        await sentinel.aclose()
