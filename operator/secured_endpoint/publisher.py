"""Telling the world what happened to an endpoint, in one place: the status patch, the Event on a transition
of ``Ready``, the log line of a failure and the endpoint's metrics (expiry, next refresh, conditions), which
follow every status the operator writes.

A status write sends only the difference between what the apiserver holds and what should be there (a JSON
merge patch); nothing is sent when nothing a reader cares about changed. Events are posted only when the
``Ready`` condition changes status, or reason while not True (:func:`announced`), so a refresh every few
minutes does not flood ``kubectl describe``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field

from secured_endpoint import api, kube, metrics, status
from secured_endpoint.intake import Endpoint
from secured_endpoint.metrics import OperatorMetrics
from secured_endpoint.status import EndpointStatus

logger = logging.getLogger(__name__)


class Published(enum.Enum):
    WRITTEN = "written"  # or nothing to write
    GONE = "gone"  # no such endpoint (deleted meanwhile)


@dataclass
class StatusPublisher:
    client: kube.KubeClient
    component: str  # the Events' reporting component
    metrics: OperatorMetrics = field(default_factory=lambda: metrics.default)
    _posting: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)  # Events on their way

    async def publish(self, endpoint: Endpoint, wanted: EndpointStatus) -> Published | kube.KubeError:
        """Make the status ``wanted``; the apiserver's refusal if it refused (the caller tries again later, not
        before the error's ``retry_after``).
        A ``Ready=False`` status (but ``Suspended``) is a failure report: logged each time, not only on
        transitions. The endpoint's metrics follow whatever the apiserver now holds."""
        ready = wanted.ready
        if ready is not None and ready.status != "True" and ready.reason != api.Reason.SUSPENDED:
            logger.warning("%s/%s is not ready (%s): %s", endpoint.namespace, endpoint.name, ready.reason,
                           ready.message, extra=endpoint.log_fields(ready.reason))
        before = endpoint.recorded
        wanted_json = wanted.to_json()
        patch = status.merge_patch(endpoint.stored, wanted_json)
        if not patch:
            endpoint.recorded = wanted
            self.metrics.observe_status(endpoint.namespace, endpoint.name, wanted)
            return Published.WRITTEN
        try:
            await self.client.patch_endpoint_status(endpoint.namespace, endpoint.name, patch)
        except kube.KubeError as exc:
            if exc.not_found:
                return Published.GONE
            logger.warning("Could not write the status of %s/%s: %s", endpoint.namespace, endpoint.name, exc,
                           extra=endpoint.log_fields())
            return exc
        endpoint.recorded, endpoint.stored = wanted, wanted_json
        self.metrics.observe_status(endpoint.namespace, endpoint.name, wanted)
        await self._announce(endpoint, before.ready, wanted.ready)
        return Published.WRITTEN

    async def _announce(self, endpoint: Endpoint, before: status.Condition | None,
                        after: status.Condition | None) -> None:
        """Post the Event beside the job rather than in it: the status already says what happened, and waiting
        for the Event was one more round trip in every new endpoint's reconcile."""
        if after is None or not announced(before, after):
            return
        task = asyncio.create_task(self._post_event(endpoint.namespace, endpoint.name, endpoint.desired.uid, after))
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

    async def _post_event(self, namespace: str, name: str, uid: str, after: status.Condition) -> None:
        try:
            await self.client.post_event(
                namespace=namespace, name=name, uid=uid, event_type="Normal" if after.status == "True" else "Warning",
                reason=after.reason, message=after.message, component=self.component)
        except kube.KubeError as exc:
            logger.debug("Could not post an event for %s/%s: %s", namespace, name, exc)

    async def flush(self) -> None:
        """Wait for the Events on their way (at shutdown; bound it with ``asyncio.timeout``)."""
        if self._posting:
            await asyncio.wait(set(self._posting))



def announced(before: status.Condition | None, after: status.Condition | None) -> bool:
    """Is the change from ``before`` to ``after`` worth an Event? A change of ``Ready``'s status, or of its reason
    while it is not True; from one Ready reason to another (``TokenIssued`` → ``TokenRefreshed``: the first
    refresh) is routine, and an Event for it was one more API write per endpoint."""
    if after is None:
        return False
    if before is None or before.status != after.status:
        return True
    return after.status != "True" and before.reason != after.reason
