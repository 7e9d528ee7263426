"""The operator's Redis target and reactive path, end to end (docs/contract.md §3, §4).

The Redis operator talks TLS with a client certificate to an ACL user, password from a file, db 3,
so every case here runs through those settings.

Cases:
- the hash holds exactly the docs/contract.md §3 fields, its expiry equals the token's, the status names the key,
  and each write is announced on ``<prefix>:updated``;
- after a refresh the previous token stays readable under ``:previous`` until its own expiry;
- switching the Redis target off removes the key; deleting the endpoint removes it too;
- Redis killed and restarted (data lost) → every current token is back within seconds, tokens refreshed
  during the outage included, and Ready recovers;
- a refresh request with a stale fingerprint → no token request; with the current one → exactly one,
  however many gateways ask; ``reactive: false`` ignores them;
- five gateway replicas (the client library) keep calling a backend that accepts only current tokens
  while the token is revoked three times → no failed request, exactly one token request per revocation.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
from kubernetes import client as k8s

from secured_endpoint import tokens
from secured_endpoint_devenv.tokenserver import TokenServer
from secured_endpoint_gateway import RedisTokenSource, TokenAuth
from tests.conftest import Kube, OperatorProcess, RedisAccess, Setup, redis_operator_env, wait_for

pytestmark = pytest.mark.e2e

REDIS_TARGET = {"target": {"redis": {"enabled": True}}}


def test_hash_layout_expiry_and_announcement(redis_operator: OperatorProcess, kube: Kube, redis_setup: Setup,
                                             redis_access: RedisAccess, token_server: TokenServer) -> None:
    client = redis_access.client()
    pubsub = client.pubsub()
    pubsub.subscribe(f"{redis_access.prefix}:updated")
    redis_setup.client(token_server)
    token_server.lifetime_seconds = 120
    redis_setup.endpoint("cached", token_server, scopes=["inventory.read"], **REDIS_TARGET)
    kube.wait_ready(redis_setup.namespace, "cached")
    key = redis_access.key(redis_setup.namespace, "cached")
    fields = client.hgetall(key)
    assert set(fields) == {"access_token", "token_type", "expires_at", "scope", "fingerprint"}
    status = (kube.get_endpoint(redis_setup.namespace, "cached") or {})["status"]
    assert token_server.is_valid(fields["access_token"])
    assert fields["fingerprint"] == status["tokenFingerprint"] == tokens.fingerprint(fields["access_token"])
    assert fields["token_type"] == "Bearer"
    assert fields["scope"] == "inventory.read"
    expires_at = int(fields["expires_at"])
    assert abs(client.pexpiretime(key) / 1000 - expires_at) <= 1, "the key must expire with the token"
    assert abs(expires_at - time.time() - 120) <= 5
    assert status["targets"] == {"redis": {"key": key}}
    assert kube.secret_data(redis_setup.namespace, "cached-token") is None, "Redis only: no Secret"
    message = wait_for(lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1),
                       message="the announcement on the updated channel")
    assert message["data"] == f"{redis_setup.namespace}/cached"


def test_previous_token_stays_readable(redis_operator: OperatorProcess, kube: Kube, redis_setup: Setup,
                                       redis_access: RedisAccess, token_server: TokenServer) -> None:
    client = redis_access.client()
    token_server.lifetime_seconds = 6
    redis_setup.client(token_server)
    redis_setup.endpoint("rolling", token_server, target={"secret": {}, "redis": {"enabled": True}})
    kube.wait_ready(redis_setup.namespace, "rolling")
    key = redis_access.key(redis_setup.namespace, "rolling")
    first = client.hgetall(key)
    wait_for(lambda: client.hget(key, "fingerprint") not in (None, first["fingerprint"]), timeout=8,
             message="a refreshed token")
    previous = client.hgetall(f"{key}:previous")
    assert previous["access_token"] == first["access_token"]
    assert abs(client.pexpiretime(f"{key}:previous") / 1000 - int(first["expires_at"])) <= 1
    assert kube.secret_data(redis_setup.namespace, "rolling-token") is not None, "both targets are written"


def test_switching_redis_off_and_deleting_remove_the_key(redis_operator: OperatorProcess, kube: Kube,
                                                         redis_setup: Setup, redis_access: RedisAccess,
                                                         token_server: TokenServer) -> None:
    client = redis_access.client()
    redis_setup.client(token_server)
    redis_setup.endpoint("off", token_server, target={"secret": {}, "redis": {"enabled": True}})
    redis_setup.endpoint("deleted", token_server, **REDIS_TARGET)
    kube.wait_ready(redis_setup.namespace, "off")
    kube.wait_ready(redis_setup.namespace, "deleted")
    off_key, deleted_key = (redis_access.key(redis_setup.namespace, name) for name in ("off", "deleted"))
    assert client.exists(off_key)
    assert client.exists(deleted_key)
    kube.patch_endpoint(redis_setup.namespace, "off", {"spec": {"target": {"redis": {"enabled": False}}}})
    wait_for(lambda: not client.exists(off_key), message="the key of the switched-off target gone")
    assert kube.secret_data(redis_setup.namespace, "off-token") is not None
    kube.delete_endpoint(redis_setup.namespace, "deleted")
    wait_for(lambda: not client.exists(deleted_key), message="the key of the deleted endpoint gone")


def test_redis_outage_restores_every_token(redis_operator: OperatorProcess, kube: Kube, redis_setup: Setup,
                                           redis_access: RedisAccess, token_server: TokenServer) -> None:
    token_server.lifetime_seconds = 4
    redis_setup.client(token_server)
    redis_setup.endpoint("redis-only", token_server, **REDIS_TARGET)
    redis_setup.endpoint("both", token_server, target={"secret": {}, "redis": {"enabled": True}})
    for name in ("redis-only", "both"):
        kube.wait_ready(redis_setup.namespace, name)
    redis_access.server.kill()
    requests_at_kill = token_server.token_requests
    try:
        kube.wait_ready(redis_setup.namespace, "both", status="False", reason="TargetWriteFailed", timeout=10)
        wait_for(lambda: token_server.token_requests > requests_at_kill, message="a refresh during the outage")
    finally:
        redis_access.server.restart()  # empty: nothing was persisted
    restarted = time.monotonic()
    client = redis_access.client()
    for name in ("redis-only", "both"):
        key = redis_access.key(redis_setup.namespace, name)
        wait_for(lambda key=key: client.exists(key), timeout=15, message=f"{key} rewritten after the outage")
        kube.wait_ready(redis_setup.namespace, name, timeout=10)
        status = (kube.get_endpoint(redis_setup.namespace, name) or {})["status"]
        assert client.hget(key, "fingerprint") == status["tokenFingerprint"]
        assert token_server.is_valid(client.hget(key, "access_token"))
    print(f"keys back {time.monotonic() - restarted:.2f} s after Redis restarted")


def test_refresh_requests_are_gated_by_fingerprint(redis_operator: OperatorProcess, kube: Kube,
                                                   redis_setup: Setup, redis_access: RedisAccess,
                                                   token_server: TokenServer) -> None:
    client = redis_access.client()
    redis_setup.client(token_server)
    redis_setup.endpoint("gated", token_server, **REDIS_TARGET)
    redis_setup.endpoint("proactive", token_server, refresh={"reactive": False}, **REDIS_TARGET)
    kube.wait_ready(redis_setup.namespace, "gated")
    kube.wait_ready(redis_setup.namespace, "proactive")
    channel = f"{redis_access.prefix}:refresh"
    gated_key = redis_access.key(redis_setup.namespace, "gated")
    current = client.hget(gated_key, "fingerprint")
    assert token_server.token_requests == 2

    client.publish(channel, f"{redis_setup.namespace}/gated sha256:000000000000")
    proactive = client.hget(redis_access.key(redis_setup.namespace, "proactive"), "fingerprint")
    client.publish(channel, f"{redis_setup.namespace}/proactive {proactive}")
    client.publish(channel, "garbage without a fingerprint")
    time.sleep(2)
    assert token_server.token_requests == 2, "stale fingerprints and reactive: false are ignored"

    for _ in range(100):  # a hundred gateways saw the same 401
        client.publish(channel, f"{redis_setup.namespace}/gated {current}")
    wait_for(lambda: client.hget(gated_key, "fingerprint") != current, timeout=5, message="a new token")
    time.sleep(2)
    assert token_server.token_requests == 3, "a hundred requests for one token cause one token request"


def test_five_gateways_survive_revocations(redis_operator: OperatorProcess, kube: Kube, redis_setup: Setup,
                                           redis_access: RedisAccess, token_server: TokenServer) -> None:
    redis_setup.client(token_server)
    redis_setup.endpoint("shared", token_server, **REDIS_TARGET)
    kube.wait_ready(redis_setup.namespace, "shared")
    key = redis_access.key(redis_setup.namespace, "shared")
    results = asyncio.run(_gateways_during_revocations(redis_access, redis_setup.namespace, key, token_server,
                                                       replicas=5, revocations=3))
    failed = [status for status in results if status != 200]
    assert len(results) > 100
    assert failed == [], f"{len(failed)} of {len(results)} client requests failed"
    assert token_server.token_requests == 1 + 3, "exactly one token request per revocation"


async def _gateways_during_revocations(access: RedisAccess, namespace: str, key: str, server: TokenServer, *,
                                       replicas: int, revocations: int) -> list[int]:
    statuses: list[int] = []
    stop = asyncio.Event()

    def connect() -> redis.asyncio.Redis:
        return redis.asyncio.Redis(
            host=access.server.host, port=access.server.tls_port, db=access.db, username=access.username,
            password=access.password, ssl=True, ssl_ca_certs=str(access.server.ca_path),
            ssl_certfile=str(access.server.client_cert_path), ssl_keyfile=str(access.server.client_key_path))

    async def replica() -> None:
        async with RedisTokenSource(connect(), namespace, "shared", prefix=access.prefix,
                                    refresh_wait=5.0) as source, \
                httpx.AsyncClient(auth=TokenAuth(source), timeout=10) as http:
            while not stop.is_set():
                response = await http.get(f"{server.url}/api/echo")
                statuses.append(response.status_code)
                await asyncio.sleep(0.02)

    async def revoke() -> None:
        plain = connect()
        try:
            for _ in range(revocations):
                await asyncio.sleep(1.5)
                token = (await plain.hget(key, "access_token")).decode()
                assert server.revoke(token)
            await asyncio.sleep(1.5)
        finally:
            await plain.aclose()
            stop.set()

    await asyncio.gather(revoke(), *(replica() for _ in range(replicas)))
    return statuses


def test_a_token_refused_soon_after_issue_is_replaced_at_once(control_plane: Any, kube: Kube,
                                                              redis_access: RedisAccess, token_server: TokenServer,
                                                              secret_values: set[str], tmp_path: Path,
                                                              operator_processes: list[OperatorProcess]) -> None:
    """Default settings (a 5 s floor): twenty gateways report the same refused token within 100 ms, a few
    seconds after it was issued by the previous forced refresh: one token request, the new token in Redis
    within a gateway's wait (3 s by default); only a token refused again and again meets the floor."""
    namespace = f"rf-{time.monotonic_ns() % 10**8}"
    kube.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    operator = OperatorProcess(kubeconfig=control_plane.kubeconfig_path, log_path=tmp_path / "operator.log",
                               scope=("--namespace", namespace),
                               env={"SEP_STARTUP_SPREAD_SECONDS": "0", **redis_operator_env(redis_access, tmp_path)})
    operator_processes.append(operator)
    operator.start()
    try:
        setup = Setup(kube, namespace, secret_values)
        setup.client(token_server)
        setup.endpoint("often", token_server, **REDIS_TARGET)
        kube.wait_ready(namespace, "often")
        client = redis_access.client()
        key, channel = redis_access.key(namespace, "often"), f"{redis_access.prefix}:refresh"

        def refuse_and_report() -> tuple[str, float]:
            """The IdP revokes the current token; twenty gateways report it within 100 ms."""
            current = client.hget(key, "fingerprint")
            access_token = client.hget(key, "access_token")
            assert token_server.revoke(access_token)
            for _ in range(20):
                client.publish(channel, f"{namespace}/often {current}")
                time.sleep(0.005)
            return current, time.monotonic()

        for round_ in range(2):  # the creation's token, then the one the first forced refresh issued
            requests = token_server.token_requests
            refused, reported = refuse_and_report()
            wait_for(lambda refused=refused: client.hget(key, "fingerprint") != refused, timeout=3,
                     message=f"a new token within a gateway's wait (round {round_ + 1})")
            replaced_after = time.monotonic() - reported
            time.sleep(1)
            assert token_server.token_requests == requests + 1, "twenty reports, one token request"
            assert replaced_after < 2.0
        # a third refusal within the floor: the loop the floor guards against
        requests = token_server.token_requests
        refused, reported = refuse_and_report()
        time.sleep(1)
        assert client.hget(key, "fingerprint") == refused, "not before the floor"
        wait_for(lambda: client.hget(key, "fingerprint") != refused, timeout=8, message="a token after the floor")
        assert token_server.token_requests == requests + 1
        kube.delete_endpoint(namespace, "often")
        wait_for(lambda: kube.get_endpoint(namespace, "often") is None, message="the endpoint gone")
    finally:
        operator.stop()
