"""Shared pieces of the benchmark scripts: statistics, result tables, machine facts, the bench
cluster, a lean Kubernetes HTTP client and the docs/benchmarks.md updater.

The scripts in bench/ are standalone (run with the venv's python, `bench/` first on sys.path), so
this is imported as `common`. Nothing here asserts on timings: benchmarks report, tests assert.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = sys.executable
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
# One per checkout: two checkouts' benchmarks on one machine must not take down each other's cluster.
DEFAULT_DIR = Path(
    os.environ.get("DSJOBS_BENCH_DIR")
    or f"/tmp/dsjobs-bench-{hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:8]}"
)

Obj = dict[str, Any]


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float) -> str:
    """Milliseconds, with the precision the noise on a shared 2-core machine deserves."""
    v = seconds * 1000
    return f"{v:.1f} ms" if v < 10 else f"{v:.0f} ms"


def secs(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def latency_summary(samples: Sequence[float]) -> str:
    return (
        f"p50 {ms(percentile(samples, 50))}, p90 {ms(percentile(samples, 90))}, "
        f"p99 {ms(percentile(samples, 99))}, max {ms(max(samples))} (n={len(samples)})"
    )


# ------------------------------------------------------------------ load and machine


def load1() -> float:
    return os.getloadavg()[0]


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def wait_quiet(idle: float = 0.7, window: float = 2.0, timeout: float = 180.0) -> tuple[float, float]:
    """Wait until the CPUs were at least `idle` idle over the last `window` seconds.

    A benchmark that starts right after another one would otherwise measure the tail of its work
    (pods terminating, cleanups, the API server catching up) instead of its own subject. Gives up
    after `timeout`. Returns (seconds waited, idle fraction of the last window).
    """
    t0 = time.monotonic()
    while True:
        i0, a0 = _cpu_times()
        time.sleep(window)
        i1, a1 = _cpu_times()
        frac = (i1 - i0) / max(1, a1 - a0)
        waited = time.monotonic() - t0
        if frac >= idle or waited >= timeout:
            return waited, frac


@dataclass
class LoadSpan:
    """The 1-minute load average when a measurement started and ended.

    The machine is shared with other sessions; the load beside each figure says how much to trust
    it. Our own benchmark adds to it, so a load around 2 during a saturating test is expected.
    """

    start: float = field(default_factory=load1)
    end: float | None = None

    def stop(self) -> LoadSpan:
        self.end = load1()
        return self

    def __str__(self) -> str:
        end = self.end if self.end is not None else load1()
        return f"{self.start:.1f}→{end:.1f}"


def _run_text(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=20, check=False, cwd=REPO_ROOT
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, str]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = _run_text(["free", "-g"]).splitlines()
    mem_line = next((m for m in mem if m.startswith("Mem:")), "")
    parts = mem_line.split()
    commit = _run_text(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = bool(_run_text(["git", "status", "--porcelain", "--untracked-files=no"]))
    untracked = bool(_run_text(["git", "ls-files", "--others", "--exclude-standard", "operator"]))
    la = os.getloadavg()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" + uncommitted changes" if dirty or untracked else ""),
        "nproc": _run_text(["nproc"]),
        "cpu": cpu_model,
        "memory": f"{parts[1]} GiB total, {parts[6]} GiB available" if len(parts) > 6 else mem_line,
        "load": f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}",
        "python": sys.version.split()[0],
    }


def machine_line(info: dict[str, str]) -> str:
    return (
        f"{info['date']}, commit {info['commit']}; {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['memory']}; load average at start {info['load']}; Python {info['python']}"
    )


def proc_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MiB; VmHWM is its peak RSS so far."""
    rss = hwm = 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


#: (substring of a process's command line, what it is): the first match names the process.
CPU_KINDS: tuple[tuple[str, str], ...] = (
    ("kube-apiserver", "API server"),
    ("bin/etcd", "etcd"),
    ("kube-scheduler", "scheduler"),
    ("kube-controller-manager", "controller-manager"),
    ("s3server", "S3 server"),
    ("dsjobs.devcluster.node", "node agents"),
    ("dsjobs.controller", "operator"),
    ("dsjobs.runner", "runner (Python)"),
)


class CpuBreakdown:
    """CPU seconds by kind of process over a measurement (a thread samples /proc every 0.1 s).

    A process is named by the first command line seen (a zombie shows none and keeps its name);
    the benchmark's own process is "bench". What the samples cannot name (a process born and
    gone between two samples, the job's own commands, the kernel) is "other": the machine's CPU
    total minus the named ones.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self._names: dict[int, str] = {}
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._times0 = _cpu_times()
        self._total0 = self._machine()
        #: Share of the machine's CPU time that was busy over the measurement (set by stop()).
        self.busy = 0.0
        self._sample(base=True)
        self._thread = threading.Thread(target=self._run, name="cpu-breakdown", daemon=True)
        self._thread.start()

    @staticmethod
    def _machine() -> float:
        idle, total = _cpu_times()
        return (total - idle) / os.sysconf("SC_CLK_TCK")

    def _sample(self, *, base: bool = False) -> None:
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self._names:
                try:
                    cmdline = (
                        Path(f"/proc/{pid}/cmdline")
                        .read_bytes()
                        .replace(b"\0", b" ")
                        .decode(errors="replace")
                    )
                except OSError:
                    continue
                if not cmdline:
                    continue  # a kernel thread, or a zombie never seen alive: "other"
                kind = "bench" if pid == me else next((k for sub, k in CPU_KINDS if sub in cmdline), "")
                self._names[pid] = kind
            if not self._names[pid]:
                continue
            cpu = proc_cpu_seconds(pid)
            if base:
                self._base[pid] = cpu
            if cpu > 0:
                self._last[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def stop(self) -> dict[str, float]:
        """Seconds of CPU per kind since the start, "other" included."""
        self._stop.set()
        self._thread.join()
        self._sample()
        by_kind: dict[str, float] = {}
        for pid, cpu in self._last.items():
            kind = self._names[pid]
            by_kind[kind] = by_kind.get(kind, 0.0) + max(0.0, cpu - self._base.get(pid, 0.0))
        by_kind["other"] = max(0.0, self._machine() - self._total0 - sum(by_kind.values()))
        idle, total = _cpu_times()
        elapsed = total - self._times0[1]
        self.busy = (elapsed - (idle - self._times0[0])) / elapsed if elapsed > 0 else 0.0
        return by_kind


def cpu_note(by_kind: dict[str, float], n: int, unit: str = "job") -> str:
    """'CPU per job 1200 ms (runner 610 ms, API server 140 ms, ...)' (largest first)."""
    total = sum(by_kind.values())
    parts = ", ".join(
        f"{k} {1000 * v / n:.0f} ms"
        for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        if 1000 * v / n >= 1
    )
    return f"CPU per {unit} {1000 * total / n:.0f} ms ({parts})"


def proc_cpu_seconds(pid: int) -> float:
    """user+system CPU time of a live process (not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    wall: float  # spawn -> exit, interpreter start-up included
    peak_rss_mib: float  # the child's own ru_maxrss
    stdout: str


GNU_TIME = "/usr/bin/time"


def run_measured(argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> Measured:
    """Run a process to completion; its wall time and its own peak RSS.

    Why /usr/bin/time in between: Linux carries the RSS high-water mark of the process that
    exec()s into the new program's ru_maxrss (and Python spawns with vfork, sharing our memory
    until the exec), so a child of this fat benchmark process would report at least our own RSS.
    A child of the small `time` process reports its own.
    """
    with tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss_file:
        wrapped = list(argv)
        if os.access(GNU_TIME, os.X_OK):
            wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv]
        t0 = time.monotonic()
        proc = subprocess.run(wrapped, env=env, cwd=cwd or REPO_ROOT, capture_output=True, check=False)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")
            raise RuntimeError(f"{' '.join(argv[:4])} exited {proc.returncode}:\n{err[-3000:]}")
        text = Path(rss_file.name).read_text().strip()
    # Without GNU time: no per-process figure we would trust.
    peak = int(text.splitlines()[-1]) / 1024 if text else float("nan")
    return Measured(wall, peak, proc.stdout.decode(errors="replace"))


# ------------------------------------------------------------------ results


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    load: str = ""
    notes: str = ""
    ok: bool | None = None  # None: no target, or not comparable


@dataclass
class Section:
    """The outcome of one benchmark: figures, plus why some were not measured."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    seconds: float = 0.0

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        print(f"  {fig.name}: {fig.value}  [load {fig.load}]", file=sys.stderr, flush=True)
        return fig

    def skip(self, why: str) -> None:
        self.skipped.append(why)
        print(f"  skipped: {why}", file=sys.stderr, flush=True)

    def markdown(self, machine: dict[str, str] | None = None) -> str:
        out = [f"### {self.title}", ""]
        run = f"Measured {self.date} in {self.seconds:.0f} s"
        if machine:
            run += f" (commit {machine['commit']}, {machine['nproc']} CPUs, {machine['memory']})"
        out += [run + ". Load: 1-minute load average at start→end of each measurement.", ""]
        if self.figures:
            out += ["| figure | value | target | load | notes |", "|---|---|---|---|---|"]
            for f in self.figures:
                target = f.target
                if f.target and f.ok is not None:
                    target += " ✓" if f.ok else " ✗"
                out.append(f"| {f.name} | {f.value} | {target} | {f.load} | {f.notes} |".replace("\n", " "))
            out.append("")
        out += [f"- {n}" for n in self.notes]
        out += [f"- skipped: {s}" for s in self.skipped]
        return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------ docs/benchmarks.md

RESULTS_HEADING = "## `make bench` results"
_RESULTS_INTRO = """\
Written by `make bench` (`hack/bench.sh [cluster storage controller api runner]`; the scripts are in
`bench/`, each also runs alone: `.venv/bin/python bench/<name>.py`). The benchmarks bring up a dev
cluster of their own in `$DSJOBS_BENCH_DIR` (default `/tmp/dsjobs-bench-<hash of the checkout's path>`) and take it down at the
end. Each rerun of a benchmark replaces its own section between the `bench:<name>` markers below;
benchmarks that were not rerun keep their earlier figures and dates. Knobs: `BENCH_OPERATOR_JOBS`
(500), `BENCH_STORAGE_REPS` (2), `BENCH_RUNNER_REPS` (2); `--quick` checks the harness with small
counts and writes nothing here.

The machine is shared with other sessions and the benchmark's own processes (clients, S3 server,
job pods) run on the same 2 cores: read every figure with its load column (1-minute load average
at the start and end of the measurement). Nothing here is asserted by a test.
"""


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"


def replace_marked(text: str, key: str, body: str, order: Sequence[str]) -> str:
    """Put `body` between the markers of `key`: replaced in place when they exist, else inserted
    after the last existing section that comes before `key` in `order` (else at the end)."""
    begin, end = _markers(key)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    if RESULTS_HEADING not in text:
        text = text.rstrip() + f"\n\n{RESULTS_HEADING}\n\n{_RESULTS_INTRO}"
    anchor = -1
    for earlier in order[: order.index(key)] if key in order else order:
        m = re.search(re.escape(_markers(earlier)[1]), text)
        if m:
            anchor = m.end()
    if anchor < 0:
        return text.rstrip() + f"\n\n{block}\n"
    return text[:anchor] + f"\n\n{block}" + text[anchor:]


def has_section(key: str) -> bool:
    return DOC_PATH.exists() and _markers(key)[0] in DOC_PATH.read_text()


def update_doc(sections: Iterable[Section], machine: dict[str, str], order: Sequence[str]) -> None:
    text = DOC_PATH.read_text() if DOC_PATH.exists() else "# Benchmarks\n"
    for s in sections:
        text = replace_marked(text, s.key, s.markdown(machine), order)
    DOC_PATH.write_text(text.rstrip() + "\n")


# ------------------------------------------------------------------ the bench cluster


@dataclass
class TimedRun:
    seconds: float
    returncode: int
    stdout: str
    stderr: str


def timed(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 3600) -> TimedRun:
    t0 = time.monotonic()
    p = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO_ROOT, env=env
    )
    return TimedRun(time.monotonic() - t0, p.returncode, p.stdout, p.stderr)


class BenchCluster:
    """A dev cluster in a directory of its own (never `.dev`: other sessions use that one)."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.started_here = False

    def cli(self, *args: str, timeout: float = 3600) -> TimedRun:
        return timed(
            [VENV_PYTHON, "-m", "dsjobs.devcluster", "--dir", str(self.root), *args], timeout=timeout
        )

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def running(self) -> bool:
        return self.cli("status", timeout=60).returncode == 0

    def up(self) -> TimedRun:
        r = self.cli("up")
        if r.returncode != 0:
            raise RuntimeError(f"devcluster up failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        self.started_here = True
        return r

    def down(self) -> TimedRun:
        r = self.cli("down", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"devcluster down failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        self.started_here = False
        return r

    def ensure_up(self) -> None:
        if not self.running():
            # A half-dead recorded cluster makes `up` refuse; clear it first.
            self.cli("down", timeout=300)
            self.up()

    def record(self) -> Obj:
        return dict(json.loads((self.root / "cluster" / "pids.json").read_text()))

    def pid_of(self, name: str) -> int:
        for c in self.record()["components"]:
            if c["name"] == name:
                return int(c["pid"])
        raise KeyError(name)

    def bin_dir(self) -> Path:
        return Path(self.record()["info"]["bin_dir"])

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        p = subprocess.run(
            [str(self.bin_dir() / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {p.stderr.strip()}")
        return p.stdout

    def s3_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for line in (self.root / "s3.env").read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                env[k] = v
        return env

    def kube(self) -> Kube:
        return Kube(self.kubeconfig)


# ------------------------------------------------------------------ Kubernetes over plain HTTP


class KubeError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Kube:
    """A minimal Kubernetes client: one keep-alive HTTPS connection per thread, JSON in and out.

    Why not the `kubernetes` package: its per-request CPU (model (de)serialisation) is several
    times the API server's own cost per pod on this 2-core machine, so a throughput figure would
    measure the client. This one costs little more than the TLS write.
    """

    def __init__(self, kubeconfig: Path) -> None:
        cfg = yaml.safe_load(kubeconfig.read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        url = urllib.parse.urlsplit(cluster["server"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.ssl = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if "token" in user:
            self.headers["Authorization"] = f"Bearer {user['token']}"
        if "client-certificate-data" in user:
            # load_cert_chain wants files; they live only for the call.
            with tempfile.TemporaryDirectory() as d:
                cert, key = Path(d) / "c.crt", Path(d) / "c.key"
                cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
                key.write_bytes(base64.b64decode(user["client-key-data"]))
                self.ssl.load_cert_chain(cert, key)
        self._local = threading.local()

    def _conn(self, fresh: bool = False) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl, timeout=120)
            self._local.conn = conn
        return conn

    def raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            conn = self._conn(fresh=attempt == 2)
            try:
                conn.request(method, path, body=data, headers=self.headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A keep-alive connection the server closed while idle: retry once on a new one.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None, ok: Iterable[int] = (200, 201, 202)) -> Any:
        status, data = self.raw(method, path, body)
        for _ in range(30):
            # 429 "storage is (re)initializing" follows a CRD (re)apply for a moment: wait it out.
            if status != 429:
                break
            time.sleep(1)
            status, data = self.raw(method, path, body)
        if status not in tuple(ok):
            raise KubeError(status, data.decode(errors="replace"))
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body)

    def delete(self, path: str, ok: Iterable[int] = (200, 202, 404)) -> Any:
        return self.call("DELETE", path, ok=ok)

    def metrics_text(self) -> str:
        status, data = self.raw("GET", "/metrics")
        if status != 200:
            raise KubeError(status, data.decode(errors="replace"))
        return data.decode()

    # -- namespaces

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.post("/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}})
        # Pods are rejected until the namespace's default ServiceAccount exists.
        wait_for(
            f"default ServiceAccount in {name}",
            lambda: self.raw("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
            60,
        )

    def delete_namespace(self, name: str, wait: float = 0) -> None:
        self.delete(f"/api/v1/namespaces/{name}")
        if wait:
            wait_for(
                f"namespace {name} gone",
                lambda: self.raw("GET", f"/api/v1/namespaces/{name}")[0] == 404,
                wait,
                interval=0.5,
            )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


@dataclass
class WatchEvent:
    at: float  # time.monotonic() when the line was read
    type: str
    obj: Obj


class Watch:
    """A watch in a thread of its own, on its own connection; calls `on_event` per event.

    Reconnects from the last resourceVersion when the server ends the stream (timeoutSeconds),
    so a long benchmark sees every change exactly as a controller would.
    """

    def __init__(self, kube: Kube, path: str, on_event: Callable[[WatchEvent], None]) -> None:
        self.kube, self.path, self.on_event = kube, path, on_event
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"watch {path}")

    def start(self) -> Watch:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"watch on {self.path} did not start")
        return self

    def _run(self) -> None:
        version = str(self.kube.get(self.path)["metadata"]["resourceVersion"])
        while not self._stop.is_set():
            sep = "&" if "?" in self.path else "?"
            q = f"{self.path}{sep}watch=1&resourceVersion={version}&timeoutSeconds=300&allowWatchBookmarks=true"
            conn = http.client.HTTPSConnection(
                self.kube.host, self.kube.port, context=self.kube.ssl, timeout=400
            )
            self._conn = conn
            try:
                conn.request("GET", q, headers=self.kube.headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    raise KubeError(resp.status, resp.read().decode(errors="replace"))
                self._ready.set()
                while not self._stop.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    at = time.monotonic()
                    ev = json.loads(line)
                    obj = ev.get("object", {})
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if ev["type"] == "ERROR":
                        # 410 Gone: our version is too old; start from the current state.
                        version = str(self.kube.get(self.path)["metadata"]["resourceVersion"])
                        break
                    if ev["type"] != "BOOKMARK":
                        self.on_event(WatchEvent(at, ev["type"], obj))
            except (OSError, http.client.HTTPException, ValueError):
                if self._stop.is_set():
                    return
                time.sleep(0.2)
            finally:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._conn is not None and self._conn.sock is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)


class Tracker:
    """When a watch first saw each object meet each named condition (e.g. "bound", "running").

    Conditions get (event type, object); `key` names the object (None: not ours, ignored).
    """

    def __init__(
        self,
        conditions: dict[str, Callable[[str, Obj], bool]],
        key: Callable[[Obj], str | None] = lambda o: str(o["metadata"]["name"]),
    ) -> None:
        self.conditions = conditions
        self.key = key
        self.seen: dict[str, dict[str, float]] = {c: {} for c in conditions}
        self.cond = threading.Condition()

    def on_event(self, ev: WatchEvent) -> None:
        k = self.key(ev.obj)
        if k is None:
            return
        with self.cond:
            for name, pred in self.conditions.items():
                if k not in self.seen[name] and pred(ev.type, ev.obj):
                    self.seen[name][k] = ev.at
                    self.cond.notify_all()

    def wait(self, condition: str, names: Iterable[str], timeout: float) -> None:
        wanted = list(names)
        seen = self.seen[condition]
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in seen for n in wanted):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in wanted if n not in seen]
                    raise TimeoutError(
                        f"{len(missing)} of {len(wanted)} not {condition} after {timeout:.0f}s: {missing[:5]}"
                    )
                self.cond.wait(min(left, 1.0))


@dataclass
class Burst:
    created: dict[str, float]  # name -> monotonic time of the create response
    request: list[float]  # latency of each create request
    wall: float  # first request sent -> last response
    t0: float  # when the clients were released

    @property
    def rate(self) -> float:
        return len(self.created) / self.wall if self.wall > 0 else float("nan")


def parallel_create(kube: Kube, path: str, bodies: Sequence[Obj], clients: int = 8) -> Burst:
    """POST `bodies` from `clients` threads at once, each as fast as the server answers."""
    created: dict[str, float] = {}
    request: list[float] = []
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def worker(chunk: Sequence[Obj]) -> None:
        try:
            kube.get("/version")  # open this thread's connection before the clock starts
            start.wait()
            for b in chunk:
                t = time.monotonic()
                kube.post(path, b)
                created[b["metadata"]["name"]] = done = time.monotonic()
                request.append(done - t)
        except BaseException as e:
            errors.append(e)
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()
        finally:
            kube.close()

    threads = [threading.Thread(target=worker, args=(bodies[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return Burst(created, request, max(created.values()) - t0, t0)


def write_requests(metrics_text: str) -> dict[str, float]:
    """apiserver_request_total for writes, summed by resource[/subresource]."""
    out: dict[str, float] = {}
    for labels, value in parse_prom(metrics_text, "apiserver_request_total"):
        if labels.get("verb") in ("GET", "LIST", "WATCH", "CONNECT"):
            continue
        res = labels.get("resource", "?") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        out[res] = out.get(res, 0.0) + value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


# ------------------------------------------------------------------ misc helpers


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = check()
            if v:
                return v
        except Exception as e:  # transient errors while things converge
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def suffix() -> str:
    return secrets.token_hex(3)


def parse_prom(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric from Prometheus text format: [(labels, value)]."""
    out: list[tuple[dict[str, str], float]] = []
    prefix = metric + "{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels_s, _, value = line[len(prefix) :].rpartition("} ")
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels_s))
            out.append((labels, float(value)))
        elif line.startswith(metric + " "):
            out.append(({}, float(line.split()[1])))
    return out


def module_missing(name: str, *, runnable: bool = False) -> str | None:
    """None when `name` can be imported here (with `runnable`: run as `python -m name`), else why not."""
    import importlib.util

    target = f"{name}.__main__" if runnable else name
    try:
        spec = importlib.util.find_spec(target)
    except ModuleNotFoundError:
        spec = None
    return None if spec is not None else f"{name} missing"


@dataclass
class Context:
    """What every benchmark gets from bench/run.py."""

    cluster: BenchCluster
    work: Path  # scratch space (big files, process logs); removed at the end
    quick: bool = False  # smaller counts: checks that the harness works, figures are not comparable
    # Fixtures more than one benchmark can use within one run (e.g. a namespace of 10k jobs).
    shared: dict[str, Any] = field(default_factory=dict)
    # Run by bench/run.py at the very end, last first (for the shared fixtures).
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full
