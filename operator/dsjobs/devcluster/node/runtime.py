"""Host processes as containers: spawn, log capture, signals, exit — all on the event loop.

* `posix_spawn` (vfork-fast, no fork of the agent's memory) with `setsid`, so each
  container's main process leads its own session and process group;
* stdout/stderr are pipes read with `loop.add_reader` and written as CRI log entries;
* the exit is noticed through a pidfd registered with the loop: no thread per process.

When the main process exits, the rest of its process group is SIGKILLed before the
zombie is reaped, as a container runtime tears down the container's PID namespace
(processes that called setsid() themselves escape: there is no PID namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .logs import LineSplitter, encode_entry, now_ns

# How long to wait for the log pipes to drain after the process group is gone.
DRAIN_TIMEOUT = 2.0


async def wait_any(*waits: Awaitable[object], timeout: float | None = None, every: bool = False) -> None:
    """Until the first of `waits` is done (`every`: all of them), or `timeout`. The ones left are
    cancelled, also when this wait is itself cancelled: a task left pending (an Event.wait of a
    worker closed meanwhile) is logged at ERROR by asyncio once collected."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        when = asyncio.ALL_COMPLETED if every else asyncio.FIRST_COMPLETED
        await asyncio.wait(tasks, timeout=timeout, return_when=when)
    finally:
        for task in tasks:
            task.cancel()


class Notifier:
    """Wakes every waiter on each `notify()` (log followers, status writers)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    signal: int | None


def exit_status(wait_status: int) -> ExitStatus:
    """Container convention: killed by signal N -> exit code 128+N."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        return ExitStatus(128 - code, -code)
    return ExitStatus(code, None)


def proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: tells a reused pid from the process we started."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class ContainerProcess:
    """One running instance of a container."""

    def __init__(
        self, pid: int, pidfd: int, pipes: dict[str, int], log: BinaryIO, notifier: Notifier
    ) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._log = log
        self._notifier = notifier
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._open_pipes: dict[int, tuple[str, LineSplitter]] = {}
        self._pipes_closed = asyncio.Event()
        for stream, fd in pipes.items():
            os.set_blocking(fd, False)
            self._open_pipes[fd] = (stream, LineSplitter())
            self._loop.add_reader(fd, self._on_readable, fd)
        self._loop.add_reader(pidfd, self._on_exit)

    @classmethod
    def spawn(
        cls, argv: Sequence[str], env: dict[str, str], log_path: str, notifier: Notifier
    ) -> ContainerProcess:
        """Start argv[0] (an absolute path) in a new session. Raises OSError if it cannot start."""
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - owned by the instance, closed on exit
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        try:
            pid = os.posix_spawn(
                argv[0],
                list(argv),
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, w_out, 1),
                    (os.POSIX_SPAWN_DUP2, w_err, 2),
                ],
                setsid=True,
                # Python ignores SIGPIPE/SIGXFSZ; an ignored signal stays ignored across exec.
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM),
                setsigmask=(),
            )
        except OSError:
            for fd in (r_out, w_out, r_err, w_err):
                os.close(fd)
            log.close()
            raise
        os.close(w_out)
        os.close(w_err)
        pidfd = os.pidfd_open(pid)
        return cls(pid, pidfd, {"stdout": r_out, "stderr": r_err}, log, notifier)

    # -- logs

    def _write(self, stream: str, entries: list[tuple[bool, bytes]]) -> None:
        if not entries:
            return
        ts = now_ns()
        data = b"".join(encode_entry(ts, stream, partial, content) for partial, content in entries)
        with contextlib.suppress(OSError, ValueError):
            self._log.write(data)
        self._notifier.notify()

    def _on_readable(self, fd: int) -> None:
        stream, splitter = self._open_pipes[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._write(stream, splitter.feed(data))
            return
        self._close_pipe(fd)

    def _close_pipe(self, fd: int) -> None:
        stream, splitter = self._open_pipes.pop(fd)
        self._write(stream, splitter.flush())
        self._loop.remove_reader(fd)
        os.close(fd)
        if not self._open_pipes:
            self._pipes_closed.set()

    # -- exit

    def _on_exit(self) -> None:
        # Kill stragglers while the zombie still pins the process group id.
        kill_group(self.pid, signal.SIGKILL)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(exit_status(status))

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the container)."""
        if not self._exited.done():
            kill_group(self.pid, sig)

    @property
    def running(self) -> bool:
        return not self._exited.done()

    async def wait(self) -> ExitStatus:
        """Wait for the exit and for the logs to be drained; then the log file is closed."""
        result = await asyncio.shield(self._exited)
        if self._open_pipes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pipes_closed.wait(), DRAIN_TIMEOUT)
            # A daemonized grandchild may hold the pipe open forever; stop listening.
            for fd in list(self._open_pipes):
                self._close_pipe(fd)
        if not self._log.closed:
            self._log.close()
        self._notifier.notify()
        return result
