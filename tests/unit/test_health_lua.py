"""Argo CD's view of a SecuredEndpoint: health.lua and the "refresh" action run in a real Lua 5.1 (lupa, the
Lua version of Argo CD's gopher-lua), in a sandbox with only what Argo CD's VM offers (base without file
loading, string, table, math, os.date/os.time/os.clock); and the kstatus conditions of ``status.with_health``.

Cases:
- health: no status yet / an empty one → Progressing; a status or Ready condition for an older generation →
  Progressing; Ready Unknown → Progressing; Ready True (TokenIssued, TokenRefreshed) → Healthy with the
  operator's message; Ready False with each failure reason → Degraded naming the reason (with "needs a
  change" when Stalled, the retry time when Reconciling; a Ready-only status from an operator without
  kstatus conditions too); Suspended → Suspended;
- the Argo CD test table next to health.lua (health_test.yaml + testdata/, objects captured from a running
  operator) gives the expected verdicts;
- the action: discovery offers "refresh"; running it sets secured-endpoint.io/refresh-requested-at to the
  current UTC time, creates the annotations if there are none, keeps the others and touches nothing else;
- argocd-cm.yaml embeds exactly these scripts;
- ``status.with_health``: Ready plus Reconciling (retry planned) or Stalled (a change needed), neither when
  Ready or Suspended, each with observedGeneration, lastTransitionTime kept while a status holds, and the
  kstatus verdict (Current / InProgress / Failed) each gives.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import pytest
import yaml

from secured_endpoint import api, status
from secured_endpoint.status import EndpointStatus

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "examples" / "gitops" / "argocd"
CUSTOMIZATION = ARGOCD / "resource_customizations" / "secured-endpoint.io" / "SecuredEndpoint"
HEALTH = CUSTOMIZATION / "health.lua"
DISCOVERY = CUSTOMIZATION / "actions" / "discovery.lua"
REFRESH = CUSTOMIZATION / "actions" / "refresh" / "action.lua"

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
FAILURES = [reason for reason in api.Reason
            if reason not in (api.Reason.TOKEN_ISSUED, api.Reason.TOKEN_REFRESHED, api.Reason.SUSPENDED)]
# what only a change of the spec or of a referenced object can mend (the controller tells with_health so)
NEEDS_CHANGE = {api.Reason.CREDENTIALS_NOT_FOUND, api.Reason.INVALID_CREDENTIALS, api.Reason.INVALID_SPEC,
                api.Reason.CLIENT_KEY_INVALID}

# Argo CD's Lua VM: no io, no file or module loading
_SANDBOX = """
io, require, dofile, loadfile, load, loadstring, module, package, debug = nil, nil, nil, nil, nil, nil, nil, nil, nil
os = {date = os.date, time = os.time, clock = os.clock}
"""


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, Mapping):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def _from_lua(value: Any) -> Any:
    if lua51.lua_type(value) == "table":
        items = dict(value.items())
        if items and all(isinstance(k, int) for k in items) and sorted(items) == list(range(1, len(items) + 1)):
            return [_from_lua(items[k]) for k in sorted(items)]
        return {k: _from_lua(v) for k, v in items.items()}
    return value


def run_lua(script: Path, obj: Mapping[str, Any] | None) -> Any:
    """Run an Argo CD script with the global ``obj`` as Argo CD does; return what it returns, as Python."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.execute(_SANDBOX)
    if obj is not None:
        runtime.globals().obj = _to_lua(runtime, obj)
    return _from_lua(runtime.execute(script.read_text()))


def health(obj: Mapping[str, Any]) -> dict[str, str]:
    result = run_lua(HEALTH, obj)
    assert isinstance(result, dict), result
    assert set(result) <= {"status", "message"}
    return result


def endpoint(status_json: Mapping[str, Any] | None, *, generation: int = 2) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": f"{api.GROUP}/{api.VERSION}", "kind": api.KIND,
                            "metadata": {"name": "orders", "namespace": "shop", "generation": generation},
                            "spec": {"tokenUrl": "https://idp.example.com/token", "clientSecretRef": {"name": "o"}}}
    if status_json is not None:
        body["status"] = status_json
    return body


def healthy_status(reason: api.Reason = api.Reason.TOKEN_ISSUED, generation: int = 2) -> EndpointStatus:
    return status.with_health(EndpointStatus(expires_at=NOW + timedelta(hours=1)), ready=True, reason=reason,
                              message="token valid until 2026-05-01T13:00:00Z; next refresh at 2026-05-01T12:40:00Z",
                              generation=generation, now=NOW)


def failed_status(reason: api.Reason, *, kstatus: bool = True, generation: int = 2) -> EndpointStatus:
    message = f"{reason} happened; the previous token stays usable until 2026-05-01T13:00:00Z"
    if not kstatus:  # an operator that writes Ready only
        return EndpointStatus().with_ready(ready=False, reason=reason, message=message, generation=generation,
                                           now=NOW)
    return status.with_health(EndpointStatus(), ready=False, reason=reason, message=message, generation=generation,
                              now=NOW, needs_change=reason in NEEDS_CHANGE, retry_at=NOW + timedelta(seconds=30))


# -- health.lua ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, {}, {"observedGeneration": 2}, {"conditions": []}])
def test_no_status_yet_is_progressing(raw: dict[str, Any] | None) -> None:
    assert health(endpoint(raw))["status"] == "Progressing"


@pytest.mark.parametrize("reason", [api.Reason.TOKEN_ISSUED, api.Reason.TOKEN_REFRESHED])
def test_ready_is_healthy(reason: api.Reason) -> None:
    verdict = health(endpoint(healthy_status(reason).to_json()))
    assert verdict == {"status": "Healthy",
                       "message": "token valid until 2026-05-01T13:00:00Z; next refresh at 2026-05-01T12:40:00Z"}


@pytest.mark.parametrize("reason", FAILURES)
@pytest.mark.parametrize("kstatus", [True, False])
def test_each_failure_is_degraded_and_says_why(reason: api.Reason, kstatus: bool) -> None:
    verdict = health(endpoint(failed_status(reason, kstatus=kstatus).to_json()))
    assert verdict["status"] == "Degraded"
    assert verdict["message"].startswith(f"{reason}: {reason} happened; the previous token stays usable")
    if kstatus and reason in NEEDS_CHANGE:
        assert verdict["message"].endswith("(needs a change to the spec or the referenced objects)")
    elif kstatus:
        assert verdict["message"].endswith(f"(retrying at 2026-05-01T12:00:30Z after {reason})")


def test_suspended() -> None:
    suspended = status.with_health(EndpointStatus(), ready=False, reason=api.Reason.SUSPENDED,
                                   message="spec.suspend is true: no token is requested", generation=2, now=NOW)
    assert health(endpoint(suspended.to_json())) == {"status": "Suspended",
                                                     "message": "spec.suspend is true: no token is requested"}


def test_a_status_for_an_older_generation_is_progressing() -> None:
    stale = healthy_status(generation=2).to_json()
    assert health(endpoint(stale, generation=3)) == {
        "status": "Progressing", "message": "Waiting for the operator to act on generation 3"}
    # the condition's own observedGeneration counts, even if the top-level one moved on
    stale["observedGeneration"] = 3
    assert health(endpoint(stale, generation=3))["status"] == "Progressing"
    # a failure for an older generation is not yet a verdict on the new spec either
    assert health(endpoint(failed_status(api.Reason.INVALID_SPEC, generation=2).to_json(), generation=3))["status"] \
        == "Progressing"


def test_ready_unknown_is_progressing() -> None:
    unknown = {"observedGeneration": 2, "conditions": [
        {"type": "Ready", "status": "Unknown", "reason": "Pending", "observedGeneration": 2}]}
    assert health(endpoint(unknown))["status"] == "Progressing"


def test_argo_cd_test_table() -> None:
    table = yaml.safe_load((CUSTOMIZATION / "health_test.yaml").read_text())
    assert len(table["tests"]) >= 5
    seen = set()
    for case in table["tests"]:
        obj = yaml.safe_load((CUSTOMIZATION / case["inputPath"]).read_text())
        verdict = health(obj)
        assert verdict["status"] == case["healthStatus"]["status"], case["inputPath"]
        assert verdict.get("message", "") == case["healthStatus"]["message"], case["inputPath"]
        seen.add(verdict["status"])
    assert seen == {"Healthy", "Degraded", "Suspended", "Progressing"}


# -- the refresh action --------------------------------------------------------------------------------------


def test_discovery_offers_refresh() -> None:
    actions = run_lua(DISCOVERY, endpoint(healthy_status().to_json()))
    assert set(actions) == {"refresh"}
    assert actions["refresh"]["disabled"] is False


@pytest.mark.parametrize("annotations", [None, {}, {"team": "shop", api.REFRESH_ANNOTATION: "2020-01-01T00:00:00Z"}])
def test_refresh_sets_the_annotation_to_now(annotations: dict[str, str] | None) -> None:
    before = endpoint(healthy_status().to_json())
    if annotations is not None:
        before["metadata"]["annotations"] = annotations
    started = datetime.now(UTC).replace(microsecond=0)
    after = run_lua(REFRESH, copy.deepcopy(before))
    value = after["metadata"]["annotations"].pop(api.REFRESH_ANNOTATION)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value)
    assert started <= datetime.fromisoformat(value.replace("Z", "+00:00")) <= datetime.now(UTC)
    kept = dict(annotations or {})
    kept.pop(api.REFRESH_ANNOTATION, None)
    assert after["metadata"].pop("annotations") == kept or (not kept and after["metadata"].get("annotations") is None)
    before["metadata"].pop("annotations", None)
    assert after == before, "the action changes nothing but the annotation"


def test_argocd_cm_embeds_these_scripts() -> None:
    config = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert config["metadata"]["name"] == "argocd-cm"
    data = config["data"]
    assert data["resource.customizations.health.secured-endpoint.io_SecuredEndpoint"] == HEALTH.read_text()
    actions = yaml.safe_load(data["resource.customizations.actions.secured-endpoint.io_SecuredEndpoint"])
    assert actions["discovery.lua"] == DISCOVERY.read_text()
    assert actions["definitions"] == [{"name": "refresh", "action.lua": REFRESH.read_text()}]


# -- status.with_health: the kstatus conditions ---------------------------------------------------------------


def kstatus(body: Mapping[str, Any]) -> str:
    """kstatus' generic rules (sigs.k8s.io/cli-utils/pkg/kstatus/status), as Flux applies them to a custom
    resource: an older observedGeneration or Reconciling=True → InProgress; Stalled=True → Failed; else
    Current."""
    raw = body.get("status") or {}
    observed = raw.get("observedGeneration")
    if observed is not None and observed != body["metadata"]["generation"]:
        return "InProgress"
    conditions = {c["type"]: c for c in raw.get("conditions") or ()}
    if conditions.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if conditions.get("Stalled", {}).get("status") == "True":
        return "Failed"
    return "Current"


def types(value: EndpointStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in value.conditions}


def test_with_health_conditions_and_kstatus_verdicts() -> None:
    ready = healthy_status()
    assert types(ready) == {"Ready": ("True", "TokenIssued")}
    assert kstatus(endpoint(ready.to_json())) == "Current"
    for reason in FAILURES:
        failed = failed_status(reason)
        assert all(c.observed_generation == 2 for c in failed.conditions)
        assert failed.observed_generation == 2
        if reason in NEEDS_CHANGE:
            assert types(failed) == {"Ready": ("False", str(reason)), "Stalled": ("True", str(reason))}
            assert kstatus(endpoint(failed.to_json())) == "Failed"
        else:
            assert types(failed) == {"Ready": ("False", str(reason)), "Reconciling": ("True", "Retrying")}
            assert kstatus(endpoint(failed.to_json())) == "InProgress"
    suspended = status.with_health(ready, ready=False, reason=api.Reason.SUSPENDED, message="paused", generation=3,
                                   now=NOW)
    assert types(suspended) == {"Ready": ("False", "Suspended")}
    assert kstatus(endpoint(suspended.to_json(), generation=3)) == "Current"
    assert kstatus(endpoint(ready.to_json(), generation=3)) == "InProgress"


def test_with_health_moves_between_verdicts_and_keeps_transition_times() -> None:
    later = NOW + timedelta(minutes=5)
    first = failed_status(api.Reason.TOKEN_REQUEST_FAILED)
    again = status.with_health(first, ready=False, reason=api.Reason.TOKEN_REQUEST_FAILED, message="still down",
                               generation=2, now=later, retry_at=later + timedelta(seconds=60))
    reconciling = {c.type: c for c in again.conditions}["Reconciling"]
    assert reconciling.last_transition_time == status.timestamp(NOW), "still retrying: no transition"
    assert reconciling.message == "retrying at 2026-05-01T12:06:00Z after TokenRequestFailed"
    stalled = status.with_health(again, ready=False, reason=api.Reason.INVALID_CREDENTIALS, message="refused",
                                 generation=2, now=later, needs_change=True)
    assert types(stalled) == {"Ready": ("False", "InvalidCredentials"), "Stalled": ("True", "InvalidCredentials")}
    recovered = status.with_health(stalled, ready=True, reason=api.Reason.TOKEN_REFRESHED, message="ok",
                                   generation=2, now=later + timedelta(minutes=1))
    assert types(recovered) == {"Ready": ("True", "TokenRefreshed")}
    (ready,) = recovered.conditions
    assert ready.last_transition_time == status.timestamp(later + timedelta(minutes=1))
    # other condition types someone else set are kept, in place
    foreign = status.with_condition(EndpointStatus(), type="Custom", status="True", reason="X", message="",
                                    generation=1, now=NOW)
    mixed = status.with_health(foreign, ready=True, reason=api.Reason.TOKEN_ISSUED, message="", generation=1, now=NOW)
    assert [c.type for c in mixed.conditions] == ["Custom", "Ready"]
