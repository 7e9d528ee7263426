"""Tokens from the operator's Redis cache (docs/contract.md §3, §4), for asyncio and for threads.

Reading: the hash ``<prefix>:<namespace>:<name>`` is read once and kept in memory until ``expires_at``
minus ``expiry_skew``. A listener subscribed to ``<prefix>:updated`` drops the cached token whenever
``<namespace>/<name>`` is announced there, so a proactive refresh by the operator is picked up at the
next request. The cache is trusted only while the listener is subscribed: while it is not (Redis restarted,
connection lost, channel not permitted by ACL), every ``get()`` reads the key, and every (re)subscription
drops the cache, because announcements sent in between were lost.

Reacting to a 401: ``request_refresh(stale)`` first looks whether the key already holds another token
(another replica may have asked already), and otherwise PUBLISHes ``<namespace>/<name> <fingerprint>`` on
``<prefix>:refresh`` and waits up to ``refresh_wait`` seconds for a token with a different fingerprint. It
is woken by the updated channel and also reads the key every ``poll_interval`` in case the announcement is
missed. Concurrent callers with the same stale token share one request (one PUBLISH per process); the
operator dedupes across processes by fingerprint. A refresh that went unanswered is not asked for again
for ``refresh_cooldown`` seconds: during that time further calls with the same stale token only look at
the key, so an operator that is down (or ``reactive: false``) does not add ``refresh_wait`` to every request.

A token that is found expired raises ``TokenUnavailable``. One inside the skew window but not yet expired
is returned (it still works) but not cached, so its replacement is picked up as soon as it is written.
The ``<name>:previous`` hash is deliberately not read: it holds an older token, never a better one.

While Redis does not answer at all, ``get()`` keeps serving the token it read last until that expires (minus
the skew): a Redis outage should not become a gateway outage. A key that Redis says is missing is never
bridged like that (the endpoint may be gone).

``RedisTokenSource`` needs ``redis.asyncio``; ``SyncRedisTokenSource`` uses the blocking client and a
daemon thread for the listener. Both are safe to share between all requests of a process.

Redis Cluster: give a ``RedisCluster`` client (or ``from_url(..., cluster=True)``). The key is then the
cluster layout ``<prefix>:{<namespace>:<name>}`` (docs/contract.md §3.2; ``cluster=`` overrides the guess
from the client's type), and the listener subscribes on one node over a plain connection (a cluster
broadcasts classic pub/sub to every node), moving to the next node when that one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio

from secured_endpoint_gateway import wire
from secured_endpoint_gateway._errors import TokenUnavailable
from secured_endpoint_gateway._token import GatewayToken, RefreshCooldown, parse_redis_hash

DEFAULT_PREFIX = wire.DEFAULT_PREFIX
logger = logging.getLogger("secured_endpoint_gateway")

# How long the first get() waits for the listener's subscription before reading without a cache.
_SUBSCRIBE_WAIT = 1.0
_MAX_RECONNECT_DELAY = 5.0


class _RedisFailed(TokenUnavailable):
    """Redis did not answer (as opposed to: it answered that there is no usable token)."""


class _RedisNames:
    """Key, channels and message formats of one endpoint, and the options both twins share."""

    def __init__(self, namespace: str, name: str, *, prefix: str, refresh_wait: float, expiry_skew: float,
                 refresh_cooldown: float, poll_interval: float, cluster: bool = False) -> None:
        if not namespace or not name or "/" in namespace or " " in namespace + name:
            raise ValueError("namespace and name must be non-empty Kubernetes names")
        if refresh_wait < 0 or expiry_skew < 0 or refresh_cooldown < 0 or poll_interval <= 0:
            raise ValueError("refresh_wait, expiry_skew and refresh_cooldown must be >= 0, poll_interval > 0")
        self.namespace = namespace
        self.name = name
        self.prefix = prefix
        self.cluster = cluster
        self.key = wire.token_key(prefix, namespace, name, cluster=cluster)
        self.endpoint = wire.endpoint_id(namespace, name)
        self.updated_channel = wire.updated_channel(prefix)
        self.refresh_channel = wire.refresh_channel(prefix)
        self.refresh_wait = refresh_wait
        self.expiry_skew = expiry_skew
        self.poll_interval = poll_interval
        self.cooldown = RefreshCooldown(refresh_cooldown)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r})"

    def refresh_message(self, stale: GatewayToken) -> str:
        return wire.refresh_request(self.namespace, self.name, stale.fingerprint)

    def unavailable(self, reason: str) -> TokenUnavailable:
        return TokenUnavailable(self.key, reason, endpoint=self.endpoint)

    def redis_failed(self, exc: BaseException) -> TokenUnavailable:
        # redis-py messages name hosts and ports, never passwords or values.
        return _RedisFailed(self.key, f"Redis failed: {type(exc).__name__}: {exc}", endpoint=self.endpoint)

    def fallback(self, last: GatewayToken | None, failure: TokenUnavailable) -> GatewayToken:
        """While Redis is unreachable, the token read last is still good until it expires: serving it keeps
        a Redis outage from becoming a gateway outage. A key found missing is not bridged this way (the
        endpoint may have been deleted), nor is an expired token."""
        if last is None or last.expired(skew=self.expiry_skew):
            raise failure
        logger.debug("Redis unreachable (%s); still using token %s", failure.reason, last.fingerprint)
        return last

    def parse(self, fields: dict[bytes | str, bytes | str]) -> GatewayToken | None:
        """The stored token, None for a missing key; TokenUnavailable for a malformed hash."""
        if not fields:
            return None
        try:
            return parse_redis_hash(fields)
        except ValueError as exc:
            raise self.unavailable(f"the hash is malformed: {exc}") from None

    def usable(self, token: GatewayToken | None) -> GatewayToken:
        if token is None:
            raise self.unavailable("the key does not exist (the operator has not written a token yet, the "
                                   "endpoint has no Redis target, or the last token expired)")
        if token.expired():
            raise self.unavailable(f"the stored token {token.fingerprint} expired at "
                                   f"{token.expires_at.isoformat()}")
        return token

    def newer(self, token: GatewayToken | None, stale: GatewayToken) -> GatewayToken | None:
        if token is not None and token.fingerprint != stale.fingerprint and not token.expired():
            return token
        return None

    def cooldown_error(self, stale: GatewayToken, ago: float) -> TokenUnavailable:
        return self.unavailable(f"a refresh of {stale.fingerprint} went unanswered {ago:.1f}s ago; not asking "
                                f"again before {self.cooldown.seconds:g}s have passed")

    def timeout_error(self, stale: GatewayToken) -> TokenUnavailable:
        return self.unavailable(
            f"asked for a refresh of {stale.fingerprint} on {self.refresh_channel}, but no newer token arrived "
            f"within {self.refresh_wait:g}s (is the operator running, with spec.refresh.reactive true?)")

    def is_update(self, message: dict[str, Any]) -> bool:
        data = message.get("data")
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        return data == self.endpoint


class RedisTokenSource(_RedisNames):
    """Asynchronous token source over ``redis.asyncio``; see the module docstring for the semantics.

    The listener task starts with the first ``get()``/``request_refresh()`` and stops with ``aclose()``
    (or ``async with``). A client passed in stays open; one made by ``from_url`` is closed by ``aclose()``.
    """

    def __init__(self, client: redis.asyncio.Redis | redis.asyncio.RedisCluster, namespace: str, name: str, *,
                 prefix: str = DEFAULT_PREFIX, refresh_wait: float = 3.0, expiry_skew: float = 5.0,
                 refresh_cooldown: float = 10.0, poll_interval: float = 0.1, cluster: bool | None = None) -> None:
        is_cluster = isinstance(client, redis.asyncio.RedisCluster) if cluster is None else cluster
        super().__init__(namespace, name, prefix=prefix, refresh_wait=refresh_wait, expiry_skew=expiry_skew,
                         refresh_cooldown=refresh_cooldown, poll_interval=poll_interval, cluster=is_cluster)
        self._client = client
        self._owns_client = False
        self._attempts = 0  # subscriptions tried: in cluster mode, which node the next one goes to
        self._cache: GatewayToken | None = None
        self._last: GatewayToken | None = None  # the token read last, cached or not (see fallback())
        self._generation = 0  # bumped by every invalidation; a read started before one is not cached
        self._changed = asyncio.Event()  # replaced on every invalidation, after waking its waiters
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._refreshes: dict[str, asyncio.Task[GatewayToken]] = {}
        self._closed = False

    @classmethod
    def from_url(cls, url: str, namespace: str, name: str, *, prefix: str = DEFAULT_PREFIX,
                 refresh_wait: float = 3.0, expiry_skew: float = 5.0, refresh_cooldown: float = 10.0,
                 poll_interval: float = 0.1, cluster: bool = False, **redis_options: Any) -> RedisTokenSource:
        """A source with its own client for ``redis://`` / ``rediss://`` ``url`` (``redis_options`` go to
        ``redis.asyncio.Redis.from_url``, e.g. ``socket_timeout=5``; with ``cluster``, to
        ``redis.asyncio.RedisCluster.from_url``, the URL naming a seed node)."""
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster = (
            redis.asyncio.RedisCluster.from_url(url, **redis_options) if cluster
            else redis.asyncio.Redis.from_url(url, **redis_options))
        source = cls(client, namespace, name, prefix=prefix, refresh_wait=refresh_wait, expiry_skew=expiry_skew,
                     refresh_cooldown=refresh_cooldown, poll_interval=poll_interval, cluster=cluster)
        source._owns_client = True
        return source

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the listener (and close the client if ``from_url`` made it). Idempotent."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        for task in list(self._refreshes.values()):
            task.cancel()
        if self._owns_client:
            self._owns_client = False
            await self._client.aclose()

    # -- reading --

    async def get(self) -> GatewayToken:
        """The current token: from memory when it can be trusted, else from Redis.

        Raises TokenUnavailable when the key is missing, malformed or expired, or Redis fails.
        """
        await self._start_listener()
        token = self._cache
        if token is not None and self._subscribed.is_set() and not token.expired(skew=self.expiry_skew):
            return token
        try:
            return self.usable(await self._read())
        except _RedisFailed as exc:
            return self.fallback(self._last, exc)

    async def _read(self) -> GatewayToken | None:
        """Read the key; cache the result if no invalidation happened meanwhile."""
        generation = self._generation
        try:
            fields = await self._client.hgetall(self.key)
        except (redis.RedisError, OSError) as exc:
            raise self.redis_failed(exc) from None
        token = self.parse(fields)
        self._last = token
        if (token is not None and generation == self._generation and self._subscribed.is_set()
                and not token.expired(skew=self.expiry_skew)):
            self._cache = token
        return token

    # -- the reactive path --

    async def request_refresh(self, stale: GatewayToken) -> GatewayToken:
        """A token newer than ``stale`` (which the upstream refused), asking the operator for one if needed.

        Raises TokenUnavailable if none arrives within ``refresh_wait`` seconds.
        """
        await self._start_listener()
        task = self._refreshes.get(stale.fingerprint)
        if task is None:
            task = asyncio.create_task(self._refresh(stale), name=f"refresh {self.endpoint}")
            self._refreshes[stale.fingerprint] = task
            task.add_done_callback(lambda done: self._refresh_done(stale.fingerprint, done))
        # Shielded: one caller giving up (its request was cancelled) must not cancel the others' wait.
        return await asyncio.shield(task)

    def _refresh_done(self, fingerprint: str, task: asyncio.Task[GatewayToken]) -> None:
        if self._refreshes.get(fingerprint) is task:
            del self._refreshes[fingerprint]
        if not task.cancelled():
            task.exception()  # retrieved here, so a refresh nobody awaits any more logs no warning

    async def _refresh(self, stale: GatewayToken) -> GatewayToken:
        current = self.newer(await self._read(), stale)
        if current is not None:
            return current
        ago = self.cooldown.since(stale.fingerprint)
        if ago is not None:
            raise self.cooldown_error(stale, ago)
        try:
            await self._client.publish(self.refresh_channel, self.refresh_message(stale))
        except (redis.RedisError, OSError) as exc:
            raise self.redis_failed(exc) from None
        logger.info("asked for a refresh of %s (token %s refused)", self.endpoint, stale.fingerprint)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.refresh_wait
        while True:
            changed = self._changed  # taken before reading, so an update right after the read still wakes us
            current = self.newer(await self._read(), stale)
            if current is not None:
                self.cooldown.answered(stale.fingerprint)
                return current
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.cooldown.failed(stale.fingerprint)
                raise self.timeout_error(stale)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(self.poll_interval, remaining))

    # -- the listener --

    async def _start_listener(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._listener is None or self._listener.done():
            first = self._listener is None
            self._listener = asyncio.create_task(self._listen(), name=f"listen {self.updated_channel}")
            if first:
                # Only the first call waits: later ones read through while the listener is away.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._subscribed.wait(), _SUBSCRIBE_WAIT)

    def _invalidate(self) -> None:
        self._generation += 1
        self._cache = None
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _subscriber(self) -> redis.asyncio.Redis | None:
        """In cluster mode a plain client to the next node (its own pool, closed after use); else None."""
        client = self._client
        if not isinstance(client, redis.asyncio.RedisCluster):
            return None
        await client.initialize()
        nodes = sorted(client.get_nodes(), key=lambda node: node.name)
        node = nodes[self._attempts % len(nodes)]
        self._attempts += 1
        pool = redis.asyncio.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        return redis.asyncio.Redis.from_pool(pool)

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            node: redis.asyncio.Redis | None = None
            try:
                node = await self._subscriber()
            except (redis.RedisError, OSError) as exc:
                logger.warning("finding a Redis Cluster node to listen on failed (%s: %s); reading %s without a "
                               "cache until back", type(exc).__name__, exc, self.key)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RECONNECT_DELAY)
                continue
            pubsub = (node or self._client).pubsub()
            try:
                await pubsub.subscribe(self.updated_channel)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        # Also sent after redis-py reconnected on its own: updates in the gap were lost.
                        self._invalidate()
                        self._subscribed.set()
                        delay = 0.1
                    elif message["type"] == "message" and self.is_update(message):
                        self._invalidate()
            except (redis.RedisError, OSError) as exc:
                logger.warning("listening on %s failed (%s: %s); reading %s without a cache until back",
                               self.updated_channel, type(exc).__name__, exc, self.key)
            finally:
                self._subscribed.clear()
                self._invalidate()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
                if node is not None:
                    with contextlib.suppress(Exception):
                        await node.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RECONNECT_DELAY)


@dataclass
class _Flight:
    """One refresh shared by every thread that saw the same stale token."""

    done: threading.Event = field(default_factory=threading.Event)
    token: GatewayToken | None = None
    error: TokenUnavailable | None = None


class SyncRedisTokenSource(_RedisNames):
    """The blocking twin of ``RedisTokenSource`` (``redis.Redis``; the listener is a daemon thread).

    Thread-safe. ``close()`` (or ``with``) stops the listener; a client made by ``from_url`` is closed too.
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster, namespace: str, name: str, *,
                 prefix: str = DEFAULT_PREFIX, refresh_wait: float = 3.0, expiry_skew: float = 5.0,
                 refresh_cooldown: float = 10.0, poll_interval: float = 0.1, cluster: bool | None = None) -> None:
        is_cluster = isinstance(client, redis.RedisCluster) if cluster is None else cluster
        super().__init__(namespace, name, prefix=prefix, refresh_wait=refresh_wait, expiry_skew=expiry_skew,
                         refresh_cooldown=refresh_cooldown, poll_interval=poll_interval, cluster=is_cluster)
        self._client = client
        self._attempts = 0
        self._owns_client = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._cache: GatewayToken | None = None
        self._last: GatewayToken | None = None
        self._generation = 0
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._flights: dict[str, _Flight] = {}

    @classmethod
    def from_url(cls, url: str, namespace: str, name: str, *, prefix: str = DEFAULT_PREFIX,
                 refresh_wait: float = 3.0, expiry_skew: float = 5.0, refresh_cooldown: float = 10.0,
                 poll_interval: float = 0.1, cluster: bool = False, **redis_options: Any) -> SyncRedisTokenSource:
        client: redis.Redis | redis.RedisCluster = (
            redis.RedisCluster.from_url(url, **redis_options) if cluster
            else redis.Redis.from_url(url, **redis_options))
        source = cls(client, namespace, name, prefix=prefix, refresh_wait=refresh_wait, expiry_skew=expiry_skew,
                     refresh_cooldown=refresh_cooldown, poll_interval=poll_interval, cluster=cluster)
        source._owns_client = True
        return source

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stopping.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.join(timeout=5)
        if self._owns_client:
            self._owns_client = False
            self._client.close()

    # -- reading --

    def get(self) -> GatewayToken:
        """As ``RedisTokenSource.get``, blocking."""
        self._start_listener()
        with self._lock:
            token = self._cache
        if token is not None and self._subscribed.is_set() and not token.expired(skew=self.expiry_skew):
            return token
        try:
            return self.usable(self._read())
        except _RedisFailed as exc:
            return self.fallback(self._last, exc)

    def _read(self) -> GatewayToken | None:
        with self._lock:
            generation = self._generation
        try:
            fields = self._client.hgetall(self.key)
        except (redis.RedisError, OSError) as exc:
            raise self.redis_failed(exc) from None
        token = self.parse(fields)
        with self._lock:
            self._last = token
            if (token is not None and generation == self._generation and self._subscribed.is_set()
                    and not token.expired(skew=self.expiry_skew)):
                self._cache = token
        return token

    # -- the reactive path --

    def request_refresh(self, stale: GatewayToken) -> GatewayToken:
        """As ``RedisTokenSource.request_refresh``, blocking; threads with the same stale token share one."""
        self._start_listener()
        with self._lock:
            flight = self._flights.get(stale.fingerprint)
            leader = flight is None
            if flight is None:
                flight = self._flights[stale.fingerprint] = _Flight()
        if leader:
            try:
                flight.token = self._refresh(stale)
            except TokenUnavailable as exc:
                flight.error = exc
            finally:
                with self._lock:
                    del self._flights[stale.fingerprint]
                flight.done.set()
        # The leader finishes within refresh_wait plus a few Redis round trips.
        elif not flight.done.wait(self.refresh_wait + 10):
            raise self.timeout_error(stale)
        if flight.error is not None:
            raise flight.error
        assert flight.token is not None
        return flight.token

    def _refresh(self, stale: GatewayToken) -> GatewayToken:
        current = self.newer(self._read(), stale)
        if current is not None:
            return current
        ago = self.cooldown.since(stale.fingerprint)
        if ago is not None:
            raise self.cooldown_error(stale, ago)
        try:
            self._client.publish(self.refresh_channel, self.refresh_message(stale))
        except (redis.RedisError, OSError) as exc:
            raise self.redis_failed(exc) from None
        logger.info("asked for a refresh of %s (token %s refused)", self.endpoint, stale.fingerprint)
        deadline = time.monotonic() + self.refresh_wait
        while True:
            with self._lock:
                generation = self._generation
            current = self.newer(self._read(), stale)
            if current is not None:
                self.cooldown.answered(stale.fingerprint)
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.cooldown.failed(stale.fingerprint)
                raise self.timeout_error(stale)
            with self._changed:
                if generation == self._generation:  # nothing announced since the read: wait for it or poll
                    self._changed.wait(min(self.poll_interval, remaining))

    # -- the listener --

    def _start_listener(self) -> None:
        if self._stopping.is_set():
            raise RuntimeError(f"{self!r} is closed")
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            first = self._listener is None
            self._listener = threading.Thread(target=self._listen, name=f"listen {self.updated_channel}",
                                              daemon=True)
            self._listener.start()
        if first:
            self._subscribed.wait(_SUBSCRIBE_WAIT)

    def _invalidate(self) -> None:
        with self._changed:
            self._generation += 1
            self._cache = None
            self._changed.notify_all()

    def _pubsub(self) -> Any:
        """A PubSub on the client, or in cluster mode on the next node's own client (a plain connection)."""
        client = self._client
        nodes = []
        if isinstance(client, redis.RedisCluster):
            nodes = sorted(client.get_nodes(), key=lambda node: node.name)  # type: ignore[no-untyped-call]
        if nodes:
            node = nodes[self._attempts % len(nodes)]
            self._attempts += 1
            return node.redis_connection.pubsub()
        return client.pubsub()  # type: ignore[no-untyped-call]  # untyped in redis-py

    def _listen(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            pubsub = self._pubsub()
            try:
                pubsub.subscribe(self.updated_channel)
                while not self._stopping.is_set():
                    # A timeout, so close() is noticed; None means nothing arrived.
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._invalidate()
                        self._subscribed.set()
                        delay = 0.1
                    elif message["type"] == "message" and self.is_update(message):
                        self._invalidate()
            except (redis.RedisError, OSError, ValueError) as exc:
                # ValueError: redis-py's reader on a socket that close() shut under it.
                if not self._stopping.is_set():
                    logger.warning("listening on %s failed (%s: %s); reading %s without a cache until back",
                                   self.updated_channel, type(exc).__name__, exc, self.key)
            finally:
                self._subscribed.clear()
                self._invalidate()
                with contextlib.suppress(Exception):
                    pubsub.close()
            self._stopping.wait(delay)
            delay = min(delay * 2, _MAX_RECONNECT_DELAY)
