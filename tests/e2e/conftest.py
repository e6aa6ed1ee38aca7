"""Session fixtures of the e2e suite, registered once for every test module here."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import pytest
from cluster_fixtures import dev_cluster, dev_s3  # noqa: F401
from stack_fixtures import dsjobs_stack  # noqa: F401

# tests/shared: test helpers the unit and e2e suites share (kube_fake).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "shared"))


def unwind_on_sigterm() -> None:
    """SIGTERM (a CI timeout killing the job's process group) unwinds like Ctrl-C, so the session's
    fixtures are torn down: the dev cluster this session started and the extra node agents run in
    sessions of their own, which that kill does not reach. KeyboardInterrupt, not SystemExit:
    pytest takes a SystemExit inside a test for that test's failure and goes on with the next one.
    A second SIGTERM is ignored so that it does not cut the teardown short."""
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            print("e2e: SIGTERM again; still tearing down", file=sys.stderr, flush=True)
            return
        fired = True
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def pytest_sessionstart(session: pytest.Session) -> None:
    unwind_on_sigterm()
