"""The metrics as Prometheus sees them: scraped over HTTP from a running operator, which also logs JSON.

One operator for this module (``--namespace 'm-*'``, ``SEP_METRICS_PORT`` on a free loopback port,
``SEP_LOG_FORMAT=json``). Cases:
- a Ready endpoint: its expiry series equals ``status.expiresAt`` and its next-refresh series
  ``status.nextRefreshTime``; Ready True is 1 (False and Unknown 0), reason ``TokenIssued`` is 1 and every
  other reason 0; refreshes, IdP requests by host (host:port only, never the path), the split latency
  histograms, managed endpoints and leader are there;
- the IdP refuses the client and a refresh is forced: the Ready series flips to False/InvalidCredentials,
  the refresh and IdP-request counters count the failure;
- the endpoint is deleted: every one of its series vanishes, another endpoint's stay;
- every metric name the Grafana dashboard (examples/monitoring) and the PrometheusRule query is one this
  operator exports;
- with ``SEP_LOG_FORMAT=json`` every log line is one JSON object with ``timestamp``, ``severity`` and
  ``message``, and every line that mentions one of the test's endpoints names it as namespace/name (or
  carries kopf's object reference).
"""

from __future__ import annotations

import json
import re
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from secured_endpoint import api
from secured_endpoint_devenv import controlplane
from secured_endpoint_devenv.tokenserver import TokenServer
from tests.conftest import ROOT, Kube, OperatorProcess, Setup, _namespace, _operator, wait_for

pytestmark = pytest.mark.e2e

MONITORING = ROOT / "examples" / "monitoring"
Sample = tuple[dict[str, str], float]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def metrics_operator(control_plane: controlplane.ControlPlane, tmp_path_factory: pytest.TempPathFactory,
                     operator_processes: list[OperatorProcess], metrics_port: int) -> Iterator[OperatorProcess]:
    log_path = tmp_path_factory.mktemp("metrics-operator") / "operator.log"
    yield from _operator(control_plane, log_path, operator_processes, scope=("--namespace", "m-*"), env={
        "SEP_METRICS_PORT": str(metrics_port), "SEP_METRICS_ADDRESS": "127.0.0.1", "SEP_LOG_FORMAT": "json"})


@pytest.fixture
def msetup(kube: Kube, secret_values: set[str]) -> Iterator[Setup]:
    for name in _namespace(kube, "m"):
        yield Setup(kube, name, secret_values)


class Scrape:
    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            self.text = response.read().decode()
        self.families = list(text_string_to_metric_families(self.text))

    def samples(self, metric: str, **labels: str) -> list[Sample]:
        return [(dict(s.labels), s.value) for family in self.families for s in family.samples
                if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, metric: str, **labels: str) -> float | None:
        found = self.samples(metric, **labels)
        assert len(found) <= 1, f"{metric}{labels}: {found}"
        return found[0][1] if found else None

    def names(self) -> set[str]:
        """Every sample name this exposition can have, families without samples yet included."""
        names = {s.name for family in self.families for s in family.samples}
        for family in self.families:
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                        "summary": ("_count", "_sum")}.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
        return names


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _ones(scrape: Scrape, metric: str, label: str, **labels: str) -> list[str]:
    return sorted(s[label] for s, v in scrape.samples(metric, **labels) if v == 1.0)


def test_metrics_follow_the_endpoint(metrics_operator: OperatorProcess, metrics_port: int, kube: Kube,
                                     msetup: Setup, token_server: TokenServer) -> None:
    ns = msetup.namespace
    msetup.client(token_server)
    msetup.endpoint("orders", token_server)
    msetup.endpoint("stays", token_server)
    kube.wait_ready(ns, "orders")
    kube.wait_ready(ns, "stays")
    status = (kube.get_endpoint(ns, "orders") or {})["status"]
    scrape = wait_for(lambda: (s := Scrape(metrics_port)).value(
        "secured_endpoint_token_expiration_timestamp_seconds", namespace=ns, name="orders") is not None and s,
        message="the expiry series")
    one = {"namespace": ns, "name": "orders"}
    assert scrape.value("secured_endpoint_token_expiration_timestamp_seconds", **one) == _stamp(status["expiresAt"])
    assert scrape.value("secured_endpoint_token_next_refresh_timestamp_seconds", **one) \
        == _stamp(status["nextRefreshTime"])
    assert {s["status"]: v for s, v in scrape.samples("secured_endpoint_status_condition", **one)} \
        == {"True": 1.0, "False": 0.0, "Unknown": 0.0}
    reasons = scrape.samples("secured_endpoint_status_condition_reason", **one, condition="Ready")
    assert len(reasons) == len(api.Reason)
    assert _ones(scrape, "secured_endpoint_status_condition_reason", "reason", **one) == ["TokenIssued"]
    host = f"127.0.0.1:{token_server.port}"
    assert (scrape.value("secured_endpoint_refreshes_total", result="success") or 0) >= 2
    assert (scrape.value("secured_endpoint_idp_requests_total", host=host, result="issued") or 0) >= 2
    assert (scrape.value("secured_endpoint_token_request_duration_seconds_count", host=host) or 0) >= 2
    assert (scrape.value("secured_endpoint_credentials_read_duration_seconds_count") or 0) >= 2
    assert (scrape.value("secured_endpoint_endpoints_managed") or 0) >= 2
    assert scrape.value("secured_endpoint_leader") == 1
    assert "/oauth2" not in scrape.text, "never a token URL's path"
    assert scrape.value("process_resident_memory_bytes") is not None

    # the IdP now refuses the client; a forced refresh flips Ready
    token_server.fault = "invalid_client"
    kube.patch_endpoint(ns, "orders", {"metadata": {"annotations": {
        "secured-endpoint.io/refresh-requested-at": uuid.uuid4().hex}}})
    kube.wait_ready(ns, "orders", status="False", reason="InvalidCredentials")
    scrape = wait_for(lambda: (s := Scrape(metrics_port)) and _ones(
        s, "secured_endpoint_status_condition", "status", **one, condition="Ready") == ["False"] and s,
        message="Ready=False series")
    # a refused client needs a change: kstatus' Stalled says so beside Ready
    assert _ones(scrape, "secured_endpoint_status_condition", "status", **one, condition="Stalled") == ["True"]
    assert _ones(scrape, "secured_endpoint_status_condition_reason", "reason", **one) == ["InvalidCredentials"]
    assert (scrape.value("secured_endpoint_refreshes_total", result="InvalidCredentials") or 0) >= 1
    assert (scrape.value("secured_endpoint_idp_requests_total", host=host, result="InvalidCredentials") or 0) >= 1
    # the previous token is still in the targets: its expiry stays
    assert scrape.value("secured_endpoint_token_expiration_timestamp_seconds", **one) == _stamp(status["expiresAt"])

    kube.delete_endpoint(ns, "orders")
    wait_for(lambda: kube.get_endpoint(ns, "orders") is None, message="the endpoint deleted")
    scrape = wait_for(lambda: (s := Scrape(metrics_port)) and not any(
        labels.get("name") == "orders" and labels.get("namespace") == ns
        for family in s.families for labels in (dict(x.labels) for x in family.samples)) and s,
        message="every series of the deleted endpoint gone")
    assert _ones(scrape, "secured_endpoint_status_condition", "status", namespace=ns, name="stays") == ["True"]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    queries += [variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
                for variable in dashboard.get("templating", {}).get("list", []) if variable.get("type") == "query"]
    return queries


def _rule_queries() -> list[str]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [entry["expr"] for group in rule["spec"]["groups"] for entry in group["rules"]]


_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL query (or a Grafana label_values() query) reads: identifiers with the
    operator's or the process collector's prefix, outside label matchers and strings."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_grouping = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_matchers)
    return {name for name in _IDENTIFIER.findall(without_grouping)
            if name.startswith(("secured_endpoint_", "process_", "python_"))}


def test_dashboard_and_rules_use_only_exported_metrics(metrics_operator: OperatorProcess,
                                                       metrics_port: int) -> None:
    exported = Scrape(metrics_port).names()
    queries = _dashboard_queries() + _rule_queries()
    assert len(queries) >= 10
    used: set[str] = set()
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= exported, f"{query!r} reads {sorted(names - exported)}, which the operator does not export"
        used |= names
    # the dashboard shows every per-endpoint series
    assert {"secured_endpoint_token_expiration_timestamp_seconds", "secured_endpoint_status_condition",
            "secured_endpoint_token_next_refresh_timestamp_seconds"} <= used


def test_json_log_lines_are_objects_that_name_the_endpoint(metrics_operator: OperatorProcess, kube: Kube,
                                                           msetup: Setup, token_server: TokenServer) -> None:
    name = f"logged-{uuid.uuid4().hex[:6]}"
    msetup.client(token_server)
    msetup.endpoint(name, token_server)
    kube.wait_ready(msetup.namespace, name)
    msetup.endpoint(f"{name}-nocreds", token_server, clientSecretRef={"name": "missing"})
    kube.wait_ready(msetup.namespace, f"{name}-nocreds", status="False", reason="CredentialsNotFound")
    wait_for(lambda: f"{msetup.namespace}/{name}" in metrics_operator.log_text(), message="a log line about it")
    lines = [line for line in metrics_operator.log_text().splitlines() if line.strip()]
    assert len(lines) > 5
    about: list[dict[str, Any]] = []
    for line in lines:
        record = json.loads(line)  # raises on any line that is not one JSON object
        assert isinstance(record, dict), line
        assert {"timestamp", "severity", "message"} <= record.keys(), line
        datetime.fromisoformat(record["timestamp"])
        assert record["severity"] in ("debug", "info", "warn", "error", "fatal"), line
        if name in record["message"]:
            about.append(record)
    assert about
    for record in about:
        ref = record.get("object") or {}
        named = re.search(rf"{re.escape(msetup.namespace)}/{re.escape(name)}(-nocreds)?\b", record["message"]) \
            or (ref.get("namespace") == msetup.namespace and str(ref.get("name", "")).startswith(name))
        assert named, f"a line about the endpoint that does not name it: {record}"
    # the operator's own lines about an endpoint carry it as fields too, and a failure its reason
    own = [record for record in about if record["message"].startswith((f"{msetup.namespace}/", "Fetching a token"))]
    assert own
    for record in own:
        ref = record.get("object") or {}
        assert (ref.get("namespace"), str(ref.get("name", "")).startswith(name)) == (msetup.namespace, True), record
    assert any(record.get("reason") == "CredentialsNotFound" for record in own)
