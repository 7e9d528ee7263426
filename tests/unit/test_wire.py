"""The wire format shared by the operator and the gateways (``secured_endpoint_gateway.wire``).

The names are asserted as docs/contract.md §2 to §4 spell them, literally, so that a change to the module
shows here; and
the operator's Redis and Secret targets and its fingerprint are checked to be the module's, not copies.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from secured_endpoint import tokens
from secured_endpoint.targets import secret as secret_target
from secured_endpoint.targets.redis import FIELDS, RedisTarget, parse_refresh_request
from secured_endpoint_gateway import wire
from secured_endpoint_gateway._redis import RedisTokenSource
from secured_endpoint_gateway._token import GatewayToken


def test_fingerprint_is_sha256_and_12_hex_digits() -> None:
    assert wire.fingerprint("tok-A") == "sha256:" + hashlib.sha256(b"tok-A").hexdigest()[:12]
    assert wire.fingerprint("tok-A") != wire.fingerprint("tok-B")


def test_the_operator_uses_the_same_fingerprint() -> None:
    assert tokens.fingerprint is wire.fingerprint


def test_redis_layout() -> None:
    assert wire.DEFAULT_PREFIX == "secured-endpoint"
    assert wire.token_key("p", "shop", "orders") == "p:shop:orders"
    assert wire.previous_key("p", "shop", "orders") == "p:shop:orders:previous"
    assert wire.alive_key("p") == "p:_alive"
    assert wire.updated_channel("p") == "p:updated"
    assert wire.refresh_channel("p") == "p:refresh"
    assert wire.endpoint_id("shop", "orders") == "shop/orders"
    assert wire.REDIS_FIELDS == ("access_token", "token_type", "expires_at", "scope", "fingerprint")
    assert wire.SECRET_KEYS == ("access_token", "token_type", "expires_at", "authorization", "credential",
                                "fingerprint")


async def test_operator_and_gateway_name_the_same_keys_and_channels() -> None:
    client = Redis(host="127.0.0.1", port=1)  # never connected: only names are asked for
    target = RedisTarget(client, key_prefix="p", where="Redis at test")
    source = RedisTokenSource(client, "shop", "orders", prefix="p")
    try:
        assert target.key("shop", "orders") == source.key == "p:shop:orders"
        assert target.previous_key("shop", "orders") == "p:shop:orders:previous"
        assert target.alive_key == "p:_alive"
        assert target.updated_channel == source.updated_channel == "p:updated"
        assert target.refresh_channel == source.refresh_channel == "p:refresh"
        assert FIELDS == wire.REDIS_FIELDS
        assert secret_target.KEYS == wire.SECRET_KEYS
        stale = GatewayToken(access_token=SecretStr("tok-A"), token_type="Bearer",
                             expires_at=datetime.now(UTC), fingerprint=wire.fingerprint("tok-A"))
        message = source.refresh_message(stale)
        assert parse_refresh_request(message) == ("shop", "orders", wire.fingerprint("tok-A"))
    finally:
        await source.aclose()
        await client.aclose()


def test_refresh_request_round_trip() -> None:
    message = wire.refresh_request("team-a", "orders.v2", "sha256:0123456789ab")
    assert message == "team-a/orders.v2 sha256:0123456789ab"
    assert wire.parse_refresh_request(message) == ("team-a", "orders.v2", "sha256:0123456789ab")
    assert wire.parse_refresh_request(message.encode()) == ("team-a", "orders.v2", "sha256:0123456789ab")
    assert wire.parse_refresh_request(f"  {message}\n") == ("team-a", "orders.v2", "sha256:0123456789ab")


@pytest.mark.parametrize("message", [
    "", "shop/orders", "shop orders sha256:x", "shop/orders sha256:x extra", "/orders sha256:x", "shop/ sha256:x",
    "Shop/orders sha256:x", "shop/orders_ sha256:x", "shop/-orders sha256:x", "-shop/orders sha256:x",
    "a" * 64 + "/orders sha256:x", "shop/orders " + "f" * 129, "shop/orders sha256:\x00", "x" * 513, b"\xff\xfe",
    None, 42, ["shop/orders", "sha256:x"],
])
def test_malformed_refresh_requests_are_none(message: object) -> None:
    assert wire.parse_refresh_request(message) is None


def test_expires_at_as_the_secret_carries_it() -> None:
    moment = datetime(2026, 11, 28, 17, 0, 0, 750_000, tzinfo=UTC)
    assert wire.format_expires_at(moment) == "2026-11-28T17:00:00Z"
    assert wire.format_expires_at(moment.astimezone(timezone(timedelta(hours=2)))) == "2026-11-28T17:00:00Z"
    assert wire.parse_expires_at("2026-11-28T17:00:00Z") == moment.replace(microsecond=0)
    assert wire.parse_expires_at("2026-11-28T19:00:00+02:00") == moment.replace(microsecond=0)
    assert wire.parse_expires_at(" 2026-11-28T17:00:00 \n") == moment.replace(microsecond=0)  # no offset: UTC
    assert wire.parse_expires_at("2026-11-28T17:00:00Z").tzinfo is UTC
    with pytest.raises(ValueError, match="Invalid isoformat"):
        wire.parse_expires_at("tomorrow")
