"""The operator against a real 3-master Redis Cluster (``SEP_REDIS_CLUSTER=true``, docs/contract.md §3).

The cluster: three ``redis-server --cluster-enabled yes`` created with ``redis-cli --cluster create``, a password
on every node; the operator is seeded with one node (``SEP_REDIS_HOST``/``PORT``) and reads the password from a
file. Cases:

- tokens land under the cluster layout ``<prefix>:{<namespace>:<name>}``, spread over the masters; the status
  names that key; after a refresh ``:previous`` exists and CLUSTER KEYSLOT puts both keys of an endpoint in one
  slot; every master holds exactly one ``_alive`` marker, in a slot it serves;
- a gateway (the library's ``RedisTokenSource`` over ``redis.asyncio.RedisCluster``) reads the token, asks for a
  refresh on ``<prefix>:refresh`` and is answered (the operator subscribes on one node; the cluster broadcasts);
  the blocking ``SyncRedisTokenSource`` over ``redis.RedisCluster`` reads the same layout;
- FLUSHALL on the master holding the most keys: its keys and its marker come back within seconds, the other
  masters' keys untouched, and no token request is made.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.redisserver import RedisClusterGroup, RedisServer
from secured_endpoint_devenv.tokenserver import TokenServer
from secured_endpoint_gateway import RedisTokenSource, SyncRedisTokenSource, wire
from tests.conftest import TEST_OPERATOR_ENV, Kube, OperatorProcess, Setup, _namespace, wait_for

pytestmark = pytest.mark.e2e

PREFIX = "sep-cluster"
REDIS_TARGET = {"target": {"redis": {"enabled": True}}}


@pytest.fixture(scope="module")
def cluster(secret_values: set[str]) -> Iterator[RedisClusterGroup]:
    password = f"cluster-{uuid.uuid4().hex}"
    secret_values.add(password)
    with RedisClusterGroup(3, password=password) as group:
        yield group


@pytest.fixture(scope="module")
def cluster_operator(control_plane: controlplane.ControlPlane, cluster: RedisClusterGroup,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    workdir = tmp_path_factory.mktemp("cluster-operator")
    assert cluster.password is not None
    (password_file := workdir / "redis-password").write_text(cluster.password + "\n")
    operator = OperatorProcess(kubeconfig=control_plane.kubeconfig_path, log_path=workdir / "operator.log",
                               scope=("--namespace", "rc-*"), env={
                                   **TEST_OPERATOR_ENV, "SEP_REDIS_CLUSTER": "true",
                                   "SEP_REDIS_HOST": cluster.seed.host, "SEP_REDIS_PORT": str(cluster.seed.port),
                                   "SEP_REDIS_PASSWORD_FILE": str(password_file), "SEP_REDIS_KEY_PREFIX": PREFIX,
                                   "SEP_REDIS_SOCKET_TIMEOUT_SECONDS": "2", "SEP_REDIS_CONNECT_TIMEOUT_SECONDS": "2"})
    operator.start()
    yield operator
    operator.stop()


@pytest.fixture
def cluster_setup(kube: Kube, cluster_operator: OperatorProcess, secret_values: set[str]) -> Iterator[Setup]:
    for namespace in _namespace(kube, "rc"):
        yield Setup(kube, namespace, secret_values)


def cluster_client(cluster: RedisClusterGroup) -> redis.RedisCluster:
    return redis.RedisCluster(host=cluster.seed.host, port=cluster.seed.port, password=cluster.password,
                              decode_responses=True)


def keyslot(cluster: RedisClusterGroup, key: str) -> int:
    with cluster.seed.admin() as client:
        return int(client.execute_command("CLUSTER", "KEYSLOT", key))


def markers_on(node: RedisServer) -> list[str]:
    with node.admin() as client:
        return sorted(client.scan_iter(match=f"{PREFIX}:_alive*"))


def test_tokens_land_with_hash_tags_and_markers_per_master(cluster: RedisClusterGroup, cluster_setup: Setup,
                                                           kube: Kube, token_server: TokenServer) -> None:
    token_server.lifetime_seconds = 4
    namespace = cluster_setup.namespace
    cluster_setup.client(token_server)
    names = [f"e-{index}" for index in range(8)]
    for name in names:
        cluster_setup.endpoint(name, token_server, **REDIS_TARGET)
    for name in names:
        kube.wait_ready(namespace, name)
    with cluster_client(cluster) as client:
        holders = set()
        for name in names:
            key = wire.token_key(PREFIX, namespace, name, cluster=True)
            assert key == f"{PREFIX}:{{{namespace}:{name}}}"
            status = (kube.get_endpoint(namespace, name) or {})["status"]
            assert status["targets"] == {"redis": {"key": key}}
            fields = client.hgetall(key)
            assert fields["fingerprint"] == status["tokenFingerprint"] == wire.fingerprint(fields["access_token"])
            assert token_server.is_valid(fields["access_token"])
            assert keyslot(cluster, key) == wire.key_slot(key)
            holders.add(cluster.node_for_key(key).port)
        assert len(holders) >= 2, "eight endpoints' keys spread over the masters"
        first = wire.token_key(PREFIX, namespace, names[0], cluster=True)
        wait_for(lambda: client.exists(first + ":previous"), timeout=8, message="a refresh putting a token aside")
        assert keyslot(cluster, first) == keyslot(cluster, first + ":previous"), "both keys in one slot"
        assert client.pttl(first + ":previous") > 0
    for node in cluster.nodes:
        markers = markers_on(node)
        assert len(markers) == 1, f"one marker on the master at {node.address}: {markers}"
        assert cluster.node_for_key(markers[0]) is node


def test_a_gateway_refresh_is_answered(cluster: RedisClusterGroup, cluster_setup: Setup, kube: Kube,
                                       token_server: TokenServer) -> None:
    namespace = cluster_setup.namespace
    cluster_setup.client(token_server)
    cluster_setup.endpoint("gw", token_server, **REDIS_TARGET)
    kube.wait_ready(namespace, "gw")

    async def refresh() -> tuple[str, str]:
        client = redis.asyncio.RedisCluster(host=cluster.seed.host, port=cluster.seed.port, password=cluster.password)
        try:
            async with RedisTokenSource(client, namespace, "gw", prefix=PREFIX, refresh_wait=5.0) as source:
                assert source.key == f"{PREFIX}:{{{namespace}:gw}}"
                refused = await source.get()
                newer = await source.request_refresh(refused)
                return refused.fingerprint, newer.fingerprint
        finally:
            await client.aclose()

    with SyncRedisTokenSource(cluster_client(cluster), namespace, "gw", prefix=PREFIX) as blocking:
        current = (kube.get_endpoint(namespace, "gw") or {})["status"]["tokenFingerprint"]
        assert blocking.key == f"{PREFIX}:{{{namespace}:gw}}", "the layout guessed from the client's type"
        assert blocking.get().fingerprint == current
    requests = token_server.token_requests
    refused, newer = asyncio.run(refresh())
    assert newer != refused
    assert token_server.token_requests == requests + 1, "the refresh request caused one token request"
    wait_for(lambda: (kube.get_endpoint(namespace, "gw") or {})["status"]["tokenFingerprint"] == newer,
             message="the status naming the new token")


def test_flushall_of_one_master_brings_its_keys_back(cluster: RedisClusterGroup, cluster_setup: Setup, kube: Kube,
                                                     token_server: TokenServer,
                                                     cluster_operator: OperatorProcess) -> None:
    namespace = cluster_setup.namespace
    cluster_setup.client(token_server)
    names = [f"f-{index}" for index in range(9)]
    for name in names:
        cluster_setup.endpoint(name, token_server, **REDIS_TARGET)
    for name in names:
        kube.wait_ready(namespace, name)
    keys = {name: wire.token_key(PREFIX, namespace, name, cluster=True) for name in names}
    by_node: dict[int, list[str]] = {}
    for key in keys.values():
        by_node.setdefault(cluster.node_for_key(key).port, []).append(key)
    victim = next(node for node in cluster.nodes if node.port == max(by_node, key=lambda port: len(by_node[port])))
    with cluster_client(cluster) as client:
        before = {key: client.hget(key, "fingerprint") for key in keys.values()}
        requests = token_server.token_requests
        lost_before = cluster_operator.log_text().count("has lost the operator's keys")
        with victim.admin() as admin:
            admin.flushall()
        flushed = time.monotonic()
        wait_for(lambda: all(client.hget(key, "fingerprint") == before[key] for key in keys.values()), timeout=10,
                 message="every key back with the same token")
        back = time.monotonic() - flushed
    assert len(markers_on(victim)) == 1, "the flushed master's marker is back"
    assert cluster_operator.log_text().count("has lost the operator's keys") == lost_before + 1, \
        "the marker told the operator, once"
    assert token_server.token_requests == requests, "a rewrite, not a token request"
    print(f"{len(by_node[victim.port])} keys of the flushed master back {back:.2f} s after FLUSHALL")
