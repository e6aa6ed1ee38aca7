"""The whole runner without Kubernetes: stage-in into temp dirs, the entry script under dash, the
ship sidecar running concurrently - against a real S3 server (see runner_s3.py).

Needs `dash` (apt-get install dash); pip installs from a local index built here (no network).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from runner_s3 import S3Target, local_index, put_input, runner_s3, zip_like_cli  # noqa: F401

from dsjobs.logrecords import PROGRESS_LOG_PATH, SYSTEM_LOG_PATH, Stream, read_records
from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.result import (
    FileErrorType,
    RunnerResult,
    RunnerStatus,
    load_result,
    parse_termination_message,
)
from dsjobs.runner.ship import Ship
from dsjobs.runner.stagein import run_stage_in
from dsjobs.storage import output_key

pytestmark = pytest.mark.e2e

PROGRAM = r"""
import json, os, sys, time
import helpers, tinypkg

data_dir, out_dir = sys.argv[1], sys.argv[2]
print("start", tinypkg.VALUE, helpers.GREETING, flush=True)
for i in range(3):
    print(f"out {i}", flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
    with open(os.environ["JOB_PROGRESS_FILENAME"], "a") as p:
        p.write(json.dumps({"progress": 30 * (i + 1), "message": f"step {i}"}) + "\n")
    time.sleep(0.3)
os.makedirs(out_dir, exist_ok=True)
total = sum(int(x) for x in open(os.path.join(data_dir, "numbers.txt")).read().split())
with open(os.path.join(out_dir, "sum.txt"), "w") as f:
    f.write(str(total))
os.makedirs(os.path.join(out_dir, "nested"))
with open(os.path.join(out_dir, "nested", "deep.txt"), "w") as f:
    f.write("deep")
os.symlink("../sum.txt", os.path.join(out_dir, "nested", "latest"))  # followed: in the work dir
os.symlink("/etc/hostname", os.path.join(out_dir, "host"))  # skipped: outside it
sys.stdout.write("no newline at the end")
sys.exit(3)
"""


def _dash() -> str:
    path = shutil.which("dash")
    if path is None:
        pytest.skip("dash is not installed (apt-get install dash)")
    return path


@contextmanager
def shipping(cfg: RunnerConfig, t: S3Target, term: Path) -> Iterator[dict[str, Any]]:
    """Run the ship sidecar in a thread for the duration of the block."""
    out: dict[str, Any] = {}
    ship = Ship(cfg, t.storage, termination_log=str(term))
    out["ship"] = ship

    def run() -> None:
        try:
            out["result"] = ship.run()
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield out
    finally:
        th.join(timeout=120)
        assert not th.is_alive(), "ship did not finish"
        if "error" in out:
            raise out["error"]


def _stream(t: S3Target, kind: Stream) -> bytes:
    res = read_records(t.storage, t.project, t.job, 0, max_records=10**6, max_bytes=1 << 30)
    return b"".join(r.content for r in res.records if r.stream == kind)


def _path_env() -> dict[str, str]:
    # The "image" is this machine; its python3 must be the one with pip (the test's interpreter).
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_full_job(runner_s3: S3Target, tmp_path: Path) -> None:  # noqa: F811
    dash = _dash()
    client = tmp_path / "client"
    (client / "data").mkdir(parents=True)
    (client / "data" / "numbers.txt").write_text("1 2 3 4\n")
    (client / "helpers").mkdir()
    (client / "helpers" / "__init__.py").write_text("GREETING = 'hello'\n")
    main_sha, main_size = put_input(runner_s3, PROGRAM.encode())
    data_sha, data_size = put_input(runner_s3, zip_like_cli(client / "data"))
    mod_sha, mod_size = put_input(runner_s3, zip_like_cli(client / "helpers"))
    cfg = RunnerConfig(
        project_id=runner_s3.project,
        job_id=runner_s3.job,
        cmd="python3 ${MAIN} ${DATA} ${RESULTS}",
        inputs=[
            {"path": "main.py", "var": "MAIN", "sha256": main_sha, "size_bytes": main_size},
            {
                "path": "data",
                "var": "DATA",
                "sha256": data_sha,
                "size_bytes": data_size,
                "compression": "ZIP",
            },
        ],
        local_modules=[
            {"path": "/tmp/tmpab12.zip", "var": "_LOCAL_MODULE_0", "sha256": mod_sha, "size_bytes": mod_size}
        ],
        outputs=[{"path": "results", "var": "RESULTS"}, {"path": "missing.bin", "var": "MISSING"}],
        python_env={
            "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
            "requirements": ["tinypkg==0.1"],
            "pip": {"index_url": local_index(tmp_path), "no_deps": True},
        },
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert run_stage_in(cfg, runner_s3.storage, termination_log=str(tmp_path / "stage-in.term"))
    term = tmp_path / "ship.term"
    with shipping(cfg, runner_s3, term) as box:
        proc = subprocess.run(
            [dash, str(cfg.layout.entry_script)], env=_path_env(), capture_output=True, timeout=180
        )
    assert proc.returncode == 3, cfg.layout.system_log.read_text()
    result: RunnerResult = box["result"]

    # Exit code, outputs, the NOT_FOUND error.
    assert result.status == RunnerStatus.EXITED and result.return_code == 3 and not result.cancelled
    assert [(o.path, o.var, o.compression.value) for o in result.outputs] == [("results", "RESULTS", "ZIP")]
    [link, err] = result.file_errors
    # The link out of the working dir is not followed, and the user is told.
    assert (link.type, link.path, link.var, link.index) == (
        FileErrorType.UPLOAD_FAILED,
        "results",
        "RESULTS",
        0,
    )
    assert link.description.startswith("1 symlink leading outside the working directory not followed, e.g. ")
    assert (err.type, err.path, err.var, err.index) == (FileErrorType.NOT_FOUND, "missing.bin", "MISSING", 1)
    zip_bytes = runner_s3.storage.get_bytes(output_key(runner_s3.project, runner_s3.job, "results"))
    assert zip_bytes is not None and len(zip_bytes) == result.outputs[0].size_bytes
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        assert zf.read("results/sum.txt") == b"10"
        assert zf.read("results/nested/deep.txt") == b"deep"
        assert zf.read("results/nested/latest") == b"10"
        assert "results/host" not in zf.namelist()

    # Logs: each stream complete and in order, stdout also in the container log.
    expected_out = b"start 42 hello\nout 0\nout 1\nout 2\nno newline at the end"
    assert _stream(runner_s3, Stream.OUT) == expected_out
    assert _stream(runner_s3, Stream.ERR) == b"err 0\nerr 1\nerr 2\n"
    assert proc.stdout == expected_out and proc.stderr == b"err 0\nerr 1\nerr 2\n"
    res = read_records(runner_s3.storage, runner_s3.project, runner_s3.job, 0, max_records=10**6)
    assert res.complete and res.next_offset == result.log_end_offset and result.logs_complete
    progress_lines = b"".join(r.content for r in res.records if r.file_path == PROGRESS_LOG_PATH).splitlines()
    assert [json.loads(line)["progress"] for line in progress_lines] == [30, 60, 90]
    system = b"".join(r.content for r in res.records if r.file_path == SYSTEM_LOG_PATH).decode()
    for text in ("stage-in: staged 2 inputs and 1 local modules", "requirements installed", "exit code 3"):
        assert text in system
    assert (
        result.progress is not None and result.progress.progress == 90 and result.progress.message == "step 2"
    )
    assert {f.name for f in result.log_files} == {"stdout.txt", "stderr.txt", "system.log"}

    # The termination message and result.json agree.
    assert parse_termination_message(term.read_text()) == result
    assert load_result(runner_s3.storage, runner_s3.project, runner_s3.job) == result


def test_cancel_with_graceful_shutdown(runner_s3: S3Target, tmp_path: Path) -> None:  # noqa: F811
    dash = _dash()
    cmd = (
        "trap 'echo saving; mkdir -p out; echo partial > out/state.txt; exit 0' USR1; "
        "echo running; while :; do sleep 0.1; done"
    )
    cfg = RunnerConfig(
        project_id=runner_s3.project,
        job_id=runner_s3.job,
        cmd=cmd,
        outputs=[{"path": "out/state.txt"}],
        graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 10},
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert run_stage_in(cfg, runner_s3.storage)
    with shipping(cfg, runner_s3, tmp_path / "term") as box:
        proc = subprocess.Popen([dash, str(cfg.layout.entry_script)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while b"running" not in (cfg.layout.stdout.read_bytes() if cfg.layout.stdout.exists() else b""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Pod deletion: both containers get SIGTERM.
        box["ship"].request_stop()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    result: RunnerResult = box["result"]
    assert result.status == RunnerStatus.EXITED and result.cancelled and result.return_code == 0
    assert [o.path for o in result.outputs] == ["out/state.txt"]
    assert _stream(runner_s3, Stream.OUT) == b"running\nsaving\n"


def _container_running(
    shell: str, cfg: RunnerConfig, printed: bytes
) -> tuple[subprocess.Popen[bytes], tuple[int, int]]:
    """The entry script started as a whole "container" (its own process group) once the program
    printed `printed`, and the process groups that make it: the entry script's and the program's
    own session (setsid), whose leader's pid the entry script logged."""
    proc = subprocess.Popen(
        [shell, str(cfg.layout.entry_script)], stdout=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 30
    while printed not in (cfg.layout.stdout.read_bytes() if cfg.layout.stdout.exists() else b""):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    match = re.search(r"program started \(pid (\d+)", cfg.layout.system_log.read_text())
    assert match is not None
    return proc, (proc.pid, int(match.group(1)))


def _container_config(runner_s3: S3Target, tmp_path: Path, cmd: str) -> RunnerConfig:  # noqa: F811
    """A job writing out.txt with a 3 s heartbeat timeout, its inputs staged."""
    cfg = RunnerConfig(
        project_id=runner_s3.project,
        job_id=runner_s3.job,
        cmd=cmd,
        outputs=[{"path": "out.txt"}],
        ship={"heartbeat_timeout_seconds": 3},
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert run_stage_in(cfg, runner_s3.storage)
    return cfg


def test_job_container_killed_outright_is_reported_lost(runner_s3: S3Target, tmp_path: Path) -> None:  # noqa: F811
    dash = _dash()
    cfg = _container_config(runner_s3, tmp_path, "echo before-oom; echo data > out.txt; sleep 60")
    with shipping(cfg, runner_s3, tmp_path / "term") as box:
        proc, groups = _container_running(dash, cfg, b"before-oom")
        # Everything of the "container" dies at once, like an OOM kill.
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        proc.wait(timeout=10)
    result: RunnerResult = box["result"]
    assert result.status == RunnerStatus.LOST and result.return_code is None
    assert [o.path for o in result.outputs] == ["out.txt"]  # whatever was written is still collected
    assert _stream(runner_s3, Stream.OUT) == b"before-oom\n"
    assert result.logs_complete


def test_a_stalled_job_container_is_waited_for_not_taken_for_lost(
    runner_s3: S3Target,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A container frozen past the heartbeat timeout (thrashing near its memory limit, a hung
    disk) still holds the liveness FIFO: ship waits, and takes the outputs the program writes
    after the stall, its logs to the end, and its exit code."""
    dash = _dash()
    cfg = _container_config(runner_s3, tmp_path, "echo before; sleep 2; echo after > out.txt; echo done")
    with shipping(cfg, runner_s3, tmp_path / "term") as box:
        proc, groups = _container_running(dash, cfg, b"before")
        # The whole "container" frozen for twice the heartbeat timeout, then thawed.
        for group in groups:
            os.killpg(group, signal.SIGSTOP)
        time.sleep(7)
        for group in groups:
            os.killpg(group, signal.SIGCONT)
        assert proc.wait(timeout=30) == 0
    result: RunnerResult = box["result"]
    assert result.status == RunnerStatus.EXITED and result.return_code == 0
    assert [o.path for o in result.outputs] == ["out.txt"]
    stored = runner_s3.storage.get_bytes(output_key(runner_s3.project, runner_s3.job, "out.txt"))
    assert stored == b"after\n"  # written after the stall
    assert _stream(runner_s3, Stream.OUT) == b"before\ndone\n"
    assert "heartbeat has not moved" in cfg.layout.system_log.read_text()
    assert result.logs_complete


def test_as_processes_like_the_pod_runs_them(runner_s3: S3Target, tmp_path: Path) -> None:  # noqa: F811
    """`python -m dsjobs.runner stage-in|ship` with the config file and storage env the pod gives."""
    dash = _dash()
    sha, size = put_input(runner_s3, b"hello input\n")
    cfg = RunnerConfig(
        project_id=runner_s3.project,
        job_id=runner_s3.job,
        cmd="cat ${IN} > copy.txt; cat copy.txt; exit 2",
        inputs=[{"path": "in.txt", "var": "IN", "sha256": sha, "size_bytes": size}],
        outputs=[{"path": "copy.txt"}],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    (tmp_path / "runner.json").write_text(cfg.to_json())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DSJOBS_")},
        **runner_s3.env,
        "DSJOBS_RUNNER_CONFIG_FILE": str(tmp_path / "runner.json"),
        "DSJOBS_TERMINATION_LOG": str(tmp_path / "termination-log"),
    }
    runner = [sys.executable, "-m", "dsjobs.runner"]
    stage = subprocess.run([*runner, "stage-in"], env=env, capture_output=True, timeout=120)
    assert stage.returncode == 0, stage.stderr.decode()
    ship = subprocess.Popen([*runner, "ship"], env=env, stderr=subprocess.PIPE)
    job = subprocess.run([dash, str(cfg.layout.entry_script)], capture_output=True, timeout=60)
    assert job.returncode == 2 and job.stdout == b"hello input\n"
    _, ship_err = ship.communicate(timeout=120)
    assert ship.returncode == 0, ship_err.decode()
    result = parse_termination_message((tmp_path / "termination-log").read_text())
    assert isinstance(result, RunnerResult)
    assert result.return_code == 2 and [o.path for o in result.outputs] == ["copy.txt"]
    assert _stream(runner_s3, Stream.OUT) == b"hello input\n"
