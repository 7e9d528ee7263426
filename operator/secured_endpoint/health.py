"""The probes Kubernetes asks: ``/livez`` (restart me?) and ``/readyz`` (count me in?), on ``SEP_HEALTH_PORT``.

- **live**: the event loop answers (a stuck loop answers nothing, and the probe times out) and, while this
  replica leads, the scheduler turns: its loop wakes at least every few seconds, so a loop that has not
  turned for ``stuck_after`` seconds is stuck (a bug, a deadlock) and the Pod is better restarted.
- **ready**: the watches have listed every Secret and ConfigMap in scope, and the replica is either the leader
  or a follower that has seen the Lease — a warm standby that can take over without a relist.

The answers are small JSON objects naming each check, for ``kubectl describe pod`` and for people.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

logger = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]  # (passes, why)


@dataclass
class HealthServer:
    live: Mapping[str, Check]
    ready: Mapping[str, Check]
    port: int
    host: str = "0.0.0.0"  # noqa: S104 - the kubelet probes the Pod's address
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/livez", self._answer(self.live)), web.get("/readyz", self._answer(self.ready))])
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        logger.info("Probes at :%d/livez and /readyz.", self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @staticmethod
    def _answer(checks: Mapping[str, Check]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def answer(request: web.Request) -> web.StreamResponse:
            results = {name: check() for name, check in checks.items()}
            body = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in results.items()}
            healthy = all(ok for ok, _ in results.values())
            return web.json_response(body, status=200 if healthy else 503)
        return answer
