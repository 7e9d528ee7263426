"""kopf handlers, and nothing else: hand events over to the controller, start and stop the collaborators.

kopf watches the SecuredEndpoints, through ``on.event`` handlers only: they write nothing to the objects (no
``last-handled-configuration`` annotation, no progress in status), so a change costs no extra PATCH. The
operator's own finalizer is managed by the controller.

Secrets and ConfigMaps are not kopf's: the operator's own metadata-only watches (:mod:`secured_endpoint.sources`)
keep a resourceVersion per object and the fingerprint of each token Secret, whatever their number. No endpoint
is handed to the controller before its namespace's Secrets and ConfigMaps are listed, so after a restart the
controller sees every credential rotated while it was down before its first decision.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Iterable
from typing import Any

import kopf
from kopf._core.reactor import observation as kopf_observation

from secured_endpoint import api, kube, leader, metrics, schedule, sources, tokens
from secured_endpoint.controller import Controller
from secured_endpoint.duties import LeaderDuties, TakeIn
from secured_endpoint.health import Check, HealthServer
from secured_endpoint.settings import OperatorSettings, RedisSettings
from secured_endpoint.targets.base import Target
from secured_endpoint.targets.redis import RedisTarget, UnconfiguredRedis
from secured_endpoint.targets.secret import SecretTarget

logger = logging.getLogger(__name__)

registry = kopf.OperatorRegistry()


@kopf.on.login(registry=registry)
async def login(*, memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials: at start the ones the operator loaded for itself; when kopf asks again (a 401: the
    service-account token rotated), loaded afresh."""
    credentials: kube.Credentials | None = memo.pop("credentials", None)
    if credentials is None:
        credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=memo.get("kubeconfig"))
    return kopf.ConnectionInfo(server=credentials.server, ca_path=credentials.ca_path, insecure=credentials.insecure,
                               token=credentials.token, certificate_path=credentials.cert_path,
                               private_key_path=credentials.key_path)


class _NoDiffBase(kopf.DiffBaseStorage):
    """No essence, no diff. kopf builds both for every event (a deep copy of the object) for its on.create and
    on.update handlers; the operator has none (kopf only delivers events), so they were never read and cost
    about 4% of the CPU of a refresh, whose status write comes back as an event."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup(registry=registry)
async def start(*, settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    # kopf's own bookkeeping, if any, goes to annotations: the status schema stays ours alone
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.watching.chunk_size = 500  # page the initial LIST of SecuredEndpoints in large clusters
    settings.posting.enabled = False  # the controller posts its own, explicit Events
    operator_settings: OperatorSettings = memo["operator_settings"]
    clusterwide: bool = memo.get("clusterwide", True)
    patterns: tuple[str, ...] = tuple(memo.get("namespaces", ()))
    configure_watches(settings, clusterwide=clusterwide, namespaces=patterns)
    credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=memo.get("kubeconfig"))
    memo["credentials"] = credentials  # for kopf's login, which comes after the start-up handlers
    client = kube.KubeClient(credentials, max_in_flight=operator_settings.kube_max_in_flight)
    if operator_settings.health_port:  # answering (live, not ready) while it waits for the apiserver below
        health = HealthServer(live=_live_checks(memo), ready=_ready_checks(memo), port=operator_settings.health_port)
        await health.start()
        memo["health"] = health
    await _until_served(client)
    token_client = tokens.TokenClient(timeout=operator_settings.token_timeout_seconds,
                                      connect_timeout=operator_settings.token_connect_timeout_seconds)
    redis_settings: RedisSettings = memo["redis_settings"]
    redis = RedisTarget.from_settings(redis_settings)
    exact = not clusterwide and all(_exact_namespace(pattern) for pattern in patterns)
    # Namespace patterns: one cluster-wide watch per kind where RBAC allows it (the cache holds metadata only,
    # so the other namespaces' Secrets cost little), else two watches per matching namespace
    by_namespace = not clusterwide and not exact and not all(
        [await client.may_list_everywhere(resource) for resource in sources.RESOURCES.values()])
    cache = sources.MetadataCache(client, namespaces=list(patterns) if exact else None,
                                  label_selector=operator_settings.source_label_selector,
                                  namespaces_to_come=by_namespace)
    view = sources.SourceView(cache, source_labels=operator_settings.source_labels)
    targets: list[Target] = [
        SecretTarget(client, labels=operator_settings.source_labels, held=view.target_fingerprint),
        redis if redis is not None else UnconfiguredRedis(),
    ]
    controller = Controller(client=client, token_client=token_client, settings=operator_settings,
                            index=view, targets=targets)
    cache.on_change = _source_changed(controller)
    memo.update(controller=controller, cache=cache, view=view, redis=redis)
    if operator_settings.source_label_selector:
        logger.info("Watching only the Secrets and ConfigMaps labelled %s.", operator_settings.source_label_selector)
    await cache.start()
    if by_namespace:
        scope = sources.NamespaceScope(client, cache, patterns)
        memo["namespace_scope"] = scope
        await scope.start()
    duties = LeaderDuties(controller, redis, _take_in(client, cache, view, controller, memo.get("namespace_scope"),
                                                     clusterwide=clusterwide, exact=exact, patterns=patterns))
    memo["duties"] = duties
    if redis is not None:
        metrics.watch_redis(lambda: redis.available)
    if operator_settings.leader_election:
        metrics.set_leader(False)
        # a client of its own: a renewal never waits behind a burst of refresh writes
        election_client = kube.KubeClient(credentials, max_in_flight=2)
        memo["election_client"] = election_client
        elector = leader.LeaderElector.from_settings(election_client, operator_settings,
                                                     on_started_leading=duties.start, on_stopped_leading=duties.stop)
        memo["elector"] = elector
        memo["election"] = asyncio.create_task(elector.run(), name="leader election")
        memo["election"].add_done_callback(_election_ended)
    else:
        await duties.start()
    metrics.serve(operator_settings.metrics_port)
    logger.info("secured-endpoint-operator started.")


def _take_in(client: kube.KubeClient, cache: sources.MetadataCache, view: sources.SourceView,
             controller: Controller, scope: sources.NamespaceScope | None, *, clusterwide: bool, exact: bool,
             patterns: tuple[str, ...]) -> TakeIn:
    """Where the leader lists SecuredEndpoints itself: the namespaces kopf serves, by kopf's rules."""
    async def everywhere() -> list[str | None]:
        return [None]

    async def named() -> list[str | None]:
        return list(patterns)

    async def matching() -> list[str | None]:
        return list(await scope.served()) if scope is not None else [None]

    if clusterwide:
        return TakeIn(client, cache, view, controller, namespaces=everywhere)
    if exact:
        return TakeIn(client, cache, view, controller, namespaces=named)
    # patterns: one LIST of all where RBAC allows (as for the Secrets), else one per matching namespace
    return TakeIn(client, cache, view, controller, namespaces=matching,
                  serves=lambda namespace: sources.namespace_matches(namespace, patterns))


async def _until_served(client: kube.KubeClient) -> None:
    """Wait until the apiserver serves SecuredEndpoints. kopf looks the resource up once, right after the
    start-up handlers; an apiserver that is down or has just started (it answers before the custom resources'
    groups are registered) would leave kopf serving nothing, for ever."""
    failures = 0
    while not await client.serves(api.GROUP, api.VERSION, api.PLURAL):
        failures += 1
        if failures % 10 == 1:  # the first time, then about once a minute
            logger.warning("The apiserver does not serve %s.%s/%s yet (down, starting, or the CRD is missing); "
                           "waiting.", api.PLURAL, api.GROUP, api.VERSION)
        await asyncio.sleep(schedule.jittered_backoff(_DISCOVERY_BACKOFF, failures=failures, rng=_rng))
    if failures:
        logger.info("The apiserver serves %s.%s now.", api.PLURAL, api.GROUP)


_DISCOVERY_BACKOFF = schedule.Backoff(base_seconds=0.25, cap_seconds=5.0)
_rng = random.Random()  # noqa: S311 - jitter only


class _UnservedWatch(logging.Handler):
    """Catches kopf's word that it cannot serve SecuredEndpoints (its one look-up failed despite
    :func:`_until_served`: the apiserver blinked in between) and stops the operator, which then exits non-zero
    so that the Pod is restarted, rather than running on healthy-looking and serving nothing."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.tripped = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Unresolved resources cannot be served") and api.PLURAL in message \
                and not self.tripped:
            self.tripped = True
            # kopf's own graceful stop, as for a SIGTERM (a stop flag other than an asyncio one would be waited
            # for in a thread that nothing wakes at a real SIGTERM)
            signal.raise_signal(signal.SIGTERM)


def configure_watches(settings: kopf.OperatorSettings, *, clusterwide: bool, namespaces: Iterable[str]) -> None:
    """What kopf observes beyond the SecuredEndpoints.

    Exact namespace names only (no glob, no negation): nothing cluster-wide is observed, so Roles in those
    namespaces are all the RBAC it needs. kopf would otherwise list and watch namespaces (to match patterns)
    and CRDs (to notice a CRD installed or changed while it runs); :func:`_until_served` makes sure the CRD
    is there before kopf looks.
    """
    patterns = list(namespaces)
    if not clusterwide and patterns and all(_exact_namespace(pattern) for pattern in patterns):
        settings.scanning.disabled = True


def _exact_namespace(pattern: str) -> bool:
    return not any(char in pattern for char in "!*?,")


def serve_listed_namespaces() -> None:
    """Make kopf serve a namespace that only a LIST of its namespace watch shows (namespace patterns).

    kopf (1.45.2, and upstream still) lists the namespaces once (``kopf/_core/reactor/observation.py:51``),
    then starts its namespace watch (``:78``), which lists them again and watches from that second LIST's
    resourceVersion (``kopf/_cogs/clients/watching.py:171-187``); but ``process_discovered_namespace_event``
    drops every listed namespace (type None, ``observation.py:156-157``). A namespace created between the two
    LISTs (in the moments after the operator starts), or before that watch relists after a 410, thus reaches
    kopf in no event it applies: kopf never watches its SecuredEndpoints until the operator restarts, while our
    NamespaceScope serves its Secrets. Here a listed namespace is applied as an added one is (kopf's own
    matching, which also drops one that is being deleted), and the orchestrator is woken only when that changes
    what kopf serves, so that a relist of many namespaces does not wake it once per namespace.
    """
    original = kopf_observation.process_discovered_namespace_event
    if getattr(original, "applies_listings", False):
        return

    async def process_discovered_namespace_event(*, raw_event: Any, namespaces: Any, insights: Any,
                                                 **kwargs: Any) -> None:
        if raw_event["type"] is not None:
            await original(raw_event=raw_event, namespaces=namespaces, insights=insights, **kwargs)
            return
        name = raw_event["object"]["metadata"]["name"]
        async with insights.revised:
            served = name in insights.namespaces
            kopf_observation.revise_namespaces(raw_events=[raw_event], insights=insights, namespaces=namespaces)
            if (name in insights.namespaces) != served:
                if not served:
                    logger.info("kopf serves namespace %s from its listing (no event of it came).", name)
                insights.revised.notify_all()

    process_discovered_namespace_event.applies_listings = True  # type: ignore[attr-defined]
    kopf_observation.process_discovered_namespace_event = process_discovered_namespace_event


@kopf.on.cleanup(registry=registry)
async def stop(*, memo: kopf.Memo, **_: Any) -> None:
    # SIGTERM: stop writing first, then hand the Lease over (a follower takes over at its next try)
    elector: leader.LeaderElector | None = memo.get("elector")
    if elector is not None:
        await elector.stop()
    duties: LeaderDuties | None = memo.get("duties")
    if duties is not None:
        await duties.stop()
    for watcher in (memo.get("namespace_scope"), memo.get("cache"), memo.get("health")):
        if watcher is not None:
            await watcher.stop()
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        await controller.token_client.aclose()
        await controller.client.aclose()
    election_client: kube.KubeClient | None = memo.get("election_client")
    if election_client is not None:
        await election_client.aclose()
    redis: RedisTarget | None = memo.get("redis")
    if redis is not None:
        await redis.aclose()


# The scheduler's loop wakes at least every MAX_SLEEP_SECONDS; three times that without a turn is a stuck loop.
_STUCK_AFTER = 3 * schedule.MAX_SLEEP_SECONDS


def _live_checks(memo: kopf.Memo) -> dict[str, Check]:
    def scheduler() -> tuple[bool, str]:
        controller: Controller | None = memo.get("controller")
        if controller is None:
            return True, "starting"
        if not controller.leading:
            return True, "not leading: nothing to schedule"
        turned = controller.scheduler.turned_at
        if turned is None:
            return True, "starting"
        idle = asyncio.get_running_loop().time() - turned
        return idle < _STUCK_AFTER, f"turned {idle:.1f} s ago"
    return {"event loop": lambda: (True, "answering"), "scheduler": scheduler}


def _ready_checks(memo: kopf.Memo) -> dict[str, Check]:
    def watches() -> tuple[bool, str]:
        cache: sources.MetadataCache | None = memo.get("cache")
        if cache is None:
            return False, "starting: waiting for the apiserver to serve SecuredEndpoints"
        if not cache.synced.is_set():
            return False, "listing the Secrets and ConfigMaps in scope"
        problems = cache.problems()
        return True, "; ".join(f"{watch}: {error}" for watch, error in problems.items()) or "listed"

    def role() -> tuple[bool, str]:
        controller: Controller | None = memo.get("controller")
        elector: leader.LeaderElector | None = memo.get("elector")
        if controller is None:
            return False, "starting"
        if controller.leading:
            return True, "leader"
        if elector is not None and elector.leader is not None:
            return True, f"following {elector.leader}, ready to take over"
        return False, "has not seen the Lease yet"
    return {"watches": watches, "role": role}


def _election_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.critical("Leader election stopped: %s; this replica will not lead again until restarted.",
                        type(task.exception()).__name__)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
async def endpoint_event(*, event: kopf.RawEvent, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    cache: sources.MetadataCache = memo["cache"]
    if namespace is not None:
        await cache.wait_synced(namespace)  # the restart barrier: its Secrets are known before any decision
    controller: Controller = memo["controller"]
    if event["type"] != "DELETED" and controller.outdated(event["object"]):
        return  # the leader's own take-in LIST showed a newer one
    view: sources.SourceView = memo["view"]
    view.learn(event["object"])  # before the controller looks at the sources' versions
    controller.observe(event["object"], event_type=event["type"])


def _source_changed(controller: Controller) -> sources.ChangeCallback:
    """What a change of a Secret or ConfigMap means to the controller."""
    def changed(kind: str, namespace: str, name: str, deleted: bool, fingerprint: str | None) -> None:
        logger.debug("Seen %s %s/%s %s.", kind, namespace, name, "deleted" if deleted else "changed")
        controller.source_changed(namespace, api.SourceRef(kind, name))
        if kind == sources.SECRET and (deleted or fingerprint is not None):
            controller.target_changed(SecretTarget.kind, namespace, name, None if deleted else fingerprint)
    return changed


def run(settings: OperatorSettings, redis_settings: RedisSettings, *, all_namespaces: bool,
        namespaces: Iterable[str], kubeconfig: str | None, liveness: str | None, verbose: bool) -> int:
    """Configure kopf's logging and run the operator with these handlers until it is stopped; the exit code."""
    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.PLAIN
    kopf.configure(verbose=verbose, log_format=log_format)
    for chatty in ("httpx", "httpcore"):  # one line per request and per socket step: noise, not news
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if not verbose:
        # kopf says "Handler ... succeeded" for every event of every watched Secret and ConfigMap; the
        # operator's own log says what happened to each endpoint
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    scope = list(namespaces)
    memo = kopf.Memo(operator_settings=settings, redis_settings=redis_settings, kubeconfig=kubeconfig,
                     clusterwide=all_namespaces, namespaces=tuple(scope))
    serve_listed_namespaces()
    unserved = _UnservedWatch()
    logging.getLogger("kopf").addHandler(unserved)
    try:
        # an identity of our own: kopf would otherwise ask getpass, which fails for a UID without a passwd entry
        kopf.run(registry=registry, clusterwide=all_namespaces, namespaces=scope, standalone=True,
                 liveness_endpoint=liveness, memo=memo,
                 identity=leader.default_identity())  # type: ignore[arg-type]  # kopf's NewType of str, unexported
    finally:
        logging.getLogger("kopf").removeHandler(unserved)
    if unserved.tripped:
        logger.error("kopf could not find the SecuredEndpoint resource when it started; exiting to start again.")
        return 1
    return 0
