"""The operator's metrics on a fresh registry each (``OperatorMetrics(CollectorRegistry())``).

Cases:
- a published status becomes the per-endpoint series: expiry and next refresh as Unix seconds, one
  ``status_condition`` series per status and one ``status_condition_reason`` series per Ready reason, exactly
  one of them 1; a status without Ready reads Unknown; a later status replaces the values (no stale 1);
- series of other condition types (Reconciling, Stalled) appear as the status has them;
- forgetting an endpoint removes every one of its series, and no other endpoint's;
- token URL hosts: host and explicit port only, lower case, never user info, path or query; IPv6 literals;
- refreshes, IdP requests, latency histograms, target errors, lag, Redis up and leader have the exported names;
  Redis up has no sample until known (set, or read from a probe at each scrape);
- the HTTP endpoint serves the registry it was given (on loopback), in the text format Prometheus parses;
- the default instance registers the process collectors and exports every metric family the docs name.
"""

from __future__ import annotations

import dataclasses
import socket
import urllib.request
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from secured_endpoint import api, metrics
from secured_endpoint.status import Condition, EndpointStatus

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
EXPIRES = datetime(2026, 5, 1, 13, 0, tzinfo=UTC)  # the series has whole seconds, as the status
REFRESH = datetime(2026, 5, 1, 12, 40, tzinfo=UTC)


def fresh() -> metrics.OperatorMetrics:
    return metrics.OperatorMetrics(CollectorRegistry())


def value(m: metrics.OperatorMetrics, metric: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(metric, labels)


def samples(m: metrics.OperatorMetrics, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for family in m.registry.collect() for s in family.samples if s.name == name]


def ready_status(*, ready: bool, reason: api.Reason, extra: tuple[Condition, ...] = ()) -> EndpointStatus:
    status = EndpointStatus(expires_at=EXPIRES.replace(microsecond=750_000), next_refresh_time=REFRESH)
    status = status.with_ready(ready=ready, reason=reason, message="m", generation=3, now=NOW)
    return dataclasses.replace(status, conditions=(*status.conditions, *extra))


def test_status_becomes_the_endpoint_series() -> None:
    m = fresh()
    m.observe_status("shop", "orders", ready_status(ready=True, reason=api.Reason.TOKEN_ISSUED))
    assert value(m, "secured_endpoint_token_expiration_timestamp_seconds", namespace="shop", name="orders") \
        == EXPIRES.timestamp()
    assert value(m, "secured_endpoint_token_next_refresh_timestamp_seconds", namespace="shop", name="orders") \
        == REFRESH.timestamp()
    statuses = {s["status"]: v for s, v in samples(m, "secured_endpoint_status_condition")}
    assert statuses == {"True": 1.0, "False": 0.0, "Unknown": 0.0}
    reasons = {s["reason"]: v for s, v in samples(m, "secured_endpoint_status_condition_reason")}
    assert set(reasons) == {str(reason) for reason in api.Reason}
    assert [reason for reason, v in reasons.items() if v == 1.0] == ["TokenIssued"]


def test_a_later_status_replaces_the_values() -> None:
    m = fresh()
    m.observe_status("shop", "orders", ready_status(ready=True, reason=api.Reason.TOKEN_ISSUED))
    failed = ready_status(ready=False, reason=api.Reason.TOKEN_REQUEST_FAILED)
    m.observe_status("shop", "orders", dataclasses.replace(failed, next_refresh_time=None))
    ones = [(s["status"], v) for s, v in samples(m, "secured_endpoint_status_condition") if v == 1.0]
    assert ones == [("False", 1.0)]
    ones_reason = [s["reason"] for s, v in samples(m, "secured_endpoint_status_condition_reason") if v == 1.0]
    assert ones_reason == ["TokenRequestFailed"]
    # no next refresh planned (Suspended, InvalidSpec): the series goes, the expiry stays
    assert samples(m, "secured_endpoint_token_next_refresh_timestamp_seconds") == []
    assert value(m, "secured_endpoint_token_expiration_timestamp_seconds", namespace="shop", name="orders") \
        == EXPIRES.timestamp()


def test_no_ready_condition_reads_unknown_and_no_token_no_expiry() -> None:
    m = fresh()
    m.observe_status("shop", "new", EndpointStatus())
    assert samples(m, "secured_endpoint_token_expiration_timestamp_seconds") == []
    ones = [(s["condition"], s["status"]) for s, v in samples(m, "secured_endpoint_status_condition") if v == 1.0]
    assert ones == [("Ready", "Unknown")]
    assert all(v == 0.0 for _, v in samples(m, "secured_endpoint_status_condition_reason"))


def test_other_condition_types_and_unknown_reasons() -> None:
    m = fresh()
    stalled = Condition(type="Stalled", status="True", reason="InvalidCredentials", message="",
                        observed_generation=3, last_transition_time="")
    status = ready_status(ready=False, reason=api.Reason.INVALID_CREDENTIALS, extra=(stalled,))
    m.observe_status("shop", "orders", status)
    ones = {(s["condition"], s["status"]) for s, v in samples(m, "secured_endpoint_status_condition") if v == 1.0}
    assert ones == {("Ready", "False"), ("Stalled", "True")}
    # a reason from a newer version of the operator still shows, as the current one
    newer = EndpointStatus(conditions=(Condition(type="Ready", status="False", reason="SomethingNew", message="",
                                                 observed_generation=1, last_transition_time=""),))
    m.observe_status("shop", "orders", newer)
    ones_reason = [s["reason"] for s, v in samples(m, "secured_endpoint_status_condition_reason") if v == 1.0]
    assert ones_reason == ["SomethingNew"]


def test_forgetting_removes_every_series_of_that_endpoint_only() -> None:
    m = fresh()
    for name in ("a", "b"):
        m.observe_status("shop", name, ready_status(ready=True, reason=api.Reason.TOKEN_REFRESHED))
    m.forget_endpoint("shop", "a")
    m.forget_endpoint("shop", "never-seen")  # harmless
    names = {"secured_endpoint_token_expiration_timestamp_seconds",
             "secured_endpoint_token_next_refresh_timestamp_seconds", "secured_endpoint_status_condition",
             "secured_endpoint_status_condition_reason"}
    for name in names:
        assert {s["name"] for s, _ in samples(m, name)} == {"b"}, name


@pytest.mark.parametrize(("url", "host"), [
    ("https://IdP.Example.com/oauth2/token?tenant=42", "idp.example.com"),
    ("https://idp.example.com:8443/realms/shop/protocol/openid-connect/token", "idp.example.com:8443"),
    ("https://user:s3cret@idp.example.com/token", "idp.example.com"),
    ("http://127.0.0.1:5000/token#frag", "127.0.0.1:5000"),
    ("https://[::1]:9443/token", "[::1]:9443"),
    ("https://idp.example.com:99999/token", "invalid"),
    ("not a url", "invalid"),
])
def test_token_url_host(url: str, host: str) -> None:
    assert metrics.token_url_host(url) == host


def test_operator_wide_metrics() -> None:
    m = fresh()
    m.observe_refresh("success")
    m.observe_refresh("InvalidCredentials")
    m.observe_idp_request("https://idp.example.com/t?secret=x", "issued", 0.2)
    m.observe_credentials_read(0.003)
    m.observe_target_write_error("redis")
    m.observe_queue_lag(0.7)
    m.observe_queue_lag(-0.1)  # a clock step: counted as on time
    m.set_redis_up(False)
    m.set_leader(False)
    m.endpoints_managed.set(2)
    assert value(m, "secured_endpoint_refreshes_total", result="success") == 1
    assert value(m, "secured_endpoint_refreshes_total", result="InvalidCredentials") == 1
    assert value(m, "secured_endpoint_idp_requests_total", host="idp.example.com", result="issued") == 1
    assert value(m, "secured_endpoint_token_request_duration_seconds_count", host="idp.example.com") == 1
    assert value(m, "secured_endpoint_token_request_duration_seconds_bucket", host="idp.example.com",
                 le="0.25") == 1
    assert value(m, "secured_endpoint_credentials_read_duration_seconds_count") == 1
    assert value(m, "secured_endpoint_target_write_errors_total", target="redis") == 1
    assert value(m, "secured_endpoint_scheduler_queue_lag_seconds_count") == 2
    assert value(m, "secured_endpoint_scheduler_queue_lag_seconds_bucket", le="0.001") == 1
    assert value(m, "secured_endpoint_redis_up") == 0
    assert value(m, "secured_endpoint_leader") == 0
    assert value(m, "secured_endpoint_endpoints_managed") == 2
    text = "\n".join(f"{s.name}{s.labels}" for family in m.registry.collect() for s in family.samples)
    assert "secret" not in text
    assert "/t" not in text


def test_leader_defaults_to_one_without_election_and_redis_up_to_nothing() -> None:
    m = fresh()
    assert value(m, "secured_endpoint_leader") == 1
    assert value(m, "secured_endpoint_redis_up") is None  # no Redis configured: no sample, not 0
    m.set_redis_up(True)
    assert value(m, "secured_endpoint_redis_up") == 1
    state: list[bool | None] = [False]
    m.watch_redis(lambda: state[0])  # read at each scrape
    assert value(m, "secured_endpoint_redis_up") == 0
    state[0] = True
    assert value(m, "secured_endpoint_redis_up") == 1
    state[0] = None
    assert value(m, "secured_endpoint_redis_up") is None

    def broken() -> bool:
        raise RuntimeError("probe broke")

    m.watch_redis(broken)
    assert value(m, "secured_endpoint_redis_up") is None  # the scrape itself still works


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serves_its_registry_over_http_on_loopback() -> None:
    m = fresh()
    m.observe_status("shop", "orders", ready_status(ready=True, reason=api.Reason.TOKEN_ISSUED))
    port = _free_port()
    served = m.serve(port, "127.0.0.1")
    assert served is not None
    server, thread = served
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    families = {family.name: family for family in text_string_to_metric_families(body)}
    (sample,) = families["secured_endpoint_token_expiration_timestamp_seconds"].samples
    assert sample.value == EXPIRES.timestamp()
    assert sample.labels == {"namespace": "shop", "name": "orders"}
    assert "process_resident_memory_bytes" not in body  # a fresh registry has only what it was given
    assert m.serve(0) is None


def test_default_instance_has_the_process_collectors_and_every_family() -> None:
    names = {family.name for family in metrics.default.registry.collect()}
    assert {"process_resident_memory_bytes", "python_gc_objects_collected"} & names
    assert {
        "secured_endpoint_token_expiration_timestamp_seconds", "secured_endpoint_token_next_refresh_timestamp_seconds",
        "secured_endpoint_status_condition", "secured_endpoint_status_condition_reason",
        "secured_endpoint_refreshes", "secured_endpoint_idp_requests",
        "secured_endpoint_token_request_duration_seconds",
        "secured_endpoint_credentials_read_duration_seconds", "secured_endpoint_target_write_errors",
        "secured_endpoint_scheduler_queue_lag_seconds", "secured_endpoint_redis_up", "secured_endpoint_leader",
        "secured_endpoint_endpoints_managed",
    } <= names
    assert metrics.ENDPOINTS is metrics.default.endpoints_managed
