"""kopf's namespace observer, with :func:`secured_endpoint.wiring.serve_listed_namespaces`: a namespace that only
a LIST of kopf's namespace watch shows (created between kopf's two LISTs at start-up, or before a relist) is
served, through kopf's own matching and its own ``Insights``; the orchestrator is woken only when what kopf
serves changes; events other than listings are kopf's as before.

Also pins the kopf behaviour the fix works around (listed namespaces dropped): should a kopf upgrade fix it,
that test fails and the workaround can go.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kopf._cogs.structs import references
from kopf._core.reactor import observation

from secured_endpoint import wiring

PATTERNS = ["p-*"]


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve_listed_namespaces() for one test; kopf's own processor is put back afterwards."""
    monkeypatch.setattr(observation, "process_discovered_namespace_event",
                        observation.process_discovered_namespace_event)
    wiring.serve_listed_namespaces()


def _event(event_type: str | None, name: str, **metadata: Any) -> Any:
    body: dict[str, Any] = {"metadata": {"name": name, **metadata}}
    if "deletionTimestamp" in metadata:  # kopf takes a namespace for deleted once it is marked and has conditions
        body["status"] = {"conditions": [{"type": "NamespaceDeletionContentFailure", "status": "False"}]}
    return {"type": event_type, "object": body}


async def _process(event: Any, insights: references.Insights) -> None:
    await observation.process_discovered_namespace_event(raw_event=event, namespaces=PATTERNS, insights=insights)


async def _woken_by(event: Any, insights: references.Insights) -> bool:
    """Does processing ``event`` wake a waiter on ``insights.revised``, as kopf's orchestrator waits?"""
    async def wait() -> None:
        async with insights.revised:
            await insights.revised.wait()

    waiter = asyncio.create_task(wait())
    await asyncio.sleep(0)  # the waiter is waiting
    await _process(event, insights)
    await asyncio.sleep(0)
    woken = waiter.done()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    return woken


async def test_unpatched_kopf_drops_a_listed_namespace() -> None:
    insights = references.Insights()
    await _process(_event(None, "p-new"), insights)
    assert insights.namespaces == set(), "kopf now applies listings: serve_listed_namespaces may go"


async def test_a_listed_namespace_is_served_and_wakes_the_orchestrator(patched: None) -> None:
    insights = references.Insights()
    assert await _woken_by(_event(None, "p-new"), insights)
    assert insights.namespaces == {"p-new"}


async def test_a_listed_namespace_already_served_wakes_nothing(patched: None) -> None:
    insights = references.Insights(namespaces={"p-old"})
    assert not await _woken_by(_event(None, "p-old"), insights)
    assert not await _woken_by(_event(None, "q-other"), insights), "not matched by the patterns"
    assert insights.namespaces == {"p-old"}


async def test_a_listed_namespace_being_deleted_is_dropped(patched: None) -> None:
    insights = references.Insights(namespaces={"p-going"})
    assert await _woken_by(_event(None, "p-going", deletionTimestamp="2026-01-01T00:00:00Z"), insights)
    assert insights.namespaces == set()


async def test_watch_events_are_kopfs_as_before(patched: None) -> None:
    insights = references.Insights()
    assert await _woken_by(_event("ADDED", "p-added"), insights)
    assert await _woken_by(_event("ADDED", "p-added"), insights), "kopf's own processor wakes at every event"
    await _process(_event("DELETED", "p-added"), insights)
    assert insights.namespaces == set()


def test_installed_once(patched: None) -> None:
    installed = observation.process_discovered_namespace_event
    wiring.serve_listed_namespaces()
    assert observation.process_discovered_namespace_event is installed
