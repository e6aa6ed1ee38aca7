"""The timing of Kubernetes API requests, one metric for the operator and the API server alike (each
exports it from its own process), so that one dashboard query reads both."""

from __future__ import annotations

from prometheus_client import Histogram

KUBE_REQUESTS = Histogram(
    "dsjobs_kube_request_duration_seconds",
    "Kubernetes API requests made by this process, watches excluded (the operator: one observation per "
    "attempt), by verb (the HTTP method), resource and code (ok, the HTTP status, or error: no answer).",
    ["verb", "resource", "code"],
    # Up to the clients' 30 s request timeout.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
