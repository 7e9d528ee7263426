"""What only the leader does, started and stopped as leadership comes and goes (docs/contract.md §7).

A replica that does not lead keeps its watches warm and its picture of every endpoint current (the
controller adopts the status the leader writes), but plans nothing, requests no token and writes nothing. When
it becomes the leader it starts the scheduler over the endpoints it already knows, subscribes to the gateways'
refresh requests and watches Redis' availability; when it stops leading it stops all of that again — within
the few seconds the Lease leaves before a rival may take over.

At each take-over the new leader also lists every SecuredEndpoint in its scope itself (:class:`TakeIn`) and
plans them at once, rather than only as kopf delivers them, one object at a time and in the same order every
time: a replica restarted again and again would otherwise spend each short life on the same first few hundred
endpoints while the tokens of the rest expire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from secured_endpoint import kube, metrics, sources
from secured_endpoint.controller import Controller
from secured_endpoint.targets.redis import RedisTarget

logger = logging.getLogger(__name__)


class TakeIn:
    """The leader's own LIST of the SecuredEndpoints it serves, fed to the controller as kopf's listing would be
    (after the same restart barrier), page by page. kopf's events of the same objects follow as echoes.

    ``namespaces()`` says where to list (None: cluster-wide) and ``serves(namespace)`` which listed namespaces
    kopf serves (namespace patterns). A failed LIST costs nothing but time: kopf's own listing brings them all."""

    def __init__(self, client: kube.KubeClient, cache: sources.MetadataCache, view: sources.SourceView,
                 controller: Controller, *, namespaces: Callable[[], Awaitable[Sequence[str | None]]],
                 serves: Callable[[str], bool] = lambda _: True, timeout: float = 60.0) -> None:
        self.client, self.cache, self.view, self.controller = client, cache, view, controller
        self.namespaces, self.serves, self.timeout = namespaces, serves, timeout

    async def run(self) -> None:
        started = time.monotonic()
        taken = 0
        refused: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                for namespace in await self.namespaces():
                    try:
                        taken += await self._take_in(namespace)
                    except kube.KubeError as exc:
                        if namespace is None:
                            raise
                        refused.append(f"{namespace} ({exc.status})")  # e.g. its Role not there yet
        except (kube.KubeError, TimeoutError) as exc:
            logger.warning("Taking in the SecuredEndpoints by a LIST of its own failed after %d (%s); kopf's "
                           "listing brings the others.", taken, exc or "timed out")
            return
        logger.info("Leading: took in %d endpoints from a LIST of its own in %.1f s%s.", taken,
                    time.monotonic() - started, _refused_note(refused))

    async def _take_in(self, namespace: str | None) -> int:
        taken = 0
        async for page in self.client.endpoint_pages(namespace=namespace):
            for body in page:
                where = str((body.get("metadata") or {}).get("namespace", ""))
                if not self.serves(where) or not self.controller.leading:
                    continue
                await self.cache.wait_synced(where)  # the restart barrier, as for kopf's events
                self.view.learn(body)
                self.controller.take_in(body)
                taken += 1
            await asyncio.sleep(0)  # a page at a time: renewals and refreshes go on meanwhile
        return taken


def _refused_note(refused: list[str]) -> str:
    if not refused:
        return ""
    shown = ", ".join(refused[:5])
    return f"; not listed in {len(refused)} namespaces: {shown}{', ...' if len(refused) > 5 else ''}"


class LeaderDuties:
    def __init__(self, controller: Controller, redis: RedisTarget | None, take_in: TakeIn | None = None) -> None:
        self.controller = controller
        self.redis = redis
        self.take_in = take_in
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def active(self) -> bool:
        return self.controller.leading

    async def start(self) -> None:
        if self.controller.leading:
            return
        logger.info("Leading: refreshing the tokens of %d endpoints.", len(self.controller.registry))
        await self.controller.start_leading()
        metrics.set_leader(True)
        if self.take_in is not None:
            self._tasks.append(asyncio.create_task(self.take_in.run(), name="take in endpoints"))
        if self.redis is not None:
            self._tasks += [
                asyncio.create_task(self._serve_refresh_requests(self.redis), name="redis refresh requests"),
                asyncio.create_task(self.redis.watch_availability(self._redis_restored), name="redis availability"),
            ]

    async def stop(self) -> None:
        if not self.controller.leading:
            return
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # finished before their connection closes
        await self.controller.stop_leading()
        metrics.set_leader(False)
        logger.info("Not leading any more: no refresh and no write from this replica.")

    async def _serve_refresh_requests(self, redis: RedisTarget) -> None:
        """Gateways that saw a 401 ask here (docs/contract.md §4); the controller decides whether it is news."""
        async for namespace, name, fingerprint in redis.refresh_requests():
            if self.controller.request_refresh((namespace, name), fingerprint):
                logger.info("Refresh of %s/%s requested by a gateway.", namespace, name)

    async def _redis_restored(self) -> None:
        self.controller.rewrite_all(RedisTarget.kind)
