"""Prometheus metrics of the API server (served on DSJOBS_API_METRICS_LISTEN at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from dsjobs.kubemetrics import KUBE_REQUESTS as KUBE_REQUESTS

REQUESTS = Counter(
    "dsjobs_api_requests_total",
    "gRPC calls finished, by full method name and status code.",
    ["method", "code"],
)
LATENCY = Histogram(
    "dsjobs_api_request_duration_seconds",
    "Time to answer a unary call, or the lifetime of a stream, by method.",
    ["method"],
    # Unary calls are expected in single milliseconds; the tail covers streams.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
INFLIGHT_STREAMS = Gauge(
    "dsjobs_api_inflight_streams",
    "Server-streaming calls (ReadLogs, ReadStdLogs) currently open.",
    ["method"],
)
INFLIGHT_UNARY = Gauge("dsjobs_api_inflight_requests", "Unary calls being served.")
JOB_INDEX_SYNCED = Gauge(
    "dsjobs_api_job_index_synced",
    "1 while this replica's watch of the ProjectJobs is in sync (Get and operations read its cache), "
    "0 while it lists them again or retries (every read goes to the API server then).",
)
LOG_RECORDS_SENT = Counter("dsjobs_api_log_records_sent_total", "Log records streamed to clients.")


def serve(listen: str) -> None:
    """Start the /metrics HTTP endpoint in a daemon thread (empty `listen` disables it)."""
    if not listen:
        return
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
