"""What only the leader does, started and stopped as leadership comes and goes (docs/contract.md §7).

A replica that does not lead keeps its watches warm and its picture of every endpoint current (the
controller adopts the status the leader writes), but plans nothing, requests no token and writes nothing. When
it becomes the leader it starts the scheduler over the endpoints it already knows, subscribes to the gateways'
refresh requests and watches Redis' availability; when it stops leading it stops all of that again — within
the few seconds the Lease leaves before a rival may take over.
"""

from __future__ import annotations

import asyncio
import logging

from secured_endpoint import metrics
from secured_endpoint.controller import Controller
from secured_endpoint.targets.redis import RedisTarget

logger = logging.getLogger(__name__)


class LeaderDuties:
    def __init__(self, controller: Controller, redis: RedisTarget | None) -> None:
        self.controller = controller
        self.redis = redis
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
        if self.redis is not None:
            self._tasks = [
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
