"""``TokenAuth``: an ``httpx.Auth`` that sends the operator's token and reacts to a 401 once.

The flow, for ``httpx.Client`` and ``httpx.AsyncClient`` alike:

1. ``source.get()``; if that raises ``TokenUnavailable`` the exception propagates and nothing is sent —
   a request never leaves without a token (the reference system once did, wso2 #3849).
2. Send with ``Authorization: <token_type> <token>``, replacing any Authorization the caller set.
3. On a 401: ``source.request_refresh(stale)``. With a newer token the request is sent once more, and that
   answer is returned whatever it is (no loops). If no newer token comes in time, the original 401 is
   returned as it is.

Retrying needs the body again. A body given as bytes, str, ``json=`` or ``data=`` is held in memory by
httpx and replayed; a streaming body (an iterator, a generator, a file upload) is not read into memory by
this class and therefore not retried: its 401 is returned after the refresh was asked for, so the next
request gets the new token.

Sync and async: httpx calls ``sync_auth_flow`` for ``Client`` and ``async_auth_flow`` for
``AsyncClient``. A synchronous source works in both (in the async flow its calls run in a worker thread, so
a Redis round trip or a refresh wait never blocks the event loop); an asynchronous source in a synchronous
client is a TypeError, because there is no event loop to run it on.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, Generator
from typing import cast

import anyio.to_thread  # httpx's own dependency: worker threads under asyncio and trio alike
import httpx

from secured_endpoint_gateway._errors import TokenUnavailable
from secured_endpoint_gateway._token import AsyncTokenSource, GatewayToken, SyncTokenSource

logger = logging.getLogger("secured_endpoint_gateway")


class TokenAuth(httpx.Auth):
    """Authenticates requests with the token of ``source`` (any of the four sources, or your own that
    follows ``AsyncTokenSource``/``SyncTokenSource`` with ``async def`` or plain methods)."""

    def __init__(self, source: AsyncTokenSource | SyncTokenSource) -> None:
        self.source = source
        self._async = inspect.iscoroutinefunction(source.get)

    def __repr__(self) -> str:
        return f"TokenAuth({self.source!r})"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._async:
            raise TypeError(f"TokenAuth got an asynchronous token source ({type(self.source).__name__}) but "
                            "is used by a synchronous httpx.Client: use httpx.AsyncClient, or a Sync* source")
        source = cast(SyncTokenSource, self.source)
        token = source.get()
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code != 401:
            return
        try:
            fresh = source.request_refresh(token)
        except TokenUnavailable as exc:
            logger.warning("%s %s: 401 with token %s and no newer token: %s", request.method, request.url.host,
                           token.fingerprint, exc)
            return
        if self._replayable(request, token, fresh):
            request.headers["Authorization"] = fresh.authorization
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._get()
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code != 401:
            return
        try:
            fresh = await self._request_refresh(token)
        except TokenUnavailable as exc:
            logger.warning("%s %s: 401 with token %s and no newer token: %s", request.method, request.url.host,
                           token.fingerprint, exc)
            return
        if self._replayable(request, token, fresh):
            request.headers["Authorization"] = fresh.authorization
            yield request

    async def _get(self) -> GatewayToken:
        if self._async:
            return await cast(AsyncTokenSource, self.source).get()
        return await anyio.to_thread.run_sync(cast(SyncTokenSource, self.source).get)

    async def _request_refresh(self, stale: GatewayToken) -> GatewayToken:
        if self._async:
            return await cast(AsyncTokenSource, self.source).request_refresh(stale)
        return await anyio.to_thread.run_sync(cast(SyncTokenSource, self.source).request_refresh, stale)

    @staticmethod
    def _replayable(request: httpx.Request, stale: GatewayToken, fresh: GatewayToken) -> bool:
        # httpx keeps bytes/str/json/form bodies as a ByteStream (and turns any body it has read into one).
        if isinstance(request.stream, httpx.ByteStream):
            logger.info("%s %s: 401 with token %s, retrying once with %s", request.method, request.url.host,
                        stale.fingerprint, fresh.fingerprint)
            return True
        logger.info("%s %s: 401 with token %s; a streaming body is not retried (token %s is ready for the next "
                    "request)", request.method, request.url.host, stale.fingerprint, fresh.fingerprint)
        return False
