"""What the cluster's Secrets and ConfigMaps look like now, from metadata-only watches.

The controller needs two facts about them: the resourceVersion of every Secret and ConfigMap an endpoint may
reference (to notice a rotated credential, even one rotated while the operator was down), and the token
fingerprint of every token Secret it wrote (to notice one deleted or edited by someone else). It never needs
their data from a watch — it reads the few referenced objects in full when it fetches a token.

:class:`MetadataCache` runs one :class:`kube.MetadataWatch` per kind (Secret, ConfigMap) and namespace —
one per kind cluster-wide, or one per kind in each named namespace — and keeps per object only
``name -> resourceVersion`` in a dict per (interned) namespace, plus ``name -> fingerprint`` for the
token Secrets, which carry it in the ``TOKEN_FINGERPRINT_ANNOTATION``. No body, no per-object dict: about
150 bytes per object, so 50,000 Secrets cost about 8 MiB.

- ``synced`` is set once the first LIST of every watch is complete: the restart barrier. Before it, changes go
  into the cache silently; the controller reads the cache when it plans.
- After that, ``on_change`` is called for every change: each ADDED/MODIFIED/DELETED event, and after a relist
  (the apiserver lost the watch's resourceVersion) every object whose resourceVersion differs from the cache's,
  appeared or disappeared — deletes missed while disconnected included.
- A watch the apiserver refuses with 403 (no RBAC for that namespace) counts as synced, empty, so one
  namespace cannot hold the barrier for all; it keeps retrying with backoff and reports what it finds once
  allowed (every object as a change). Any other failure (apiserver unreachable) holds the barrier until its
  first LIST succeeds. :meth:`MetadataCache.problems` names the watches that are failing right now.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from secured_endpoint import api, kube, schedule

logger = logging.getLogger(__name__)

SECRET: Final = "Secret"
CONFIGMAP: Final = "ConfigMap"
RESOURCES: Final = {SECRET: "secrets", CONFIGMAP: "configmaps"}
# On token Secrets: the fingerprint of the token they hold, readable from metadata alone (the data key
# ``fingerprint`` stays, gateways read it).
TOKEN_FINGERPRINT_ANNOTATION: Final = "secured-endpoint.io/token-fingerprint"

ChangeCallback = Callable[[str, str, str, bool, "str | None"], None]
"""``on_change(kind, namespace, name, deleted, fingerprint)``; see :class:`MetadataCache`."""

_Store = dict[str, dict[str, str]]  # namespace -> name -> value
_EMPTY: Final[Mapping[str, str]] = {}


class MetadataCache:
    """resourceVersions of the Secrets and ConfigMaps in scope and fingerprints of the token Secrets.

    ``namespaces`` None watches cluster-wide (one watch per kind); otherwise one watch per kind in each named
    namespace (exact names). ``label_selector`` (``key=value[,…]``) goes to the apiserver with every LIST and
    WATCH. ``on_change(kind, namespace, name, deleted, fingerprint)``:

    - ``kind`` is ``"Secret"`` or ``"ConfigMap"``;
    - ``deleted`` is True when the object is gone (a DELETED event, a relist that no longer lists it, or an
      object that stopped matching the label selector);
    - ``fingerprint`` is, for a Secret labelled as managed by this operator and not deleted, the value of
      ``TOKEN_FINGERPRINT_ANNOTATION`` ("" when it has none), and None otherwise.

    It is called on the event loop, after the cache was updated (so lookups in it see the change), and must
    not block; an exception it raises is logged and the watch goes on. :meth:`start` after :meth:`stop`
    resumes every watch from its last resourceVersion.
    """

    def __init__(self, client: kube.KubeClient, *, namespaces: Sequence[str] | None = None,
                 label_selector: str = "", on_change: ChangeCallback | None = None,
                 kinds: Sequence[str] = (SECRET, CONFIGMAP), page_size: int = kube.LIST_PAGE_SIZE,
                 watch_timeout_seconds: float = kube.WATCH_TIMEOUT_SECONDS,
                 backoff: schedule.Backoff = kube.WATCH_BACKOFF) -> None:
        unknown = set(kinds) - set(RESOURCES)
        if unknown:
            raise ValueError(f"cannot watch {sorted(unknown)}: only {sorted(RESOURCES)}")
        self.on_change = on_change
        self.synced = asyncio.Event()
        self._versions: dict[str, _Store] = {kind: {} for kind in kinds}
        self._fingerprints: _Store = {}
        scopes: list[str | None] = [None] if namespaces is None else list(dict.fromkeys(namespaces))
        self._sinks = [_WatchSink(self, kind, namespace) for kind in kinds for namespace in scopes]
        self.watches = tuple(
            kube.MetadataWatch(client, RESOURCES[sink.kind], sink, namespace=sink.namespace,
                               label_selector=label_selector, page_size=page_size,
                               timeout_seconds=watch_timeout_seconds, backoff=backoff)
            for sink in self._sinks)
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the controller reads ------------------------------------------------------------------

    def source_version(self, namespace: str, kind: str, name: str) -> str | None:
        """The resourceVersion of Secret or ConfigMap ``name`` in ``namespace``; None if it is not there (or
        not watched: outside the namespaces, or without the selected labels)."""
        return self._versions.get(kind, {}).get(namespace, _EMPTY).get(name)

    def target_fingerprint(self, namespace: str, secret_name: str) -> str | None:
        """The fingerprint a managed token Secret announces ("" if none); None if there is no such Secret."""
        return self._fingerprints.get(namespace, _EMPTY).get(secret_name)

    def count(self, kind: str) -> int:
        """How many objects of ``kind`` the cache holds."""
        return sum(len(names) for names in self._versions.get(kind, {}).values())

    def problems(self) -> dict[str, str]:
        """The watches failing right now (``"secrets in namespace a"`` → the last error), for logs and health."""
        return {str(watch): str(sink.error) for watch, sink in zip(self.watches, self._sinks, strict=True)
                if sink.error is not None}

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(watch.run(), name=f"watch {watch}") for watch in self.watches]
        for task in self._tasks:
            task.add_done_callback(_report_exit)

    async def stop(self) -> None:
        """Cancel every watch and wait until each has closed its stream."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- called by the sinks ------------------------------------------------------------------------

    def _store_of(self, kind: str) -> _Store:
        return self._versions[kind]

    def _watch_synced(self) -> None:
        if all(sink.counted for sink in self._sinks) and not self.synced.is_set():
            logger.info("Secrets and ConfigMaps in scope listed: %s.",
                        ", ".join(f"{self.count(kind)} {RESOURCES[kind]}" for kind in self._versions))
            self.synced.set()

    def _report(self, kind: str, namespace: str, name: str, deleted: bool, fingerprint: str | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(kind, namespace, name, deleted, fingerprint)
        except Exception as exc:  # the watch must go on; the text may quote data, the type does not
            logger.error("The change handler failed for %s %s/%s: %s", kind, namespace, name,
                         type(exc).__name__)


class _WatchSink:
    """Applies one watch's LISTs and events to the cache's stores (its kind, its namespace or all)."""

    def __init__(self, cache: MetadataCache, kind: str, namespace: str | None) -> None:
        self.cache = cache
        self.kind = kind
        self.namespace = None if namespace is None else sys.intern(namespace)
        self.counted = False  # its first LIST is done, or it was refused (403): it holds no barrier
        self.error: kube.KubeError | None = None
        self._listed = False  # a LIST of it completed: the cache holds its objects
        self._reporting = False
        self._pending: _Store = {}
        self._pending_fingerprints: _Store = {}
        self._changed: list[tuple[str, str, str | None]] = []  # (namespace, name, fingerprint) during a relist

    # -- LIST ----------------------------------------------------------------------------------------

    def list_started(self) -> None:
        self._pending, self._pending_fingerprints, self._changed = {}, {}, []
        # Changes found by a relist are reported only once the controller relies on the cache; the first
        # LIST of a watch refused until now reports everything it finds.
        self._reporting = self.cache.synced.is_set()

    def list_page(self, items: list[kube.JSON]) -> None:
        store = self.cache._store_of(self.kind)
        for item in items:
            parsed = _parse(item, self.kind)
            if parsed is None:
                continue
            namespace, name, version, fingerprint = parsed
            self._pending.setdefault(namespace, {})[name] = version
            if fingerprint is not None:
                self._pending_fingerprints.setdefault(namespace, {})[name] = fingerprint
            if self._reporting and store.get(namespace, _EMPTY).get(name) != version:
                self._changed.append((namespace, name, fingerprint))

    def list_done(self, resource_version: str) -> None:
        store = self.cache._store_of(self.kind)
        scope = list(store) if self.namespace is None else [self.namespace]
        deleted: list[tuple[str, str]] = []
        if self._reporting:
            for namespace in scope:
                gone = store.get(namespace, _EMPTY).keys() - self._pending.get(namespace, _EMPTY).keys()
                deleted.extend((namespace, name) for name in gone)
        if self.namespace is None:
            self.cache._versions[self.kind] = self._pending
            if self.kind == SECRET:
                self.cache._fingerprints = self._pending_fingerprints
        else:
            _replace(store, self.namespace, self._pending.get(self.namespace))
            if self.kind == SECRET:
                _replace(self.cache._fingerprints, self.namespace, self._pending_fingerprints.get(self.namespace))
        changed, self._changed = self._changed, []
        self._pending, self._pending_fingerprints = {}, {}
        self._listed, self.error = True, None
        if not self.counted:
            self.counted = True
            self.cache._watch_synced()
        for namespace, name, fingerprint in changed:
            self.cache._report(self.kind, namespace, name, False, fingerprint)
        for namespace, name in deleted:
            self.cache._report(self.kind, namespace, name, True, None)

    # -- WATCH ---------------------------------------------------------------------------------------

    def watch_event(self, event_type: str, obj: kube.JSON) -> None:
        parsed = _parse(obj, self.kind)
        if parsed is None:
            return
        namespace, name, version, fingerprint = parsed
        self.error = None
        store = self.cache._store_of(self.kind)
        deleted = event_type == "DELETED"
        if deleted:
            _discard(store, namespace, name)
        else:
            store.setdefault(namespace, {})[name] = version
        if self.kind == SECRET:
            if fingerprint is None or deleted:
                _discard(self.cache._fingerprints, namespace, name)
            else:
                self.cache._fingerprints.setdefault(namespace, {})[name] = fingerprint
        if self.cache.synced.is_set():
            self.cache._report(self.kind, namespace, name, deleted, None if deleted else fingerprint)

    def failed(self, error: kube.KubeError) -> None:
        self.error = error
        if error.status == 403 and not self.counted:
            logger.error("Not allowed to list %s (%s): endpoints there cannot see their Secrets and ConfigMaps "
                         "change until the operator's RBAC allows list and watch; retrying.",
                         RESOURCES[self.kind], f"namespace {self.namespace}" if self.namespace else "cluster-wide")
            self.counted = True
            self.cache._watch_synced()


def _parse(obj: Mapping[str, Any], kind: str) -> tuple[str, str, str, str | None] | None:
    """``(namespace, name, resourceVersion, fingerprint)`` of a PartialObjectMetadata; the fingerprint only
    for a Secret managed by this operator."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    namespace, name, version = meta.get("namespace"), meta.get("name"), meta.get("resourceVersion")
    if not (isinstance(namespace, str) and isinstance(name, str) and isinstance(version, str)):
        return None
    fingerprint: str | None = None
    labels = meta.get("labels")
    if kind == SECRET and isinstance(labels, Mapping) and labels.get(api.MANAGED_BY_LABEL) == api.MANAGED_BY_VALUE:
        annotations = meta.get("annotations")
        value = annotations.get(TOKEN_FINGERPRINT_ANNOTATION) if isinstance(annotations, Mapping) else None
        fingerprint = value if isinstance(value, str) else ""
    # Namespaces are interned, one string for the thousands of objects in each; names are not: most are
    # unique, and interning them would add an entry to the interpreter's table for each.
    return sys.intern(namespace), name, version, fingerprint


def _replace(store: _Store, namespace: str, names: dict[str, str] | None) -> None:
    if names:
        store[namespace] = names
    else:
        store.pop(namespace, None)


def _discard(store: _Store, namespace: str, name: str) -> None:
    names = store.get(namespace)
    if names is not None:
        names.pop(name, None)
        if not names:
            del store[namespace]


def _report_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s stopped: %s", task.get_name(), type(task.exception()).__name__)
