"""Prometheus metrics of the operator (served on ``SEP_METRICS_PORT`` when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

ENDPOINTS = Gauge("secured_endpoint_endpoints", "SecuredEndpoints this replica manages")
TOKEN_REQUESTS = Counter("secured_endpoint_token_requests_total",
                         "Token requests sent to token servers, by result (issued or a Ready reason)",
                         ["result"])
TOKEN_REQUEST_SECONDS = Histogram("secured_endpoint_token_request_seconds",
                                  "Time to read credentials and obtain a token",
                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
REFRESH_FAILURES = Counter("secured_endpoint_refresh_failures_total",
                           "Refreshes that left an endpoint not ready, by reason", ["reason"])


def serve(port: int) -> None:
    """Start the /metrics endpoint in a background thread (prometheus_client's own server)."""
    if port:
        start_http_server(port)
