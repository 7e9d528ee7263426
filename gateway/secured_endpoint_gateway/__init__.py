"""Client library for API gateways that use the tokens the operator keeps (no kopf, no Kubernetes client).

Two places to read a token from, each as an asyncio source and a blocking twin:

- Redis (docs/contract.md §3, §4): ``RedisTokenSource`` / ``SyncRedisTokenSource`` — cached in memory, invalidated by
  ``<prefix>:updated``, and able to ask the operator for a new token after a 401 (``<prefix>:refresh``).
- The token Secret mounted as a directory (docs/contract.md §2): ``SecretDirTokenSource`` /
  ``SyncSecretDirTokenSource`` — re-read when the kubelet swaps the files; cannot ask for a refresh.

``TokenAuth`` plugs either into httpx: it sets ``Authorization``, and on a 401 gets a newer token and
retries once. Without a token it raises ``TokenUnavailable`` instead of sending anything.

Asynchronous::

    import httpx
    from secured_endpoint_gateway import RedisTokenSource, TokenAuth

    async with RedisTokenSource.from_url("redis://redis:6379/0", "shop", "orders-backend") as source:
        async with httpx.AsyncClient(auth=TokenAuth(source), base_url="https://orders.internal") as client:
            response = await client.get("/api/orders")

Synchronous::

    from secured_endpoint_gateway import SyncSecretDirTokenSource, TokenAuth

    source = SyncSecretDirTokenSource("/var/run/secrets/orders-token")
    with httpx.Client(auth=TokenAuth(source), base_url="https://orders.internal") as client:
        response = client.get("/api/orders")

``secured_endpoint_gateway.wire`` is the wire format itself (key and channel names, fields, the refresh
request, the fingerprint), shared with the operator, for gateways written against Redis directly.

``examples/04-gateway/`` has a small reverse proxy built on this package.
"""

from secured_endpoint_gateway._auth import TokenAuth
from secured_endpoint_gateway._errors import TokenUnavailable
from secured_endpoint_gateway._redis import DEFAULT_PREFIX, RedisTokenSource, SyncRedisTokenSource
from secured_endpoint_gateway._secretdir import SecretDirTokenSource, SyncSecretDirTokenSource
from secured_endpoint_gateway._token import AsyncTokenSource, GatewayToken, SyncTokenSource

__all__ = [
    "DEFAULT_PREFIX",
    "AsyncTokenSource",
    "GatewayToken",
    "RedisTokenSource",
    "SecretDirTokenSource",
    "SyncRedisTokenSource",
    "SyncSecretDirTokenSource",
    "SyncTokenSource",
    "TokenAuth",
    "TokenUnavailable",
]
