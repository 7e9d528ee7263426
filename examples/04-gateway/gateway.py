#!/usr/bin/env python3
"""A small API gateway: a reverse proxy that adds the operator's token to every upstream request.

Built on ``secured_endpoint_gateway`` (aiohttp serves, ``httpx.AsyncClient`` + ``TokenAuth`` call the
upstream)::

    python examples/04-gateway/gateway.py --listen 127.0.0.1:8081 \\
        --upstream http://127.0.0.1:18080/api \\
        --redis-url redis://127.0.0.1:6379/0 --endpoint shop/orders-backend
    # or, with the token Secret mounted:  --secret-dir /var/run/secrets/orders-token

``GET /echo?x=1`` on the gateway becomes ``GET http://127.0.0.1:18080/api/echo?x=1`` upstream, with method,
query, body and most headers forwarded. Hop-by-hop headers (RFC 9110 §7.6.1) and the caller's
``Authorization`` are not forwarded: the upstream sees the gateway's token only. ``X-Forwarded-For``,
``-Host`` and ``-Proto`` and a ``Via`` are added. The upstream's status, headers and body come back
unchanged (streamed, still encoded as the upstream sent them).

On a 401 from the upstream ``TokenAuth`` asks the operator for a refresh (Redis) or re-reads the directory,
and retries once; if no newer token comes, the upstream's 401 is returned. Without any usable token the
gateway answers 503 itself and sends nothing upstream. An unreachable upstream is 502, a slow one 504.

``/healthz`` (the process serves) and ``/readyz`` (a token is available) are the gateway's own; every other
path is proxied. Several replicas can run against one Redis: each keeps its own cache, and the operator acts
on one refresh request per token however many replicas saw the 401.

The Redis URL may carry a password; pass it in ``SEP_REDIS_URL`` rather than on the command line, where
``ps`` shows it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import AsyncIterator

import httpx
from aiohttp import web
from multidict import CIMultiDict

from secured_endpoint_gateway import (
    DEFAULT_PREFIX,
    RedisTokenSource,
    SecretDirTokenSource,
    TokenAuth,
    TokenUnavailable,
)

logger = logging.getLogger("gateway")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade"})
# Not forwarded upstream besides the hop-by-hop ones: httpx sets Host and Content-Length itself, and the
# caller's credentials must never reach the upstream.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "authorization", "expect"}
MAX_BODY = 16 * 1024 * 1024

SOURCE: web.AppKey[RedisTokenSource | SecretDirTokenSource] = web.AppKey("source")
CLIENT: web.AppKey[httpx.AsyncClient] = web.AppKey("client")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream")


def _connection_tokens(values: list[str]) -> set[str]:
    """Header names listed in Connection: hop-by-hop for this one message."""
    return {part.strip().lower() for value in values for part in value.split(",") if part.strip()}


def upstream_headers(request: web.Request) -> list[tuple[str, str]]:
    dropped = NOT_FORWARDED | _connection_tokens(request.headers.getall("Connection", []))
    headers = [(name, value) for name, value in request.headers.items() if name.lower() not in dropped]
    if "Accept-Encoding" not in request.headers:
        # Else httpx would ask for gzip, and the raw body passed back would be one the caller cannot read.
        headers.append(("Accept-Encoding", "identity"))
    peer = request.remote or ""
    previous = request.headers.get("X-Forwarded-For")
    headers.append(("X-Forwarded-For", f"{previous}, {peer}" if previous else peer))
    headers.append(("X-Forwarded-Host", request.host))
    headers.append(("X-Forwarded-Proto", request.scheme))
    headers.append(("Via", f"{request.version.major}.{request.version.minor} secured-endpoint-gateway"))
    return headers


def downstream_headers(response: httpx.Response) -> CIMultiDict[str]:
    dropped = HOP_BY_HOP | _connection_tokens(response.headers.get_list("Connection"))
    return CIMultiDict((name, value) for name, value in response.headers.multi_items()
                       if name.lower() not in dropped)


async def proxy(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT]
    url = request.app[UPSTREAM] + request.rel_url.raw_path
    if request.rel_url.raw_query_string:
        url += "?" + request.rel_url.raw_query_string
    # Read whole (bounded by client_max_size): a body in memory is what lets TokenAuth retry after a 401.
    body = await request.read()
    upstream_request = client.build_request(request.method, url, headers=upstream_headers(request), content=body)
    try:
        upstream = await client.send(upstream_request, stream=True)
    except TokenUnavailable as exc:
        logger.warning("%s %s: %s", request.method, request.rel_url.raw_path, exc)
        return web.json_response({"error": "token_unavailable", "message": str(exc)}, status=503,
                                 headers={"Retry-After": "1"})
    except httpx.TimeoutException as exc:
        return web.json_response({"error": "upstream_timeout", "message": type(exc).__name__}, status=504)
    except httpx.TransportError as exc:
        return web.json_response({"error": "upstream_unreachable", "message": f"{type(exc).__name__}: {exc}"},
                                 status=502)
    try:
        response = web.StreamResponse(status=upstream.status_code, reason=upstream.reason_phrase,
                                      headers=downstream_headers(upstream))
        await response.prepare(request)
        async for chunk in upstream.aiter_raw():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        await upstream.aclose()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    try:
        token = await request.app[SOURCE].get()
    except TokenUnavailable as exc:
        return web.json_response({"ready": False, "message": str(exc)}, status=503)
    return web.json_response({"ready": True, "fingerprint": token.fingerprint,
                              "expires_at": token.expires_at.isoformat()})


def make_app(args: argparse.Namespace) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[UPSTREAM] = args.upstream.rstrip("/")

    async def resources(app: web.Application) -> AsyncIterator[None]:
        source: RedisTokenSource | SecretDirTokenSource
        if args.secret_dir:
            source = SecretDirTokenSource(args.secret_dir, refresh_wait=args.refresh_wait)
            logger.info("tokens from the mounted Secret at %s", args.secret_dir)
        else:
            namespace, name = args.endpoint.split("/", 1)
            source = RedisTokenSource.from_url(args.redis_url, namespace, name, prefix=args.prefix,
                                               refresh_wait=args.refresh_wait)
            logger.info("tokens from Redis key %s", source.key)
        client = httpx.AsyncClient(auth=TokenAuth(source), timeout=args.timeout, follow_redirects=False,
                                   limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        app[SOURCE], app[CLIENT] = source, client
        yield
        await client.aclose()
        await source.aclose()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A reverse proxy that adds the operator's token upstream.")
    parser.add_argument("--listen", default="127.0.0.1:8081", metavar="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="base URL; the request path is appended to it")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--redis-url", default=os.environ.get("SEP_REDIS_URL"),
                        help="redis:// or rediss:// URL (default: $SEP_REDIS_URL)")
    source.add_argument("--secret-dir", help="directory where the token Secret is mounted")
    parser.add_argument("--endpoint", metavar="NAMESPACE/NAME", help="the SecuredEndpoint (with --redis-url)")
    parser.add_argument("--prefix", default=os.environ.get("SEP_REDIS_KEY_PREFIX", DEFAULT_PREFIX),
                        help="Redis key and channel prefix (default: %(default)s)")
    parser.add_argument("--refresh-wait", type=float, default=3.0,
                        help="seconds to wait for a newer token after a 401 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="upstream timeout in seconds")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.secret_dir:
        if not args.redis_url:
            parser.error("give --redis-url (or SEP_REDIS_URL) or --secret-dir")
        if not args.endpoint or args.endpoint.count("/") != 1 or "" in args.endpoint.split("/"):
            parser.error("--endpoint NAMESPACE/NAME is required with --redis-url")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--listen must be HOST:PORT")
    args.host, args.port = host.strip("[]"), int(port)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it would log every request URL at INFO
    web.run_app(make_app(args), host=args.host, port=args.port, print=None,
                access_log_format='%a "%r" %s %b %Tfs')
    return 0


if __name__ == "__main__":
    sys.exit(main())
