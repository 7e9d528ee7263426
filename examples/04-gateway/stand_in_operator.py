#!/usr/bin/env python3
"""A stand-in for the operator's Redis side, to try the gateway without Kubernetes. Not the operator.

It does, for one endpoint, what docs/contract.md §3/§4 say the operator does: fetch a token (client_credentials) from
the token server, write the hash ``<prefix>:<namespace>:<name>`` with PEXPIREAT, announce it on
``<prefix>:updated``, and on ``<namespace>/<name> <fingerprint>`` from ``<prefix>:refresh`` fetch a new token
only if the fingerprint is the current token's. It also refreshes at two thirds of the lifetime. No
backoff, no floor, no Secret: use the real operator for anything but a demo::

    python examples/04-gateway/stand_in_operator.py --token-url http://127.0.0.1:18080/oauth2/token \\
        --client demo:demo-secret --redis-url redis://127.0.0.1:6379/0 --endpoint shop/orders-backend
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time

import httpx
import redis.asyncio

from secured_endpoint_gateway import wire
from secured_endpoint_gateway.wire import fingerprint

logger = logging.getLogger("stand-in-operator")


class StandIn:
    def __init__(self, args: argparse.Namespace) -> None:
        self.redis = redis.asyncio.Redis.from_url(args.redis_url, decode_responses=True)
        self.token_url = args.token_url
        self.client_id, _, self.client_secret = args.client.partition(":")
        self.endpoint = args.endpoint
        namespace, name = args.endpoint.split("/", 1)
        self.key = wire.token_key(args.prefix, namespace, name)
        self.updated, self.refresh = wire.updated_channel(args.prefix), wire.refresh_channel(args.prefix)
        self.current: str | None = None
        self.refresh_at = 0.0

    async def issue(self, why: str) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(self.token_url, data={"grant_type": "client_credentials"},
                                         auth=(self.client_id, self.client_secret))
        response.raise_for_status()
        body = response.json()
        token, lifetime = body["access_token"], int(body.get("expires_in", 3600))
        expires_at = time.time() + lifetime
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, mapping={"access_token": token, "token_type": body.get("token_type", "Bearer"),
                                         "expires_at": str(int(expires_at)), "scope": body.get("scope", ""),
                                         "fingerprint": fingerprint(token)})
            pipe.pexpireat(self.key, int(expires_at * 1000))
            await pipe.execute()
        await self.redis.publish(self.updated, self.endpoint)
        self.current, self.refresh_at = token, time.time() + lifetime * 2 / 3
        logger.info("wrote %s (%s, %d s): %s", fingerprint(token), self.key, lifetime, why)

    async def run(self) -> None:
        await self.issue("start")
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(self.refresh)
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                request = wire.parse_refresh_request(message["data"])
                if request is None or wire.endpoint_id(*request[:2]) != self.endpoint:
                    continue
                stale = request[2]
                if self.current is not None and stale == fingerprint(self.current):
                    await self.issue(f"refresh requested for {stale}")
                else:
                    logger.info("ignored a refresh request for %s: not the current token", stale)
            if time.time() >= self.refresh_at:
                await self.issue("proactive refresh")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--client", required=True, metavar="ID:SECRET")
    parser.add_argument("--redis-url", default=os.environ.get("SEP_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--endpoint", required=True, metavar="NAMESPACE/NAME")
    parser.add_argument("--prefix", default=wire.DEFAULT_PREFIX)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it stops
        asyncio.run(StandIn(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
