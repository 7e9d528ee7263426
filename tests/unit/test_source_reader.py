"""``credentials.SourceReader``: a referenced object is read again only when the watches say it changed.

- The same resourceVersion as the copy: no GET (a refresh, or a Secret shared by many endpoints).
- A new resourceVersion, or none known (a Secret outside the label selector): a GET, and the new copy kept.
- A deleted object: the copy goes (``forget``, or a 404 on the next read).
- At most ``capacity`` copies, the least recently used out first; a copy keeps only kind, data and version.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from secured_endpoint import api, credentials


class CountingKube:
    """Answers ``get_secret`` as the apiserver would and counts the GETs."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.gets: list[str] = []

    def put(self, name: str, version: str, value: str) -> None:
        self.secrets[name] = {"kind": "Secret", "data": {"client-secret": base64.b64encode(value.encode()).decode()},
                              "metadata": {"name": name, "resourceVersion": version,
                                           "managedFields": [{"manager": "kubectl"}]}}

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets.append(name)
        return self.secrets.get(name)


def ref(name: str) -> api.SourceRef:
    return api.SourceRef("Secret", name)


async def test_an_unchanged_object_is_read_once() -> None:
    kube = CountingKube()
    kube.put("oauth", "7", "s1")
    watched = {"oauth": "7"}
    reader = credentials.SourceReader(kube, lambda namespace, r: watched.get(r.name))  # type: ignore[arg-type]
    first = await reader.read("ns", ref("oauth"))
    for _ in range(5):
        assert await reader.read("ns", ref("oauth")) == first
    assert kube.gets == ["oauth"]
    assert first is not None
    assert set(first) == {"kind", "data", "binaryData", "metadata"}
    assert first["metadata"] == {"resourceVersion": "7"}

    kube.put("oauth", "8", "s2")  # rotated: the watch reports the new version
    watched["oauth"] = "8"
    rotated = await reader.read("ns", ref("oauth"))
    assert rotated is not None
    assert base64.b64decode(rotated["data"]["client-secret"]) == b"s2"
    assert await reader.read("ns", ref("oauth")) is rotated
    assert kube.gets == ["oauth", "oauth"]


async def test_without_a_watched_version_every_read_is_a_get() -> None:
    kube = CountingKube()
    kube.put("unlabelled", "3", "s")
    reader = credentials.SourceReader(kube, lambda namespace, r: None)  # type: ignore[arg-type]
    for _ in range(3):
        await reader.read("ns", ref("unlabelled"))
    assert kube.gets == ["unlabelled"] * 3


async def test_a_deleted_object_loses_its_copy() -> None:
    kube = CountingKube()
    kube.put("oauth", "7", "s1")
    watched: dict[str, str] = {"oauth": "7"}
    reader = credentials.SourceReader(kube, lambda namespace, r: watched.get(r.name))  # type: ignore[arg-type]
    await reader.read("ns", ref("oauth"))
    del kube.secrets["oauth"], watched["oauth"]
    reader.forget("ns", ref("oauth"))
    assert await reader.read("ns", ref("oauth")) is None
    # re-created with the same name (the version of a new object is new; say it is the old one on purpose)
    kube.put("oauth", "7", "s3")
    watched["oauth"] = "7"
    again = await reader.read("ns", ref("oauth"))
    assert again is not None
    assert base64.b64decode(again["data"]["client-secret"]) == b"s3"


async def test_the_least_recently_used_copy_goes_first() -> None:
    kube = CountingKube()
    for name in "abc":
        kube.put(name, "1", name)
    reader = credentials.SourceReader(kube, lambda namespace, r: "1", capacity=2)  # type: ignore[arg-type]
    await reader.read("ns", ref("a"))
    await reader.read("ns", ref("b"))
    await reader.read("ns", ref("a"))  # a is used again: b is now the oldest
    await reader.read("ns", ref("c"))  # evicts b
    kube.gets.clear()
    await reader.read("ns", ref("a"))
    await reader.read("ns", ref("c"))
    await reader.read("ns", ref("b"))
    assert kube.gets == ["b"]


class SlowKube(CountingKube):
    """Answers only when told to, so that reads overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets.append(name)
        await self.answer.wait()
        return self.secrets.get(name)


async def test_reads_of_the_same_version_at_once_share_one_get() -> None:
    kube = SlowKube()
    kube.put("shared", "5", "rotated")
    watched = {"shared": "5"}
    reader = credentials.SourceReader(kube, lambda namespace, r: watched.get(r.name))  # type: ignore[arg-type]
    readers = [asyncio.create_task(reader.read("ns", ref("shared"))) for _ in range(32)]
    await asyncio.sleep(0)
    readers[0].cancel()  # one waiter gone does not cancel the read the others wait for
    kube.answer.set()
    results = await asyncio.gather(*readers[1:])
    assert kube.gets == ["shared"]
    assert all(result is results[0] for result in results)


async def test_a_read_for_a_newer_version_does_not_join_an_older_get() -> None:
    kube = SlowKube()
    kube.put("shared", "5", "old")
    watched = {"shared": "5"}
    reader = credentials.SourceReader(kube, lambda namespace, r: watched.get(r.name))  # type: ignore[arg-type]
    early = asyncio.create_task(reader.read("ns", ref("shared")))
    await asyncio.sleep(0)
    kube.put("shared", "6", "new")  # rotated while the first GET is on its way
    watched["shared"] = "6"
    late = asyncio.create_task(reader.read("ns", ref("shared")))
    await asyncio.sleep(0)
    kube.answer.set()
    await early
    newest = await late
    assert kube.gets == ["shared", "shared"]
    assert newest is not None
    assert base64.b64decode(newest["data"]["client-secret"]) == b"new"
