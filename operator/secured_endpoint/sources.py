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
import fnmatch
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    WATCH. With ``namespaces_to_come`` the namespaces are added later (:meth:`add_namespace`, by a
    :class:`NamespaceScope` that matches patterns) and ``synced`` waits for :meth:`scope_complete`.
    ``on_change(kind, namespace, name, deleted, fingerprint)``:

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
                 backoff: schedule.Backoff = kube.WATCH_BACKOFF, namespaces_to_come: bool = False) -> None:
        unknown = set(kinds) - set(RESOURCES)
        if unknown:
            raise ValueError(f"cannot watch {sorted(unknown)}: only {sorted(RESOURCES)}")
        self.on_change = on_change
        self.synced = asyncio.Event()
        self._client = client
        self._kinds = tuple(kinds)
        self._watch_options: dict[str, Any] = {"label_selector": label_selector, "page_size": page_size,
                                               "timeout_seconds": watch_timeout_seconds, "backoff": backoff}
        self._versions: dict[str, _Store] = {kind: {} for kind in kinds}
        self._fingerprints: _Store = {}
        # (kind, namespace or None for all) -> its watch and what it reports to, in the order added
        self._scoped: dict[tuple[str, str | None], tuple[kube.MetadataWatch, _WatchSink]] = {}
        self._tasks: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._running = False
        # a scope of namespace patterns is complete only once the namespaces are listed (see NamespaceScope)
        self._scope_known = not namespaces_to_come
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []  # wait_synced() calls
        scopes: list[str | None] = [] if namespaces_to_come else [None] if namespaces is None \
            else list(dict.fromkeys(namespaces))
        for namespace in scopes:
            self._add_scope(namespace)

    @property
    def watches(self) -> tuple[kube.MetadataWatch, ...]:
        return tuple(watch for watch, _ in self._scoped.values())

    def _add_scope(self, namespace: str | None) -> None:
        for kind in self._kinds:
            if (kind, namespace) in self._scoped:
                continue
            sink = _WatchSink(self, kind, namespace)
            watch = kube.MetadataWatch(self._client, RESOURCES[kind], sink, namespace=namespace,
                                       **self._watch_options)
            self._scoped[(kind, namespace)] = (watch, sink)
            if self._running:
                self._start_watch(kind, namespace)

    def add_namespace(self, namespace: str) -> None:
        """Watch ``namespace`` too (a namespace that matches the patterns appeared)."""
        self._add_scope(sys.intern(namespace))
        self._watch_synced()  # waiters for it learn that it is now covered, not yet listed

    def remove_namespace(self, namespace: str) -> None:
        """Stop watching ``namespace`` (deleted, or it no longer matches) and forget what it held."""
        for kind in self._kinds:
            self._scoped.pop((kind, namespace), None)
            task = self._tasks.pop((kind, namespace), None)
            if task is not None:
                task.cancel()
            _replace(self._versions[kind], namespace, None)
        _replace(self._fingerprints, namespace, None)

    def scope_complete(self) -> None:
        """Every namespace of a pattern scope has been added: the barrier may now fall."""
        self._scope_known = True
        self._watch_synced()

    def synced_in(self, namespace: str) -> bool:
        """Has every watch that covers ``namespace`` completed its first LIST (or been refused)?"""
        sinks = self._covering(namespace)
        return bool(sinks) and all(sink.counted for sink in sinks)

    def watching(self, namespace: str, kind: str) -> bool:
        """Does the cache hold ``kind`` in ``namespace`` as the apiserver has it (listed, not refused)?"""
        return any(sink.listed for sink in self._covering(namespace) if sink.kind == kind)

    async def wait_synced(self, namespace: str) -> None:
        """Return once :meth:`synced_in` is true for ``namespace``: an endpoint there may be planned."""
        if self.synced_in(namespace):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((namespace, waiter))
        await waiter

    def _covering(self, namespace: str) -> list[_WatchSink]:
        return [sink for (_, scope), (_, sink) in self._scoped.items() if scope is None or scope == namespace]

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
        return {str(watch): str(sink.error) for watch, sink in self._scoped.values() if sink.error is not None}

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        for kind, namespace in self._scoped:
            self._start_watch(kind, namespace)

    def _start_watch(self, kind: str, namespace: str | None) -> None:
        watch, _ = self._scoped[(kind, namespace)]
        task = asyncio.create_task(watch.run(), name=f"watch {watch}")
        task.add_done_callback(_report_exit)
        self._tasks[(kind, namespace)] = task

    async def stop(self) -> None:
        """Cancel every watch and wait until each has closed its stream."""
        self._running = False
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- called by the sinks ------------------------------------------------------------------------

    def _store_of(self, kind: str) -> _Store:
        return self._versions[kind]

    def _watch_synced(self) -> None:
        if self._scope_known and all(sink.counted for _, sink in self._scoped.values()) \
                and not self.synced.is_set():
            logger.info("Secrets and ConfigMaps in scope listed: %s.",
                        ", ".join(f"{self.count(kind)} {RESOURCES[kind]}" for kind in self._versions))
            self.synced.set()
        waiting, self._waiters = self._waiters, []
        for namespace, waiter in waiting:
            if waiter.done():
                continue
            if self.synced_in(namespace):
                waiter.set_result(None)
            else:
                self._waiters.append((namespace, waiter))

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
        self.listed = False  # a LIST of it completed: the cache holds its objects
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
        self.listed, self.error = True, None
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


def namespace_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether kopf serves namespace ``name`` for ``--namespace`` ``patterns`` (any of them), by kopf's rules,
    so that the Secrets watched are those of the namespaces whose endpoints kopf delivers.

    A pattern is comma-separated globs. Its first glob decides the initial match (a leading ``!glob`` implies
    a ``*`` before it); then, left to right, ``!glob`` un-matches, and a later inclusive glob re-matches only a
    name the first glob matched.
    """
    return any(_matches_pattern(name, pattern) for pattern in patterns)


def _matches_pattern(name: str, pattern: str) -> bool:
    globs = [glob.strip() for glob in pattern.split(",")]
    if not globs or globs[0].startswith("!"):
        globs = ["*", *globs]
    initial = fnmatch.fnmatch(name, globs[0])
    matched = initial
    for glob in globs[1:]:
        if glob.startswith("!"):
            matched = matched and not fnmatch.fnmatch(name, glob.lstrip("!"))
        elif initial and fnmatch.fnmatch(name, glob):
            matched = True
    return matched


class NamespaceScope:
    """The namespaces that match ``patterns``, from a metadata-only watch of namespaces, added to and removed
    from ``cache`` as they come and go; the cache's barrier falls once the first LIST is through."""

    def __init__(self, client: kube.KubeClient, cache: MetadataCache, patterns: Sequence[str], *,
                 backoff: schedule.Backoff = kube.WATCH_BACKOFF) -> None:
        self.cache = cache
        self.patterns = tuple(patterns)
        self.current: set[str] = set()
        self.watch = kube.MetadataWatch(client, "namespaces", self, backoff=backoff)
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._complete = False
        self._listed = asyncio.Event()
        self._refused_logged = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.watch.run(), name=f"watch {self.watch}")
            self._task.add_done_callback(_report_exit)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def served(self) -> list[str]:
        """The matching namespaces, once the first LIST of namespaces is through."""
        await self._listed.wait()
        return sorted(self.current)

    # -- the watch's sink --------------------------------------------------------------------------

    def list_started(self) -> None:
        self._pending = set()

    def list_page(self, items: list[kube.JSON]) -> None:
        for item in items:
            name = (item.get("metadata") or {}).get("name")
            if isinstance(name, str) and namespace_matches(name, self.patterns):
                self._pending.add(name)

    def list_done(self, resource_version: str) -> None:
        for name in self.current - self._pending:
            self.cache.remove_namespace(name)
        for name in sorted(self._pending - self.current):
            logger.info("Serving namespace %s.", name)
            self.cache.add_namespace(name)
        self.current, self._pending = self._pending, set()
        if not self._complete:
            self._complete = True
            self._listed.set()
            self.cache.scope_complete()

    def watch_event(self, event_type: str, obj: kube.JSON) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not namespace_matches(name, self.patterns):
            return
        if event_type == "DELETED":
            if name in self.current:
                self.current.discard(name)
                self.cache.remove_namespace(name)
        elif name not in self.current:
            logger.info("Serving namespace %s.", name)
            self.current.add(name)
            self.cache.add_namespace(name)

    def failed(self, error: kube.KubeError) -> None:
        if error.status == 403 and not self._refused_logged:
            self._refused_logged = True
            logger.error("Not allowed to list namespaces: namespace patterns %s need list and watch on namespaces "
                         "(manifests/rbac-namespace-patterns.yaml); retrying.", ",".join(self.patterns))


class SourceView:
    """The controller's view of the sources (:class:`secured_endpoint.controller.SourceIndex`) over the cache.

    A referenced Secret or ConfigMap that the cache cannot see although it exists — it lacks the labels of
    ``SEP_SOURCE_LABEL_SELECTOR``, or its namespace's watch is refused — would look "changed since the token
    was issued" after every status write, and the controller would fetch again and again. For such a source the
    view answers with the version the endpoint's status recorded (its last GET of it), and says once in the log
    that its rotation is only noticed at the next refresh.
    """

    def __init__(self, cache: MetadataCache, *, source_labels: Mapping[str, str] | None = None) -> None:
        self.cache = cache
        self._labels = dict(source_labels or {})
        self._unwatched: dict[tuple[str, api.SourceRef], str] = {}  # version last recorded
        self._warned: set[tuple[str, api.SourceRef]] = set()

    def _blind(self, namespace: str, ref: api.SourceRef) -> bool:
        return bool(self._labels) or not self.cache.watching(namespace, ref.kind)

    def source_version(self, namespace: str, ref: api.SourceRef) -> str | None:
        version = self.cache.source_version(namespace, ref.kind, ref.name)
        if version is None and self._blind(namespace, ref):
            return self._unwatched.get((namespace, ref))
        return version

    def target_fingerprint(self, namespace: str, secret_name: str) -> str | None:
        return self.cache.target_fingerprint(namespace, secret_name)

    def unwatched_hint(self, namespace: str, refs: Iterable[api.SourceRef]) -> str | None:
        """Label mode: a status hint naming the referenced sources this operator cannot see change (None: all
        are watched). Only meaningful right after they were read, i.e. while they exist."""
        if not self._labels:
            return None
        unseen = sorted(str(ref) for ref in refs if self.cache.source_version(namespace, ref.kind, ref.name) is None)
        if not unseen:
            return None
        labels = ",".join(f"{key}={value}" for key, value in self._labels.items())
        return (f"{', '.join(unseen)} not labelled {labels}: a change to {'them' if len(unseen) > 1 else 'it'} "
                "is picked up at the next refresh, not at once")

    def learn(self, body: Mapping[str, Any]) -> None:
        """Note the source versions an endpoint's status recorded for sources the cache cannot see (a restart,
        or another replica's writes)."""
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        recorded = (body.get("status") or {}).get("sourceVersions") or {}
        if isinstance(namespace, str) and isinstance(recorded, Mapping):
            self.read_at(namespace, recorded, name)

    def read_at(self, namespace: str, versions: Mapping[str, Any], endpoint: object) -> None:
        """Note the versions a token was just made from (the leader's own reads, before their status echo)."""
        for text, version in versions.items():
            kind, _, source_name = str(text).partition("/")
            if kind not in RESOURCES or not source_name or not isinstance(version, str):
                continue
            ref = api.SourceRef(kind, source_name)
            if not self._blind(namespace, ref) or self.cache.source_version(namespace, kind, source_name) is not None:
                self._unwatched.pop((namespace, ref), None)
                self._warned.discard((namespace, ref))
                continue
            self._unwatched[(namespace, ref)] = version
            if (namespace, ref) not in self._warned:
                self._warned.add((namespace, ref))
                self._warn(namespace, ref, endpoint)

    def _warn(self, namespace: str, ref: api.SourceRef, endpoint: object) -> None:
        if not self._labels:
            logger.warning("%s in namespace %s (used by SecuredEndpoint %s) cannot be watched (no list/watch "
                           "permission there): a change to it is only picked up at the next refresh.",
                           ref, namespace, endpoint)
            return
        labels = " ".join(f"{key}={value}" for key, value in self._labels.items())
        logger.warning(
            "%s in namespace %s (used by SecuredEndpoint %s) lacks the label %s, so this operator does not "
            "watch it: a change to it is only picked up at the next refresh. Label it to have a rotation "
            "noticed at once: kubectl label -n %s %s %s %s",
            ref, namespace, endpoint, labels, namespace, ref.kind.lower(), ref.name, labels)
