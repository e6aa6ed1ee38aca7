"""Host processes on the event loop: exit codes, CRI logs, process-group signals."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

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

    async def main() -> tuple[int, int | None, float]:
        # The shell ignores nothing; its child sleep is in the same group and dies too.
        proc = ContainerProcess.spawn(
            ["/bin/sh", "-c", "trap 'echo term; exit 0' TERM; sleep 100 & wait"], {}, str(log), Notifier()
        )
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        st = await proc.wait()
        return st.exit_code, st.signal, time.monotonic() - t0

    code, sig, _ = run(main())
    assert (code, sig) == (0, None)
    assert [e.content for e in read_entries(str(log))] == [b"term"]


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
    async def main() -> int:
        # A grandchild in its own session escapes the group kill and keeps stdout open.
        proc = ContainerProcess.spawn(
            ["/bin/sh", "-c", "setsid sleep 30 & echo started"],
            {"PATH": "/usr/bin:/bin"},
            str(tmp_path / "l"),
            Notifier(),
        )
        st = await proc.wait()
        return st.exit_code

    t0 = time.monotonic()
    assert run(main()) == 0
    assert time.monotonic() - t0 < 20
