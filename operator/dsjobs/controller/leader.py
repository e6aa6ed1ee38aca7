"""Leader election on a coordination.k8s.io Lease, so that a standby replica can take over.

With `DSJOBS_LEADER_LEASE=<namespace>/<name>` the operator process first waits to hold the
Lease, then runs Kopf while a thread renews it. Whoever cannot renew it for the renew deadline
(two thirds of the lease) exits at once: by the time another replica may take the Lease (its
duration after the last renewal it saw), this one has stopped acting. A graceful stop (SIGTERM:
a rollout) releases the Lease, so a standby takes over within one retry period.

As client-go's leaderelection, expiry is judged by the observer's own clock: a Lease is expired
when its record has not changed for its duration since this process last saw it change, so the
replicas' clocks need not agree. The decision is `plan_lease` (pure); `LeaseClient` is a small
synchronous HTTP client (the operator keeps the `kubernetes` package out of its memory, and the
election runs before Kopf's event loop and beside it in a thread).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import quote, urlsplit

log = logging.getLogger("dsjobs.controller.leader")

LEASE_API: Final = "/apis/coordination.k8s.io/v1"


# --- the decision (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says about its holder (spec), and its resourceVersion for the next write."""

    holder: str = ""
    duration_seconds: int = 0
    acquire_time: str = ""
    renew_time: str = ""
    transitions: int = 0
    resource_version: str = ""

    @classmethod
    def from_lease(cls, body: Mapping[str, Any]) -> LeaseRecord:
        spec = body.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=str(spec.get("acquireTime") or ""),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=str((body.get("metadata") or {}).get("resourceVersion") or ""),
        )

    def spec(self) -> dict[str, Any]:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }

    def same_record(self, other: LeaseRecord) -> bool:
        """Whether nobody has written the Lease between the two (resourceVersion aside)."""
        return replace(self, resource_version="") == replace(other, resource_version="")


@dataclass(frozen=True)
class Observed:
    """The Lease record as this process last saw it change, and when (its monotonic clock)."""

    record: LeaseRecord
    at: float


@dataclass(frozen=True)
class LeaseStep:
    """Write `record` (create it when `create`), or wait: `record` None."""

    record: LeaseRecord | None
    create: bool = False
    observed: Observed | None = None
    wait_seconds: float = 0.0


def micro_time(now: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds, UTC."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def plan_lease(
    current: LeaseRecord | None,
    observed: Observed | None,
    *,
    me: str,
    now: datetime,
    mono: float,
    duration_seconds: int,
) -> LeaseStep:
    """One step of the election: what to write to hold the Lease, or how long to wait.

    `current` is the Lease as just read (None: there is none); `observed` what this process saw
    before. A Lease held by another is free once its record has stood unchanged for its duration
    on this process's clock; an empty holder (a released Lease) is free at once.
    """
    stamp = micro_time(now)
    if current is None:
        record = LeaseRecord(me, duration_seconds, stamp, stamp, 0)
        return LeaseStep(record, create=True)
    if observed is None or not observed.record.same_record(current):
        observed = Observed(current, mono)
    if current.holder == me:
        return LeaseStep(
            replace(current, renew_time=stamp, duration_seconds=duration_seconds), observed=observed
        )
    lasted = mono - observed.at
    held_for = current.duration_seconds or duration_seconds
    if current.holder and lasted < held_for:
        return LeaseStep(None, observed=observed, wait_seconds=held_for - lasted)
    taken = replace(
        current,
        holder=me,
        duration_seconds=duration_seconds,
        acquire_time=stamp,
        renew_time=stamp,
        transitions=current.transitions + 1,
    )
    return LeaseStep(taken, observed=observed)


def released(record: LeaseRecord, now: datetime) -> LeaseRecord:
    """The record a holder writes when it stops: no holder, so a standby takes it at once."""
    stamp = micro_time(now)
    return replace(record, holder="", duration_seconds=1, acquire_time=stamp, renew_time=stamp)


def parse_lease_ref(value: str) -> tuple[str, str]:
    """`<namespace>/<name>` of DSJOBS_LEADER_LEASE."""
    namespace, _, name = value.partition("/")
    if not namespace or not name or "/" in name:
        raise ValueError("must be <namespace>/<name>, e.g. dsjobs-system/dsjobs-operator")
    return namespace, name


# --- the Lease over HTTP ------------------------------------------------------------------------


class LeaseConflict(Exception):
    """Another replica wrote the Lease first (409)."""


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate: from Kopf's login (kopf.ConnectionInfo)."""

    host: str
    port: int
    context: ssl.SSLContext | None
    headers: Mapping[str, str]
    #: The server URL's own path (a proxy's, e.g. Rancher's /k8s/clusters/<id>), before the API's.
    prefix: str = ""


def _pem(data: bytes | str) -> bytes:
    """A kubeconfig's inline `*-data` value (base64 text; Kopf may pass it decoded as bytes)."""
    return data if isinstance(data, bytes) else base64.b64decode(data)


def connection_from(info: Any) -> Connection:
    """A Connection from a kopf.ConnectionInfo (server, CA, client certificate or token)."""
    url = urlsplit(str(info.server))
    secure = url.scheme == "https"
    context: ssl.SSLContext | None = None
    if secure:
        # Only the cluster's CA when it names one (as Kopf and client-go): the system's public CAs
        # are no authority on an API server, and the token goes to whoever they vouch for.
        if info.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif info.ca_path:
            context = ssl.create_default_context(cafile=str(info.ca_path))
        elif info.ca_data:
            context = ssl.create_default_context(cadata=_pem(info.ca_data).decode())
        else:
            context = ssl.create_default_context()
        # The ssl module loads a client certificate and key from files only: inline ones go
        # through files read at once and removed (a login every minute would pile them up).
        made: list[str] = []

        def path_of(path: Any, data: Any) -> str | None:
            if path or not data:
                return str(path) if path else None
            fd, made_path = tempfile.mkstemp(prefix="dsjobs-lease-")
            made.append(made_path)
            with os.fdopen(fd, "wb") as f:
                f.write(_pem(data))
            return made_path

        try:
            if cert := path_of(info.certificate_path, info.certificate_data):
                context.load_cert_chain(cert, path_of(info.private_key_path, info.private_key_data))
        finally:
            for made_path in made:
                os.unlink(made_path)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if info.token:
        headers["Authorization"] = f"Bearer {info.token}"
    port = url.port or (443 if secure else 80)
    return Connection(url.hostname or "localhost", port, context, headers, url.path.rstrip("/"))


class LeaseClient:
    """GET / POST / PUT of one Lease; `login` gives a fresh Connection (rotating tokens)."""

    def __init__(self, login: Callable[[], Connection], namespace: str, name: str, timeout: float) -> None:
        self._login = login
        self.namespace, self.name = namespace, name
        self.timeout = timeout
        self._conn: Connection | None = None
        self._conn_at = 0.0

    def _connection(self) -> Connection:
        if self._conn is None or time.monotonic() - self._conn_at > 60:
            self._conn, self._conn_at = self._login(), time.monotonic()
        return self._conn

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        c = self._connection()
        if c.context is not None:
            http_conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                c.host, c.port, timeout=self.timeout, context=c.context
            )
        else:
            http_conn = http.client.HTTPConnection(c.host, c.port, timeout=self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            http_conn.request(method, c.prefix + path, body=payload, headers=dict(c.headers))
            response = http_conn.getresponse()
            data = response.read()
        finally:
            http_conn.close()
        if response.status == 401:
            self._conn = None  # a rotated token: log in again next time
        try:
            return response.status, (json.loads(data) if data else None)
        except ValueError:
            # Not the API server's JSON (a proxy's HTML error page): its status and its start.
            text = data[:200].decode("utf-8", "replace").strip()
            raise RuntimeError(
                f"{method} lease {self.namespace}/{self.name}: {response.status} {text}"
            ) from None

    def _path(self, name: str | None = None) -> str:
        base = f"{LEASE_API}/namespaces/{quote(self.namespace)}/leases"
        return f"{base}/{quote(name)}" if name else base

    def get(self) -> LeaseRecord | None:
        status, body = self._request("GET", self._path(self.name))
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET lease {self.namespace}/{self.name}: {status} {_message(body)}")
        return LeaseRecord.from_lease(body)

    def write(self, record: LeaseRecord, *, create: bool) -> LeaseRecord:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if not create:
            metadata["resourceVersion"] = record.resource_version
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": record.spec(),
        }
        method, path = ("POST", self._path()) if create else ("PUT", self._path(self.name))
        status, answer = self._request(method, path, body)
        if status == 409:
            raise LeaseConflict(f"lease {self.namespace}/{self.name} was written by another replica")
        if status not in (200, 201):
            raise RuntimeError(f"{method} lease {self.namespace}/{self.name}: {status} {_message(answer)}")
        return LeaseRecord.from_lease(answer)


def _message(body: Any) -> str:
    return str(body.get("message", "")) if isinstance(body, dict) else ""


# --- the elector --------------------------------------------------------------------------------


def identity() -> str:
    """This replica: its pod name (HOSTNAME in a pod) and a random part (a restarted container
    in the same pod is another replica)."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class Clock:
    """The elector's monotonic time and its waits on it (tests give it a fake one)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """`event.wait(seconds)`: whether the event is set."""
        return event.wait(seconds)


class LeaderElector:
    def __init__(
        self, client: LeaseClient, me: str, duration_seconds: int, clock: Clock | None = None
    ) -> None:
        self.client, self.me = client, me
        self.clock = clock or Clock()
        self.duration = duration_seconds
        self.renew_deadline = duration_seconds * 2 / 3
        self.retry_seconds = max(duration_seconds / 7.5, 0.2)  # 2 s of client-go's 15 s
        self._observed: Observed | None = None
        self._held: LeaseRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When the attempt that last held or renewed the Lease began (monotonic): the API server
        # may have committed it from then on, so a standby's clock may start there.
        self._renewed_at = 0.0
        self._renew_error = ""

    def try_once(self, *, renewing: bool = False) -> float:
        """One attempt to hold (or keep) the Lease: 0 when held, else seconds to wait.

        A renewal (`renewing`) only renews (or makes a deleted Lease again): one that is no longer
        this replica's is not taken back, even a free one (released by this replica's `release()`
        while the renewal's read was in flight: the stopping replica would exit holding it, and a
        standby wait out its duration); once stopping, nothing is written."""
        current = self.client.get()
        if renewing and (self._stop.is_set() or (current is not None and current.holder != self.me)):
            if current is not None and not (self._observed and self._observed.record.same_record(current)):
                self._observed = Observed(current, self.clock.monotonic())
            return self.retry_seconds
        step = plan_lease(
            current,
            self._observed,
            me=self.me,
            now=datetime.now(UTC),
            mono=self.clock.monotonic(),
            duration_seconds=self.duration,
        )
        self._observed = step.observed
        if step.record is None:
            return min(step.wait_seconds, self.retry_seconds)
        self._held = self.client.write(step.record, create=step.create)
        return 0.0

    def acquire(self) -> None:
        """Block until this replica holds the Lease."""
        waiting_for, failing = "", ""
        while not self._stop.is_set():
            started = self.clock.monotonic()
            try:
                wait = self.try_once()
                failing = ""
            except LeaseConflict:
                wait = self.retry_seconds
            except Exception as exc:
                if str(exc) != failing:  # once per new message: a missing RoleBinding repeats
                    log.warning("leader election: %s", exc)
                    failing = str(exc)
                wait = self.retry_seconds
            if wait == 0.0 and self._held is not None:
                self._renewed_at = started
                log.info(
                    "leading: holding lease %s/%s as %s (transition %d)",
                    self.client.namespace,
                    self.client.name,
                    self.me,
                    self._held.transitions,
                )
                return
            holder = self._observed.record.holder if self._observed is not None else ""
            if holder and holder != waiting_for:
                log.info(
                    "standing by: lease %s/%s is held by %s", self.client.namespace, self.client.name, holder
                )
                waiting_for = holder
            self.clock.wait(self._stop, wait)

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew the Lease in a thread; `on_lost(why)` once it cannot (it must stop this replica).

        The renew deadline is kept by a watchdog of its own, not by the renewals: a request may
        hang past it (a slow API server, a lost connection; client-go cancels the request there),
        and by the time a standby may take over this replica must have stopped."""
        told = threading.Lock()

        def lose(why: str) -> None:
            if told.acquire(blocking=False):
                on_lost(why)

        def renew() -> None:
            while not self.clock.wait(self._stop, self.retry_seconds):
                started = self.clock.monotonic()
                try:
                    if self.try_once(renewing=True) == 0.0:
                        self._renewed_at = max(self._renewed_at, started)
                        continue
                    if self._stop.is_set():
                        return  # released meanwhile: nothing was lost
                    holder = self._observed.record.holder if self._observed is not None else "?"
                    lose(f"the lease is held by {holder}")
                    return
                except LeaseConflict as exc:
                    self._renew_error = str(exc)
                except Exception as exc:
                    self._renew_error = f"{type(exc).__name__}: {exc}"

        def watchdog() -> None:
            while True:
                left = self._renewed_at + self.renew_deadline - self.clock.monotonic()
                if left <= 0:
                    why = self._renew_error or "no answer in time"
                    lose(f"could not renew the lease for {self.renew_deadline:.0f}s ({why})")
                    return
                if self.clock.wait(self._stop, left):
                    return

        if not self._renewed_at:
            self._renewed_at = self.clock.monotonic()  # held without acquire() (tests)
        self._thread = threading.Thread(target=renew, name="lease renewal", daemon=True)
        self._thread.start()
        threading.Thread(target=watchdog, name="lease deadline", daemon=True).start()

    def release(self) -> None:
        """Stop renewing and hand the Lease back (best effort: else it expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry_seconds + self.client.timeout)
        if self._held is None:
            return
        for _ in range(3):
            try:
                current = self.client.get()
                if current is not None and current.holder == self.me:
                    self.client.write(released(current, datetime.now(UTC)), create=False)
                    log.info("released lease %s/%s", self.client.namespace, self.client.name)
                return
            except LeaseConflict:
                # A renewal still in flight (its thread outlived the join) wrote first: read again.
                continue
            except Exception as exc:
                log.warning("could not release the lease (it expires by itself): %s", exc)
                return
        log.warning("could not release the lease (it expires by itself): it kept changing")


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path.startswith("/healthz") else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


class _ThreadingHTTPServer6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class StandbyLiveness:
    """/healthz while standing by (Kopf serves it only once it runs), so that the kubelet does not
    restart a replica for waiting."""

    def __init__(self, host: str, port: int) -> None:
        server_class = _ThreadingHTTPServer6 if ":" in host else ThreadingHTTPServer
        self.server = server_class((host, port), _Healthy)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.1,), name="standby liveness", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
