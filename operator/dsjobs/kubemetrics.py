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


def call_kind(method: str, path: str) -> tuple[str, str]:
    """(verb, resource) of a Kubernetes API call, the labels of its timing in both processes: the
    HTTP method in lower case, and the resource the path names (`projectjobs`, `projectjobs/status`,
    `tokenreviews`), never a name or a namespace."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    # /api/v1/... or /apis/<group>/<version>/...
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:] if parts[:1] == ["apis"] else parts
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]  # a namespaced resource
    resource = rest[0] if rest else "unknown"
    if len(rest) >= 3:
        resource += "/" + rest[2]  # a subresource: projectjobs/status
    return method.lower(), resource


#: A watch silent this long is a dead connection (a vanished API server instance, a dropped
#: conntrack entry): asked with allowWatchBookmarks and a timeoutSeconds, the API server sends a
#: BOOKMARK every minute however quiet the resource, and keeps ~75 s of events to watch again
#: from. The API's job index then watches again from the last resourceVersion seen (waiting for
#: the server's 300 s timeout, +30, served stale jobs 5.5 min); Kopf's watches in the operator do
#: the same: it is their `inactivity_timeout`.
WATCH_IDLE_SECONDS = 70.0
