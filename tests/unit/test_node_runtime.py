"""Host processes on the event loop: exit codes, CRI logs, process-group signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from runner_fakes import alive

from dsjobs.devcluster.node.logs import read_entries
from dsjobs.devcluster.node.runtime import ContainerProcess, Notifier, exit_status, proc_start_ticks

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_exit_status_convention() -> None:
    assert exit_status(3 << 8).exit_code == 3
    killed = exit_status(signal.SIGKILL)
    assert (killed.exit_code, killed.signal) == (137, 9)


def test_exit_code_and_logs(tmp_path: Path) -> None:
    log = tmp_path / "c.log"

    async def main() -> tuple[int, int | None]:
        proc = ContainerProcess.spawn(
            ["/bin/sh", "-c", "echo out; echo err >&2; printf partial; exit 3"],
            {"PATH": "/usr/bin:/bin"},
            str(log),
            Notifier(),
        )
        assert proc_start_ticks(proc.pid) is not None
        st = await proc.wait()
        return st.exit_code, st.signal

    assert run(main()) == (3, None)
    entries = read_entries(str(log))
    got = sorted((e.stream, e.content) for e in entries)
    assert got == [("stderr", b"err"), ("stdout", b"out"), ("stdout", b"partial")]


def test_sigterm_reaches_the_whole_group(tmp_path: Path) -> None:
    log = tmp_path / "c.log"

    async def main() -> tuple[int, int | None]:
        # The shell ignores nothing; its child sleep is in the same group and dies too.
        proc = ContainerProcess.spawn(
            ["/bin/sh", "-c", "trap 'echo term; exit 0' TERM; echo ready; sleep 100 & wait"],
            {},
            str(log),
            Notifier(),
        )
        # The trap is set once "ready" is logged (a TERM before it would end the shell with 143).
        deadline = asyncio.get_running_loop().time() + 30
        while not log.exists() or b"ready" not in [e.content for e in read_entries(str(log))]:
            assert asyncio.get_running_loop().time() < deadline, "the shell never got ready"
            await asyncio.sleep(0.02)
        proc.signal(signal.SIGTERM)
        st = await proc.wait()
        return st.exit_code, st.signal

    code, sig = run(main())
    assert (code, sig) == (0, None)
    assert [e.content for e in read_entries(str(log))] == [b"ready", b"term"]


def test_sigkill_reported_as_137(tmp_path: Path) -> None:
    async def main() -> tuple[int, int | None]:
        proc = ContainerProcess.spawn(
            ["/bin/sh", "-c", "trap '' TERM; sleep 100"], {}, str(tmp_path / "l"), Notifier()
        )
        await asyncio.sleep(0.2)
        proc.signal(signal.SIGKILL)
        st = await proc.wait()
        return st.exit_code, st.signal

    assert run(main()) == (137, 9)


def test_straggler_holding_the_pipe_does_not_block(tmp_path: Path) -> None:
    log = tmp_path / "l"
    escaped = tmp_path / "straggler"

    async def main() -> tuple[int, bool]:
        # A grandchild in its own session escapes the group kill and keeps stdout open. The shell
        # ends only once it has escaped (its pid written after setsid), not while it could still
        # be caught in the group.
        # The path by the environment (any path quotes inside the inner sh's single quotes), and
        # a bound on the wait: a pid file never written spun this shell past the test for good.
        script = (
            """setsid sh -c 'echo $$ >"$ESCAPED"; exec sleep 30' & """
            """n=0; until [ -s "$ESCAPED" ] || [ $n -ge 200 ]; do sleep 0.05; n=$((n+1)); done; echo started"""
        )
        env = {"PATH": "/usr/bin:/bin", "ESCAPED": str(escaped)}
        proc = ContainerProcess.spawn(["/bin/sh", "-c", script], env, str(log), Notifier())
        st = await proc.wait()
        return st.exit_code, proc.running

    code, running = run(main())
    straggler = int(escaped.read_text())
    try:
        assert (code, running) == (0, False)
        assert [e.content for e in read_entries(str(log))] == [b"started"]
        # wait() returned while the straggler still held the pipe (no EOF yet): it did not wait
        # for the straggler's end, only (a bounded while) for the pipe to drain.
        assert alive(straggler)
    finally:
        if alive(straggler):
            os.kill(straggler, signal.SIGKILL)


def test_a_cancelled_wait_leaves_no_task_pending() -> None:
    """A worker closed while it waited left its Event.wait() task pending for good: asyncio logged
    "Task was destroyed but it is pending!" at ERROR once it was collected."""
    from dsjobs.devcluster.node.runtime import wait_any

    async def main() -> tuple[int, bool]:
        never, soon = asyncio.Event(), asyncio.Event()
        waiting = asyncio.create_task(wait_any(never.wait(), soon.wait()))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0)  # the inner tasks' cancellation runs
        left = len(asyncio.all_tasks()) - 1  # this one
        soon.set()
        await wait_any(never.wait(), soon.wait(), timeout=5)  # the first done ends it
        await wait_any(soon.wait(), asyncio.sleep(0), every=True)
        await asyncio.sleep(0)
        return left, len(asyncio.all_tasks()) == 1

    assert asyncio.run(main()) == (0, True)
