"""The metadata cache's bookkeeping, fed the way a :class:`kube.MetadataWatch` feeds it (no apiserver here:
the watch loop itself is tested against the real one in ``tests/e2e/test_metadata_watch.py``).

- The restart barrier: ``synced`` is set only when the first LIST of every watch (each kind, each namespace) is
  done; the initial LIST and events before ``synced`` call no ``on_change``; a watch refused with 403 counts as
  synced (empty) and reports what it finds once allowed; other failures hold the barrier.
- Lookups: ``source_version`` per kind and namespace, ``target_fingerprint`` only for Secrets labelled as
  managed by the operator (annotation value, "" without one), never for ConfigMaps.
- Events after ``synced``: ADDED/MODIFIED/DELETED update the cache before ``on_change`` sees them; a token
  Secret that loses the managed-by label has no fingerprint any more.
- A relist reports exactly the objects that appeared, changed (resourceVersion) or disappeared, never the
  unchanged ones; a namespaced relist touches only its namespace; a relist restarted midway forgets the partial
  one; an exception in ``on_change`` does not stop the rest.
- Memory: 50,000 Secrets held in well under 15 MiB (about 150 bytes each), namespaces interned.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from secured_endpoint import api, kube, sources

Change = tuple[str, str, str, bool, "str | None"]


@pytest.fixture
def client() -> Iterator[kube.KubeClient]:
    # never used for a request: these tests drive the sinks directly
    instance = kube.KubeClient(kube.Credentials(server="https://127.0.0.1:9", tls=ssl.create_default_context()))
    yield instance
    asyncio.run(instance.aclose())


def meta(namespace: str, name: str, rv: str, *, managed: bool = False, fingerprint: str | None = None,
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"namespace": namespace, "name": name, "resourceVersion": rv,
                                "uid": f"uid-{namespace}-{name}", "labels": dict(labels or {})}
    if managed:
        metadata["labels"][api.MANAGED_BY_LABEL] = api.MANAGED_BY_VALUE
    if fingerprint is not None:
        metadata["annotations"] = {sources.TOKEN_FINGERPRINT_ANNOTATION: fingerprint}
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata}


def sink_of(cache: sources.MetadataCache, resource: str, namespace: str | None = None) -> kube.MetadataSink:
    for watch in cache.watches:
        if watch.resource == resource and watch.namespace == namespace:
            return watch.sink
    raise AssertionError(f"no watch of {resource} in {namespace}")


def list_all(sink: kube.MetadataSink, *pages: list[dict[str, Any]], rv: str = "100") -> None:
    sink.list_started()
    for page in pages:
        sink.list_page(page)
    sink.list_done(rv)


def recording(cache: sources.MetadataCache) -> list[Change]:
    changes: list[Change] = []
    cache.on_change = lambda *change: changes.append(change)
    return changes


def test_synced_only_after_the_first_list_of_every_watch(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, namespaces=["a", "b"])
    changes = recording(cache)
    assert len(cache.watches) == 4
    assert {(w.resource, w.namespace) for w in cache.watches} == {
        ("secrets", "a"), ("secrets", "b"), ("configmaps", "a"), ("configmaps", "b")}
    list_all(sink_of(cache, "secrets", "a"), [meta("a", "s1", "11")])
    list_all(sink_of(cache, "secrets", "b"), [])
    list_all(sink_of(cache, "configmaps", "a"), [meta("a", "c1", "12")])
    # an event on a synced watch while another still lists: into the cache, silently
    sink_of(cache, "secrets", "a").watch_event("MODIFIED", meta("a", "s1", "13"))
    assert not cache.synced.is_set()
    sink_of(cache, "configmaps", "b").failed(kube.KubeError(0, "Unreachable", "no route"))
    assert not cache.synced.is_set(), "an unreachable apiserver holds the barrier"
    list_all(sink_of(cache, "configmaps", "b"), [meta("b", "c2", "14")])
    assert cache.synced.is_set()
    assert changes == []
    assert cache.source_version("a", "Secret", "s1") == "13"
    assert cache.source_version("a", "ConfigMap", "c1") == "12"
    assert cache.source_version("b", "ConfigMap", "c2") == "14"
    assert cache.source_version("b", "Secret", "c2") is None, "kinds are kept apart"
    assert cache.source_version("a", "ConfigMap", "s1") is None
    assert cache.source_version("z", "Secret", "s1") is None
    assert cache.problems() == {}


def test_fingerprints_only_for_managed_token_secrets(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client)
    list_all(sink_of(cache, "secrets"), [
        meta("a", "tok", "1", managed=True, fingerprint="sha256:aaa"),
        meta("a", "old-tok", "2", managed=True),  # written before the annotation existed
        meta("a", "foreign", "3", fingerprint="sha256:bbb"),  # the annotation alone proves nothing
        meta("a", "other-manager", "4", fingerprint="sha256:ccc", labels={api.MANAGED_BY_LABEL: "helm"}),
    ])
    list_all(sink_of(cache, "configmaps"), [meta("a", "tok", "5", managed=True, fingerprint="sha256:ddd")])
    assert cache.target_fingerprint("a", "tok") == "sha256:aaa"
    assert cache.target_fingerprint("a", "old-tok") == ""
    assert cache.target_fingerprint("a", "foreign") is None
    assert cache.target_fingerprint("a", "other-manager") is None
    assert cache.target_fingerprint("b", "tok") is None
    assert cache.source_version("a", "ConfigMap", "tok") == "5"


def test_events_after_sync_update_the_cache_then_report(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, kinds=[sources.SECRET])
    seen_by_callback: list[tuple[str | None, str | None]] = []
    changes: list[Change] = []

    def on_change(kind: str, namespace: str, name: str, deleted: bool, fingerprint: str | None) -> None:
        changes.append((kind, namespace, name, deleted, fingerprint))
        seen_by_callback.append((cache.source_version(namespace, kind, name),
                                 cache.target_fingerprint(namespace, name)))

    cache.on_change = on_change
    sink = sink_of(cache, "secrets")
    list_all(sink, [meta("a", "cred", "1")])
    sink.watch_event("ADDED", meta("a", "tok", "2", managed=True, fingerprint="sha256:one"))
    sink.watch_event("MODIFIED", meta("a", "tok", "3", managed=True, fingerprint="sha256:two"))
    sink.watch_event("MODIFIED", meta("a", "cred", "4"))
    sink.watch_event("MODIFIED", meta("a", "tok", "5"))  # someone removed the managed-by label
    sink.watch_event("DELETED", meta("a", "tok", "6", managed=True, fingerprint="sha256:two"))
    sink.watch_event("DELETED", meta("a", "never-seen", "7"))
    assert changes == [
        ("Secret", "a", "tok", False, "sha256:one"),
        ("Secret", "a", "tok", False, "sha256:two"),
        ("Secret", "a", "cred", False, None),
        ("Secret", "a", "tok", False, None),
        ("Secret", "a", "tok", True, None),
        ("Secret", "a", "never-seen", True, None),
    ]
    assert seen_by_callback == [("2", "sha256:one"), ("3", "sha256:two"), ("4", None), ("5", None),
                                (None, None), (None, None)]
    assert cache.count(sources.SECRET) == 1


def test_a_relist_reports_what_changed_appeared_or_disappeared(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, kinds=[sources.SECRET])
    changes = recording(cache)
    sink = sink_of(cache, "secrets")
    list_all(sink, [meta("a", "same", "1"), meta("a", "changed", "2"), meta("a", "gone", "3")],
             [meta("b", "gone-too", "4"), meta("b", "tok", "5", managed=True, fingerprint="sha256:old")])
    assert changes == []
    list_all(sink, [meta("a", "same", "1"), meta("a", "changed", "20")],
             [meta("b", "tok", "21", managed=True, fingerprint="sha256:new"), meta("c", "new", "22")], rv="30")
    assert sorted(changes) == sorted([
        ("Secret", "a", "changed", False, None),
        ("Secret", "b", "tok", False, "sha256:new"),
        ("Secret", "c", "new", False, None),
        ("Secret", "a", "gone", True, None),
        ("Secret", "b", "gone-too", True, None),
    ])
    assert cache.source_version("a", "Secret", "changed") == "20"
    assert cache.source_version("a", "Secret", "gone") is None
    assert cache.target_fingerprint("b", "tok") == "sha256:new"
    assert cache.count(sources.SECRET) == 4


def test_a_namespaced_relist_touches_only_its_namespace(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, namespaces=["a", "b"], kinds=[sources.SECRET])
    changes = recording(cache)
    list_all(sink_of(cache, "secrets", "a"), [meta("a", "s", "1"), meta("a", "t", "2", managed=True)])
    list_all(sink_of(cache, "secrets", "b"), [meta("b", "s", "3"), meta("b", "t", "4", managed=True)])
    list_all(sink_of(cache, "secrets", "a"), [], rv="9")
    assert sorted(changes) == [("Secret", "a", "s", True, None), ("Secret", "a", "t", True, None)]
    assert cache.source_version("b", "Secret", "s") == "3"
    assert cache.target_fingerprint("b", "t") == ""
    assert cache.target_fingerprint("a", "t") is None


def test_a_relist_restarted_midway_forgets_the_partial_one(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, kinds=[sources.SECRET])
    changes = recording(cache)
    sink = sink_of(cache, "secrets")
    list_all(sink, [meta("a", "s1", "1"), meta("a", "s2", "2")])
    sink.list_started()
    sink.list_page([meta("a", "s1", "10"), meta("a", "partial-only", "11")])
    assert cache.source_version("a", "Secret", "s1") == "1", "nothing applied before the LIST is complete"
    sink.failed(kube.KubeError(410, "Expired", "The provided continue parameter is too old"))
    assert "secrets in all namespaces" in cache.problems()
    list_all(sink, [meta("a", "s1", "12"), meta("a", "s2", "2")], rv="12")
    assert changes == [("Secret", "a", "s1", False, None)]
    assert cache.source_version("a", "Secret", "partial-only") is None
    assert cache.problems() == {}


def test_a_forbidden_namespace_does_not_hold_the_barrier(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, namespaces=["allowed", "denied"], kinds=[sources.SECRET])
    changes = recording(cache)
    list_all(sink_of(cache, "secrets", "allowed"), [meta("allowed", "s", "1")])
    denied = sink_of(cache, "secrets", "denied")
    denied.failed(kube.KubeError(403, "Forbidden", 'secrets is forbidden: cannot list resource "secrets"'))
    assert cache.synced.is_set()
    assert "403" in cache.problems()["secrets in namespace denied"]
    list_all(denied, [meta("denied", "s", "2"), meta("denied", "t", "3", managed=True, fingerprint="f")])
    assert sorted(changes) == [("Secret", "denied", "s", False, None), ("Secret", "denied", "t", False, "f")]
    assert cache.problems() == {}


def test_a_failing_callback_does_not_stop_the_others(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, kinds=[sources.SECRET])
    seen: list[str] = []

    def on_change(kind: str, namespace: str, name: str, deleted: bool, fingerprint: str | None) -> None:
        seen.append(name)
        if name == "bad":
            raise RuntimeError("the handler's bug")

    cache.on_change = on_change
    sink = sink_of(cache, "secrets")
    list_all(sink, [])
    list_all(sink, [meta("a", "bad", "1"), meta("a", "good", "2")])
    sink.watch_event("ADDED", meta("a", "bad", "3"))
    sink.watch_event("ADDED", meta("a", "later", "4"))
    assert seen == ["bad", "good", "bad", "later"]


def test_objects_without_the_needed_metadata_are_skipped(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client, kinds=[sources.SECRET])
    list_all(sink_of(cache, "secrets"), [{"kind": "PartialObjectMetadata"}, {"metadata": {"name": "x"}},
                                         {"metadata": {"namespace": "a", "name": "y", "resourceVersion": 5}},
                                         meta("a", "ok", "6")])
    assert cache.count(sources.SECRET) == 1


def test_50000_secrets_fit_in_a_few_mib(client: kube.KubeClient) -> None:
    cache = sources.MetadataCache(client)
    namespaces = [f"team-{index}" for index in range(50)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        sink = sink_of(cache, "secrets")
        sink.list_started()
        for page in range(100):  # 500 per page, as the apiserver sends them
            sink.list_page([meta(namespaces[(page * 500 + index) % 50], f"helm-release-{page}-{index}",
                                 str(1_000_000 + page * 500 + index)) for index in range(500)])
        sink.list_done("2000000")
        list_all(sink_of(cache, "configmaps"), [meta(ns, "kube-root-ca.crt", "7") for ns in namespaces])
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert cache.count(sources.SECRET) == 50_000
    assert held < 15 * 1024 * 1024, f"{held / 2**20:.1f} MiB for 50,000 Secrets"
    print(f"50,000 Secrets: {held / 2**20:.1f} MiB, {held / 50_000:.0f} bytes each")
    # one string per namespace, however many objects it holds
    for store in cache._versions.values():
        assert all(namespace is sys.intern(namespace) for namespace in store)
