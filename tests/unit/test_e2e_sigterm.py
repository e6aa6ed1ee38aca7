"""SIGTERM to the e2e session (a CI timeout) ends it with its fixtures torn down: the dev cluster and
extra node agents run in sessions of their own that a kill of the job's process group misses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"

SESSION = """
import os, signal, time
from pathlib import Path
import pytest

@pytest.fixture(scope="session")
def cluster():
    try:
        yield
    finally:
        Path(os.environ["MARK"]).write_text("torn down")

def test_killed(cluster):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    Path(os.environ["MARK"] + ".slept").write_text("the signal did not stop the test")

def test_after(cluster):
    Path(os.environ["MARK"] + ".after").write_text("ran")
"""


def test_sigterm_tears_the_session_down_and_stops_it(tmp_path: Path) -> None:
    (tmp_path / "test_session.py").write_text(SESSION)
    mark = tmp_path / "mark"
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
        # Only the plugins named below: the inner session runs its tests in file order (a
        # random-order plugin in the venv ran test_after first).
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "MARK": str(mark),
        "PYTHONPATH": os.pathsep.join(p for p in (str(E2E_DIR), os.environ.get("PYTHONPATH")) if p),
    }
    # tests/e2e/conftest.py as a plugin: its hooks, without its fixtures ever being requested.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "test_session.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != -signal.SIGTERM, out
    assert mark.read_text() == "torn down", out
    # The signal stopped the session at once: the test it came in never got past its sleep, and
    # no test ran after it. (The 120 s timeout above is a hang guard only.)
    assert not Path(f"{mark}.slept").exists(), out
    assert not Path(f"{mark}.after").exists(), out
