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
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from secured_endpoint import api, kube, metrics, tokens
from secured_endpoint.controller import Controller
from secured_endpoint.settings import OperatorSettings, RedisSettings
from secured_endpoint.targets.redis import RedisTarget

logger = logging.getLogger(__name__)

registry = kopf.OperatorRegistry()

_MANAGED = {api.MANAGED_BY_LABEL: api.MANAGED_BY_VALUE}


class KopfIndexes:
    """The controller's view of kopf's live indexes (see :class:`controller.SourceIndex`)."""

    def __init__(self, secret_versions: kopf.Index[Any, Any], configmap_versions: kopf.Index[Any, Any],
                 token_secrets: kopf.Index[Any, Any]) -> None:
        self._secrets = secret_versions
        self._configmaps = configmap_versions
        self._tokens = token_secrets

    def source_version(self, namespace: str, ref: api.SourceRef) -> str | None:
        index = self._configmaps if ref.kind == "ConfigMap" else self._secrets
        return _only(index, (namespace, ref.name))

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
    credentials = await asyncio.to_thread(kube.load_credentials, kubeconfig=memo.get("kubeconfig"))
    client = kube.KubeClient(credentials, max_in_flight=operator_settings.kube_max_in_flight)
    token_client = tokens.TokenClient(timeout=operator_settings.token_timeout_seconds,
                                      connect_timeout=operator_settings.token_connect_timeout_seconds)
    redis_settings: RedisSettings = memo["redis_settings"]
    redis = RedisTarget.from_settings(redis_settings)
    controller = Controller(client=client, token_client=token_client, settings=operator_settings,
                            index=KopfIndexes(kwargs["secret_versions"], kwargs["configmap_versions"],
                                              kwargs["token_secrets"]), redis=redis)
    memo["controller"] = controller
    await controller.start()
    if redis is not None:
        memo["redis_tasks"] = [
            asyncio.create_task(_serve_refresh_requests(controller, redis), name="redis refresh requests"),
            asyncio.create_task(redis.watch_availability(_on_redis_restored(controller)),
                                name="redis availability"),
        ]
    metrics.serve(operator_settings.metrics_port)
    logger.info("secured-endpoint-operator started.")


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
        if controller.redis is not None:
            await controller.redis.aclose()


async def _serve_refresh_requests(controller: Controller, redis: RedisTarget) -> None:
    """Gateways that saw a 401 ask here (SPEC §4); the controller decides whether it is still news."""
    async for namespace, name, fingerprint in redis.refresh_requests():
        if controller.request_refresh((namespace, name), fingerprint):
            logger.info("Refresh of %s/%s requested by a gateway.", namespace, name)


def _on_redis_restored(controller: Controller) -> Callable[[], Awaitable[None]]:
    async def restored() -> None:
        controller.redis_restored()
    return restored


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
async def endpoint_event(*, event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
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
        controller.target_changed(namespace, name, None if deleted else _fingerprint_of(body))


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
