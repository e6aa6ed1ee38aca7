"""The official DataSphere CLI against dsjobs, as a data scientist uses it.

Every scenario runs `dsjobs datasphere ...` (the unmodified official CLI with its transport pointed at
dsjobs) as a subprocess in a temporary directory holding a DataSphere `config.yaml`, against the
stack of `stack_fixtures.dsjobs_stack`: the local cluster by default, any deployment (e.g. kind)
with DSJOBS_E2E_KUBECONFIG + DSJOBS_E2E_ENV. Waits are polls with timeouts; nothing is timed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_fixtures import ClusterHandle, memory_limits_enforced
from stack_fixtures import REPO_ROOT, CliRun, StackEnv, first_json, poll

from dsjobs.runner.entry import DOCKER_STATS_HEADER

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

FINAL = {"SUCCESS", "ERROR", "CANCELLED"}


def job_dir(base: Path, config: dict[str, Any], files: dict[str, str]) -> Path:
    """A fresh directory with config.yaml and `files` (relative path -> text)."""
    d = base / f"job-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    for rel, text in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip())
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return d


def execute(stack: StackEnv, d: Path, *extra: str) -> CliRun:
    return stack.datasphere(
        "project", "job", "execute", "-p", stack.project_id, "-c", "config.yaml", *extra, cwd=d
    )


def execute_async(stack: StackEnv, d: Path) -> str:
    """`execute --async -o exec.json`: returns the job id once the job is started."""
    run = execute(stack, d, "--async", "-o", "exec.json").ok()
    data = json.loads((d / "exec.json").read_text())
    entry = data[0] if isinstance(data, list) else data
    job_id = str(entry.get("job_id") or run.job_id)
    assert job_id, run.output
    return job_id


def status_of(stack: StackEnv, job_id: str, cwd: Path) -> str:
    return str(stack.get_job(job_id, cwd)["status"])


def wait_status(stack: StackEnv, job_id: str, cwd: Path, wanted: set[str], timeout: float = 300) -> str:
    def check() -> str | None:
        status = status_of(stack, job_id, cwd)
        if status in wanted:
            return status
        if status in FINAL:  # pytest.fail is not an Exception: poll does not swallow it
            pytest.fail(f"job {job_id} ended {status}, expected one of {sorted(wanted)}", pytrace=False)
        return None

    return str(poll(f"job {job_id} to be {'/'.join(sorted(wanted))}", check, timeout, interval=2))


def job_pods(stack: StackEnv, job_id: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = stack.kubectl_json(
        "get", "pods", "-n", stack.project_namespace, "-l", f"dsjobs.dev/job-id={job_id}"
    )["items"]
    return pods


# ------------------------------------------------------------------ a finished job for several tests

IO_MAIN = """
    import argparse
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    with open(args.input) as f:
        data = f.read()
    mode = os.environ.get("MODE", "none")
    with open(args.output, "w") as f:
        f.write(f"mode={mode}\\n" + data.upper())
    print(f"processed {len(data)} bytes in mode {mode}", flush=True)
"""


@pytest.fixture(scope="module")
def io_job(dsjobs_stack: StackEnv, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, CliRun]:
    """A finished job with an input, an output and variables; shared by list/get/fork/download/ttl."""
    config = {
        "name": "e2e-io",
        "desc": "inputs, outputs and variables",
        "cmd": "python main.py --input ${DATA} --output ${RESULT}",
        "inputs": ["main.py", {"data.txt": "DATA"}],
        "outputs": [{"result.txt": "RESULT"}],
    }
    d = job_dir(tmp_path_factory.mktemp("io"), config, {"main.py": IO_MAIN, "data.txt": "hello dsjobs\n"})
    run = execute(dsjobs_stack, d).ok()
    return run.job_id, d, run


def test_inputs_outputs_and_vars(io_job: tuple[str, Path, CliRun]) -> None:
    _, d, run = io_job
    assert (d / "result.txt").read_text() == "mode=none\nHELLO DSJOBS\n"
    assert "processed 13 bytes in mode none" in run.output  # the program's stdout, streamed back


def test_env_vars(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    config = {
        "name": "e2e-env",
        "cmd": "python main.py",
        "env": {"vars": [{"GREETING": "hello from config"}, "FROM_LOCAL"]},
        "inputs": ["main.py"],
        "outputs": ["env.json"],
    }
    main = """
        import json, os
        values = {k: os.environ.get(k) for k in ("GREETING", "FROM_LOCAL")}
        print("env:", values, flush=True)
        with open("env.json", "w") as f:
            json.dump(values, f)
    """
    d = job_dir(tmp_path, config, {"main.py": main})
    # `- FROM_LOCAL` copies the variable from the submitting shell.
    run = dsjobs_stack.datasphere(
        "project", "job", "execute", "-p", dsjobs_stack.project_id, "-c", "config.yaml",
        cwd=d, env=dsjobs_stack.env(FROM_LOCAL="copied from the laptop"),
    ).ok()  # fmt: skip
    assert json.loads((d / "env.json").read_text()) == {
        "GREETING": "hello from config",
        "FROM_LOCAL": "copied from the laptop",
    }, run.output


def test_working_storage(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    # `working-storage` becomes a volume of the cluster's working storage class (the local
    # overlay: the dev cluster's hostPath provisioner), mounted as the working directory.
    if not dsjobs_stack.local:
        pytest.skip("the local overlay's working storage class (a directory of this machine)")
    config = {
        "name": "e2e-working-storage",
        "cmd": "python main.py",
        "inputs": ["main.py"],
        "outputs": ["where.txt"],
        "working-storage": {"type": "SSD", "size": "100Gb"},
    }
    main = """
        import os
        cwd = os.getcwd()
        mount = next(line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == cwd)
        with open("where.txt", "w") as f:
            print(cwd, mount[3], file=f)
    """
    d = job_dir(tmp_path, config, {"main.py": main})
    run = execute(dsjobs_stack, d).ok()
    cwd, source = (d / "where.txt").read_text().split()
    assert cwd == "/job/work", run.output
    assert "/hostpath_pv/" in source, run.output  # a bind mount of the provisioned directory


def test_output_datasets_are_created_and_mounted_by_later_jobs(
    dsjobs_stack: StackEnv, tmp_path: Path
) -> None:
    if not dsjobs_stack.local:
        pytest.skip("the local overlay's working storage class (a directory of this machine)")
    writer = {
        "name": "e2e-dataset-writer",
        "cmd": "sh -c 'echo made by the writer > ${WEIGHTS}/w.txt'",
        "output-datasets": [{"name": "weights", "var": "WEIGHTS", "size": "1Gb", "labels": {"team": "cv"}}],
    }
    run = execute(dsjobs_stack, job_dir(tmp_path / "writer", writer, {})).ok()
    found = re.search(r"\* (\S+) \(weights\) size: 1 Gb", run.output)
    assert found and "Created datasets:" in run.output, run.output
    dataset_id = found.group(1)
    claim = f"dsjobs-dataset-{dataset_id}"
    try:
        reader = {
            "name": "e2e-dataset-reader",
            "cmd": "sh -c 'cat ${WEIGHTS}/w.txt > seen.txt'",
            "datasets": [{dataset_id: "WEIGHTS"}],
            "outputs": ["seen.txt"],
        }
        d = job_dir(tmp_path / "reader", reader, {})
        run = execute(dsjobs_stack, d).ok()
        assert (d / "seen.txt").read_text() == "made by the writer\n", run.output
    finally:
        dsjobs_stack.kubectl("delete", "pvc", claim, "-n", dsjobs_stack.project_namespace, "--wait=false")


def test_directory_and_empty_inputs(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    # empty.txt: the CLI's PUT of zero bytes goes chunked, which S3 refuses (411); the empty file
    # is never stored, so Create does not ask for it.
    config = {
        "name": "e2e-dir",
        "cmd": "python main.py ${DATASET}",
        "inputs": ["main.py", "empty.txt", {"dataset": "DATASET"}],
        "outputs": [{"listing.txt": "LISTING"}],
    }
    main = """
        import os, sys
        root = sys.argv[1]
        lines = []
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    lines.append(f"{os.path.relpath(path, root)}={f.read().strip()}")
        lines.append(f"empty.txt={os.path.getsize('empty.txt')}")
        with open("listing.txt", "w") as f:
            f.write("\\n".join(sorted(lines)) + "\\n")
    """
    files = {
        "main.py": main,
        "empty.txt": "",
        "dataset/a.txt": "A",
        "dataset/sub/b.txt": "B",
        "dataset/sub/deeper/c.txt": "C",
    }
    d = job_dir(tmp_path, config, files)
    execute(dsjobs_stack, d).ok()
    listing = (d / "listing.txt").read_text().split()
    assert listing == ["a.txt=A", "empty.txt=0", "sub/b.txt=B", "sub/deeper/c.txt=C"]


def test_python_auto_with_local_modules_and_requirements(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    # `python: auto`: the CLI finds the local modules (a package and a module) and the pinned
    # requirements of the local environment (six, installed here) and sends a python_env.
    config = {
        "name": "e2e-python-auto",
        "cmd": "python main.py",
        "env": {"python": "auto"},
        "outputs": ["result.json"],
    }
    main = """
        import json
        import sys

        import six
        import shapes
        from helpers.util import answer

        if __name__ == "__main__":
            result = {"six": six.__version__, "answer": answer(), "area": shapes.area(2), "python": sys.version[:4]}
            print("result:", result, flush=True)
            with open("result.json", "w") as f:
                json.dump(result, f)
    """
    files = {
        "main.py": main,
        "helpers/__init__.py": "",
        "helpers/util.py": "def answer():\n    return 42\n",
        "shapes.py": "def area(r):\n    return 3 * r * r\n",
    }
    d = job_dir(tmp_path, config, files)
    import six  # type: ignore[import-untyped]

    run = execute(dsjobs_stack, d).ok()
    result = json.loads((d / "result.json").read_text())
    assert result["six"] == six.__version__, run.output
    assert (result["answer"], result["area"]) == (42, 12)


def test_demo_example_manual_python_env(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    """examples/demo (`make demo`): manual python env, a pip requirement absent from the image."""
    d = tmp_path / "demo"
    shutil.copytree(REPO_ROOT / "examples" / "demo", d)
    run = execute(dsjobs_stack, d).ok()
    report = (d / "report.md").read_text()
    assert "## Top 8 words" in report and "| 1st | that | 3 |" in report, run.output
    assert "Hello from a dsjobs job" in run.output  # env var, printed by the program


def test_a_failed_pip_install_fails_the_job_in_pip_s_own_words(
    dsjobs_stack: StackEnv, tmp_path: Path
) -> None:
    # An index nobody serves: pip gives up after its retries, without the network.
    config = {
        "name": "e2e-pip-fails",
        "cmd": "python main.py",
        "env": {
            "python": {
                "type": "manual",
                "version": f"{sys.version_info.major}.{sys.version_info.minor}",
                "requirements-file": "requirements.txt",
                "pip": {"index-url": "http://127.0.0.1:9/simple"},
            }
        },
    }
    main = """
        if __name__ == "__main__":
            print("the program ran", flush=True)
    """
    d = job_dir(tmp_path, config, {"main.py": main, "requirements.txt": "nope-dsjobs==1\n"})
    run = execute(dsjobs_stack, d)
    assert run.returncode != 0, run.output
    assert (
        "the job's environment could not be set up: pip install failed with exit code 1: "
        "ERROR: Could not find a version that satisfies the requirement nope-dsjobs==1"
    ) in run.output
    assert "the program ran" not in run.output
    assert "dsjobs: the job ended: " in run.output and "Traceback" not in run.output
    job = dsjobs_stack.job_object(run.job_id)
    assert job["status"]["phase"] == "ERROR"
    # The program never ran: no return code of its own (the runner's exit code is not one).
    assert job["status"].get("returnCode") is None, job["status"]


def test_failing_program_propagates_return_code(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    config = {"name": "e2e-fail", "cmd": "python fail.py", "inputs": ["fail.py"]}
    main = """
        import sys
        print("about to fail", file=sys.stderr, flush=True)
        sys.exit(3)
    """
    d = job_dir(tmp_path, config, {"fail.py": main})
    run = execute(dsjobs_stack, d)
    assert run.returncode != 0, run.output
    assert "dsjobs: the job failed: Program returned code 3" in run.output
    assert "Traceback" not in run.output  # the official CLI's, on its ProgramError
    assert "about to fail" in run.output  # stderr streamed back
    assert status_of(dsjobs_stack, run.job_id, d) == "ERROR"


def test_the_cli_prints_a_chatty_job_s_logs_to_the_end(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    # The official CLI prints logs from a daemon thread and ended once the operation was done: the
    # last tens of thousands of lines of a burst went with it, its FINAL line too.
    config = {"name": "e2e-chatty", "cmd": "python chatty.py", "inputs": ["chatty.py"]}
    main = """
        import sys
        sys.stdout.writelines(f"step {i:06d} loss 0.{i:06d}\\n" for i in range(150000))
        print("FINAL accuracy 0.99", flush=True)
    """
    run = execute(dsjobs_stack, job_dir(tmp_path, config, {"chatty.py": main})).ok()
    assert "FINAL accuracy 0.99" in run.output
    assert run.output.count(" - step ") == 150000
    assert run.output.index("FINAL accuracy") < run.output.index("job completed successfully")


SLOW_MAIN = """
    import sys, time
    n = int(sys.argv[1])
    for i in range(n):
        print(f"tick {i}", flush=True)
        time.sleep(1)
    with open("slow.txt", "w") as f:
        f.write(f"ticked {n}\\n")
    print("slow job done", flush=True)
"""


def slow_job_dir(base: Path, seconds: int, **extra: Any) -> Path:
    config = {
        "name": f"e2e-slow-{seconds}",
        "cmd": f"python slow.py {seconds}",
        "inputs": ["slow.py"],
        "outputs": ["slow.txt"],
        **extra,
    }
    return job_dir(base, config, {"slow.py": SLOW_MAIN})


def test_async_execute_then_attach(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    d = slow_job_dir(tmp_path, 20)
    job_id = execute_async(dsjobs_stack, d)
    assert status_of(dsjobs_stack, job_id, d) not in FINAL  # --async returned while the job runs
    attach_dir = tmp_path / "attach"
    attach_dir.mkdir()
    run = dsjobs_stack.datasphere("project", "job", "attach", "--id", job_id, cwd=attach_dir).ok()
    assert "slow job done" in run.output
    assert (attach_dir / "slow.txt").read_text() == "ticked 20\n"  # attach downloads the outputs
    assert status_of(dsjobs_stack, job_id, d) == "SUCCESS"


GRACEFUL_MAIN = """
    import signal, sys, time
    def bye(signum, frame):
        print(f"got signal {signum}", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGUSR1, bye)
    for i in range(600):
        print(f"tick {i}", flush=True)
        time.sleep(1)
"""


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_execute_cancels_gracefully(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    # The official CLI on Ctrl-C asks "cancel job?"; yes -> Cancel(graceful=True) for a job with
    # graceful-shutdown parameters, then it follows the job until it ends.
    config = {
        "name": "e2e-ctrl-c",
        "cmd": "python main.py",
        "inputs": ["main.py"],
        "graceful-shutdown": {"signal": "SIGUSR1", "timeout": "30s"},
    }
    d = job_dir(tmp_path, config, {"main.py": GRACEFUL_MAIN})
    log = d / "cli.log"
    argv = dsjobs_stack._argv(
        ["project", "job", "execute", "-p", dsjobs_stack.project_id, "-c", "config.yaml"]
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=d,
            env=dsjobs_stack.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE,
            # As a terminal's Ctrl-C finds it: a suite started in the background of a
            # non-interactive shell (`make test &`, a CI runner's) has SIGINT ignored, which the CLI
            # inherited, so it never asked and this test timed out.
            preexec_fn=_sigint_default,
        )
    try:
        poll("the job's output in the CLI", lambda: "tick 2" in log.read_text(errors="replace"), 180, 0.3)
        proc.send_signal(signal.SIGINT)
        poll("the CLI's question", lambda: "cancel job?" in log.read_text(errors="replace"), 30, 0.2)
        assert proc.stdin is not None
        proc.stdin.write(b"y\n")
        proc.stdin.flush()
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text(errors="replace")
    assert "job is canceled" in output, output
    assert "got signal 10" in output, output  # the program's graceful signal, SIGUSR1
    assert "dsjobs: the job ended: CANCELLED: " in output and "Traceback" not in output, output
    job_id = CliRun(argv, proc.returncode, output).job_id
    assert status_of(dsjobs_stack, job_id, d) == "CANCELLED"


def _secret_data(stack: StackEnv, name: str) -> dict[str, str]:
    secret = stack.kubectl_json("get", "secret", name, "-n", stack.project_namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def test_cancel(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    d = slow_job_dir(tmp_path, 600)
    job_id = execute_async(dsjobs_stack, d)
    wait_status(dsjobs_stack, job_id, d, {"EXECUTING"})
    if dsjobs_stack.local:
        # The local overlay runs the operator with DSJOBS_STORAGE_CREDENTIALS=project: the job's
        # runner holds the project's own key pair, not the operator's bucket-wide one.
        project_key = _secret_data(dsjobs_stack, "dsjobs-project-storage")
        runner = _secret_data(dsjobs_stack, f"{job_id}-a1-runner")
        assert runner["DSJOBS_S3_ACCESS_KEY"] == project_key["accessKey"]
        assert runner["DSJOBS_S3_SECRET_KEY"] == project_key["secretKey"]
    run = dsjobs_stack.datasphere("project", "job", "cancel", "--id", job_id, cwd=d).ok()
    assert "job is canceled" in run.output
    wait_status(dsjobs_stack, job_id, d, {"CANCELLED"}, timeout=120)
    poll(f"the pods of job {job_id} to be gone", lambda: not job_pods(dsjobs_stack, job_id), 120)


def test_the_project_storage_key_reaches_its_own_prefix_only(
    dsjobs_stack: StackEnv, dev_cluster: ClusterHandle
) -> None:
    if not dsjobs_stack.local:
        pytest.skip("the local stack provisions the project's storage key pair")
    from dsjobs.storage import Storage, StorageSettings

    key = _secret_data(dsjobs_stack, "dsjobs-project-storage")
    env = {
        **dev_cluster.s3.env(),
        "DSJOBS_S3_ACCESS_KEY": key["accessKey"],
        "DSJOBS_S3_SECRET_KEY": key["secretKey"],
    }
    assert key["accessKey"] != dev_cluster.s3.access_key
    scoped = Storage(StorageSettings.from_env(env))
    own = f"projects/{dsjobs_stack.project_id}/e2e-scope-{uuid.uuid4().hex[:8]}"
    scoped.put_bytes(own, b"mine")
    assert scoped.get_bytes(own) == b"mine"
    scoped.delete(own)
    for other in ("projects/someone-else/inputs/x", f"projects/{dsjobs_stack.project_id}x/y", "top-level"):
        with pytest.raises(Exception, match="AccessDenied"):
            scoped.put_bytes(other, b"not mine")


def test_a_project_without_its_storage_key_gets_a_clear_error(dsjobs_stack: StackEnv) -> None:
    if not dsjobs_stack.local:
        pytest.skip("the local stack runs the operator with DSJOBS_STORAGE_CREDENTIALS=project")
    project = f"nokey-{uuid.uuid4().hex[:6]}"
    ns = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": project, "labels": {"dsjobs.dev/project-id": project}},
    }
    job = {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "metadata": {"name": "needs-key", "namespace": project},
        "spec": {"projectId": project, "execute": True, "jobParameters": {"cmd": "true"}},
    }
    dsjobs_stack.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(ns))
    try:
        dsjobs_stack.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
        dsjobs_stack.kubectl(
            "wait", "projectjob/needs-key", "-n", project,
            "--for=jsonpath={.status.phase}=ERROR", "--timeout=120s", timeout=150,
        )  # fmt: skip
        details = dsjobs_stack.kubectl(
            "get", "pj", "needs-key", "-n", project, "-o", "jsonpath={.status.statusDetails}"
        )  # fmt: skip
        assert f"Secret 'dsjobs-project-storage' in namespace {project} not found" in details, details
        pods = dsjobs_stack.kubectl("get", "pods", "-n", project, "-o", "name")
        assert not pods.strip()
    finally:
        dsjobs_stack.kubectl("delete", "namespace", project, "--wait=false", check=False)


def test_list_and_get(dsjobs_stack: StackEnv, io_job: tuple[str, Path, CliRun], tmp_path: Path) -> None:
    job_id, _, _ = io_job
    run = dsjobs_stack.datasphere(
        "project", "job", "list", "-p", dsjobs_stack.project_id, "--format", "json", cwd=tmp_path
    ).ok()  # fmt: skip
    listed = first_json(run.output)
    listed = listed if isinstance(listed, list) else [listed]
    mine = [j for j in listed if j["id"] == job_id]
    assert len(mine) == 1, run.output
    assert (mine[0]["name"], mine[0]["status"]) == ("e2e-io", "SUCCESS")

    got = dsjobs_stack.get_job(job_id, tmp_path)
    assert (got["id"], got["name"], got["desc"], got["status"]) == (
        job_id,
        "e2e-io",
        "inputs, outputs and variables",
        "SUCCESS",
    )
    assert got["created_at"] and got["finished_at"]
    # and through kubectl, the same job as a ProjectJob
    assert dsjobs_stack.job_object(job_id)["status"]["phase"] == "SUCCESS"


def test_fork_with_overrides(
    dsjobs_stack: StackEnv, io_job: tuple[str, Path, CliRun], tmp_path: Path
) -> None:
    job_id, _, _ = io_job
    (tmp_path / "other.txt").write_text("forked input\n")
    run = dsjobs_stack.datasphere(
        "project", "job", "fork", "--id", job_id,
        "--var", "DATA=other.txt", "--var", "RESULT=forked.txt",
        "--env-var", "MODE=forked", "--name", "e2e-forked",
        cwd=tmp_path,
    ).ok()  # fmt: skip
    fork_id = run.job_id
    assert fork_id != job_id
    assert (tmp_path / "forked.txt").read_text() == "mode=forked\nFORKED INPUT\n"
    got = dsjobs_stack.get_job(fork_id, tmp_path)
    assert (got["name"], got["status"]) == ("e2e-forked", "SUCCESS")


def test_download_files_with_logs(
    dsjobs_stack: StackEnv, io_job: tuple[str, Path, CliRun], tmp_path: Path
) -> None:
    job_id, _, _ = io_job
    run = dsjobs_stack.datasphere(
        "project", "job", "download-files", "--id", job_id, "--with-logs", "--output-dir", "dl", cwd=tmp_path
    ).ok()  # fmt: skip
    files = {
        p.relative_to(tmp_path / "dl").as_posix(): p for p in (tmp_path / "dl").rglob("*") if p.is_file()
    }
    assert "result.txt" in files, (sorted(files), run.output)
    assert files["result.txt"].read_text() == "mode=none\nHELLO DSJOBS\n"
    logs = [p for name, p in files.items() if name != "result.txt"]
    assert logs, f"no log files downloaded: {sorted(files)}"
    assert any("processed 13 bytes" in p.read_text(errors="replace") for p in logs), sorted(files)


def test_download_files_with_diagnostics(
    dsjobs_stack: StackEnv, dev_cluster: ClusterHandle, io_job: tuple[str, Path, CliRun], tmp_path: Path
) -> None:
    # The job's resource-usage samples (docs/runner.md#resource-usage) are its diagnostic files.
    if not dsjobs_stack.local or not memory_limits_enforced(dev_cluster):
        pytest.skip("the local nodes give containers no memory cgroups here: no samples to keep")
    job_id, _, _ = io_job
    run = dsjobs_stack.datasphere(
        "project", "job", "download-files", "--id", job_id, "--with-diagnostics", "--output-dir", "dg", cwd=tmp_path
    ).ok()  # fmt: skip
    stats = tmp_path / "dg" / "docker_stats.tsv"
    assert stats.is_file(), run.output
    header, *rows = stats.read_text().splitlines()
    assert header.split("\t") == list(DOCKER_STATS_HEADER)
    assert rows and all(int(row.split("\t")[6]) > 0 for row in rows), rows  # memory_peak_bytes


def test_dsjobs_download_files_streams_every_file_and_extracts_directories(
    dsjobs_stack: StackEnv, tmp_path: Path
) -> None:
    # The official CLI skips files past a total of 1 GiB (DataSphere's web UI has the rest; dsjobs
    # has none): `dsjobs download-files` fetches them all, checked against size and SHA-256.
    config = {
        "name": "e2e-download",
        "cmd": "mkdir -p out/deep && echo a > out/a.txt && echo b > out/deep/b.txt && echo m > model.bin"
        " && echo printed",
        "outputs": ["out", "model.bin"],
    }
    d = job_dir(tmp_path, config, {})
    job_id = execute(dsjobs_stack, d).ok().job_id
    dl = tmp_path / "dl"
    run = dsjobs_stack.datasphere(
        "--id", job_id, "--with-logs", "--output-dir", str(dl), cwd=tmp_path, command="download-files"
    ).ok()  # fmt: skip
    files = {p.relative_to(dl).as_posix(): p.read_text() for p in dl.rglob("*") if p.is_file()}
    assert files.pop("out/a.txt") == "a\n" and files.pop("out/deep/b.txt") == "b\n", run.output
    assert files.pop("model.bin") == "m\n"
    assert any("printed" in text for text in files.values()), sorted(files)  # the logs
    assert "downloaded " in run.output and not list(dl.rglob("*.download")) and not list(dl.rglob("*.zip"))
    # Run again (after a failure half-way): the files there are not fetched again.
    again = dsjobs_stack.datasphere(
        "--id", job_id, "--output-dir", str(dl), cwd=tmp_path, command="download-files"
    ).ok()  # fmt: skip
    assert f"downloaded {dl / 'model.bin'} (2 bytes, already there)" in again.output, again.output
    # Not finished yet, unknown: said, exit 1.
    gone = dsjobs_stack.datasphere("--id", "bt1nosuchjob0000000", cwd=tmp_path, command="download-files")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.output, gone.output


def test_set_data_ttl(dsjobs_stack: StackEnv, io_job: tuple[str, Path, CliRun], tmp_path: Path) -> None:
    job_id, _, _ = io_job
    run = dsjobs_stack.datasphere(
        "project", "job", "set-data-ttl", "--id", job_id, "--days", "30", cwd=tmp_path
    )
    assert "data ttl updated" in run.ok().output
    expires = datetime.fromisoformat(str(dsjobs_stack.get_job(job_id, tmp_path)["data_expired_at"]))
    expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    assert now + timedelta(days=29) < expires < now + timedelta(days=31), expires

    dsjobs_stack.datasphere(
        "project", "job", "set-data-ttl", "--id", job_id, "--days", "infinity", cwd=tmp_path
    ).ok()
    assert dsjobs_stack.get_job(job_id, tmp_path)["data_expired_at"] == "Never"


def test_gpu_instance_type_lands_on_gpu_node(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    gpu_nodes = dsjobs_stack.kubectl("get", "nodes", "-l", "dsjobs.dev/node-pool=gpu", "-o", "name").split()
    if not gpu_nodes:
        pytest.skip("no node labelled dsjobs.dev/node-pool=gpu in this cluster")
    d = slow_job_dir(tmp_path, 15, **{"cloud-instance-types": ["g2.1"]})
    job_id = execute_async(dsjobs_stack, d)

    def scheduled() -> dict[str, Any] | None:
        pods = [p for p in job_pods(dsjobs_stack, job_id) if p["spec"].get("nodeName")]
        return pods[0] if pods else None

    pod = poll(f"a scheduled pod of job {job_id}", scheduled, 180)
    assert f"node/{pod['spec']['nodeName']}" in gpu_nodes
    gpu_limits = [
        c["resources"]["limits"]["nvidia.com/gpu"]
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
        if "nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {})
    ]
    assert gpu_limits == ["1"], pod["spec"]
    tolerated = {(t.get("key"), t.get("effect")) for t in pod["spec"].get("tolerations", [])}
    assert ("nvidia.com/gpu", "NoSchedule") in tolerated
    wait_status(dsjobs_stack, job_id, d, {"SUCCESS"})


def test_kubectl_apply_example_projectjob(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    # The one the README's walkthrough applies (tests/unit/test_crds.py checks every example).
    job = yaml.safe_load((REPO_ROOT / "deploy" / "examples" / "basic.yaml").read_text())
    name = f"e2e-example-{uuid.uuid4().hex[:6]}"
    job["metadata"] = {**job.get("metadata", {}), "name": name, "namespace": dsjobs_stack.project_namespace}
    job["metadata"].pop("generateName", None)
    job["metadata"].pop("labels", None)  # as a user would write it: the operator adds them
    job["spec"]["projectId"] = dsjobs_stack.project_id
    dsjobs_stack.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
    dsjobs_stack.kubectl(
        "wait", f"projectjob/{name}", "-n", dsjobs_stack.project_namespace,
        "--for=jsonpath={.status.phase}=SUCCESS", "--timeout=300s", timeout=330,
    )  # fmt: skip
    listed = dsjobs_stack.kubectl("get", "pj", "-n", dsjobs_stack.project_namespace)
    assert name in listed
    described = dsjobs_stack.kubectl("describe", "pj", name, "-n", dsjobs_stack.project_namespace)
    events = described.split("Events:", 1)[-1]
    assert "Events:" in described and "<none>" not in events.splitlines()[0], described
    assert len([line for line in events.splitlines() if line.strip()]) >= 3, (
        described
    )  # header, rule, >= 1 event
    # The operator labelled it like the API's jobs, so the API lists it with the project's jobs.
    labels = dsjobs_stack.job_object(name)["metadata"]["labels"]
    assert labels["dsjobs.dev/project-id"] == dsjobs_stack.project_id and labels["dsjobs.dev/job-id"] == name
    run = dsjobs_stack.datasphere(
        "project", "job", "list", "-p", dsjobs_stack.project_id, "--format", "json", cwd=tmp_path
    ).ok()  # fmt: skip
    listed = first_json(run.output)
    listed = listed if isinstance(listed, list) else [listed]
    assert [j["status"] for j in listed if j["id"] == name] == ["SUCCESS"], run.output


def test_operator_and_api_restart_mid_job(dsjobs_stack: StackEnv, tmp_path: Path) -> None:
    d = slow_job_dir(tmp_path, 45)
    job_id = execute_async(dsjobs_stack, d)
    wait_status(dsjobs_stack, job_id, d, {"EXECUTING"})
    ns = dsjobs_stack.system_namespace
    deployments = dsjobs_stack.kubectl("get", "deployments", "-n", ns, "-o", "name").split()
    assert deployments
    for dep in deployments:
        dsjobs_stack.kubectl("rollout", "restart", dep, "-n", ns)
    for dep in deployments:
        dsjobs_stack.kubectl("rollout", "status", dep, "-n", ns, "--timeout=300s", timeout=330)
    # The job went on meanwhile; the restarted API serves it and the restarted operator finishes it.
    attach_dir = tmp_path / "attach"
    attach_dir.mkdir()

    def attach() -> CliRun | None:
        run = dsjobs_stack.datasphere("project", "job", "attach", "--id", job_id, cwd=attach_dir)
        return run if run.returncode == 0 else None

    run = poll("attach to succeed after the restart", attach, 600, interval=3)
    assert (attach_dir / "slow.txt").read_text() == "ticked 45\n", run.output
    assert status_of(dsjobs_stack, job_id, d) == "SUCCESS"
    assert dsjobs_stack.job_object(job_id)["status"]["phase"] == "SUCCESS"
