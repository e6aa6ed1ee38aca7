"""Leader election: the decision taken on each read of the Lease (pure)."""

from __future__ import annotations

import base64
import json
import tempfile
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import kopf
import pytest

from dsjobs.controller.leader import (
    Clock,
    Connection,
    LeaderElector,
    LeaseClient,
    LeaseConflict,
    LeaseRecord,
    Observed,
    connection_from,
    micro_time,
    parse_lease_ref,
    plan_lease,
    released,
)
from dsjobs.controller.settings import SettingsError, settings_from_env
from dsjobs.devcluster.pki import CertificateAuthority

NOW = datetime(2026, 11, 30, 9, 0, 0, 123456, tzinfo=UTC)
STAMP = "2026-11-30T09:00:00.123456Z"


def other(renewed: str = "2026-11-30T08:59:59.000000Z", holder: str = "b") -> LeaseRecord:
    return LeaseRecord(holder, 15, "2026-11-30T08:00:00.000000Z", renewed, 3, "41")


def test_micro_time_is_the_lease_s_format() -> None:
    assert micro_time(NOW) == STAMP
    assert micro_time(NOW.astimezone(tz=None)) == STAMP


def test_no_lease_is_created_held_by_me() -> None:
    step = plan_lease(None, None, me="a", now=NOW, mono=100.0, duration_seconds=15)
    assert step.create and step.record == LeaseRecord("a", 15, STAMP, STAMP, 0)


def test_my_lease_is_renewed_keeping_its_acquire_time() -> None:
    mine = LeaseRecord("a", 15, "2026-11-30T08:00:00.000000Z", "2026-11-30T08:59:58.000000Z", 2, "7")
    step = plan_lease(mine, None, me="a", now=NOW, mono=100.0, duration_seconds=15)
    assert not step.create
    assert step.record == LeaseRecord("a", 15, "2026-11-30T08:00:00.000000Z", STAMP, 2, "7")


def test_another_s_lease_is_waited_for_until_it_stood_still_for_its_duration() -> None:
    # First sight: the clock starts now, whatever renewTime says (clocks of replicas may differ).
    step = plan_lease(other(), None, me="a", now=NOW, mono=100.0, duration_seconds=15)
    assert step.record is None and step.wait_seconds == 15 and step.observed == Observed(other(), 100.0)
    # Seen again unchanged 10 s later: 5 s to go.
    step = plan_lease(other(), step.observed, me="a", now=NOW, mono=110.0, duration_seconds=15)
    assert step.record is None and step.wait_seconds == 5 and step.observed == Observed(other(), 100.0)
    # Renewed meanwhile (a new record): the clock starts again.
    renewed = other("2026-11-30T09:00:09.000000Z")
    step = plan_lease(renewed, step.observed, me="a", now=NOW, mono=112.0, duration_seconds=15)
    assert step.record is None and step.observed == Observed(renewed, 112.0)
    # Unchanged for the Lease's own duration: taken, one more transition.
    step = plan_lease(renewed, step.observed, me="a", now=NOW, mono=127.0, duration_seconds=15)
    assert step.record == LeaseRecord("a", 15, STAMP, STAMP, 4, "41") and not step.create


def test_only_the_record_counts_as_a_change_not_its_resource_version() -> None:
    seen = Observed(other(), 100.0)
    moved = LeaseRecord(**{**other().__dict__, "resource_version": "99"})
    step = plan_lease(moved, seen, me="a", now=NOW, mono=116.0, duration_seconds=15)
    assert step.record is not None and step.record.holder == "a"


def test_the_holder_s_duration_counts_not_mine() -> None:
    long_held = LeaseRecord("b", 60, "", "2026-11-30T08:59:59.000000Z", 0, "1")
    step = plan_lease(long_held, Observed(long_held, 100.0), me="a", now=NOW, mono=130.0, duration_seconds=15)
    assert step.record is None and step.wait_seconds == 30


def test_a_released_lease_is_taken_at_once() -> None:
    free = released(other(), NOW - timedelta(seconds=1))
    assert (free.holder, free.duration_seconds, free.transitions) == ("", 1, 3)
    step = plan_lease(free, None, me="a", now=NOW, mono=100.0, duration_seconds=15)
    assert step.record == LeaseRecord("a", 15, STAMP, STAMP, 4, "41")


def test_a_lease_ref_is_namespace_slash_name() -> None:
    assert parse_lease_ref("dsjobs-system/dsjobs-operator") == ("dsjobs-system", "dsjobs-operator")
    for bad in ("dsjobs-operator", "/x", "ns/", "a/b/c"):
        with pytest.raises(ValueError, match="<namespace>/<name>"):
            parse_lease_ref(bad)


def test_lease_settings_are_checked() -> None:
    settings = settings_from_env({"DSJOBS_LEADER_LEASE": "ns/l", "DSJOBS_LEADER_LEASE_SECONDS": "6"})
    assert (settings.leader_lease, settings.leader_lease_seconds) == ("ns/l", 6)
    assert settings_from_env({}).leader_lease == ""  # no election unless asked for
    with pytest.raises(SettingsError, match="DSJOBS_LEADER_LEASE='l': must be <namespace>/<name>"):
        settings_from_env({"DSJOBS_LEADER_LEASE": "l"})
    with pytest.raises(SettingsError, match="DSJOBS_LEADER_LEASE_SECONDS=2: must be 3 or more"):
        settings_from_env({"DSJOBS_LEADER_LEASE": "ns/l", "DSJOBS_LEADER_LEASE_SECONDS": "2"})


def test_a_connection_from_inline_kubeconfig_data_leaves_no_files(tmp_path: Path) -> None:
    # A kubeconfig's *-data fields are base64; the ssl module loads files: made, read, removed.
    ca = CertificateAuthority.create(tmp_path / "ca")
    client = ca.issue("client", "someone", client=True)

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    info = kopf.ConnectionInfo(
        server="https://10.0.0.1:6443",
        ca_data=b64(ca.cert_path),
        certificate_data=b64(client.cert),
        private_key_data=b64(client.key),
    )
    before = set(Path(tempfile.gettempdir()).glob("dsjobs-lease-*"))
    conn = connection_from(info)
    assert set(Path(tempfile.gettempdir()).glob("dsjobs-lease-*")) == before
    assert (conn.host, conn.port, "Authorization" in conn.headers) == ("10.0.0.1", 6443, False)
    assert conn.context is not None and conn.context.get_ca_certs()

    token = connection_from(kopf.ConnectionInfo(server="http://127.0.0.1:8080", token="t0k"))
    assert (token.context, token.port, token.headers["Authorization"]) == (None, 8080, "Bearer t0k")
    assert token.prefix == ""
    # A proxy's server URL (Rancher's) keeps its path before the API's.
    proxied = connection_from(
        kopf.ConnectionInfo(server="http://127.0.0.1:8080/k8s/clusters/c-x/", token="t")
    )
    assert proxied.prefix == "/k8s/clusters/c-x"


class _FakeClock(Clock):
    """Time that moves only when the test says so (`advance_to`); a wait ends once that time
    reaches its end, or once its event is set."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._cond = threading.Condition()
        self._seen: dict[int, float] = {}  # thread -> the time it waits at, for a wait in progress

    def monotonic(self) -> float:
        with self._cond:
            return self.now

    def wait(self, event: threading.Event, seconds: float) -> bool:
        me = threading.get_ident()
        with self._cond:
            end = self.now + seconds
            try:
                while not event.is_set() and self.now < end:
                    self._seen[me] = self.now
                    self._cond.notify_all()
                    self._cond.wait(0.01)  # (Event has no callback: polled, in real time)
            finally:
                self._seen.pop(me, None)
                self._cond.notify_all()
            return event.is_set()

    def advance_to(self, now: float, *, waiting: int, unless: threading.Event | None = None) -> None:
        """Set the time; return once `waiting` threads wait again having seen it (or a later one),
        or `unless` is set: a thread whose wait ended is then on to what it does next, a request
        or a verdict."""

        def settled() -> bool:
            return sum(t >= now for t in self._seen.values()) >= waiting or bool(unless and unless.is_set())

        with self._cond:
            self.now = now
            self._cond.notify_all()
            assert self._cond.wait_for(settled, 20), f"{waiting} waits at {now} expected, {self._seen} seen"

    def advance_by(self, seconds: float) -> None:
        with self._cond:
            self.now += seconds
            self._cond.notify_all()


class _StallingApiServer(BaseHTTPRequestHandler):
    """A Lease API on a fake clock: a PUT takes half a second to commit, and hangs (no answer)
    while `stall` is set."""

    state: ClassVar[dict[str, Any]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _lease(self) -> bytes:
        rv = self.state["rv"]
        return json.dumps(
            {
                "metadata": {"name": "l", "namespace": "ns", "resourceVersion": str(rv)},
                "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": f"t{rv}"},
            }
        ).encode()

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(self._lease())

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.state["stall"].is_set():
            self.state["hanging"].set()
            self.state["unstall"].wait(60)
            return
        self.state["clock"].advance_by(0.5)
        self.state["rv"] += 1
        self.state["commits"].append(self.state["clock"].monotonic())
        self._send(self._lease())


def test_a_leader_stops_before_a_standby_may_take_over_even_while_a_renewal_hangs() -> None:
    # A renewal that hangs (no answer: the client's timeout applies per socket step, so a request
    # may hang past any deadline) must not keep the leader running past the Lease: a watchdog ends
    # it at the renew deadline, counted from the start of the last attempt that was committed. On
    # a fake clock, so the loss is seen at that very time, not measured.
    clock = _FakeClock(100.0)
    stall, unstall, hanging = threading.Event(), threading.Event(), threading.Event()
    commits: list[float] = []
    _StallingApiServer.state = {
        "rv": 1,
        "stall": stall,
        "unstall": unstall,
        "hanging": hanging,
        "clock": clock,
        "commits": commits,
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StallingApiServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = Connection("127.0.0.1", server.server_address[1], None, {"Content-Type": "application/json"})
    elector = LeaderElector(LeaseClient(lambda: conn, "ns", "l", timeout=60), "me", 15, clock)
    assert (elector.retry_seconds, elector.renew_deadline) == (2.0, 10.0)
    try:
        elector.acquire()  # from 100: committed at 100.5
        lost: list[tuple[float, str]] = []
        done = threading.Event()
        elector.keep(lambda why: (lost.append((clock.monotonic(), why)), done.set()))
        clock.advance_to(100.5, waiting=2)  # the renewal thread and the watchdog wait
        clock.advance_to(102.5, waiting=2)  # a renewal from 102.5, committed at 103; both wait again
        assert commits == [100.5, 103.0]
        stall.set()
        clock.advance_to(105.0, waiting=1)  # the next renewal hangs; the watchdog waits on
        assert hanging.wait(20)
        # Past the deadline of the first renewal (110): the one from 102.5 counts now.
        clock.advance_to(112.0, waiting=1, unless=done)
        assert not done.is_set(), lost
        clock.advance_to(112.5, waiting=0)
        assert done.wait(20)
        # The renew deadline after the start of the last committed renewal (not its answer, 103:
        # it may have been committed from its start on). A standby that saw that renewal may take
        # over 15 s after it; the renewal that hung counts for nothing.
        assert lost == [(102.5 + 10.0, "could not renew the lease for 10s (no answer in time)")]
        assert lost[0][0] < commits[-1] + 15
    finally:
        stall.clear()
        unstall.set()
        elector.release()
        server.shutdown()


class _RacingLeaseClient:
    """A Lease another write (this replica's renewal still in flight) changes under the first
    release attempt."""

    namespace, name, timeout = "ns", "dsjobs-operator", 1.0

    def __init__(self) -> None:
        self.record = LeaseRecord("a", 15, STAMP, STAMP, 1, "7")
        self.writes: list[LeaseRecord] = []

    def get(self) -> LeaseRecord:
        return self.record

    def write(self, record: LeaseRecord, *, create: bool) -> LeaseRecord:
        if not self.writes:
            self.writes.append(record)
            self.record = LeaseRecord("a", 15, STAMP, STAMP, 1, "8")  # the renewal landed first
            raise LeaseConflict("the object has been modified")
        assert record.resource_version == self.record.resource_version
        self.writes.append(record)
        self.record = record
        return record


def test_a_release_crossed_by_a_renewal_reads_again_and_releases() -> None:
    client = _RacingLeaseClient()
    elector = LeaderElector(client, "a", 15)  # type: ignore[arg-type]
    elector._held = client.record
    elector.release()
    assert len(client.writes) == 2 and client.record.holder == ""


class _LeaseApi:
    """A Lease API with resourceVersion checks; the renewal thread's next read can be held back
    until this replica's release has been written (`hold_next_renewal`)."""

    namespace, name, timeout = "ns", "dsjobs-operator", 0.1

    def __init__(self, record: LeaseRecord | None = None) -> None:
        self.lock = threading.Lock()
        self.record = record
        self.writes: list[tuple[str, str]] = []  # (thread, holder)
        self.hold_next_renewal = threading.Event()
        self.renewal_held = threading.Event()
        self.released = threading.Event()

    def get(self) -> LeaseRecord | None:
        if threading.current_thread().name == "lease renewal" and self.hold_next_renewal.is_set():
            self.hold_next_renewal.clear()
            self.renewal_held.set()
            assert self.released.wait(10)  # a slow API server: answered after the release
        with self.lock:
            return self.record

    def write(self, record: LeaseRecord, *, create: bool) -> LeaseRecord:
        with self.lock:
            version = self.record.resource_version if self.record is not None else "0"
            if not create and record.resource_version != version:
                raise LeaseConflict("the object has been modified")
            self.record = replace(record, resource_version=str(int(version) + 1))
            self.writes.append((threading.current_thread().name, record.holder))
            if not record.holder:
                self.released.set()
            return self.record


def test_a_renewal_only_renews() -> None:
    free = LeaseRecord("", 1, STAMP, STAMP, 3, "5")  # released by its holder, or by hand
    api = _LeaseApi(free)
    elector = LeaderElector(api, "a", 15)  # type: ignore[arg-type]
    assert elector.try_once(renewing=True) > 0 and api.writes == []  # not taken back by a renewal
    assert elector.try_once() == 0.0 and api.record is not None and api.record.holder == "a"  # acquired
    assert elector.try_once(renewing=True) == 0.0 and len(api.writes) == 2  # renewed
    elector._stop.set()
    assert elector.try_once(renewing=True) > 0 and len(api.writes) == 2  # stopping: nothing written
    gone = _LeaseApi(None)
    renewer = LeaderElector(gone, "a", 15)  # type: ignore[arg-type]
    assert renewer.try_once(renewing=True) == 0.0 and gone.record is not None and gone.record.holder == "a"


def test_a_renewal_in_flight_during_the_release_does_not_take_the_lease_back() -> None:
    # release() joins the renewal thread for a bounded time, then writes the released record; a
    # renewal whose read was answered after that found a free Lease and took it: the stopping
    # replica exited holding it, and a standby waited out its duration instead of a retry period.
    api = _LeaseApi()
    elector = LeaderElector(api, "a", 2)  # type: ignore[arg-type]
    lost: list[str] = []
    elector.acquire()
    elector.keep(lost.append)
    api.hold_next_renewal.set()
    assert api.renewal_held.wait(10)
    elector.release()
    assert elector._thread is not None
    elector._thread.join(10)
    assert not elector._thread.is_alive()
    assert api.record is not None and api.record.holder == "" and api.writes[-1] == ("MainThread", "")
    assert lost == []  # a release is no lost lease


def test_the_lease_client_trusts_the_cluster_s_ca_only(tmp_path: Path) -> None:
    # It loaded the system's public CAs too: an API server impersonated with a publicly trusted
    # certificate got the operator's token (Kopf, the API and client-go trust the cluster CA only).
    ca = CertificateAuthority.create(tmp_path / "ca")
    for info in (
        kopf.ConnectionInfo(server="https://10.0.0.1:6443", ca_path=str(ca.cert_path)),
        kopf.ConnectionInfo(
            server="https://10.0.0.1:6443", ca_data=base64.b64encode(ca.cert_path.read_bytes()).decode()
        ),
    ):
        context = connection_from(info).context
        assert context is not None and len(context.get_ca_certs()) == 1


class _ProxyErrorPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_proxy_s_error_page_is_told_with_its_status() -> None:
    # Told as "Expecting value: line 1 column 1 (char 0)": no status, no hint of the proxy.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyErrorPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = LeaseClient(
            lambda: connection_from(kopf.ConnectionInfo(server=url, token="t")), "ns", "lease", timeout=5
        )
        with pytest.raises(RuntimeError, match=r"GET lease ns/lease: 502 <html><body><h1>502 Bad Gateway"):
            client.get()
    finally:
        server.shutdown()
