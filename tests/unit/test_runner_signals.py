"""The runner's processes as PID 1 of their container: the kernel drops a signal PID 1 has no
handler for, so a stop (the pod deleted, a cancel) reaches them only through their own handlers.
Run in a PID namespace of their own (`unshare`, root), as a container runtime starts them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

OPERATOR = Path(__file__).resolve().parents[2] / "operator"
#: A hang guard, not a time limit: the process is killed after it either way.
GUARD_SECONDS = 60


def _as_pid_1(code: str) -> subprocess.Popen[str]:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.decode().strip()}")
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(OPERATOR)},
        stdout=subprocess.PIPE,
        text=True,
    )


def _pid_1_of(proc: subprocess.Popen[str]) -> int:
    """The namespace's PID 1 (unshare's child) as this namespace numbers it, once it is ready."""
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready 1"  # PID 1 in its namespace
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _stopped_by_sigterm(code: str) -> str:
    proc = _as_pid_1(code)
    try:
        pid = _pid_1_of(proc)
        os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=GUARD_SECONDS)
        return f"exit {proc.returncode}: {out.strip()}"
    finally:
        proc.kill()
        proc.wait()


def test_a_stage_in_told_to_stop_as_pid_1_exits() -> None:
    # Without its handler the SIGTERM was dropped: the download went on until the grace's SIGKILL.
    code = (
        "import os, time\n"
        "from dsjobs.runner.__main__ import stop_on_signals\n"
        "stop_on_signals('stage-in')\n"
        "print('ready', os.getpid(), flush=True)\n"
        "time.sleep(3600)\n"
    )
    assert _stopped_by_sigterm(code) == "exit 143: "


def test_ship_told_to_stop_before_its_own_handler_remembers_it() -> None:
    # A SIGTERM while ship loads its config and storage was dropped: the pod's deletion was not
    # seen, and ship waited for a job that would never start until the grace's SIGKILL.
    code = (
        "import os, signal\n"
        "from dsjobs.runner.__main__ import stop_on_signals\n"
        "early = stop_on_signals('ship')\n"
        "print('ready', os.getpid(), flush=True)\n"
        "while not early:\n"
        "    signal.pause()\n"
        "print('told', early)\n"
    )
    assert _stopped_by_sigterm(code) == "exit 0: told [15]"
