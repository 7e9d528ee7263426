"""The Redis target: tokens in a shared cache for gateways (docs/contract.md §3) and their refresh requests
(docs/contract.md §4).

Layout, with ``<prefix>`` = ``SEP_REDIS_KEY_PREFIX`` (default ``secured-endpoint``):

- ``<prefix>:<namespace>:<name>`` — a hash with exactly ``access_token``, ``token_type``, ``expires_at`` (unix
  seconds, an integer, rounded down), ``scope`` (empty string when the token has none) and ``fingerprint``; the
  key expires (PEXPIREAT, milliseconds) when the token does.
- ``<prefix>:<namespace>:<name>:previous`` — the token it replaced, same fields, expiring when *that* token
  does. A gateway that read the old token a moment before the write keeps a usable token (and can tell which
  one it holds by the fingerprint).
- channel ``<prefix>:updated`` — ``<namespace>/<name>`` after every write and delete, so caches re-read.
- channel ``<prefix>:refresh`` — gateways publish ``<namespace>/<name> <fingerprint>`` after a 401.
- ``<prefix>:_alive`` — a marker (value ``1``, no expiry) whose disappearance tells the operator that Redis lost
  its data; no namespace starts with ``_``, so it never collides with a token key.

A write is one Lua script (``EVALSHA``, reloaded by redis-py after a Redis restart empties the script cache),
so a reader never sees a half-written hash, a key without expiry, or a new token without the previous one put
aside. The script keeps the previous token only if its fingerprint differs (a rewrite of the same token after
a restart or an outage leaves ``:previous`` alone) and gives ``:previous`` the *remaining* lifetime of the old
key (PTTL → PEXPIRE), so its expiry is exactly the old token's. The script is idempotent, which is what makes
redis-py's retry on a timeout safe.

Redis Cluster (``SEP_REDIS_CLUSTER``): the keys carry a hash tag, ``<prefix>:{<namespace>:<name>}`` and
``<prefix>:{<namespace>:<name>}:previous``, so both land in one slot and the write script may touch both; the
``_alive`` marker is one per master (``<prefix>:_alive:{<n>}``, the first ``n`` whose slot that master serves,
chosen again when the slots move), so a master that lost its data is noticed for the keys it holds. Channels are
classic pub/sub, which a cluster broadcasts to every node: the operator subscribes on one node over a plain
connection (redis-py's cluster pub/sub differs between versions) and moves to the next known node when that
connection fails.

Connections: one ``redis.asyncio`` client (a pool) — a single server (URL or host/port), the master that
Redis Sentinel names (``master_for``; failover is followed on reconnect), or a ``RedisCluster`` seeded with the
URL or host/port. Connect and socket timeouts, a few
quick retries with jittered backoff on connection errors and timeouts, a health check on idle connections,
and an overall deadline on each operation, so nothing here waits forever. Sentinels are contacted with the
same timeouts and TLS settings, and with their own credentials (``SEP_REDIS_SENTINEL_USERNAME``,
``SEP_REDIS_SENTINEL_PASSWORD(_FILE)``; docs/contract.md §3), not the server's. TLS always verifies the
server certificate and its host name; the CA and client files are read when the first connection is made.

Outages: the operator does not depend on Redis to run. :meth:`RedisTarget.watch_availability` probes every
second, logs each transition once and calls back when Redis returns, so the caller rewrites every current
token; a failed operation marks Redis down at once, so even a blip shorter than the probe interval ends in a
rewrite, and the ``_alive`` marker catches a restart that lost the data without any failed operation.
:meth:`RedisTarget.refresh_requests` resubscribes with capped exponential backoff and jitter (pub/sub is
fire-and-forget: requests published while it is down are lost, and gateways retry) and detects a silently
dead connection with its own PINGs.

Minimal ACL for the operator's user: ``~<prefix>:* &<prefix>:* +@scripting +hset +hgetall +hget +del
+pexpire +pexpireat +pttl +type +publish +subscribe +ping +setnx`` (add ``+client|setinfo`` to silence a harmless
refusal in the Redis log); in cluster mode also ``+cluster|slots +cluster|shards`` (redis-py discovers the
nodes with them).

Nothing here logs or raises a token or a password: messages name the server (host:port, or the Sentinel
master), the endpoint and the operation, and Redis' own error text is scrubbed of both before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from secured_endpoint import api, schedule
from secured_endpoint.settings import RedisSettings
from secured_endpoint.targets.base import IssuedToken, Owner, TargetError
from secured_endpoint_gateway import wire
from secured_endpoint_gateway.wire import parse_refresh_request

logger = logging.getLogger(__name__)

TARGET = "Redis"
FIELDS = wire.REDIS_FIELDS

_RETRIES = 2  # quick retries inside one operation; longer outages are the caller's backoff
_HEALTH_CHECK_INTERVAL = 30  # seconds a pooled connection may idle before it is PINGed prior to use
_KEEPALIVE_MESSAGE = "secured-endpoint-keepalive"
_LOGGED_PREFIX = 40  # of a malformed refresh request, only this much is logged (at debug)

# KEYS[1] the token hash, KEYS[2] its ":previous" hash.
# ARGV: access_token, token_type, expires_at (s), scope, fingerprint, expires_at (ms), channel, message.
# Returns 1 when the replaced token was kept as ":previous", else 0.
_WRITE_SCRIPT = """
local current, previous = KEYS[1], KEYS[2]
local kept = 0
local kind = redis.call('TYPE', current)['ok']
if kind == 'hash' then
  local old = redis.call('HGET', current, 'fingerprint')
  if old and old ~= ARGV[5] then
    local ttl = redis.call('PTTL', current)
    local old_expires = tonumber(redis.call('HGET', current, 'expires_at'))
    if ttl > 0 or (ttl == -1 and old_expires) then
      redis.call('DEL', previous)
      redis.call('HSET', previous, unpack(redis.call('HGETALL', current)))
      if ttl > 0 then
        redis.call('PEXPIRE', previous, ttl)
      else
        -- written without an expiry by someone else: its own expires_at (a past one deletes it at once)
        redis.call('PEXPIREAT', previous, math.floor(old_expires * 1000))
      end
      kept = 1
    end
  end
end
if kind ~= 'none' then
  redis.call('DEL', current)  -- no stray fields survive, and a key of another type is replaced
end
redis.call('HSET', current, 'access_token', ARGV[1], 'token_type', ARGV[2], 'expires_at', ARGV[3],
           'scope', ARGV[4], 'fingerprint', ARGV[5])
redis.call('PEXPIREAT', current, ARGV[6])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return kept
"""

OnRestored = Callable[[], Awaitable[None]]
Subscriber = Callable[[int], Redis]  # attempt number -> a plain client to the node to SUBSCRIBE on (cluster mode)

_MARKER_CANDIDATES = 1_000_000  # far more than enough: every slot is hit well before


def cluster_markers(prefix: str, primaries: Iterable[str], owner: Callable[[str], str | None]) -> dict[str, str]:
    """The ``_alive`` marker of each master in Redis Cluster mode: ``primary -> key``.

    ``owner(key)`` names the master serving ``key``'s slot (None: not covered). Each master's marker is the first
    candidate :func:`wire.cluster_alive_key` it serves, so every operator replica picks the same keys, and a
    master's marker changes only when its slots do. A master serving no slot gets none.
    """
    wanted = set(primaries)
    markers: dict[str, str] = {}
    for number in range(_MARKER_CANDIDATES):
        if len(markers) == len(wanted):
            break
        key = wire.cluster_alive_key(prefix, number)
        master = owner(key)
        if master in wanted and master not in markers:
            markers[master] = key
    return markers


class RedisTarget:
    """Writes tokens to Redis, removes them, reads them back, and listens for gateways' refresh requests."""

    def __init__(self, client: Redis | RedisCluster, *, key_prefix: str, where: str, password: SecretStr | None = None,
                 sentinel_password: SecretStr | None = None,
                 sentinel: Sentinel | None = None, cluster: RedisCluster | None = None,
                 subscriber: Subscriber | None = None, operation_timeout: float = 16.0, ping_interval: float = 1.0,
                 keepalive_interval: float = 5.0, reconnect_base: float = 0.1, reconnect_cap: float = 5.0,
                 rng: random.Random | None = None) -> None:
        self._client = client
        self._sentinel = sentinel
        self._cluster = cluster  # the same object as client in cluster mode: its topology and its markers
        self._subscriber = subscriber
        self._markers: dict[str, str] = {}
        self.key_prefix = key_prefix
        self.where = where  # "Redis at host:port db 0" or "Redis master 'x' via sentinels ...": for messages
        self._password = password  # only to scrub it from error texts
        self._sentinel_password = sentinel_password
        self._operation_timeout = operation_timeout
        self._ping_interval = ping_interval
        self._keepalive_interval = keepalive_interval
        self._reconnect_backoff = schedule.Backoff(base_seconds=reconnect_base, cap_seconds=reconnect_cap)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._available: bool | None = None  # None: not known yet
        self._write_script = client.register_script(_WRITE_SCRIPT)

    @property
    def cluster_mode(self) -> bool:
        return self._cluster is not None

    @property
    def _plain_client(self) -> Redis:
        """The client outside cluster mode (for what a cluster does differently: MULTI, pub/sub)."""
        assert isinstance(self._client, Redis), "a cluster target has its own path for this"
        return self._client

    @classmethod
    def from_settings(cls, settings: RedisSettings, **options: Any) -> RedisTarget | None:
        """A target for the configured Redis, or None when Redis is off. Connects lazily (no I/O here).

        ``options`` go to the constructor (``ping_interval``, ``keepalive_interval``, ``operation_timeout``...).
        """
        if not settings.configured:
            return None
        connection = settings.connection
        common: dict[str, Any] = {
            "socket_connect_timeout": settings.connect_timeout_seconds,
            "socket_timeout": settings.socket_timeout_seconds,
            "socket_keepalive": True,
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=_RETRIES),
            # RESP2 (AUTH, not HELLO 3): works with every Redis a gateway may share, 5.x and older included, and
            # behaves the same whichever redis-py version (5.x defaults to 2, 8.x to 3) is installed
            "protocol": 2,
        }
        if connection.tls:
            common.update({
                "ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True,
                "ssl_min_version": ssl.TLSVersion.TLSv1_2,
                "ssl_ca_certs": str(settings.ca_file) if settings.ca_file else None,
                "ssl_certfile": str(settings.cert_file) if settings.cert_file else None,
                "ssl_keyfile": str(settings.key_file) if settings.key_file else None,
            })
        server: dict[str, Any] = {
            **common,
            "username": connection.username,
            "password": connection.password.get_secret_value() if connection.password else None,
            "db": connection.db,
            "health_check_interval": _HEALTH_CHECK_INTERVAL,
            "decode_responses": True,
            # a gateway may publish any bytes on the refresh channel: never fail a read on decoding
            "encoding_errors": "replace",
        }
        # A deadline for a whole operation. redis-py nests its retries (connect, then command), so against a
        # server that accepts but never answers they would stack up to many timeouts; this caps it at about one
        # connect and two reads. A refused or reset connection fails (or reconnects) far quicker than that.
        options.setdefault("operation_timeout",
                           settings.connect_timeout_seconds + 2 * settings.socket_timeout_seconds + 1.0)
        sentinel: Sentinel | None = None
        cluster: RedisCluster | None = None
        subscriber: Subscriber | None = None
        if settings.cluster:
            assert connection.host is not None
            node_options = {key: value for key, value in server.items() if key != "db"}
            cluster = RedisCluster(host=connection.host, port=connection.port, **node_options)
            client: Redis | RedisCluster = cluster
            subscriber = _node_subscriber(cluster, connection.host, connection.port, node_options)
        elif settings.sentinels is not None:
            assert settings.sentinel_master is not None  # settings validation guarantees it
            auth = settings.sentinel_credentials
            sentinel_kwargs = {**common, "username": auth.username,
                               "password": auth.password.get_secret_value() if auth.password else None}
            sentinel = Sentinel(list(settings.sentinel_addresses),  # type: ignore[no-untyped-call]
                                sentinel_kwargs=sentinel_kwargs, **server)
            client = sentinel.master_for(settings.sentinel_master)
        else:
            assert connection.host is not None
            client = Redis(host=connection.host, port=connection.port, **server)
        return cls(client, key_prefix=settings.key_prefix, where=settings.describe(), password=connection.password,
                   sentinel_password=settings.sentinel_credentials.password, sentinel=sentinel, cluster=cluster,
                   subscriber=subscriber, **options)

    # -- names -------------------------------------------------------------------------------------------

    def key(self, namespace: str, name: str) -> str:
        return wire.token_key(self.key_prefix, namespace, name, cluster=self.cluster_mode)

    def previous_key(self, namespace: str, name: str) -> str:
        return wire.previous_key(self.key_prefix, namespace, name, cluster=self.cluster_mode)

    @property
    def alive_key(self) -> str:
        """The marker whose disappearance tells that Redis lost its data (see :meth:`watch_availability`)."""
        return wire.alive_key(self.key_prefix)

    @property
    def updated_channel(self) -> str:
        return wire.updated_channel(self.key_prefix)

    @property
    def refresh_channel(self) -> str:
        return wire.refresh_channel(self.key_prefix)

    @property
    def available(self) -> bool:
        """Was Redis reachable at the last look? False until known; :meth:`watch_availability` keeps it current."""
        return self._available is True

    # -- the target --------------------------------------------------------------------------------------

    kind = "redis"
    location_field = "key"
    expires_by_itself = True  # every key has the token's expiry (PEXPIREAT)

    def location(self, owner: Owner, spec: api.SecuredEndpointSpec) -> str | None:
        return self.key(owner.namespace, owner.name) if spec.redis_enabled else None

    def lost(self, namespace: str, location: str, fingerprint: str) -> bool:
        return False  # not watched; the _alive marker tells when Redis lost everything (watch_availability)

    def forget(self, namespace: str, location: str) -> None:
        pass  # nothing is remembered per key

    async def write(self, owner: Owner, spec: api.SecuredEndpointSpec, location: str, token: IssuedToken) -> None:
        """Store ``token`` at ``location`` (keeping the one it replaces as ``:previous``) and announce it,
        atomically."""
        expires_ms = int(token.expires_at.timestamp() * 1000)
        arguments = [
            token.access_token.get_secret_value(), token.token_type, str(expires_ms // 1000), token.scope or "",
            token.fingerprint, str(expires_ms), self.updated_channel, wire.endpoint_id(owner.namespace, owner.name),
        ]
        keys = [location, location + wire.PREVIOUS_SUFFIX]
        await self._run("write", owner, self._write_script(keys=keys, args=arguments),
                        secrets=(token.access_token.get_secret_value(),))

    async def delete(self, owner: Owner, location: str) -> None:
        """Remove the token and the previous one, then announce it so that caches drop it."""
        async def delete() -> None:
            if self._cluster is not None:
                # redis-py splits a DEL across slots (a location written before cluster mode has no hash tag);
                # the announcement after it is enough: a reader woken by it finds the keys gone
                await self._cluster.delete(location, location + wire.PREVIOUS_SUFFIX)
                await self._cluster.publish(self.updated_channel, wire.endpoint_id(owner.namespace, owner.name))
                return
            async with self._plain_client.pipeline(transaction=True) as pipe:
                pipe.delete(location, location + wire.PREVIOUS_SUFFIX)
                pipe.publish(self.updated_channel, wire.endpoint_id(owner.namespace, owner.name))
                await pipe.execute()

        await self._run("delete", owner, delete())

    async def read(self, owner: Owner, location: str) -> IssuedToken | None:
        """The token Redis holds at ``location`` (to rewrite the other targets after a restart), or None.

        Redis does not store when the token was issued: ``issued_at`` is the moment of reading.
        """
        data: dict[str, str] = await self._run("read", owner, self._client.hgetall(location))
        if not data:
            return None
        try:
            expires_at = datetime.fromtimestamp(int(data["expires_at"]), UTC)
            access_token = SecretStr(data["access_token"])
            token_type, fingerprint = data["token_type"], data["fingerprint"]
        except (KeyError, ValueError, OverflowError, OSError):
            logger.debug("The Redis hash of %s/%s is not a token hash; ignored.", owner.namespace, owner.name)
            return None
        return IssuedToken(access_token=access_token, token_type=token_type, scope=data.get("scope") or None,
                           issued_at=min(datetime.now(UTC), expires_at), expires_at=expires_at,
                           fingerprint=fingerprint)

    async def ping(self) -> bool:
        """One PING within the operation deadline; marks Redis down when it fails (never up: see below)."""
        return await self._probe(self._client.ping(), "PING") is not None

    async def _probe(self, call: Awaitable[Any], operation: str) -> Any:
        """The result of ``call``, or None (and Redis marked down) when it fails."""
        try:
            async with asyncio.timeout(self._operation_timeout):
                return await call
        except Exception as exc:  # whatever it is, Redis is not usable now; the loops must go on
            self._mark_down(exc, operation)
            return None

    # -- refresh requests (docs/contract.md §4) ----------------------------------------------------------------------

    async def refresh_requests(self) -> AsyncIterator[tuple[str, str, str]]:
        """Yield ``(namespace, name, fingerprint)`` for every well-formed request on ``<prefix>:refresh``.

        Runs until cancelled (or closed); a lost subscription is re-established with capped exponential backoff
        and jitter, for ever. Malformed messages are skipped.
        """
        channel = self.refresh_channel
        failures = 0
        while True:
            node = self._subscriber(failures) if self._subscriber is not None else None
            pubsub = (node or self._plain_client).pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self._operation_timeout):
                    await pubsub.subscribe(channel)
                if failures:
                    logger.info("Subscribed to %s again at %s.", channel, self.where)
                failures = 0
                async for request in self._listen(pubsub):
                    yield request
            except Exception as exc:  # a lost connection above all; whatever it is, listening must go on
                failures += 1
                delay = self._reconnect_delay(failures)
                if failures == 1:
                    logger.warning("Lost the subscription to %s at %s (%s); subscribing again with backoff.",
                                   channel, self.where, self._safe(exc))
                else:
                    logger.debug("Subscribing to %s at %s failed again (%s); next try in %.1f s.",
                                 channel, self.where, self._safe(exc), delay)
                self._mark_down(exc, "SUBSCRIBE")
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):  # closing a broken connection may fail; it is dropped anyway
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                if node is not None:
                    with contextlib.suppress(Exception):
                        await node.aclose()

    async def _listen(self, pubsub: PubSub) -> AsyncIterator[tuple[str, str, str]]:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        pinged = False
        # A connection that died without a FIN/RST (a network partition) looks like a quiet channel: our own PING
        # must come back within the keepalive interval plus the socket timeout, or the connection is given up.
        patience = self._keepalive_interval * 2 + self._operation_timeout
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True,
                                               timeout=min(1.0, self._keepalive_interval))
            now = loop.time()
            if message is None:
                if now - last_heard >= patience:
                    raise RedisConnectionError("no answer to PING on the subscription")
                if not pinged and now - last_heard >= self._keepalive_interval:
                    await pubsub.ping(_KEEPALIVE_MESSAGE)
                    pinged = True
                continue
            last_heard, pinged = now, False
            if message.get("type") != "message":
                continue  # our keepalive's pong
            request = parse_refresh_request(message.get("data"))
            if request is None:
                logger.debug("Ignored a malformed refresh request starting with %r.",
                             str(message.get("data"))[:_LOGGED_PREFIX])
                continue
            yield request

    def _reconnect_delay(self, failures: int) -> float:
        return schedule.jittered_backoff(self._reconnect_backoff, failures=failures, rng=self._rng)

    # -- availability ------------------------------------------------------------------------------------

    async def watch_availability(self, on_restored: OnRestored, *, interval: float | None = None) -> None:
        """Probe Redis every ``interval`` s (default: ``ping_interval``) until cancelled, and call ``on_restored()``

        - each time Redis answers again after having been down (at start-up too, if it was down then), and
        - when Redis answers but has lost the operator's keys: a restart without persistence, a FLUSHALL or a
          failover to an empty replica, however quick (redis-py's reconnect would hide a short one).

        The probe is ``SETNX <prefix>:_alive 1``: 0 while the marker is there, 1 when it had vanished. (``_`` cannot
        start a namespace, so the marker never collides with a token key.)
        """
        interval = self._ping_interval if interval is None else interval
        while True:
            created = await self._probe(self._mark_alive(), "SETNX")
            if created is not None:
                was = self._available
                self._available = True
                if was is False:
                    logger.info("%s is reachable again; writing the current tokens again.", self.where)
                    await self._restore(on_restored)
                elif was is None:
                    logger.info("%s is reachable.", self.where)
                elif created:
                    logger.warning("%s has lost the operator's keys (a restart without persistence, a flush or a "
                                   "failover); writing the current tokens again.", self.where)
                    await self._restore(on_restored)
            await asyncio.sleep(interval)

    async def _mark_alive(self) -> bool:
        """SETNX the marker(s); True if one had vanished. In cluster mode one marker per master (see the module
        docstring): a single master that lost its data is noticed too."""
        if self._cluster is None:
            return bool(await self._client.setnx(self.alive_key, "1"))
        cluster = self._cluster
        await cluster.initialize()  # a no-op once the topology is known; redis-py refreshes it on MOVED
        primaries = {node.name for node in cluster.get_primaries()}

        def owner(key: str) -> str | None:
            try:
                node = cluster.get_node_from_key(key)
            except RedisError:  # the slot is not covered right now
                return None
            return node.name if node is not None else None

        if set(self._markers) != primaries or any(owner(key) != master for master, key in self._markers.items()):
            self._markers = cluster_markers(self.key_prefix, primaries, owner)
        if not self._markers:
            raise RedisConnectionError("the cluster names no master serving a slot")
        created = await asyncio.gather(*(cluster.setnx(key, "1") for key in self._markers.values()))
        return any(created)

    @staticmethod
    async def _restore(on_restored: OnRestored) -> None:
        try:
            await on_restored()
        except Exception as exc:
            logger.error("Writing the tokens again after Redis came back failed: %s: %s", type(exc).__name__, exc)

    def _mark_down(self, exc: BaseException, operation: str) -> None:
        # Only the watcher marks Redis up again, so that every outage, however short, ends in on_restored().
        if self._available is not False:
            logger.warning("%s is unreachable (%s failed: %s); tokens are kept in the other targets and "
                           "written again when it is back.", self.where, operation, self._safe(exc))
        self._available = False

    # -- helpers -----------------------------------------------------------------------------------------

    async def _run(self, operation: str, owner: Owner, call: Awaitable[Any], *, secrets: Iterable[str] = ()) -> Any:
        """Await one Redis operation within the deadline; any failure becomes a TargetError without secrets."""
        what = f"cannot {operation} {owner.namespace}/{owner.name} at {self.where}"
        try:
            async with asyncio.timeout(self._operation_timeout):
                result = await call
        except TimeoutError:
            self._mark_down(TimeoutError("timed out"), operation)
            raise TargetError(TARGET, f"{what}: no answer within {self._operation_timeout:g} s") from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._mark_down(exc, operation)
            raise TargetError(TARGET, f"{what}: {self._safe(exc, secrets)}") from None
        except RedisError as exc:
            raise TargetError(TARGET, f"{what}: {self._safe(exc, secrets)}") from None
        if self._available is None:
            self._available = True
        return result

    def _safe(self, exc: BaseException, secrets: Iterable[str] = ()) -> str:
        """The error's type and text, with the password and any token cut out, and short."""
        text = str(exc)
        for secret in (*secrets, *(p.get_secret_value() for p in (self._password, self._sentinel_password) if p)):
            if secret:
                text = text.replace(secret, "***")
        text = " ".join(text.split())
        if len(text) > 200:
            text = text[:200] + "…"
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    async def aclose(self) -> None:
        """Close the connection pool (and the sentinel clients)."""
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


def _node_subscriber(cluster: RedisCluster, seed_host: str, seed_port: int, options: dict[str, Any]) -> Subscriber:
    """Plain clients for SUBSCRIBE in cluster mode: attempt ``n`` goes to the ``n``-th known node (the seed until
    the topology is known), so a subscription whose node died moves on to another one."""
    def connect(attempt: int) -> Redis:
        nodes = sorted((node.host, node.port) for node in cluster.get_nodes()) or [(seed_host, seed_port)]
        host, port = nodes[attempt % len(nodes)]
        return Redis(host=host, port=int(port), **options)

    return connect


class UnconfiguredRedis:
    """The Redis target of an operator without Redis settings: an endpoint that asks for Redis is told so
    (``TargetWriteFailed``), and nothing is ever written or removed."""

    kind = "redis"
    location_field = "key"
    expires_by_itself = True

    def location(self, owner: Owner, spec: api.SecuredEndpointSpec) -> str | None:
        return wire.token_key(wire.DEFAULT_PREFIX, owner.namespace, owner.name) if spec.redis_enabled else None

    def lost(self, namespace: str, location: str, fingerprint: str) -> bool:
        return False

    def forget(self, namespace: str, location: str) -> None:
        pass

    async def write(self, owner: Owner, spec: api.SecuredEndpointSpec, location: str, token: IssuedToken) -> None:
        raise TargetError(TARGET, "the Redis target is enabled but this operator has no Redis configured "
                                  "(set SEP_REDIS_URL, SEP_REDIS_HOST or SEP_REDIS_SENTINELS)")

    async def read(self, owner: Owner, location: str) -> IssuedToken | None:
        return None

    async def delete(self, owner: Owner, location: str) -> None:
        pass
