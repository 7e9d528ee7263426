"""The Redis Cluster layout (docs/contract.md §3.2): hash slots, hash-tagged keys, one ``_alive`` marker per master.

- ``wire.key_slot`` is Redis Cluster's (the examples of the cluster specification, and redis-py's own function);
- an endpoint's key and its ``:previous`` share a slot in cluster mode, and the single-server names are unchanged;
- ``cluster_markers`` gives each master the first candidate marker in one of its slots, the same whatever the
  order of the masters, skips a master without slots, and follows the slots when they move.
"""

from __future__ import annotations

import pytest
from redis.crc import key_slot as redis_key_slot

from secured_endpoint.targets.redis import cluster_markers
from secured_endpoint_gateway import wire


@pytest.mark.parametrize(("key", "slot"), [
    ("foo", 12182), ("bar", 5061), ("123456789", 12739),  # CRC16/XMODEM of "123456789" is 0x31C3
])
def test_key_slot_of_known_keys(key: str, slot: int) -> None:
    assert wire.key_slot(key) == slot


@pytest.mark.parametrize("key", [
    "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}", "{}", "a}b{c", "plain", "é{ü}",
    "sep:{shop:orders}:previous",
])
def test_key_slot_agrees_with_redis_py(key: str) -> None:
    assert wire.key_slot(key) == redis_key_slot(key.encode())
    assert wire.key_slot(key.encode()) == wire.key_slot(key)


def test_hash_tags_per_the_specification() -> None:
    assert wire.key_slot("{user1000}.following") == wire.key_slot("{user1000}.followers") == wire.key_slot("user1000")
    assert wire.key_slot("foo{}{bar}") == redis_key_slot(b"foo{}{bar}") != wire.key_slot("bar")  # empty: whole key
    assert wire.key_slot("foo{{bar}}zap") == wire.key_slot("{bar")
    assert wire.key_slot("foo{bar}{zap}") == wire.key_slot("bar")


def test_cluster_layout_puts_both_keys_of_an_endpoint_in_one_slot() -> None:
    for namespace, name in [("shop", "orders"), ("a", "b.c-d"), ("kube-system", "x" * 253)]:
        key = wire.token_key("secured-endpoint", namespace, name, cluster=True)
        assert key == f"secured-endpoint:{{{namespace}:{name}}}"
        previous = wire.previous_key("secured-endpoint", namespace, name, cluster=True)
        assert previous == key + ":previous"
        assert wire.key_slot(key) == wire.key_slot(previous) == wire.key_slot(f"{namespace}:{name}")
    assert wire.token_key("p", "shop", "orders") == "p:shop:orders", "single server and Sentinel unchanged"
    assert wire.cluster_alive_key("p", 7) == "p:_alive:{7}"


def _three_masters(slot: int) -> str:
    return "a" if slot < 5461 else "b" if slot < 10923 else "c"


def test_one_marker_per_master_in_its_own_slots() -> None:
    def owner(key: str) -> str | None:
        return _three_masters(wire.key_slot(key))

    markers = cluster_markers("p", ["c", "a", "b"], owner)
    assert set(markers) == {"a", "b", "c"}
    for master, key in markers.items():
        assert owner(key) == master
        number = int(key.removeprefix("p:_alive:{").removesuffix("}"))
        assert all(owner(wire.cluster_alive_key("p", n)) != master for n in range(number)), "the first candidate"
    assert cluster_markers("p", ["b", "a", "c"], owner) == markers, "the same for every replica of the operator"


def test_a_master_without_slots_gets_no_marker_and_moved_slots_move_it() -> None:
    markers = cluster_markers("p", ["a", "b", "idle"], lambda key: _three_masters(wire.key_slot(key)))
    assert set(markers) == {"a", "b"}
    # "b"'s marker slot migrates to "idle": the next computation gives "b" another key and "idle" that one
    moved = wire.key_slot(markers["b"])

    def after(key: str) -> str | None:
        slot = wire.key_slot(key)
        return "idle" if slot == moved else _three_masters(slot)

    again = cluster_markers("p", ["a", "b", "idle"], after)
    assert again["idle"] == markers["b"]
    assert again["b"] != markers["b"]
    assert after(again["b"]) == "b"
    assert again["a"] == markers["a"]


def test_an_uncovered_slot_is_skipped() -> None:
    markers = cluster_markers("p", ["a"], lambda key: None if wire.key_slot(key) % 2 else "a")
    assert wire.key_slot(markers["a"]) % 2 == 0
