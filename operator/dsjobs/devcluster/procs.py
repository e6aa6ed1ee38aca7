"""Starting, recording and stopping the cluster's child processes.

Every child runs in its own session (so it outlives `up` and a Ctrl-C in the
user's terminal does not reach it) and is recorded in `pids.json` with its
process group and kernel start time. `down` signals exactly those groups, and
only when the start time still matches, so a recycled PID is never killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PIDS_FORMAT = 1


@dataclass
class Component:
    """One recorded child process."""

    name: str
    pid: int
    pgid: int
    start_time: int  # /proc/<pid>/stat field 22, in clock ticks since boot
    argv: list[str]
    log: str
    ports: dict[str, int] = field(default_factory=dict)
    kind: str = "control-plane"  # control-plane | s3 | node


@dataclass
class Record:
    """The content of pids.json: the processes plus how to reach the cluster."""

    components: list[Component] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"format": PIDS_FORMAT, "components": [asdict(c) for c in self.components], "info": self.info},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Record:
        raw = json.loads(text)
        if raw.get("format") != PIDS_FORMAT:
            raise ValueError(f"unsupported pids.json format {raw.get('format')!r}")
        return cls([Component(**c) for c in raw["components"]], dict(raw.get("info", {})))

    def save(self, path: Path) -> None:
        # Rewritten after every start, so a failed `up` still leaves a record
        # that `down` can clean up from.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Record | None:
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            # Empty or cut short (a crash during its write): a traceback here made `down`, the
            # way out of a broken cluster, fail too.
            log.warning(
                "%s cannot be read (%s): taken as no record; the processes it listed are not stopped "
                "through it (kill them by hand if they run)",
                path,
                exc,
            )
            return None

    def find(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


#: The children spawned here, kept: a Popen collected while its child has just exited reaps it,
#: and how it ended (exit_status) would be lost.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
#: Return codes (negative: the signal) of children reaped here, by pid.
_ENDED: dict[int, int] = {}


def _reap(pid: int) -> None:
    # When the caller of `up` is still alive (e.g. a test in the same
    # process), exited children stay zombies until their parent reaps them.
    child = _CHILDREN.get(pid)
    if child is not None:
        code = child.poll()
        if code is not None:
            del _CHILDREN[pid]
            _ENDED[pid] = code
        return
    with contextlib.suppress(ChildProcessError, OSError):
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            _ENDED[reaped] = os.waitstatus_to_exitcode(status)


def is_running(c: Component) -> bool:
    """The recorded process exists, is the same process, and is not a zombie."""
    _reap(c.pid)
    fields = _stat_fields(c.pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return int(fields[19]) == c.start_time


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(pid)
    return members


def exit_status(comp: Component) -> str | None:
    """How a child of this process that ended did (`exit code 1`, `killed by SIGSEGV`), or None:
    still running, or not ours to reap. A binary that crashes at once (a truncated cached one)
    leaves an empty log, and this is all there is to tell."""
    _reap(comp.pid)
    code = _ENDED.pop(comp.pid, None)
    if code is None:
        return None
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ports: Mapping[str, int] | None = None,
    kind: str = "control-plane",
) -> Component:
    """Start a detached child with stdout+stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    _CHILDREN[proc.pid] = proc
    st = start_time(proc.pid)
    if st is None:  # exited within microseconds; keep a record anyway
        st = -1
    comp = Component(
        name=name,
        pid=proc.pid,
        pgid=proc.pid,  # start_new_session makes it the group (and session) leader
        start_time=st,
        argv=list(argv),
        log=str(log_path),
        ports=dict(ports or {}),
        kind=kind,
    )
    log.info("started %s pid=%d log=%s", name, proc.pid, log_path)
    return comp


def stop(components: Sequence[Component], timeout: float = 15.0) -> list[str]:
    """SIGTERM each live component's process group, SIGKILL whatever is left
    after `timeout`. Returns the names that were running."""
    live = [c for c in components if is_running(c)]
    for c in components:
        if c not in live:
            log.debug("%s (pid %d) is not running", c.name, c.pid)
    for c in live:
        log.info("stopping %s pid=%d", c.name, c.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    pending = list(live)
    while pending and time.monotonic() < deadline:
        pending = [c for c in pending if is_running(c) or group_members(c.pgid)]
        if pending:
            time.sleep(0.1)
    for c in pending:
        log.warning("%s did not exit within %.0fs of SIGTERM; sending SIGKILL", c.name, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pending and time.monotonic() < deadline:
        pending = [c for c in pending if is_running(c) or group_members(c.pgid)]
        if pending:
            time.sleep(0.05)
    for c in pending:
        log.error("%s (pid %d) survived SIGKILL", c.name, c.pid)
    return [c.name for c in live]


@contextlib.contextmanager
def reserve_ports(count: int) -> Iterator[list[int]]:
    """Pick `count` distinct free loopback ports, below the kernel's ephemeral range.

    The sockets stay bound while the caller builds its command lines, so the
    kernel cannot hand the same port out twice; they are closed on exit, just
    before the children bind them (a small, accepted race with strangers).
    Not from the ephemeral range (what binding port 0 gives): there an outgoing
    connection may hold the port as its own when a restarted process binds it
    again (EADDRINUSE: a restarted API server failed for half a minute).
    """
    socks: list[socket.socket] = []
    try:
        low, high = RESERVED_PORTS_FROM, ephemeral_ports()[0]
        candidates = random.sample(range(low, high), min(PORT_TRIES, high - low)) if high > low else []
        for port in candidates:
            if len(socks) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < count:  # a range too small or full: the kernel's choice
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


#: Where reserve_ports looks first: above the usual fixed ports (the stack's own defaults, 17090
#: and the like), below the ephemeral range.
RESERVED_PORTS_FROM = 20000
PORT_TRIES = 200


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default if unknown)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


def tail(path: Path | str, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])
