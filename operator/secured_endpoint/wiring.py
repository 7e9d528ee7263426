"""kopf handlers and indexes, and nothing else: validate, look up, hand over to the controller.

Only ``on.event`` handlers and indexes are used: they write nothing to the objects (no
``last-handled-configuration`` annotation, no progress in status), so a change costs no extra PATCH.
The operator's own finalizer is managed by the controller. kopf runs no handler before every index
is filled, so after a restart the controller sees the cluster's Secrets before its first decision.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import kopf

from secured_endpoint import api, kube, metrics, tokens
from secured_endpoint.controller import Controller
from secured_endpoint.settings import OperatorSettings, RedisSettings
from secured_endpoint.targets.base import Target
from secured_endpoint.targets.redis import RedisTarget, UnconfiguredRedis
from secured_endpoint.targets.secret import SecretTarget

logger = logging.getLogger(__name__)

registry = kopf.OperatorRegistry()

_MANAGED = {api.MANAGED_BY_LABEL: api.MANAGED_BY_VALUE}


class KopfIndexes:
    """The controller's view of kopf's live indexes (see :class:`controller.SourceIndex`).

    With ``SEP_SOURCE_LABEL_SELECTOR`` kopf lists and watches only the labelled Secrets and ConfigMaps, so a
    referenced source without the label is missing from the index although it exists: the controller would
    take that for "changed since the token was issued" and fetch again after every status write. For such a
    source the index answers with the version the endpoints' status recorded (their last GET of it), and
    says once in the log that its rotation is only noticed at the next refresh unless it is labelled.
    """

    def __init__(self, secret_versions: kopf.Index[Any, Any], configmap_versions: kopf.Index[Any, Any],
                 token_secrets: kopf.Index[Any, Any], *, source_labels: Mapping[str, str] | None = None) -> None:
        self._secrets = secret_versions
        self._configmaps = configmap_versions
        self._tokens = token_secrets
        self._labels = dict(source_labels or {})
        self._unwatched: dict[tuple[str, api.SourceRef], str] = {}  # label mode: version last recorded
        self._warned: set[tuple[str, api.SourceRef]] = set()

    def source_version(self, namespace: str, ref: api.SourceRef) -> str | None:
        index = self._configmaps if ref.kind == "ConfigMap" else self._secrets
        version = _only(index, (namespace, ref.name))
        if version is None and self._labels:
            return self._unwatched.get((namespace, ref))
        return version

    def unwatched_hint(self, namespace: str, refs: Iterable[api.SourceRef]) -> str | None:
        """Label mode: a status hint naming the referenced sources this operator cannot see change (None: all
        are watched). Only meaningful right after they were read, i.e. while they exist."""
        if not self._labels:
            return None
        unseen = sorted(str(ref) for ref in refs if _only(
            self._configmaps if ref.kind == "ConfigMap" else self._secrets, (namespace, ref.name)) is None)
        if not unseen:
            return None
        labels = ",".join(f"{key}={value}" for key, value in self._labels.items())
        return (f"{', '.join(unseen)} not labelled {labels}: a change to {'them' if len(unseen) > 1 else 'it'} "
                "is picked up at the next refresh, not at once")

    def learn(self, body: Mapping[str, Any]) -> None:
        """Label mode: note the source versions an endpoint's status recorded for sources kopf cannot see."""
        if not self._labels:
            return
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        recorded = (body.get("status") or {}).get("sourceVersions") or {}
        if not isinstance(namespace, str) or not isinstance(recorded, Mapping):
            return
        for text, version in recorded.items():
            kind, _, source_name = str(text).partition("/")
            if kind not in ("Secret", "ConfigMap") or not source_name or not isinstance(version, str):
                continue
            ref = api.SourceRef(kind, source_name)
            index = self._configmaps if kind == "ConfigMap" else self._secrets
            if _only(index, (namespace, source_name)) is not None:
                self._unwatched.pop((namespace, ref), None)
                self._warned.discard((namespace, ref))
                continue
            self._unwatched[(namespace, ref)] = version
            if (namespace, ref) not in self._warned:
                self._warned.add((namespace, ref))
                labels = " ".join(f"{key}={value}" for key, value in self._labels.items())
                logger.warning(
                    "%s in namespace %s (used by SecuredEndpoint %s) lacks the label %s, so this operator does not "
                    "watch it: a change to it is only picked up at the next refresh. Label it to have a rotation "
                    "noticed at once: kubectl label -n %s %s %s %s",
                    ref, namespace, name, labels, namespace, kind.lower(), source_name, labels)

    def target_fingerprint(self, namespace: str, secret_name: str) -> str | None:
        return _only(self._tokens, (namespace, secret_name))


def _only(index: kopf.Index[Any, Any], key: tuple[str, str]) -> str | None:
    store = index.get(key)
    return next(iter(store), None) if store else None


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


@kopf.index("v1", "secrets", registry=registry)
def secret_versions(*, namespace: str | None, name: str, meta: kopf.Meta,
                    **_: Any) -> dict[tuple[str | None, str], str]:
    return {(namespace, name): meta["resourceVersion"]}


@kopf.index("v1", "configmaps", registry=registry)
def configmap_versions(*, namespace: str | None, name: str, meta: kopf.Meta,
                       **_: Any) -> dict[tuple[str | None, str], str]:
    return {(namespace, name): meta["resourceVersion"]}


@kopf.index("v1", "secrets", labels=_MANAGED, registry=registry)
def token_secrets(*, namespace: str | None, name: str, body: kopf.Body,
                  **_: Any) -> dict[tuple[str | None, str], str]:
    return {(namespace, name): _fingerprint_of(body)}


@kopf.on.startup(registry=registry)
async def start(*, settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    # kopf's own bookkeeping, if any, goes to annotations: the status schema stays ours alone
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=api.GROUP)
    settings.watching.chunk_size = 500  # page the initial LIST of Secrets in large clusters
    settings.posting.enabled = False  # the controller posts its own, explicit Events
    operator_settings: OperatorSettings = memo["operator_settings"]
    configure_watches(settings, operator_settings, clusterwide=memo.get("clusterwide", True),
                      namespaces=memo.get("namespaces", ()))
    credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=memo.get("kubeconfig"))
    client = kube.KubeClient(credentials, max_in_flight=operator_settings.kube_max_in_flight)
    token_client = tokens.TokenClient(timeout=operator_settings.token_timeout_seconds,
                                      connect_timeout=operator_settings.token_connect_timeout_seconds)
    redis_settings: RedisSettings = memo["redis_settings"]
    redis = RedisTarget.from_settings(redis_settings)
    indexes = KopfIndexes(kwargs["secret_versions"], kwargs["configmap_versions"], kwargs["token_secrets"],
                          source_labels=operator_settings.source_labels)
    targets: list[Target] = [
        SecretTarget(client, labels=operator_settings.source_labels, held=indexes.target_fingerprint),
        redis if redis is not None else UnconfiguredRedis(),
    ]
    controller = Controller(client=client, token_client=token_client, settings=operator_settings,
                            index=indexes, targets=targets)
    memo["controller"] = controller
    memo["indexes"] = indexes
    memo["redis"] = redis
    await controller.start()
    if redis is not None:
        memo["redis_tasks"] = [
            asyncio.create_task(_serve_refresh_requests(controller, redis), name="redis refresh requests"),
            asyncio.create_task(redis.watch_availability(_on_redis_restored(controller)),
                                name="redis availability"),
        ]
    metrics.serve(operator_settings.metrics_port)
    logger.info("secured-endpoint-operator started.")


def configure_watches(settings: kopf.OperatorSettings, operator_settings: OperatorSettings, *,
                      clusterwide: bool, namespaces: Iterable[str]) -> None:
    """What kopf lists and watches beyond the SecuredEndpoints.

    - ``SEP_SOURCE_LABEL_SELECTOR``: a ``labelSelector`` on kopf's LIST and WATCH requests for Secrets and
      ConfigMaps (kopf's ``settings.watching.label_selectors``), so the apiserver sends only the labelled
      ones; unlike a handler's ``labels=`` filter, which kopf applies after receiving every object.
    - Exact namespace names only (no glob, no negation): nothing cluster-wide is observed, so Roles in those
      namespaces are all the RBAC it needs. kopf would otherwise list and watch namespaces (to match
      patterns) and CRDs (to notice a CRD installed or changed while it runs). The CRD must then exist
      when the operator starts.
    """
    selector = operator_settings.source_label_selector
    if selector:
        for resource in (("v1", "secrets"), ("v1", "configmaps")):
            settings.watching.label_selectors[resource] = selector
        logger.info("Watching only the Secrets and ConfigMaps labelled %s.", selector)
    patterns = list(namespaces)
    if not clusterwide and patterns and all(_exact_namespace(pattern) for pattern in patterns):
        settings.scanning.disabled = True


def _exact_namespace(pattern: str) -> bool:
    return not any(char in pattern for char in "!*?,")


@kopf.on.cleanup(registry=registry)
async def stop(*, memo: kopf.Memo, **_: Any) -> None:
    tasks = memo.get("redis_tasks", [])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # finished before their connection closes
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        await controller.stop()
        await controller.token_client.aclose()
        await controller.client.aclose()
    redis: RedisTarget | None = memo.get("redis")
    if redis is not None:
        await redis.aclose()


async def _serve_refresh_requests(controller: Controller, redis: RedisTarget) -> None:
    """Gateways that saw a 401 ask here (docs/contract.md §4); the controller decides whether it is still news."""
    async for namespace, name, fingerprint in redis.refresh_requests():
        if controller.request_refresh((namespace, name), fingerprint):
            logger.info("Refresh of %s/%s requested by a gateway.", namespace, name)


def _on_redis_restored(controller: Controller) -> Callable[[], Awaitable[None]]:
    async def restored() -> None:
        controller.rewrite_all(RedisTarget.kind)
    return restored


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
async def endpoint_event(*, event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    indexes: KopfIndexes = memo["indexes"]
    indexes.learn(event["object"])  # before the controller looks at the sources' versions
    _controller(memo).observe(event["object"], event_type=event["type"])


@kopf.on.event("v1", "secrets", registry=registry)
async def secret_event(*, event: kopf.RawEvent, namespace: str | None, name: str, labels: kopf.Labels,
                       body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if namespace is None:
        return
    controller = _controller(memo)
    controller.source_changed(namespace, api.SourceRef("Secret", name))
    if labels.get(api.MANAGED_BY_LABEL) == api.MANAGED_BY_VALUE:
        deleted = event["type"] == "DELETED"
        controller.target_changed(SecretTarget.kind, namespace, name, None if deleted else _fingerprint_of(body))


@kopf.on.event("v1", "configmaps", registry=registry)
async def configmap_event(*, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    if namespace is not None:
        _controller(memo).source_changed(namespace, api.SourceRef("ConfigMap", name))


def _controller(memo: kopf.Memo) -> Controller:
    controller: Controller = memo["controller"]
    return controller


def _fingerprint_of(body: kopf.Body) -> str:
    encoded = (body.get("data") or {}).get("fingerprint", "")
    try:
        return base64.b64decode(encoded).decode()
    except ValueError:
        return ""


def run(settings: OperatorSettings, redis_settings: RedisSettings, *, all_namespaces: bool,
        namespaces: Iterable[str], kubeconfig: str | None, liveness: str | None, verbose: bool) -> None:
    """Configure kopf's logging and run the operator with these handlers until it is stopped."""
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
    kopf.run(registry=registry, clusterwide=all_namespaces, namespaces=scope, standalone=True,
             liveness_endpoint=liveness, memo=memo)
