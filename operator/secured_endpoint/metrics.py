"""Prometheus metrics of the operator, all in one injected ``CollectorRegistry`` (served on ``SEP_METRICS_PORT``).

Names follow the ecosystem's: per-object timestamps in seconds like cert-manager's
``certmanager_certificate_expiration_timestamp_seconds``, conditions like external-secrets'
``externalsecret_status_condition`` with one series per possible value (1 for the current one, 0 for the
others, as kube-state-metrics does), so an alert is a comparison and a dashboard a filter:

=================================================================  ==========================================
``secured_endpoint_token_expiration_timestamp_seconds{namespace,name}``  when the token in the targets expires
``secured_endpoint_token_next_refresh_timestamp_seconds{namespace,name}``  the next planned refresh or retry
``secured_endpoint_status_condition{namespace,name,condition,status}``  each condition type: True/False/Unknown
``secured_endpoint_status_condition_reason{namespace,name,condition,reason}``  Ready: one series per reason
``secured_endpoint_refreshes_total{result}``                     token refreshes: ``success`` or the failure's
                                                                   Ready reason
``secured_endpoint_idp_requests_total{host,result}``             HTTP token requests by token URL host
                                                                   (host[:port], never path or query)
``secured_endpoint_token_request_duration_seconds{host}``        the HTTP token request alone
``secured_endpoint_credentials_read_duration_seconds``           reading the referenced Secrets/ConfigMaps
``secured_endpoint_target_write_errors_total{target}``           failed writes by target kind (secret, redis)
``secured_endpoint_scheduler_queue_lag_seconds``                 how late due refresh jobs start
``secured_endpoint_redis_up``                                    1 while Redis answers (absent without Redis)
``secured_endpoint_leader``                                      1 while this replica is the one that acts
``secured_endpoint_endpoints_managed``                           SecuredEndpoints this replica manages
=================================================================  ==========================================

The per-endpoint series are not kept as prometheus-client children (a few hundred bytes each, and 17 of them
per endpoint): :class:`OperatorMetrics` keeps one small record per endpoint, set from every status the
operator publishes and dropped when it forgets the endpoint, and turns the records into samples only when
scraped. The scrape runs in prometheus-client's server thread; the records are replaced whole (never
mutated), so a copy of the dict is a consistent view.

:data:`default` is the instance the operator serves; tests build their own on a fresh registry.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from threading import Thread
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from secured_endpoint import api
from secured_endpoint.status import EndpointStatus

PREFIX = "secured_endpoint"
CONDITION_STATUSES = ("True", "False", "Unknown")
READY_REASONS = tuple(str(reason) for reason in api.Reason)

# Token requests take milliseconds on a LAN and seconds across the internet or through a slow IdP.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A job starting a few ms late is normal; seconds mean the concurrency is too low for the load.
_LAG_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)


@dataclass(frozen=True)
class _EndpointRecord:
    expires_at: float | None
    next_refresh: float | None
    conditions: tuple[tuple[str, str, str], ...]  # (type, status, reason); Ready first


class _EndpointCollector(Collector):
    """The per-endpoint series, generated from the records at scrape time."""

    def __init__(self, records: dict[tuple[str, str], _EndpointRecord]) -> None:
        self._records = records

    def describe(self) -> Iterable[Metric]:
        return list(self._families())  # empty families: registration checks names without a scrape

    def collect(self) -> Iterable[Metric]:
        return list(self._families(sorted(self._records.copy().items())))

    def _families(self, records: Iterable[tuple[tuple[str, str], _EndpointRecord]] = ()) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(f"{PREFIX}_token_expiration_timestamp_seconds",
                                   "When the access token in the targets expires (Unix time)",
                                   labels=("namespace", "name"))
        refresh = GaugeMetricFamily(f"{PREFIX}_token_next_refresh_timestamp_seconds",
                                    "When the operator next fetches a token for the endpoint: the planned refresh "
                                    "or the retry after a failure (Unix time)", labels=("namespace", "name"))
        condition = GaugeMetricFamily(f"{PREFIX}_status_condition",
                                      "The endpoint's status conditions: one series per status, 1 for the current",
                                      labels=("namespace", "name", "condition", "status"))
        reason = GaugeMetricFamily(f"{PREFIX}_status_condition_reason",
                                   "Reason of the Ready condition: one series per reason, 1 for the current",
                                   labels=("namespace", "name", "condition", "reason"))
        for (namespace, name), record in records:
            if record.expires_at is not None:
                expiry.add_metric((namespace, name), record.expires_at)
            if record.next_refresh is not None:
                refresh.add_metric((namespace, name), record.next_refresh)
            for kind, current, why in record.conditions:
                for value in CONDITION_STATUSES:
                    condition.add_metric((namespace, name, kind, value), 1.0 if value == current else 0.0)
                if kind == api.CONDITION_READY:
                    reasons = READY_REASONS if why in READY_REASONS or not why else (*READY_REASONS, why)
                    for value in reasons:
                        reason.add_metric((namespace, name, kind, value), 1.0 if value == why else 0.0)
        yield from (expiry, refresh, condition, reason)


class _OptionalGauge(Collector):
    """A gauge without labels that has no sample until it is set (its HELP and TYPE are always there)."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name, self._documentation = name, documentation
        self.value: float | None = None
        self._source: Callable[[], bool | None] | None = None

    def set(self, value: float | None) -> None:
        self.value = value

    def follow(self, source: Callable[[], bool | None]) -> None:
        """Read the value from ``source`` at each scrape (None: no sample)."""
        self._source = source

    def _current(self) -> float | None:
        if self._source is None:
            return self.value
        try:
            state = self._source()
        except Exception:  # a scrape must not fail over one gauge
            return None
        return None if state is None else float(bool(state))

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._name, self._documentation, value=self._current())]


class OperatorMetrics:
    """Every metric of the operator, registered in ``registry`` (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._records: dict[tuple[str, str], _EndpointRecord] = {}
        r.register(_EndpointCollector(self._records))
        self.endpoints_managed = Gauge(f"{PREFIX}_endpoints_managed", "SecuredEndpoints this replica manages",
                                       registry=r)
        self.refreshes = Counter(f"{PREFIX}_refreshes", "Token refreshes by result: success, or the Ready "
                                 "reason of the failure", ["result"], registry=r)
        self.idp_requests = Counter(f"{PREFIX}_idp_requests", "HTTP token requests sent to token servers, by "
                                    "token URL host and result (issued, or the Ready reason of the failure)",
                                    ["host", "result"], registry=r)
        self.token_request_seconds = Histogram(
            f"{PREFIX}_token_request_duration_seconds", "Duration of the HTTP token request (connect to last byte), "
            "by token URL host", ["host"], buckets=_REQUEST_BUCKETS, registry=r)
        self.credentials_read_seconds = Histogram(
            f"{PREFIX}_credentials_read_duration_seconds", "Time to read an endpoint's referenced Secrets and "
            "ConfigMaps and build its token request", buckets=_REQUEST_BUCKETS, registry=r)
        self.target_write_errors = Counter(f"{PREFIX}_target_write_errors", "Failed writes of a token to a "
                                           "target, by target kind", ["target"], registry=r)
        self.queue_lag = Histogram(f"{PREFIX}_scheduler_queue_lag_seconds", "How late due refresh jobs start "
                                   "(start time minus due time)", buckets=_LAG_BUCKETS, registry=r)
        # no sample at all until Redis is known to be configured: 0 would read "Redis down" in every operator
        # without Redis
        self.redis_up = _OptionalGauge(f"{PREFIX}_redis_up", "1 while the Redis target answers, 0 while it does not "
                                       "(absent without Redis)")
        r.register(self.redis_up)
        self.leader = Gauge(f"{PREFIX}_leader", "1 while this replica is the leader (the one that refreshes)",
                            registry=r)
        # Without leader election a replica acts alone: it leads. The election code sets it as it campaigns.
        self.leader.set(1)

    # -- per endpoint ------------------------------------------------------------------------------------

    def observe_status(self, namespace: str, name: str, status: EndpointStatus) -> None:
        """The endpoint's status is now ``status``: its per-endpoint series say the same."""
        conditions = [(c.type, c.status if c.status in CONDITION_STATUSES else "Unknown", c.reason)
                      for c in status.conditions if c.type]
        if not any(kind == api.CONDITION_READY for kind, _, _ in conditions):
            conditions.append((api.CONDITION_READY, "Unknown", ""))
        conditions.sort(key=lambda c: (c[0] != api.CONDITION_READY, c[0]))
        self._records[(namespace, name)] = _EndpointRecord(
            expires_at=_seconds(status.expires_at), next_refresh=_seconds(status.next_refresh_time),
            conditions=tuple(conditions))

    def forget_endpoint(self, namespace: str, name: str) -> None:
        """The endpoint is gone: its series vanish from the next scrape."""
        self._records.pop((namespace, name), None)

    # -- operator-wide -----------------------------------------------------------------------------------

    def observe_refresh(self, result: str) -> None:
        self.refreshes.labels(result=result).inc()

    def observe_idp_request(self, token_url: str, result: str, seconds: float) -> None:
        host = token_url_host(token_url)
        self.idp_requests.labels(host=host, result=result).inc()
        self.token_request_seconds.labels(host=host).observe(seconds)

    def observe_credentials_read(self, seconds: float) -> None:
        self.credentials_read_seconds.observe(seconds)

    def observe_target_write_error(self, target: str) -> None:
        self.target_write_errors.labels(target=target).inc()

    def observe_queue_lag(self, seconds: float) -> None:
        """A :class:`~secured_endpoint.schedule.Scheduler` ``on_lag`` callback."""
        self.queue_lag.observe(max(seconds, 0.0))

    def set_redis_up(self, up: bool) -> None:
        self.redis_up.set(1.0 if up else 0.0)

    def watch_redis(self, available: Callable[[], bool | None]) -> None:
        """Report Redis as ``available()`` says at each scrape (e.g. ``lambda: redis_target.available``)."""
        self.redis_up.follow(available)

    def set_leader(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)

    def serve(self, port: int, address: str | None = None) -> tuple[WSGIServer, Thread] | None:
        """Serve ``/metrics`` on ``port`` in a background thread (prometheus-client's own server); 0: not at
        all. ``address`` defaults to ``SEP_METRICS_ADDRESS``, else every interface (a Pod is scraped on its
        IP); the tests bind loopback."""
        if not port:
            return None
        bind = address or os.environ.get("SEP_METRICS_ADDRESS") or "0.0.0.0"  # noqa: S104 - see above
        server, thread = start_http_server(port, addr=bind, registry=self.registry)
        return server, thread


def _seconds(moment: datetime | None) -> float | None:
    """Whole seconds, as the status has them (``status.timestamp``): the series and the status agree."""
    return float(math.floor(moment.timestamp())) if moment is not None else None


def token_url_host(token_url: str) -> str:
    """The host (and an explicit port) of a token URL, lower case: never its user info, path or query, which
    may carry tenant ids or, misconfigured, credentials."""
    try:
        parts = urlsplit(token_url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return "invalid"
    if not host:
        return "invalid"
    if ":" in host:  # an IPv6 literal keeps its brackets, as in the URL
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


def _standard_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_* series
        registry.register(collector)
    return registry


default = OperatorMetrics(_standard_registry())
"""The operator's metrics (what :func:`serve` serves)."""

# The controller's gauge of managed endpoints, by its historical name.
ENDPOINTS = default.endpoints_managed


def serve(port: int, address: str | None = None) -> tuple[WSGIServer, Thread] | None:
    """Serve :data:`default` on ``port`` (0: not at all)."""
    return default.serve(port, address)


def set_leader(leading: bool) -> None:
    """For the leader-election code: this replica became (True) or stopped being (False) the leader."""
    default.set_leader(leading)


def set_redis_up(up: bool) -> None:
    default.set_redis_up(up)


def watch_redis(available: Callable[[], bool | None]) -> None:
    """For the wiring, once the Redis target exists: ``metrics.watch_redis(lambda: redis.available)``."""
    default.watch_redis(available)


def forget_endpoint(namespace: str, name: str) -> None:
    """The controller forgot this endpoint: its series vanish."""
    default.forget_endpoint(namespace, name)


def observe_queue_lag(seconds: float) -> None:
    default.observe_queue_lag(seconds)


def observe_target_write_error(target: str) -> None:
    default.observe_target_write_error(target)
