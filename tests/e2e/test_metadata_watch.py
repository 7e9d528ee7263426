"""The operator's own metadata-only watches of Secrets and ConfigMaps, against a real kube-apiserver + etcd.

This module runs its own control plane: it compacts etcd and restarts the apiserver, which would disturb the
session's. That apiserver serves Secrets straight from etcd (``--watch-cache-sizes=secrets#0``, as any
resource without the watch cache), so compacting etcd makes an old resourceVersion unservable at once — the
``410`` a large cluster meets after minutes; ConfigMaps keep the watch cache, which sends bookmarks and, after
an apiserver restart, no longer has the versions from before.

- LIST then WATCH, namespaced and cluster-wide: the cache holds each object's resourceVersion and a token
  Secret's fingerprint (annotation); create, modify and delete reach ``on_change`` in order, the initial LIST
  does not; the watches hold no request slot (a client with ``max_in_flight=1`` still serves a GET).
- Metadata only: every object the watch receives, listed or watched, is a ``PartialObjectMetadata`` with no
  ``data`` — the Secret's value never reaches the process's sink.
- A label selector limits LIST and WATCH on the server; losing the label reads as a delete.
- Forced 410 on the watch: watches stopped, objects created, changed and deleted, etcd compacted, watches
  resumed → a fresh LIST, exactly the missed changes and deletes reported, and the watch goes on.
- Forced 410 on a LIST's continue token (etcd compacted between two pages): the LIST starts again and
  completes; nothing crashes.
- Bookmarks move the resourceVersion on while nothing selected changes.
- The apiserver stopped and started again: changes made while the cache was disconnected are caught up
  (resumed or relisted), and under a running cache the watches report failing while it is down, then
  reconnect and see new changes.
- A namespace the operator may not list (403) does not hold the restart barrier, and once RBAC allows it,
  its objects are reported.
- ``patch_endpoint_finalizers``: the resourceVersion precondition refuses a stale write (409).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from secured_endpoint import api, kube, schedule, sources
from secured_endpoint_devenv import controlplane

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
FAST = schedule.Backoff(base_seconds=0.05, cap_seconds=0.5)  # reconnect quickly: these tests wait on it
MANAGED = {api.MANAGED_BY_LABEL: api.MANAGED_BY_VALUE}
Change = tuple[str, str, str, bool, "str | None"]


# -- a control plane of our own, whose apiserver can be stopped and started ---------------------------------


class Apiserver:
    """The plane's kube-apiserver, taken over so that a test can stop and start it again with the same port,
    certificates, token file and etcd (plus ``extra_args``). It uses only the plane's public ``pids``,
    ``server`` and ``get``; a ``ControlPlane.restart_apiserver()`` in the harness would replace it."""

    def __init__(self, plane: controlplane.ControlPlane, extra_args: list[str]) -> None:
        self.plane = plane
        for pid in plane.pids:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
            if args and Path(args[0]).name == "kube-apiserver":
                self.pid, self.args = pid, [*args, *extra_args]
                break
        else:
            raise AssertionError("the control plane runs no kube-apiserver")
        self.port = int(plane.server.rsplit(":", 1)[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = plane.workdir / "kube-apiserver-restarted.log"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds: a terminating apiserver waits for its open watches to
        time out, which would take minutes; a killed one drops them, as a crashed or evicted one does."""
        if self.process is None:
            pid, self.pid = self.pid, 0  # the harness's own process; it reaps it when it stops
            _terminate(lambda sig: os.kill(pid, sig), lambda: _refuses(self.port))
        else:
            process, self.process = self.process, None
            _terminate(process.send_signal, lambda: process.poll() is not None)
            process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _refuses(self.port):
            if time.monotonic() > deadline:
                raise AssertionError("kube-apiserver did not stop")
            time.sleep(0.1)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"kube-apiserver exited with {self.process.returncode}, see {self.log_path}")
            try:
                if self.plane.get("/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("kube-apiserver did not become ready")


def _terminate(send: Callable[[int], None], gone: Callable[[], bool], grace: float = 3.0) -> None:
    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not gone():
        if time.monotonic() > deadline:
            send(signal.SIGKILL)
            return
        time.sleep(0.1)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.fixture(scope="module")
def plane() -> Iterator[controlplane.ControlPlane]:
    controlplane.ensure_binaries()
    with controlplane.ControlPlane() as cp:
        cp.install_crds(ROOT / "crds")
        yield cp


@pytest.fixture(scope="module")
def apiserver(plane: controlplane.ControlPlane) -> Iterator[Apiserver]:
    server = Apiserver(plane, ["--watch-cache-sizes=secrets#0"])
    server.stop()
    server.start()
    yield server
    if server.process is not None:
        server.stop()


@pytest.fixture
async def admin(plane: controlplane.ControlPlane, apiserver: Apiserver) -> AsyncIterator[kube.KubeClient]:
    """The test's own hands on the cluster (admin); the code under test gets clients of its own."""
    async with _client(plane) as client:
        yield client


class _client:  # used like a function: async with _client(plane) as client
    def __init__(self, plane: controlplane.ControlPlane, *, token: str | None = None, max_in_flight: int = 20):
        self.plane, self.token, self.max_in_flight = plane, token, max_in_flight

    async def __aenter__(self) -> kube.KubeClient:
        if self.token is None:
            credentials = kube.load_credentials(kubeconfig=str(self.plane.kubeconfig_path))
        else:
            credentials = kube.Credentials(server=self.plane.server, token=self.token,
                                           tls=ssl.create_default_context(cafile=str(self.plane.ca_path)))
        self.client = kube.KubeClient(credentials, max_in_flight=self.max_in_flight)
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()


async def new_namespace(admin: kube.KubeClient, prefix: str = "mw") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    await admin.request("POST", "/api/v1/namespaces", json_body={"metadata": {"name": name}})
    return name


@pytest.fixture
async def namespace(admin: kube.KubeClient) -> str:
    return await new_namespace(admin)


async def put_secret(admin: kube.KubeClient, namespace: str, name: str, *, data: dict[str, str] | None = None,
                     labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> str:
    """Create the Secret; its resourceVersion."""
    body = {"metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
            "stringData": data or {"key": "value"}}
    created = await admin.request("POST", f"/api/v1/namespaces/{namespace}/secrets", json_body=body)
    return str(created["metadata"]["resourceVersion"])


async def patch(admin: kube.KubeClient, namespace: str, resource: str, name: str, body: dict[str, Any]) -> str:
    patched = await admin.request("PATCH", f"/api/v1/namespaces/{namespace}/{resource}/{name}", json_body=body,
                                  content_type="application/merge-patch+json")
    return str(patched["metadata"]["resourceVersion"])


async def put_configmap(admin: kube.KubeClient, namespace: str, name: str, *,
                        labels: dict[str, str] | None = None) -> str:
    created = await admin.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", json_body={
        "metadata": {"name": name, "labels": labels or {}}, "data": {"ca.crt": "not really a certificate"}})
    return str(created["metadata"]["resourceVersion"])


async def delete(admin: kube.KubeClient, namespace: str, resource: str, name: str) -> None:
    await admin.request("DELETE", f"/api/v1/namespaces/{namespace}/{resource}/{name}")


async def compact_etcd(plane: controlplane.ControlPlane) -> int:
    """Compact etcd at its current revision (after one more write, so the revision is newer than any
    resourceVersion handed out so far); returns that revision. etcd's v3 JSON gateway, no etcdctl needed."""
    async with httpx.AsyncClient(base_url=plane.etcd_endpoint) as etcd:
        put = await etcd.post("/v3/kv/put", json={"key": "c2VwLXRlc3QvYnVtcA==", "value": "eA=="})  # sep-test/bump
        revision = int(put.json()["header"]["revision"])
        answer = await etcd.post("/v3/kv/compaction", json={"revision": str(revision), "physical": True})
        assert answer.status_code == 200, answer.text
    return revision


def compact_etcd_blocking(plane: controlplane.ControlPlane) -> None:
    """The same from inside a synchronous sink call, between two LIST pages."""
    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(plane.etcd_endpoint + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())  # type: ignore[no-any-return]

    revision = post("/v3/kv/put", {"key": "c2VwLXRlc3QvYnVtcA==", "value": "eQ=="})["header"]["revision"]
    post("/v3/kv/compaction", {"revision": revision, "physical": True})


async def eventually(predicate: Callable[[], Any], *, timeout: float = 15.0, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {message}")


class Recorder:
    """``on_change`` that records every call."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, kind: str, namespace: str, name: str, deleted: bool, fingerprint: str | None) -> None:
        self.changes.append((kind, namespace, name, deleted, fingerprint))

    async def wait_for(self, *expected: Change, timeout: float = 15.0) -> None:
        await eventually(lambda: all(change in self.changes for change in expected), timeout=timeout,
                         message=f"{expected} (seen: {self.changes})")


class RawSink:
    """A :class:`kube.MetadataSink` that keeps every object exactly as the apiserver sent it."""

    def __init__(self, on_page: Callable[[int], None] | None = None) -> None:
        self.objects: list[dict[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.list_starts = 0
        self.pages = 0
        self.listed: list[str] = []
        self.done: list[str] = []
        self.errors: list[kube.KubeError] = []
        self._on_page = on_page

    def list_started(self) -> None:
        self.list_starts += 1
        self.listed = []

    def list_page(self, items: list[dict[str, Any]]) -> None:
        self.pages += 1
        self.objects.extend(items)
        self.listed.extend(item["metadata"]["name"] for item in items)
        if self._on_page is not None:
            self._on_page(self.pages)

    def list_done(self, resource_version: str) -> None:
        self.done.append(resource_version)

    def watch_event(self, event_type: str, obj: dict[str, Any]) -> None:
        self.objects.append(obj)
        self.events.append((event_type, obj))

    def failed(self, error: kube.KubeError) -> None:
        self.errors.append(error)


async def running(cache: sources.MetadataCache, timeout: float = 15.0) -> sources.MetadataCache:
    await cache.start()
    await asyncio.wait_for(cache.synced.wait(), timeout)
    return cache


async def run_watch(watch: kube.MetadataWatch) -> asyncio.Task[None]:
    return asyncio.create_task(watch.run())


async def cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- tests ---------------------------------------------------------------------------------------------------


async def test_list_then_watch_sees_create_modify_delete(plane: controlplane.ControlPlane,
                                                         admin: kube.KubeClient, namespace: str) -> None:
    listed_secret = await put_secret(admin, namespace, "before")
    listed_configmap = await put_configmap(admin, namespace, "ca")
    recorder = Recorder()
    async with _client(plane, max_in_flight=1) as client:
        cache = await running(sources.MetadataCache(client, namespaces=[namespace], on_change=recorder,
                                                    backoff=FAST))
        try:
            assert cache.source_version(namespace, "Secret", "before") == listed_secret
            assert cache.source_version(namespace, "ConfigMap", "ca") == listed_configmap
            assert recorder.changes == [], "the initial LIST reports nothing: the controller reads the cache"
            # two watches are open on a client with one request slot: requests still go through
            assert (await asyncio.wait_for(client.get_secret(namespace, "before"), 5)) is not None

            created = await put_secret(admin, namespace, "token", labels=MANAGED,
                                       annotations={sources.TOKEN_FINGERPRINT_ANNOTATION: "sha256:first"})
            await recorder.wait_for(("Secret", namespace, "token", False, "sha256:first"))
            assert cache.source_version(namespace, "Secret", "token") == created
            assert cache.target_fingerprint(namespace, "token") == "sha256:first"

            modified = await patch(admin, namespace, "secrets", "token", {
                "metadata": {"annotations": {sources.TOKEN_FINGERPRINT_ANNOTATION: "sha256:second"}}})
            await recorder.wait_for(("Secret", namespace, "token", False, "sha256:second"))
            assert cache.source_version(namespace, "Secret", "token") == modified
            assert cache.target_fingerprint(namespace, "token") == "sha256:second"

            rotated = await patch(admin, namespace, "configmaps", "ca", {"data": {"ca.crt": "rotated"}})
            await recorder.wait_for(("ConfigMap", namespace, "ca", False, None))
            assert cache.source_version(namespace, "ConfigMap", "ca") == rotated

            await delete(admin, namespace, "secrets", "token")
            await recorder.wait_for(("Secret", namespace, "token", True, None))
            assert cache.source_version(namespace, "Secret", "token") is None
            assert cache.target_fingerprint(namespace, "token") is None
            assert recorder.changes == [
                ("Secret", namespace, "token", False, "sha256:first"),
                ("Secret", namespace, "token", False, "sha256:second"),
                ("ConfigMap", namespace, "ca", False, None),
                ("Secret", namespace, "token", True, None),
            ]
            assert cache.problems() == {}
        finally:
            await cache.stop()


async def test_cluster_wide_sees_every_namespace(plane: controlplane.ControlPlane, admin: kube.KubeClient) -> None:
    first, second = await new_namespace(admin), await new_namespace(admin)
    listed = await put_secret(admin, first, "listed")
    recorder = Recorder()
    async with _client(plane) as client:
        cache = await running(sources.MetadataCache(client, on_change=recorder, backoff=FAST))
        try:
            assert [(w.resource, w.namespace) for w in cache.watches] == [("secrets", None), ("configmaps", None)]
            assert cache.source_version(first, "Secret", "listed") == listed
            watched = await put_secret(admin, second, "watched")
            await recorder.wait_for(("Secret", second, "watched", False, None))
            assert cache.source_version(second, "Secret", "watched") == watched
            assert cache.count("Secret") >= 2
        finally:
            await cache.stop()


async def test_only_metadata_reaches_the_process(plane: controlplane.ControlPlane, admin: kube.KubeClient,
                                                 namespace: str) -> None:
    marker = f"hunter2-{uuid.uuid4().hex}"
    await put_secret(admin, namespace, "listed", data={"password": marker})
    await admin.request("POST", f"/api/v1/namespaces/{namespace}/configmaps",
                        json_body={"metadata": {"name": "listed"}, "data": {"value": marker}})
    full = await admin.get_secret(namespace, "listed")
    assert full is not None
    assert full["data"], "a full GET has the data: the watch below must not"
    async with _client(plane) as client:
        sinks = {resource: RawSink() for resource in ("secrets", "configmaps")}
        watches = [kube.MetadataWatch(client, resource, sink, namespace=namespace, backoff=FAST)
                   for resource, sink in sinks.items()]
        tasks = [await run_watch(watch) for watch in watches]
        try:
            await eventually(lambda: all(watch.lists for watch in watches), message="both LISTs")
            await put_secret(admin, namespace, "watched", data={"password": marker})
            await patch(admin, namespace, "secrets", "watched", {"stringData": {"password": marker + "-2"}})
            await admin.request("POST", f"/api/v1/namespaces/{namespace}/configmaps",
                                json_body={"metadata": {"name": "watched"}, "data": {"value": marker}})
            await eventually(lambda: len(sinks["secrets"].events) == 2 and len(sinks["configmaps"].events) == 1,
                             message="the watch events")
        finally:
            for task in tasks:
                await cancelled(task)
    for sink in sinks.values():
        assert sink.objects
        for obj in sink.objects:
            assert obj["kind"] == "PartialObjectMetadata"
            assert set(obj) == {"kind", "apiVersion", "metadata"}, sorted(obj)
            assert "data" not in obj
            assert "stringData" not in obj
            assert marker not in json.dumps(obj)
    assert [event for event, _ in sinks["secrets"].events] == ["ADDED", "MODIFIED"]


async def test_a_label_selector_limits_what_is_listed_and_watched(plane: controlplane.ControlPlane,
                                                                  admin: kube.KubeClient, namespace: str) -> None:
    selected = {"secured-endpoint.io/credentials": "true"}
    await put_secret(admin, namespace, "labelled", labels=selected)
    await put_secret(admin, namespace, "unlabelled")
    recorder = Recorder()
    async with _client(plane) as client:
        cache = await running(sources.MetadataCache(client, namespaces=[namespace], on_change=recorder,
                                                    label_selector="secured-endpoint.io/credentials=true",
                                                    backoff=FAST))
        try:
            assert cache.source_version(namespace, "Secret", "labelled") is not None
            assert cache.source_version(namespace, "Secret", "unlabelled") is None
            await put_secret(admin, namespace, "other")
            labelled_later = await patch(admin, namespace, "secrets", "unlabelled",
                                         {"metadata": {"labels": selected}})
            await recorder.wait_for(("Secret", namespace, "unlabelled", False, None))
            assert cache.source_version(namespace, "Secret", "unlabelled") == labelled_later
            await patch(admin, namespace, "secrets", "labelled",
                        {"metadata": {"labels": {"secured-endpoint.io/credentials": None}}})
            await recorder.wait_for(("Secret", namespace, "labelled", True, None))
            assert cache.source_version(namespace, "Secret", "labelled") is None
            assert [name for _, _, name, _, _ in recorder.changes] == ["unlabelled", "labelled"], "never 'other'"
        finally:
            await cache.stop()


async def test_a_compacted_resource_version_leads_to_a_relist_that_reports_what_was_missed(
        plane: controlplane.ControlPlane, admin: kube.KubeClient, namespace: str) -> None:
    for name in ("kept", "changed", "dropped"):
        await put_secret(admin, namespace, name)
    recorder = Recorder()
    async with _client(plane) as client:
        cache = await running(sources.MetadataCache(client, namespaces=[namespace], kinds=["Secret"],
                                                    on_change=recorder, backoff=FAST))
        (watch,) = cache.watches
        try:
            await cache.stop()  # disconnected, keeping its resourceVersion
            stale = watch.resource_version
            changed = await patch(admin, namespace, "secrets", "changed", {"stringData": {"key": "rotated"}})
            await delete(admin, namespace, "secrets", "dropped")
            added = await put_secret(admin, namespace, "added", labels=MANAGED,
                                     annotations={sources.TOKEN_FINGERPRINT_ANNOTATION: "sha256:new"})
            revision = await compact_etcd(plane)
            assert stale is not None
            assert int(stale) < revision
            await cache.start()  # resumes from the compacted resourceVersion: 410 → LIST
            await recorder.wait_for(("Secret", namespace, "changed", False, None),
                                    ("Secret", namespace, "dropped", True, None),
                                    ("Secret", namespace, "added", False, "sha256:new"))
            assert watch.lists == 2, "a fresh LIST, not a replay"
            assert sorted(recorder.changes) == sorted([("Secret", namespace, "changed", False, None),
                                                       ("Secret", namespace, "dropped", True, None),
                                                       ("Secret", namespace, "added", False, "sha256:new")])
            assert cache.source_version(namespace, "Secret", "changed") == changed
            assert cache.source_version(namespace, "Secret", "added") == added
            assert cache.source_version(namespace, "Secret", "dropped") is None
            assert cache.target_fingerprint(namespace, "added") == "sha256:new"
            # and it keeps watching
            after = await put_secret(admin, namespace, "after")
            await recorder.wait_for(("Secret", namespace, "after", False, None))
            assert cache.source_version(namespace, "Secret", "after") == after
            assert cache.problems() == {}
        finally:
            await cache.stop()


async def test_an_expired_continue_token_starts_the_list_again(plane: controlplane.ControlPlane,
                                                               admin: kube.KubeClient, namespace: str) -> None:
    names = [f"s{index}" for index in range(4)]
    for name in names:
        await put_secret(admin, namespace, name)
    # compacting etcd after the first page of the first LIST expires its continue token
    sink = RawSink(on_page=lambda page: compact_etcd_blocking(plane) if page == 1 else None)
    async with _client(plane) as client:
        watch = kube.MetadataWatch(client, "secrets", sink, namespace=namespace, page_size=1, backoff=FAST)
        task = await run_watch(watch)
        try:
            await eventually(lambda: watch.lists == 1, message="a complete LIST")
            assert not task.done()
        finally:
            await cancelled(task)
    assert [(error.status, error.reason) for error in sink.errors] == [(410, "Expired")]
    assert sink.list_starts == 2
    assert sorted(sink.listed) == names, "the second LIST is whole"
    assert len(sink.done) == 1


async def test_bookmarks_move_the_resource_version_on(plane: controlplane.ControlPlane, admin: kube.KubeClient,
                                                      namespace: str) -> None:
    elsewhere = await new_namespace(admin)
    sink = RawSink()
    async with _client(plane) as client:
        # ConfigMaps have the watch cache, which sends bookmarks (about 3 s before the watch's timeout)
        watch = kube.MetadataWatch(client, "configmaps", sink, namespace=namespace,
                                   label_selector="sep-test/nothing=selected", timeout_seconds=6, backoff=FAST)
        task = await run_watch(watch)
        try:
            await eventually(lambda: watch.lists == 1, message="the LIST")
            listed = int(watch.resource_version or 0)
            newer = int(await put_configmap(admin, elsewhere, "unrelated"))
            assert newer > listed
            await eventually(lambda: int(watch.resource_version or 0) >= newer, timeout=20,
                             message="a bookmark at or after the unrelated write")
        finally:
            await cancelled(task)
    assert watch.bookmarks >= 1
    assert sink.events == [], "nothing selected changed"
    assert watch.lists == 1


async def test_the_apiserver_restarted(plane: controlplane.ControlPlane, apiserver: Apiserver,
                                       admin: kube.KubeClient, namespace: str) -> None:
    await put_secret(admin, namespace, "credentials")
    await put_configmap(admin, namespace, "ca")
    recorder = Recorder()
    async with _client(plane) as client:
        cache = await running(sources.MetadataCache(client, namespaces=[namespace], on_change=recorder,
                                                    backoff=FAST))
        secrets_watch, configmaps_watch = cache.watches
        try:
            # missed while disconnected, across a restart
            await cache.stop()
            await asyncio.to_thread(apiserver.stop)
            await asyncio.to_thread(apiserver.start)
            rotated = await patch(admin, namespace, "secrets", "credentials", {"stringData": {"key": "rotated"}})
            await delete(admin, namespace, "configmaps", "ca")
            await cache.start()
            await recorder.wait_for(("Secret", namespace, "credentials", False, None),
                                    ("ConfigMap", namespace, "ca", True, None))
            assert cache.source_version(namespace, "Secret", "credentials") == rotated
            assert cache.source_version(namespace, "ConfigMap", "ca") is None
            # Secrets come straight from etcd, which still has their resourceVersion: the watch resumes. The
            # ConfigMap watch resumes too while the new watch cache initialises (it hands watches to etcd
            # meanwhile), or relists (410) once that cache, started after its resourceVersion, serves it.
            assert secrets_watch.lists == 1
            assert configmaps_watch.lists in (1, 2)

            # stopped under a running cache
            await asyncio.to_thread(apiserver.stop)
            await eventually(lambda: len(cache.problems()) == 2, message="both watches reported failing")
            assert all("connection lost" in problem for problem in cache.problems().values()), cache.problems()
            await asyncio.to_thread(apiserver.start)
            created = await put_secret(admin, namespace, "after-restart")
            await put_configmap(admin, namespace, "ca")
            await recorder.wait_for(("Secret", namespace, "after-restart", False, None),
                                    ("ConfigMap", namespace, "ca", False, None), timeout=30)
            assert cache.source_version(namespace, "Secret", "after-restart") == created
            await eventually(lambda: cache.problems() == {}, message="no watch failing any more")
        finally:
            await cache.stop()
            if apiserver.process is None:  # failed while it was down: the next tests need it
                await asyncio.to_thread(apiserver.start)


async def test_a_forbidden_namespace_does_not_hold_the_barrier(plane: controlplane.ControlPlane,
                                                               admin: kube.KubeClient) -> None:
    allowed, denied = await new_namespace(admin, "allowed"), await new_namespace(admin, "denied")
    await admin.request("POST", f"/api/v1/namespaces/{allowed}/serviceaccounts",
                        json_body={"metadata": {"name": "watcher"}})
    await grant_list_watch(admin, allowed, allowed)
    token = (await admin.request("POST", f"/api/v1/namespaces/{allowed}/serviceaccounts/watcher/token",
                                 json_body={"spec": {"expirationSeconds": 3600}}))["status"]["token"]
    await put_secret(admin, allowed, "visible")
    await put_secret(admin, denied, "hidden")
    recorder = Recorder()
    async with _client(plane, token=token) as client:
        cache = sources.MetadataCache(client, namespaces=[allowed, denied], on_change=recorder, backoff=FAST)
        await running(cache)
        try:
            assert cache.source_version(allowed, "Secret", "visible") is not None
            assert cache.source_version(denied, "Secret", "hidden") is None
            assert sorted(cache.problems()) == [f"configmaps in namespace {denied}", f"secrets in namespace {denied}"]
            assert all(problem.startswith("403 Forbidden") for problem in cache.problems().values())
            await grant_list_watch(admin, denied, allowed)
            await recorder.wait_for(("Secret", denied, "hidden", False, None))
            await eventually(lambda: cache.problems() == {}, message="the watches in the granted namespace")
        finally:
            await cache.stop()


async def grant_list_watch(admin: kube.KubeClient, namespace: str, account_namespace: str) -> None:
    base = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    await admin.request("POST", f"{base}/roles", json_body={
        "metadata": {"name": "watch-sources"},
        "rules": [{"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["list", "watch", "get"]}]})
    await admin.request("POST", f"{base}/rolebindings", json_body={
        "metadata": {"name": "watch-sources"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "watch-sources"},
        "subjects": [{"kind": "ServiceAccount", "name": "watcher", "namespace": account_namespace}]})


async def test_finalizers_are_patched_only_at_the_expected_resource_version(admin: kube.KubeClient,
                                                                            namespace: str) -> None:
    created = await admin.request(
        "POST", f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}",
        json_body={"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND, "metadata": {"name": "ep"},
                   "spec": {"tokenUrl": "https://idp.example/token", "clientSecretRef": {"name": "creds"}}})
    version = created["metadata"]["resourceVersion"]
    added = await admin.patch_endpoint_finalizers(namespace, "ep", ["example.com/other", api.FINALIZER], version)
    assert added["metadata"]["finalizers"] == ["example.com/other", api.FINALIZER]
    with pytest.raises(kube.KubeError) as stale:
        await admin.patch_endpoint_finalizers(namespace, "ep", [], version)
    assert stale.value.conflict
    removed = await admin.patch_endpoint_finalizers(namespace, "ep", [], added["metadata"]["resourceVersion"])
    assert "finalizers" not in removed["metadata"]
