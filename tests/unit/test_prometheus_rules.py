"""The alerts and the dashboard of examples/monitoring, checked with Prometheus' own ``promtool``.

``promtool`` comes from Debian's ``prometheus`` package: from ``PATH`` if installed, else the package is
downloaded with ``apt-get download`` and only unpacked into the cache (no install scripts, so no Prometheus
server is started). Cases:
- the PrometheusRule's ``spec`` is a valid rule file (``promtool check rules``), every alert has a severity,
  a summary and a description;
- ``promtool test rules`` on sample series (prometheusrule-tests.yaml): a failing refresh near expiry fires,
  a short-lived token refreshed on time and a suspended endpoint do not, an overdue refresh does; not Ready
  for 10 minutes; no leader (also when nothing is scraped), two leaders; Redis down;
- every query of the Grafana dashboard is valid PromQL (as recording rules through ``promtool check
  rules``, Grafana's variables substituted), every panel has a unique id, a position and the dashboard's
  data source variable;
- every metric the rules and the dashboard read is registered by the operator (the e2e test
  tests/e2e/test_metrics.py compares with a real scrape).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from secured_endpoint import metrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "examples" / "monitoring"
CACHE = Path.home() / ".cache" / "secured-endpoint-operator" / "promtool"


def promtool() -> Path:
    found = shutil.which("promtool")
    if found:
        return Path(found)
    unpacked = CACHE / "usr" / "bin" / "promtool"
    if unpacked.exists():
        return unpacked
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True,
                                  timeout=300, check=False)
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if download.returncode != 0 or not debs:
            pytest.fail(f"promtool is not installed and `apt-get download prometheus` failed "
                        f"(exit {download.returncode}): {download.stderr.strip()} (run `apt-get update` first, or "
                        "`apt-get install prometheus`)")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(CACHE)], check=True, timeout=120)
    return unpacked


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool()), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def rule_spec() -> dict[str, Any]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    spec: dict[str, Any] = rule["spec"]
    return spec


def alerts() -> list[dict[str, Any]]:
    return [entry for group in rule_spec()["groups"] for entry in group["rules"] if "alert" in entry]


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec()))
    result = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout
    names = {entry["alert"] for entry in alerts()}
    assert {"SecuredEndpointTokenExpiringSoon", "SecuredEndpointNotReady", "SecuredEndpointOperatorNoLeader",
            "SecuredEndpointRedisDown"} <= names
    for entry in alerts():
        assert entry["labels"]["severity"] in ("critical", "warning"), entry["alert"]
        assert entry["annotations"]["summary"], entry["alert"]
        assert entry["annotations"]["description"], entry["alert"]
    (not_ready,) = [entry for entry in alerts() if entry["alert"] == "SecuredEndpointNotReady"]
    assert not_ready["for"] == "10m"


def test_rules_on_sample_series(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec()))
    shutil.copy(MONITORING / "prometheusrule-tests.yaml", tmp_path)
    result = run_promtool("test", "rules", "prometheusrule-tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # every alert is tested to fire somewhere
    tests = yaml.safe_load((MONITORING / "prometheusrule-tests.yaml").read_text())["tests"]
    fired = {check["alertname"] for test in tests for check in test["alert_rule_test"] if check["exp_alerts"]}
    assert fired == {entry["alert"] for entry in alerts()}


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    """promtool really judges: the same file with a typo in one expression is refused."""
    spec = rule_spec()
    spec["groups"][0]["rules"][0]["expr"] = "secured_endpoint_leader >"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    assert run_promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode != 0


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return loaded


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", ())]


def grafana_to_promql(query: str) -> str:
    """What Grafana sends for a query: its variables replaced (all values selected)."""
    return query.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$namespace", ".*")


def test_dashboard_structure() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {variable["name"] for variable in board["templating"]["list"]} == {"datasource", "job", "namespace"}
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"], panel["title"]
            assert 'job=~"$job"' in target["expr"], f"{panel['title']}: every query follows the job variable"
    assert len(dashboard_queries()) >= 15


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{index}", "expr": grafana_to_promql(query)}
             for index, query in enumerate(dashboard_queries())]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(query: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    return {name for name in _IDENTIFIER.findall(without_matchers) if name.startswith("secured_endpoint_")}


def test_every_metric_read_is_registered() -> None:
    registered: set[str] = set()
    for family in metrics.OperatorMetrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        registered.update(family.name + suffix for suffix in suffixes)
    used = set().union(*(metric_names(q) for q in dashboard_queries() + [a["expr"] for a in alerts()]))
    assert used, "no metric found in the queries"
    assert used <= registered, sorted(used - registered)
