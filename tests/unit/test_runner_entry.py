"""The entry script, run for real under dash, busybox sh and bash in a temp dir.

Needs the `dash` and `busybox` packages (Debian: `apt-get install dash busybox`); a shell that is
missing is skipped with its name in the reason.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from runner_fakes import alive, umask

from dsjobs.runner.config import ENV_PROJECT_SECRETS, SHELL_SPECIAL_ENV, RunnerConfig
from dsjobs.runner.entry import CANCELLED_EXIT, KILL_HELPERS, SETUP_FAILED_EXIT, render_entry_script
from dsjobs.runner.result import RunnerStatus
from dsjobs.runner.ship import cut_log_errors, read_status_file
from dsjobs.runner.stagein import prepare
from dsjobs.runner.syslog import SystemLog


def _dash() -> list[str]:
    path = shutil.which("dash")
    if path is None:
        pytest.skip("dash is not installed (apt-get install dash)")
    return [path]


@dataclass
class Run:
    rc: int
    stdout: bytes  # the container log's stdout
    stderr: bytes
    config: RunnerConfig

    @property
    def out_file(self) -> bytes:
        return self.config.layout.stdout.read_bytes()

    @property
    def err_file(self) -> bytes:
        return self.config.layout.stderr.read_bytes()

    @property
    def syslog(self) -> str:
        return self.config.layout.system_log.read_text()


def make_config(tmp: Path, cmd: str, **kw: Any) -> RunnerConfig:
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd=cmd,
        paths={"work_dir": str(tmp / "work"), "shared_dir": str(tmp / "shared")},
        **kw,
    )
    cfg.layout.create()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    cfg.layout.entry_script.write_text(render_entry_script(cfg))
    return cfg


def run_entry(
    shell: list[str],
    cfg: RunnerConfig,
    *,
    env: dict[str, str] | None = None,
    term_when: bytes | None = None,
    timeout: float = 60,
) -> Run:
    """Run the script; with ``term_when``, send SIGTERM once the program printed that."""
    out_path = cfg.layout.root.parent / "container.out"
    err_path = cfg.layout.root.parent / "container.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [*shell, str(cfg.layout.entry_script)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else dict(os.environ),
        )
        try:
            if term_when is not None:
                deadline = time.monotonic() + timeout
                while term_when not in (
                    cfg.layout.stdout.read_bytes() if cfg.layout.stdout.exists() else b""
                ):
                    assert proc.poll() is None, "the script ended before the program got ready"
                    assert time.monotonic() < deadline, "the program never got ready"
                    time.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
    return Run(rc, out_path.read_bytes(), err_path.read_bytes(), cfg)


def _on_path(tmp: Path, name: str, script: str) -> dict[str, str]:
    """The environment with an executable `name` (a /bin/sh `script`) first on PATH."""
    bindir = tmp / f"{name}-bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!/bin/sh\n{script}")
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def _fake_python(tmp: Path, pip: str = "echo pip-ran; exit 0", before_version: str = "") -> dict[str, str]:
    """PATH with a python3 that reports 3.11.0 (after `before_version`), runs the shell commands
    `pip` for any pip command and has no venv module (pip then installs with --target)."""
    return _on_path(
        tmp,
        "python3",
        f'case "$*" in "-m pip "*) {pip} ;; "-m venv "*) exit 1 ;; esac\n{before_version}echo 3.11.0\n',
    )


def _recording_sleep(tmp: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `sleep` is the real one, which appends "ARGS STATUS" to the returned
    file once it has ended (a wrapper killed itself appends nothing)."""
    real = shutil.which("sleep")
    assert real is not None
    record = tmp / "sleeps"
    script = f'{shlex.quote(real)} "$@"\ns=$?\necho "$* $s" >>{shlex.quote(str(record))}\nexit $s\n'
    return _on_path(tmp, "sleep", script), record


def test_exit_code_and_both_streams_captured_separately(shell: list[str], tmp_path: Path) -> None:
    cmd = (
        r"printf 'o1\n'; printf 'e1\n' >&2; printf 'o2 '; printf '\001\377'; printf 'e2-partial' >&2; exit 7"
    )
    r = run_entry(shell, make_config(tmp_path, cmd))
    assert r.rc == 7
    assert r.out_file == b"o1\no2 \x01\xff"
    assert r.err_file == b"e1\ne2-partial"
    # ... and to the container log, each stream on its own side.
    assert r.stdout == b"o1\no2 \x01\xff"
    assert r.stderr == b"e1\ne2-partial"
    status = read_status_file(r.config.layout.status)
    assert status is not None and status.status == RunnerStatus.EXITED
    assert status.return_code == 7 and not status.cancelled
    assert r.config.layout.started.exists() and r.config.layout.heartbeat.read_text().strip().isdigit()
    assert "program exited with code 7" in r.syslog


def test_the_entry_script_alone_holds_the_liveness_fifo(shell: list[str], tmp_path: Path) -> None:
    """Ship tells a stalled job container from a dead one by the FIFO's writer: the script must
    hold it open while it runs, and nothing it starts (the program may daemonize and outlive it)
    may."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK)\n"
        "try:\n"
        "    print('no writer' if os.read(fd, 1) == b'' else 'data')\n"
        "except BlockingIOError:\n"
        "    print('a writer')\n"
    )
    alive = make_config(tmp_path, "true").layout.alive
    cfg = make_config(
        tmp_path,
        # What the program's own fds lead to, and whether the script holds the FIFO meanwhile.
        f"for f in /proc/self/fd/*; do readlink $f; done > fds.txt; "
        f"{shlex.join([sys.executable, str(probe), str(alive)])}",
    )
    os.mkfifo(cfg.layout.alive, 0o666)
    reader = os.open(cfg.layout.alive, os.O_RDONLY | os.O_NONBLOCK)
    try:
        r = run_entry(shell, cfg)
        assert r.rc == 0 and r.out_file == b"a writer\n"
        assert str(cfg.layout.alive) not in (cfg.work_dir / "fds.txt").read_text()
        assert os.read(reader, 10) == b""  # the script ended: no writer is left
    finally:
        os.close(reader)


def test_the_entry_script_runs_without_a_liveness_fifo(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "echo ok")
    cfg.layout.alive.write_text("a job's file, not a FIFO")
    r = run_entry(_dash(), cfg)
    assert r.rc == 0 and r.out_file == b"ok\n"


@pytest.mark.parametrize("code", [0, 1, 255])
def test_exit_codes_propagate(code: int, tmp_path: Path) -> None:
    r = run_entry(_dash(), make_config(tmp_path, f"exit {code}"))
    assert r.rc == code
    status = read_status_file(r.config.layout.status)
    assert status is not None and status.return_code == code


def test_environment_variables_progress_file_and_cmd_template(shell: list[str], tmp_path: Path) -> None:
    cmd = (
        'printf "%s|" "$GREETING" "${DATA}" "$(pwd)" "${NAME}" "$${NAME}"; '
        'echo \'{"progress": 40, "message": "m"}\' >> "$JOB_PROGRESS_FILENAME"'
    )
    cfg = make_config(
        tmp_path,
        cmd,
        env={"GREETING": 'it\'s "quoted" $HOME `x`\nline2', "NAME": "from-env"},
        inputs=[{"path": "d/x.csv", "var": "DATA", "sha256": "0" * 64, "size_bytes": 0}],
    )
    r = run_entry(shell, cfg)
    assert r.rc == 0
    work = cfg.work_dir
    assert r.out_file.decode() == f'it\'s "quoted" $HOME `x`\nline2|{work}/d/x.csv|{work}|from-env|from-env|'
    assert cfg.layout.progress.read_text() == '{"progress": 40, "message": "m"}\n'


def test_the_job_s_environment_is_the_program_s_not_the_script_s(shell: list[str], tmp_path: Path) -> None:
    """A job's PATH without the image's tools, or its own IFS, reaches the program as given and
    leaves the script's machinery alone: the launcher, the tees, the graceful-shutdown timer."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    # (The program's shell resets IFS when it starts, as any shell does: only PATH is seen there.)
    cmd = (
        "trap 'echo got-usr1; exit 5' USR1; printf '%s|\\n' \"$PATH\"; echo ready; "
        f"while :; do {sleep} 0.1; done"
    )
    cfg = make_config(
        tmp_path,
        cmd,
        env={"PATH": str(tmp_path / "nothing-here"), "IFS": ":"},
        graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 10},
    )
    r = run_entry(shell, cfg, term_when=b"ready")
    assert r.rc == 5, (r.stderr, r.syslog)
    expected = f"{tmp_path / 'nothing-here'}|\nready\ngot-usr1\n".encode()
    assert r.out_file == expected
    assert r.stdout == expected  # the tee ran: the container log has it too
    assert "tee or mkfifo missing" not in r.syslog


def test_project_secrets_that_are_no_shell_names_reach_the_program(shell: list[str], tmp_path: Path) -> None:
    """DataSphere secret names may have hyphens (`hf-token`); the pod's environment has them, but
    the shell running this script drops them (dash, busybox): they come from the Secret's files."""
    secrets = tmp_path / "project-secrets"
    secrets.mkdir()
    values = {"hf-token": "hf_abc\n", "my.key": "a b=c", "9lives": "cat", ".hidden": "h", "API_TOKEN": "file"}
    for key, value in values.items():
        (secrets / key).write_text(value)
    (secrets / "..data").mkdir()  # the kubelet's own entries are no keys
    cmd = (
        "python3 -c 'import os, json; print(json.dumps({k: os.environ.get(k) for k in "
        '["hf-token", "my.key", "9lives", ".hidden", "API_TOKEN", "..data"]}))\''
    )
    env = {**os.environ, ENV_PROJECT_SECRETS: str(secrets), "API_TOKEN": "from-env", "hf-token": "from-env"}
    r = run_entry(shell, make_config(tmp_path, cmd), env=env)
    assert r.rc == 0, (r.stderr, r.syslog)
    # Shell names come from the pod's environment (envFrom), the others from the files, as stored.
    assert json.loads(r.out_file) == {
        "hf-token": "hf_abc\n",
        "my.key": "a b=c",
        "9lives": "cat",
        ".hidden": "h",
        "API_TOKEN": "from-env",
        "..data": None,
    }


@pytest.mark.parametrize("key", ["-i", "-u", "-S", "--", "-0", "-C", "--chdir"])
def test_a_project_secret_named_like_an_option_of_env_is_passed_not_obeyed(
    shell: list[str], tmp_path: Path, key: str
) -> None:
    """Secret keys may start with '-' (a Kubernetes key is [-._a-zA-Z0-9]+). Given to `env` before
    its `--`, `-i=v` was read as its options: env exited 125 (invalid option '='), `-S=...` split the
    value into a command, and the program never ran."""
    secrets = tmp_path / "project-secrets"
    secrets.mkdir()
    (secrets / key).write_text("x /bin/false")
    cmd = f"python3 -c 'import os, json; print(json.dumps(os.environ.get(\"{key}\")))'"
    env = {**os.environ, ENV_PROJECT_SECRETS: str(secrets)}
    r = run_entry(shell, make_config(tmp_path, cmd), env=env)
    assert r.rc == 0, (r.stderr, r.syslog)
    assert json.loads(r.out_file) == "x /bin/false"


@pytest.mark.parametrize("name", sorted(SHELL_SPECIAL_ENV))
def test_the_shell_s_own_variables_are_refused(name: str, tmp_path: Path) -> None:
    # bash (also as /bin/sh) keeps some readonly; others are numeric (`OPTIND=abc` fails in dash,
    # `RANDOM=abc` under set -u in bash). Either ends the shell that runs the program.
    with pytest.raises(ValueError, match=f"{name}.*the shell's own"):
        make_config(tmp_path, "true", env={name: "1"})


@pytest.mark.parametrize("name", sorted(SHELL_SPECIAL_ENV))
def test_exporting_a_shell_variable_would_break_the_program_s_shell(name: str) -> None:
    # Why the names above are refused: as the entry script's subshell would export them, bash as
    # /bin/sh (POSIX mode: an assignment error ends the shell) fails on every one; OPTIND breaks
    # dash too. (Plain bash only warns about its readonly ones; busybox takes them all.)
    script = f"set -u; ( export {name}=abc; exec echo ran ) 2>/dev/null || echo broken"
    out = subprocess.run(["bash", "--posix", "-c", script], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "broken", out


def test_sigterm_forwards_the_graceful_signal(shell: list[str], tmp_path: Path) -> None:
    cmd = "trap 'echo got-usr1; exit 5' USR1; echo ready; while :; do sleep 0.1; done"
    cfg = make_config(tmp_path, cmd, graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 10})
    r = run_entry(shell, cfg, term_when=b"ready")
    assert r.rc == 5
    assert r.out_file == b"ready\ngot-usr1\n"
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.return_code == 5 and status.cancelled
    assert "sending SIGUSR1" in r.syslog
    # The program's own exit ended the job: the SIGKILL timer was stopped, it never ran out.
    assert "timeout (10s) expired" not in r.syslog
    # Nor is any of the timer's helpers left behind (a stop landing just after the forced-cancel
    # watcher was forked, before its pid was recorded, once left it looping for good).
    poll_until(lambda: not processes_running(cfg.layout.entry_script), 15)


def processes_running(script: Path) -> list[int]:
    """Pids of processes whose command line names `script` (the entry script and its subshells)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if str(script).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def poll_until(check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "still not so after the deadline"
        time.sleep(0.2)


@pytest.mark.parametrize("own_group", [True, False], ids=["setsid", "no-setsid"])
def test_the_program_is_signalled_once(shell: list[str], own_group: bool, tmp_path: Path) -> None:
    # A second copy of the graceful signal would interrupt the program's own shutdown (a Python
    # program given SIGINT twice: a KeyboardInterrupt inside its handler). busybox's `kill`
    # signals the group and then fails on `--`, which once made the script send it again.
    # Counting copies in the program races (pending signals merge), so each `kill` is recorded.
    log = tmp_path / "kills"
    target = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=own_group
    )
    try:
        script = (
            KILL_HELPERS
            + f"DSJOBS_SETSID={int(own_group)}\n"
            + f'kill() {{ echo "kill $*" >>{shlex.quote(str(log))}; command kill "$@"; }}\n'
            + f"dsjobs_kill USR1 {target.pid}\n"
        )
        subprocess.run([*shell, "-c", script], check=True, timeout=10)
        assert target.wait(timeout=10) == -signal.SIGUSR1
    finally:
        target.kill()
        target.wait()
    form = f"-{target.pid}" if own_group else str(target.pid)
    [line] = log.read_text().splitlines()
    assert line.startswith("kill -s USR1") and line.endswith(f" {form}"), line


def test_a_program_under_a_shell_gets_its_graceful_timeout(shell: list[str], tmp_path: Path) -> None:
    # `bash run.sh`, `python a.py; echo done`: the signal reaches the group, the shell dies of it
    # at once, and the script took that for the program's end and SIGKILLed the group: the
    # program saving its checkpoint was killed with zero of its timeout.
    child = "trap 'echo saving; sleep 1; echo saved; exit 0' USR1; echo ready; while :; do sleep 0.1; done"
    cmd = f"sh -c {shlex.quote(child)}; echo not-reached"
    cfg = make_config(tmp_path, cmd, graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 10})
    r = run_entry(shell, cfg, term_when=b"ready")
    assert r.out_file == b"ready\nsaving\nsaved\n", r.syslog
    assert r.rc == 128 + signal.SIGUSR1  # the shell's
    # The script waited for the group to end, not for the timer: it never ran out.
    assert "timeout (10s) expired" not in r.syslog
    # The timeout still holds for a group that does not end.
    stubborn = "trap 'echo ignoring' USR1; echo ready; while :; do sleep 0.1; done"
    cfg = make_config(
        tmp_path / "2",
        f"sh -c {shlex.quote(stubborn)}; echo x",
        graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 2},
    )
    r = run_entry(shell, cfg, term_when=b"ready")
    assert b"ignoring" in r.out_file and "timeout (2s) expired" in r.syslog
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.cancelled and status.return_code == r.rc


def test_a_program_in_a_process_group_of_its_own_gets_the_graceful_signal(
    shell: list[str], tmp_path: Path
) -> None:
    # `timeout 1000 python train.py`, `set -m`, setpgid: the program leaves the script's process
    # group for one of its own in the same session. The signal went to the group only: the shell
    # died of it, the program never heard it and was SIGKILLed with the container, its checkpoint
    # never saved. The whole session is signalled and waited for now.
    child = tmp_path / "child.py"
    child.write_text(
        "import os, signal, sys, time\n"
        "os.setpgid(0, 0)\n"
        "def save(*_):\n"
        "    print('saving', flush=True); time.sleep(1); print('saved', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGUSR1, save)\n"
        "print('ready', flush=True)\n"
        "for _ in range(600): time.sleep(0.1)  # a minute at most, should no signal ever come\n"
    )
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(child))}; echo not-reached"
    cfg = make_config(tmp_path, cmd, graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 10})
    started = time.monotonic()
    r = run_entry(shell, cfg, term_when=b"ready")
    assert r.out_file == b"ready\nsaving\nsaved\n", r.syslog
    assert "timeout (10s) expired" not in r.syslog
    assert time.monotonic() - started < 9  # not the tees' 10 s drain behind a program still holding them


def test_sigkill_after_the_graceful_timeout(shell: list[str], tmp_path: Path) -> None:
    # The 10 s of the DataSphere example once (dash); 3 s for the other shells to keep the suite
    # fast (not 2: the heartbeat's own `sleep 2` would pass for the timer's below).
    timeout = 10 if shell[0] == "dash" else 3
    cmd = "trap 'echo ignoring-usr1' USR1; echo ready; while :; do sleep 0.1; done"
    cfg = make_config(
        tmp_path, cmd, graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": timeout}
    )
    # No cgroup to sample, so no sampler's `sleep 10` either: the only `sleep {timeout}` is the timer's.
    cfg.layout.entry_script.write_text(render_entry_script(cfg, cgroup_fs=str(tmp_path / "no-cgroup")))
    env, sleeps = _recording_sleep(tmp_path)
    r = run_entry(shell, cfg, env=env, term_when=b"ready")
    assert r.rc == 128 + signal.SIGKILL
    assert b"ignoring-usr1" in r.out_file
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.return_code == 137 and status.cancelled
    # The program got its whole timeout (not a measured time: the timer's `sleep {timeout}` ran to
    # its end), and the SIGKILL came from the timer after it, once the signal had been sent.
    assert f"{timeout} 0" in sleeps.read_text().splitlines()
    sent = r.syslog.index(f"cancel: sending SIGUSR1 to the program, SIGKILL in {timeout}s")
    assert r.syslog.index(f"timeout ({timeout}s) expired: sending SIGKILL") > sent


def test_a_forced_cancel_cuts_the_graceful_timeout_short(shell: list[str], tmp_path: Path) -> None:
    # The pod's deletion gives a forced cancel the graceful grace too (the runner must store the
    # logs in it): ship's kill-now file, made when the operator says the cancel is forced, is what
    # makes the timer SIGKILL the program without waiting out its timeout.
    cmd = "trap 'echo ignoring-usr1' USR1; echo ready; while :; do sleep 0.1; done"
    cfg = make_config(
        tmp_path, cmd, graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 300}
    )
    cfg.layout.entry_script.write_text(render_entry_script(cfg, cgroup_fs=str(tmp_path / "no-cgroup")))
    cfg.layout.kill_now.touch()
    env, sleeps = _recording_sleep(tmp_path)
    r = run_entry(shell, cfg, env=env, term_when=b"ready")
    assert r.rc == 128 + signal.SIGKILL
    sent = r.syslog.index("cancel: sending SIGUSR1 to the program, SIGKILL in 300s")
    assert r.syslog.index("cancel forced: sending SIGKILL to the program") > sent
    assert "timeout (300s) expired" not in r.syslog
    # The timer's sleep was cut short (a killed one records nothing).
    assert not sleeps.exists() or "300 0" not in sleeps.read_text().splitlines()
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.return_code == 137 and status.cancelled


def test_without_graceful_parameters_cancel_is_sigkill(shell: list[str], tmp_path: Path) -> None:
    cmd = "trap 'echo term-trapped; exit 3' TERM; echo ready; while :; do sleep 0.1; done"
    cfg = make_config(tmp_path, cmd)
    r = run_entry(shell, cfg, term_when=b"ready")
    assert r.rc == 137
    assert b"term-trapped" not in r.out_file
    # At once: no signal for the program to act on first, no timer started.
    assert "cancel: no graceful shutdown configured: sending SIGKILL to the program" in r.syslog
    assert "SIGKILL in" not in r.syslog
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.return_code == 137 and status.cancelled


def test_sigint_as_graceful_signal_reaches_a_python_program(shell: list[str], tmp_path: Path) -> None:
    # Background jobs of a non-interactive shell ignore SIGINT; the script must undo that.
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "prog.py").write_text(
        "import sys, time\n"
        "try:\n"
        "    print('ready', flush=True)\n"  # inside the try: the signal may come right after
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(9)\n"
    )
    cfg = make_config(
        tmp_path,
        f"{shlex.quote(sys.executable)} prog.py",
        graceful_shutdown={"signal": int(signal.SIGINT), "timeout_seconds": 10},
    )
    r = run_entry(shell, cfg, term_when=b"ready")
    assert r.rc == 9, r.syslog
    assert r.out_file == b"ready\ninterrupted\n"


def test_odd_project_secrets_and_sigint_without_gnu_env(shell: list[str], tmp_path: Path) -> None:
    """An `env` without --default-signal (busybox's): the odd keys go through it, behind the python
    trampoline that resets SIGINT, and a key like `-S` is still a name, not env's option."""
    secrets = tmp_path / "project-secrets"
    secrets.mkdir()
    # Alone: before the first NAME=VALUE (a key the glob gives later goes first), env took it for
    # its -S option and ran /bin/false.
    (secrets / "-S").write_text("x /bin/false")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "prog.py").write_text(
        "import os, sys, time\n"
        "try:\n"
        "    print(os.environ.get('-S'), flush=True)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(9)\n"
    )
    real_env = shutil.which("env")
    assert real_env is not None
    env = _on_path(
        tmp_path, "env", f'case "$1" in --default-signal*) exit 125 ;; esac\nexec {real_env} "$@"\n'
    )
    env[ENV_PROJECT_SECRETS] = str(secrets)
    cfg = make_config(
        tmp_path,
        f"{shlex.quote(sys.executable)} prog.py",
        graceful_shutdown={"signal": int(signal.SIGINT), "timeout_seconds": 10},
    )
    r = run_entry(shell, cfg, env=env, term_when=b"ready")
    assert r.rc == 9, r.syslog
    assert r.out_file == b"x /bin/false\nready\ninterrupted\n"


def _path_without(tmp: Path, tool: str) -> str:
    """A PATH of everything on ours but `tool` (an image without it)."""
    bindir = tmp / f"no-{tool}-bin"
    bindir.mkdir()
    for d in os.environ["PATH"].split(":"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name != tool and not (bindir / name).exists():
                (bindir / name).symlink_to(os.path.join(d, name))
    return str(bindir)


def test_odd_project_secrets_in_an_image_without_bash_are_told_lost(shell: list[str], tmp_path: Path) -> None:
    """No bash (an Alpine image): the program's sh (busybox, dash) drops the names env gave it, so
    the program does not get them, which the system log says rather than nothing."""
    secrets = tmp_path / "project-secrets"
    secrets.mkdir()
    (secrets / "hf-token").write_text("hf_abc")
    (secrets / "API_TOKEN").write_text("t")
    env = {**os.environ, "PATH": _path_without(tmp_path, "bash"), ENV_PROJECT_SECRETS: str(secrets)}
    runs = shutil.which(shell[0])  # the script's own shell may be bash: not the program's
    assert runs is not None
    r = run_entry([runs, *shell[1:]], make_config(tmp_path, "echo ran"), env=env)
    assert r.rc == 0, (r.stderr, r.syslog)
    assert r.out_file == b"ran\n"
    assert (
        "warning: 1 project secrets whose names are no shell names do not reach the program: "
        "the image has no bash"
    ) in r.syslog


def test_odd_project_secrets_without_env_in_the_image(shell: list[str], tmp_path: Path) -> None:
    """No `env` at all: the odd keys are not passed (the system log says how many), the program
    runs as it would without them."""
    secrets = tmp_path / "project-secrets"
    secrets.mkdir()
    (secrets / "hf-token").write_text("hf_abc")
    (secrets / "my.key").write_text("v")
    env = {**os.environ, "PATH": _path_without(tmp_path, "env"), ENV_PROJECT_SECRETS: str(secrets)}
    cmd = f'{shlex.quote(sys.executable)} -c \'import os; print(os.environ.get("hf-token"))\'; echo "$#" done'
    r = run_entry(shell, make_config(tmp_path, cmd), env=env)
    assert r.rc == 0, (r.stderr, r.syslog)
    assert r.out_file == b"None\n0 done\n"
    assert "2 project secrets whose names are no shell names not passed (no env in the image)" in r.syslog


def test_leftover_background_processes_do_not_hold_the_job(shell: list[str], tmp_path: Path) -> None:
    r = run_entry(shell, make_config(tmp_path, 'sleep 60 & echo "started-bg $!"; exit 4'))
    assert r.rc == 4
    label, pid = r.out_file.decode().split()
    try:
        assert label == "started-bg" and r.out_file.endswith(b"\n")
        # Killed with the program's session when the program exited, so it no longer held the
        # output pipes when the script waited for its tees (it would have until the drain
        # deadline, then been left running).
        assert not alive(int(pid)), r.syslog
        assert "program exited with code 4" in r.syslog
    finally:
        if alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)


def _busybox_bin(tmp: Path, applets: list[str]) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    d = tmp / "bin"
    d.mkdir()
    for a in applets:
        (d / a).symlink_to(busybox)
    return d


def test_busybox_only_image(tmp_path: Path) -> None:
    """An alpine-like image: busybox applets only, no bash, no python, no GNU env."""
    bindir = _busybox_bin(
        tmp_path,
        ["sh", "tee", "mkfifo", "setsid", "sleep", "date", "mv", "rm", "mkdir", "dirname", "env", "cat"],
    )
    cmd = "trap 'echo bye; exit 6' USR1; echo ready; echo oops >&2; while :; do sleep 0.1; done"
    cfg = make_config(tmp_path, cmd, graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 10})
    r = run_entry([str(bindir / "sh")], cfg, env={"PATH": str(bindir)}, term_when=b"ready")
    assert r.rc == 6
    assert r.out_file == b"ready\nbye\n" and r.stdout == b"ready\nbye\n"
    # (The shell may add a note that its `sleep` child died of SIGUSR1: the whole group gets it.)
    assert r.err_file.startswith(b"oops\n") and r.stderr == r.err_file


def test_missing_tee_and_mkfifo_degrade_to_files_only(tmp_path: Path) -> None:
    bindir = _busybox_bin(tmp_path, ["sleep", "date", "mv", "rm", "mkdir", "dirname"])
    (bindir / "sh").symlink_to(_dash()[0])
    r = run_entry(_dash(), make_config(tmp_path, "echo out; echo err >&2; exit 2"), env={"PATH": str(bindir)})
    assert r.rc == 2
    assert r.out_file == b"out\n" and r.err_file == b"err\n"
    assert r.stdout == b""
    assert "tee or mkfifo missing" in r.syslog


def test_python_version_mismatch_is_a_setup_failure(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "echo never", python_env={"python_version": "3.1"})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = run_entry(_dash(), cfg, env=env)
    assert r.rc == SETUP_FAILED_EXIT
    assert not cfg.layout.stdout.exists()
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.SETUP_FAILED
    assert "python 3.1 was requested" in status.reason
    assert b"python 3.1 was requested" in r.stderr


def _write_wheel(dest_dir: Path, name: str, version: str, module_source: str) -> Path:
    """A minimal pure-Python wheel, built by hand (no network, no build backend)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_source.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dsjobs-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def make_local_index(tmp: Path, versions: dict[str, int] | None = None) -> str:
    """A PEP 503 index on disk serving tiny wheels of `tinypkg` (version -> its VALUE; one 0.1
    of VALUE 42 by default); returns its file:// URL."""
    pkg = tmp / "simple" / "tinypkg"
    pkg.mkdir(parents=True)
    links = []
    for version, value in (versions or {"0.1": 42}).items():
        wheel = _write_wheel(pkg, "tinypkg", version, f"VALUE = {value}\n")
        links.append(f'<a href="{wheel.name}">{wheel.name}</a>')
    (pkg / "index.html").write_text(f"<html><body>{''.join(links)}</body></html>\n")
    return (tmp / "simple").as_uri()


def _venv_site(venv: Path) -> Path:
    [site] = (venv / "lib").glob("python*/site-packages")
    return site


def _base_pip_home() -> Path | None:
    """The site dir of the base interpreter's own pip (pyenv's, here), if it has one."""
    found = list(Path(sys.base_prefix).glob("lib/python*/site-packages/pip/__init__.py"))
    return found[0].parent.parent if found else None


def _image_python(tmp: Path, index: str, installed: str | None, pip_home: Path | None = None) -> Path:
    """An image whose Python is a venv of its own (as /opt/venv images have), with pip (the test
    interpreter's unless `pip_home`, through a .pth) and `installed` (a requirement)
    pip-installed in it; its bin."""
    img = tmp / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(img)], check=True)
    pip_home = pip_home or Path(__import__("pip").__file__).parent.parent
    (_venv_site(img) / "test-pip.pth").write_text(f"{pip_home}\n")
    if installed:
        subprocess.run(
            [img / "bin" / "python", "-m", "pip", "install", "-q", "--index-url", index, installed],
            check=True,
            capture_output=True,
        )
    return img / "bin"


def _prints_tinypkg(interpreter: str = "python3") -> str:
    # One a line: the paths may hold spaces (TMPDIR).
    return (
        f"{shlex.quote(interpreter)} -c "
        "'import sys, tinypkg; print(tinypkg.VALUE, tinypkg.__file__, sys.prefix, sep=chr(10))'"
    )


def test_requirements_the_image_has_are_not_installed_again(shell: list[str], tmp_path: Path) -> None:
    # A pytorch image's torch was downloaded again by each job (pip --target ignores what the
    # interpreter has).
    index = make_local_index(tmp_path, {"0.1": 1, "0.2": 2})
    bindir = _image_python(tmp_path, index, "tinypkg==0.1")
    cfg = make_config(
        tmp_path,
        _prints_tinypkg(),
        python_env={"requirements": ["tinypkg==0.1"], "pip": {"index_url": index}},
    )
    cfg.layout.requirements.write_text("tinypkg==0.1\n")
    r = run_entry(shell, cfg, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, timeout=120)
    assert r.rc == 0, r.syslog
    assert "Requirement already satisfied: tinypkg==0.1" in r.syslog
    value, where, prefix = r.out_file.decode().splitlines()
    assert value == "1" and where.startswith(str(tmp_path / "image"))
    assert not list(_venv_site(cfg.layout.venv_dir).glob("tinypkg*"))
    # The program runs the image's interpreter (its sys.prefix: kernelspecs, conda data), not the
    # venv's; the venv's activate scripts are not on PATH (`source activate env` is conda's).
    assert prefix == str(tmp_path / "image")
    assert not (cfg.layout.venv_dir / "bin" / "activate").exists()


@pytest.mark.parametrize("interpreter", ["python3", "image"])
def test_a_requirement_in_another_version_than_the_image_s_leaves_the_image_s_alone(
    tmp_path: Path, interpreter: str
) -> None:
    index = make_local_index(tmp_path, {"0.1": 1, "0.2": 2})
    bindir = _image_python(tmp_path, index, "tinypkg==0.1")
    # "image": the program names the image's interpreter by its path.
    cfg = make_config(
        tmp_path,
        _prints_tinypkg("python3" if interpreter == "python3" else str(bindir / "python3")),
        python_env={"requirements": ["tinypkg==0.2"], "pip": {"index_url": index}},
    )
    cfg.layout.requirements.write_text("tinypkg==0.2\n")
    r = run_entry(_dash(), cfg, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, timeout=120)
    assert r.rc == 0, r.syslog
    value, where, _ = r.out_file.decode().splitlines()
    assert value == "2" and where.startswith(str(cfg.layout.venv_dir))
    # The image's copy is still there (pip did not uninstall it: it is outside the venv).
    assert (_venv_site(tmp_path / "image") / "tinypkg" / "__init__.py").read_text() == "VALUE = 1\n"


_BACKEND = """
import base64, hashlib, os, zipfile

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name, dist = "sdpkg", "sdpkg-1.0.dist-info"
    files = {
        name + "/__init__.py": open(os.path.join(name, "__init__.py"), "rb").read(),
        dist + "/METADATA": b"Metadata-Version: 2.1\\nName: sdpkg\\nVersion: 1.0\\n",
        dist + "/WHEEL": b"Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    record = [
        "%s,sha256=%s,%d" % (k, base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b"=").decode(), len(v))
        for k, v in files.items()
    ]
    files[dist + "/RECORD"] = ("\\n".join(record + [dist + "/RECORD,,"]) + "\\n").encode()
    wheel = "sdpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return wheel
"""


def _write_sdist(dest_dir: Path) -> None:
    """sdpkg 1.0 as an sdist whose build needs buildhelper 2.0 (its PEP 517 backend)."""
    members = {
        "sdpkg-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: sdpkg\nVersion: 1.0\n",
        "sdpkg-1.0/pyproject.toml": '[build-system]\nrequires = ["buildhelper==2.0"]\nbuild-backend = "buildhelper"\n',
        "sdpkg-1.0/sdpkg/__init__.py": "VALUE = 'built'\n",
    }
    with tarfile.open(dest_dir / "sdpkg-1.0.tar.gz", "w:gz") as tf:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("pip", ["newest", "base"])
def test_an_sdist_is_built_with_its_build_requirements_not_the_image_s(tmp_path: Path, pip: str) -> None:
    # The image's old setuptools (python:3.11 has 65.5) shadowed the newer one an sdist asks for
    # in pip's isolated build environment: the build failed where --target's had not. Older pips
    # (the images' own; "base" is this machine's pyenv one) keep in the build environment what the
    # venv's site dir's .pth files do not append anew; newer ones clear sys.path first.
    pip_home = None
    if pip == "base":
        pip_home = _base_pip_home()
        if pip_home is None:
            pytest.skip(f"the base interpreter {sys.base_prefix} has no pip of its own")
    root = tmp_path / "simple"
    for name in ("buildhelper", "sdpkg"):
        (root / name).mkdir(parents=True)
    old = _write_wheel(
        root / "buildhelper", "buildhelper", "1.0", "raise RuntimeError('the image buildhelper')\n"
    )
    new = _write_wheel(root / "buildhelper", "buildhelper", "2.0", _BACKEND)
    _write_sdist(root / "sdpkg")
    for name, files in (("buildhelper", [old.name, new.name]), ("sdpkg", ["sdpkg-1.0.tar.gz"])):
        links = "".join(f'<a href="{f}">{f}</a>' for f in files)
        (root / name / "index.html").write_text(f"<html><body>{links}</body></html>\n")
    index = root.as_uri()
    bindir = _image_python(tmp_path, index, "buildhelper==1.0", pip_home)
    cfg = make_config(
        tmp_path,
        "python3 -c 'import sdpkg; print(sdpkg.VALUE)'",
        python_env={"requirements": ["sdpkg==1.0"], "pip": {"index_url": index}},
    )
    cfg.layout.requirements.write_text("sdpkg==1.0\n")
    r = run_entry(_dash(), cfg, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, timeout=180)
    assert r.rc == 0, r.syslog
    assert r.out_file == b"built\n"


def test_without_the_venv_module_pip_installs_into_a_target_dir(tmp_path: Path) -> None:
    # An interpreter that cannot make a venv (a stripped image): pip installs every requirement
    # into the site dir, which is on PYTHONPATH, as it did before venvs.
    index = make_local_index(tmp_path)
    real = shlex.quote(sys.executable)
    env = _on_path(tmp_path, "python3", f'case "$*" in "-m venv "*) exit 1 ;; esac\nexec {real} "$@"\n')
    cfg = make_config(
        tmp_path,
        "python3 -c 'import tinypkg; print(tinypkg.VALUE)'",
        python_env={"requirements": ["tinypkg==0.1"], "pip": {"index_url": index}},
    )
    cfg.layout.requirements.write_text("tinypkg==0.1\n")
    r = run_entry(_dash(), cfg, env=env, timeout=120)
    assert r.rc == 0, r.syslog
    assert r.out_file == b"42\n"
    assert "no virtual environment over the image's packages" in r.syslog
    assert (cfg.layout.site_dir / "tinypkg" / "__init__.py").exists()


def test_python_env_installs_requirements_and_puts_local_modules_on_pythonpath(tmp_path: Path) -> None:
    index = make_local_index(tmp_path)
    cfg = make_config(
        tmp_path,
        'python3 -c "import tinypkg, helper; print(tinypkg.VALUE, helper.X)"',
        python_env={
            "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
            "requirements": ["tinypkg==0.1"],
            "pip": {"index_url": index, "trusted_hosts": ["localhost"], "no_deps": True},
        },
        local_modules=[
            {"path": "/tmp/whatever.zip", "var": "_LOCAL_MODULE_0", "sha256": "1" * 64, "size_bytes": 1}
        ],
    )
    cfg.layout.requirements.write_text("tinypkg==0.1\n")
    mod = cfg.layout.module_dir(0)
    mod.mkdir(parents=True)
    (mod / "helper.py").write_text("X = 'local'\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = run_entry(_dash(), cfg, env=env, timeout=120)
    assert r.rc == 0, r.syslog
    assert r.out_file == b"42 local\n"
    assert "requirements installed" in r.syslog
    assert (_venv_site(cfg.layout.venv_dir) / "tinypkg" / "__init__.py").exists()


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("https://user:s3cr3t@pypi.example/simple", "https://user:****@pypi.example/simple"),
        ("https://tok3n@pypi.example/simple", "https://****@pypi.example/simple"),
        ("https://user:@pypi.example/simple", "https://user:****@pypi.example/simple"),
        ("https://pypi.example/simple", "https://pypi.example/simple"),
    ],
)
def test_the_system_log_hides_the_passwords_of_index_urls(tmp_path: Path, url: str, logged: str) -> None:
    cfg = make_config(
        tmp_path,
        "true",
        python_env={"requirements": ["x"], "pip": {"index_url": url, "extra_index_urls": [url]}},
    )
    script = render_entry_script(cfg)
    [line] = [s for s in script.splitlines() if s.startswith("DSJOBS_PIP_ARGS=")]
    assert f"--index-url {logged} --extra-index-url {logged}" in line
    assert "s3cr3t" not in line and "tok3n" not in line
    assert url in script  # pip itself gets the real URL


def test_cancel_before_the_program_starts(tmp_path: Path) -> None:
    # pip "installs" for a while (a fake interpreter that sleeps), SIGTERM arrives meanwhile.
    env = _fake_python(tmp_path, "echo pip-running; exec sleep 30")
    cfg = make_config(
        tmp_path, "echo program-ran", python_env={"python_version": "3.11", "requirements": ["x"]}
    )
    proc = subprocess.Popen([*_dash(), str(cfg.layout.entry_script)], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while b"pip-running" not in (
        cfg.layout.system_log.read_bytes() if cfg.layout.system_log.exists() else b""
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == CANCELLED_EXIT
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.CANCELLED
    assert not cfg.layout.stdout.exists() or b"program-ran" not in cfg.layout.stdout.read_bytes()


def test_a_cancel_during_the_python_check_starts_no_pip(shell: list[str], tmp_path: Path) -> None:
    # The version probe signals the script (its parent) itself: the cancel lands before pip, in
    # a window where no process is there to stop. pip (a long install, maybe) must not start.
    pip_ran = tmp_path / "pip-ran"
    env = _fake_python(
        tmp_path, f": >{shlex.quote(str(pip_ran))}; exit 0", before_version='kill -s TERM "$PPID"\n'
    )
    cfg = make_config(
        tmp_path, "echo program-ran", python_env={"python_version": "3.11", "requirements": ["x"]}
    )
    r = run_entry(shell, cfg, env=env)
    assert r.rc == CANCELLED_EXIT, r.syslog
    assert not pip_ran.exists(), r.syslog
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.CANCELLED
    assert status.reason == "cancelled during setup"
    assert "cancelled before pip started" in r.syslog
    assert not cfg.layout.stdout.exists() or b"program-ran" not in r.out_file


def _cancel_around_start(cfg: RunnerConfig, launch: str, where: str) -> Path:
    """Rewrite the entry script: a SIGTERM to itself just before or just after the `DSJOBS_PID=$!`
    that follows the line starting with ``launch`` (a trap runs between two commands, so there),
    and every signal `dsjobs_kill` delivers recorded as "SIGNAL PID" lines in the returned file."""
    kills = cfg.layout.root.parent / "kills"
    lines = cfg.layout.entry_script.read_text().splitlines(keepends=True)
    [at] = [i for i, line in enumerate(lines) if line.startswith(launch)]
    assert lines[at + 1] == "DSJOBS_PID=$!\n"
    lines.insert(at + 1 if where == "before" else at + 2, 'command kill -s TERM "$$"\n')
    script = "".join(lines).replace("dsjobs_kill() {", "dsjobs_real_kill() {", 1)
    # Only the cancel's deliveries: not a kill whose target is gone (or that has none), nor the
    # SIGKILL to what is left of the program's session once its exit status was taken.
    record = (
        'dsjobs_kill() { dsjobs_real_kill "$@" || return; '
        '[ -z "$2" ] || [ -n "${DSJOBS_PROG_RC+taken}" ] || '
        f'echo "$1 $2" >>{shlex.quote(str(kills))}; }}\n'
    )
    script = script.replace("\nset -u\n", "\nset -u\n" + record, 1)
    cfg.layout.entry_script.write_text(script)
    return kills


_PIP_LAUNCH = '( { true >"$DSJOBS_FORKED"; } 2>/dev/null; dsjobs_job_env; exec "$DSJOBS_PIP_PY"'
_PROGRAM_LAUNCH = (
    '( { true >"$DSJOBS_FORKED"; } 2>/dev/null; dsjobs_machine_env; dsjobs_job_env; dsjobs_program_env; exec'
)


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_cancel_while_pip_starts_stops_it_once(shell: list[str], where: str, tmp_path: Path) -> None:
    # "before": the signal found no pip to stop (DSJOBS_PID still empty) and was only noted;
    # "after": the trap stopped pip itself, and the pending check must not send it again.
    # A TERM sent while the script's subshell still had the script's trap was once dropped there
    # (dash, busybox): pip then ran to its end.
    finished = tmp_path / "pip-finished"
    pip = f"trap 'kill $! 2>/dev/null; exit 143' TERM; sleep 30 & wait $!; : >{shlex.quote(str(finished))}"
    env = _fake_python(tmp_path, pip)
    cfg = make_config(
        tmp_path, "echo program-ran", python_env={"python_version": "3.11", "requirements": ["x"]}
    )
    kills = _cancel_around_start(cfg, _PIP_LAUNCH, where)
    r = run_entry(shell, cfg, env=env)
    assert r.rc == CANCELLED_EXIT, r.syslog
    assert not finished.exists(), r.syslog
    [line] = kills.read_text().splitlines() if kills.exists() else [""]
    assert line.startswith("TERM "), r.syslog
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.CANCELLED
    assert status.reason == "cancelled during setup"
    assert not cfg.layout.stdout.exists() or b"program-ran" not in r.out_file


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("graceful", [False, True], ids=["sigkill", "graceful"])
def test_a_cancel_while_the_program_starts_reaches_it_once(
    shell: list[str], graceful: bool, where: str, tmp_path: Path
) -> None:
    # The program gets what a later cancel would have given it (SIGKILL at once, or the graceful
    # signal), exactly once, and the job is reported as a cancelled run.
    cmd = "trap 'echo got-usr1; exit 5' USR1; while :; do sleep 0.1; done; echo finished-normally"
    cfg = make_config(
        tmp_path,
        cmd,
        graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 30} if graceful else None,
    )
    kills = _cancel_around_start(cfg, _PROGRAM_LAUNCH, where)
    r = run_entry(shell, cfg)
    pid = r.syslog.split("program started (pid ", 1)[1].split(",", 1)[0]
    sent = "USR1" if graceful else "KILL"
    assert kills.exists() and kills.read_text() == f"{sent} {pid}\n", r.syslog
    # The graceful signal may come before the program's shell has set its trap.
    assert r.rc in ((5, 128 + signal.SIGUSR1) if graceful else (128 + signal.SIGKILL,)), r.syslog
    assert not cfg.layout.stdout.exists() or b"finished-normally" not in r.out_file
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.EXITED
    assert status.cancelled and status.return_code == r.rc
    assert r.syslog.count("cancel: ") == 1


def _holders(fd: int) -> list[str]:
    """The other processes with the pipe `fd` (this process's end of it) open, as "PID COMM"."""
    target = f"pipe:[{os.fstat(fd).st_ino}]"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(link) == target for link in (proc / "fd").iterdir()):
                found.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def _output_at_exit(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Once the script has exited (a generous wait: a hang guard, no more), its stdout and stderr as
    they are at that moment: EOF must be there already. A pipe some leftover still holds open
    would give no EOF (it would only come when that process ends): this fails, naming it."""
    proc.wait(timeout=60)
    got = []
    for pipe in (proc.stdout, proc.stderr):
        assert pipe is not None
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        data = b""
        while True:
            try:
                chunk: bytes | None = os.read(fd, 65536)
            except BlockingIOError:
                chunk = None
            if chunk is None:
                pytest.fail(f"the container output is still open after the script's exit: {_holders(fd)}")
            if not chunk:
                break
            data += chunk
        got.append(data)
    return got[0], got[1]


def test_nothing_holds_the_container_output_open_after_exit(shell: list[str], tmp_path: Path) -> None:
    """With pipes as the container log (as a runtime has), EOF must come when the script exits."""
    cfg = make_config(tmp_path / "a", "echo hi; echo err >&2; exit 3")
    proc = subprocess.Popen(
        [*shell, str(cfg.layout.entry_script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert _output_at_exit(proc) == (b"hi\n", b"err\n") and proc.returncode == 3
    finally:
        if proc.poll() is None:
            proc.kill()
    # The cancel path starts a killer subshell: it must not hold the pipes either.
    cmd = "trap 'exit 0' USR1; echo ready; while :; do sleep 0.1; done"
    cfg2 = make_config(
        tmp_path / "b", cmd, graceful_shutdown={"signal": int(signal.SIGUSR1), "timeout_seconds": 30}
    )
    proc = subprocess.Popen(
        [*shell, str(cfg2.layout.entry_script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while b"ready" not in (cfg2.layout.stdout.read_bytes() if cfg2.layout.stdout.exists() else b""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = _output_at_exit(proc)
        assert proc.returncode == 0 and out == b"ready\n"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_failed_pip_install_tells_pip_s_first_error_line(shell: list[str], tmp_path: Path) -> None:
    pip = (
        "echo 'Looking in indexes: https://pypi.org/simple'; "
        "echo 'ERROR: Could not find a version that satisfies the requirement nope==1 (from versions: none)' >&2; "
        "echo 'ERROR: No matching distribution found for nope==1' >&2; exit 1"
    )
    env = _fake_python(tmp_path, pip)
    cfg = make_config(
        tmp_path, "echo ran", python_env={"python_version": "3.11", "requirements": ["nope==1"]}
    )
    # An ERROR line written before pip ran is not pip's.
    cfg.layout.system_log.parent.mkdir(parents=True, exist_ok=True)
    cfg.layout.system_log.write_text("ERROR: something before pip\n")
    r = run_entry(shell, cfg, env=env)
    assert r.rc == SETUP_FAILED_EXIT, r.syslog
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.SETUP_FAILED
    assert status.reason == (
        "pip install failed with exit code 1: ERROR: Could not find a version that satisfies the "
        "requirement nope==1 (from versions: none) (details in .system.log)"
    )
    assert not cfg.layout.stdout.exists() or b"ran" not in r.out_file


def test_a_system_log_that_cannot_be_opened_costs_its_lines_not_the_job(
    shell: list[str], tmp_path: Path
) -> None:
    # Made by another uid without write permission for ours; a directory is unwritable even
    # for root. The python check and pip redirect into it too.
    cfg = make_config(tmp_path, "echo ok", python_env={"python_version": "3.11", "requirements": ["x"]})
    cfg.layout.system_log.mkdir()
    r = run_entry(shell, cfg, env=_fake_python(tmp_path))
    assert r.rc == 0, r.stderr
    assert r.out_file == b"ok\n"
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.EXITED
    assert b"system.log" not in r.stderr


def test_a_system_log_the_entry_script_creates_is_appendable_by_any_uid(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "echo ok")
    r = run_entry(["sh", "-c", 'umask 022; exec "$0" "$1"', _dash()[0]], cfg)
    assert r.rc == 0
    assert stat.S_IMODE(cfg.layout.system_log.stat().st_mode) == 0o666
    assert "entry: started" in r.syslog


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_job_running_as_another_uid_appends_to_the_stage_in_s_system_log() -> None:
    # pytest's tmp dirs are 0700 (root only): this one must be reachable by uid 1000.
    root = Path(tempfile.mkdtemp(prefix="dsjobs-uid-"))
    try:
        os.chmod(root, 0o755)
        cfg = RunnerConfig(
            project_id="p",
            job_id="j",
            cmd="echo ok",
            python_env={"python_version": "3.11"},
            paths={"work_dir": str(root / "work"), "shared_dir": str(root / "shared")},
        )
        with umask(0o022):  # stage-in as the runner's uid
            prepare(cfg)
            SystemLog(cfg.layout.system_log, "stage-in")("staged")
        env = _fake_python(root)
        os.chmod(root / "python3-bin", 0o755)
        done = subprocess.run(
            [
                "setpriv",
                "--reuid=1000",
                "--regid=1000",
                "--clear-groups",
                *_dash(),
                str(cfg.layout.entry_script),
            ],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        log = cfg.layout.system_log.read_text()
        assert "stage-in: staged" in log and "entry: program exited with code 0" in log
    finally:
        shutil.rmtree(root)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a disk a program can fill (needs root, as mounting does)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_program_that_fills_the_disk_still_gets_its_exit_status_recorded(
    shell: list[str], small_disk: Path
) -> None:
    # The program takes every free block (and keeps them); the status file was given its room
    # at the start and is written over it, and the heartbeat is rewritten in place.
    # The tee appends "before" to the log file on its own time: the fill waits for it, or the
    # line could find the disk full already.
    out = make_config(small_disk, "true").layout.stdout
    cmd = f"echo before; until [ -s {shlex.quote(str(out))} ]; do sleep 0.05; done; head -c 4194304 /dev/zero > fill; exit 3"
    cfg = make_config(small_disk, cmd)
    r = run_entry(shell, cfg)
    assert r.rc == 3
    assert r.out_file == b"before\n"
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.status == RunnerStatus.EXITED, cfg.layout.status.read_bytes()[:200]
    assert status.return_code == 3
    assert os.statvfs(small_disk).f_bavail == 0  # still full: nothing was freed for the status
    assert r.config.layout.heartbeat.read_text().strip().isdigit()


def test_runner_files_the_program_replaced_by_fifos_are_not_waited_on(
    shell: list[str], tmp_path: Path
) -> None:
    # A FIFO opened for writing waits for a reader for good: the script hung after the program
    # (its end never told, the pod kept until deleted, no outputs).
    cfg = make_config(tmp_path, "true")  # for its layout's paths
    status_tmp = f"{cfg.layout.status}.tmp"
    both = shlex.join([str(cfg.layout.system_log), status_tmp])
    cmd = f"rm -f {both}; mkfifo -m 666 {both}; exit 3"
    cfg = make_config(tmp_path, cmd)
    r = run_entry(shell, cfg)  # its 60 s timeout is the hang guard
    assert r.rc == 3
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.return_code == 3 and not status.cancelled


def test_the_program_finds_a_machine_of_its_size(shell: list[str], tmp_path: Path) -> None:
    # Unbuffered Python output, thread pools as wide as the container's CPU limit (it sees all of
    # its node's CPUs), a home it may write; what the image or the job sets wins.
    show = (
        'printf "%s\\n" "$PYTHONUNBUFFERED" "$OMP_NUM_THREADS" "$MKL_NUM_THREADS" "$PYTHON_CPU_COUNT" "$HOME"'
    )
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "DSJOBS_CPUS": "4",
        "HOME": str(tmp_path / "no-such-home"),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    env.pop("PYTHON_CPU_COUNT", None)
    cfg = make_config(tmp_path, show, env={"MKL_NUM_THREADS": "2"})
    r = run_entry(shell, cfg, env=env)
    assert r.rc == 0, r.syslog
    # On the node's disk (the image's /tmp), not in the shared volume caches would fill.
    home = tmp_path / "tmp" / "dsjobs-home"
    assert r.out_file.decode().splitlines() == ["1", "4", "2", "4", str(home)]
    assert home.is_dir()
    # No writable TMPDIR: the shared volume.
    env_no_tmp = {**env, "TMPDIR": str(tmp_path / "no-such-tmp" / "x")}
    (tmp_path / "no-such-tmp").write_text("a file, not a directory")
    cfg = make_config(tmp_path / "shared-home", show)
    r = run_entry(shell, cfg, env=env_no_tmp)
    assert r.rc == 0, r.syslog
    assert r.out_file.decode().splitlines()[-1] == str(cfg.layout.root / "home")
    # The image's own settings, a home that is writable, no CPU limit told: left as they are.
    env = {**env, "PYTHONUNBUFFERED": "", "OMP_NUM_THREADS": "8", "HOME": str(tmp_path)}
    env.pop("DSJOBS_CPUS")
    cfg = make_config(
        tmp_path / "again",
        'printf "%s\\n" "[$PYTHONUNBUFFERED]" "$OMP_NUM_THREADS" "${PYTHON_CPU_COUNT-unset}" "$HOME"',
    )
    r = run_entry(shell, cfg, env=env)
    assert r.rc == 0, r.syslog
    assert r.out_file.decode().splitlines() == ["[]", "8", "unset", str(tmp_path)]


def test_what_a_python_program_printed_before_it_was_killed_is_kept(tmp_path: Path) -> None:
    # Its stdout is a pipe: Python would hold up to 8 KiB of prints until exit, and an OOM kill or
    # a cancel's SIGKILL lost them all.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    die = f"{shlex.quote(sys.executable)} -c 'import os, signal; print(\"epoch 1\"); os.kill(os.getpid(), signal.SIGKILL)'"
    r = run_entry(_dash(), make_config(tmp_path, die), env=env)
    assert r.rc == 137, r.syslog
    assert r.out_file == b"epoch 1\n"


def test_outputs_are_made_readable_for_the_uploader(shell: list[str], tmp_path: Path) -> None:
    # The ship sidecar runs as a user of its own: a file saved through a temporary one (0600) or a
    # directory made by mkdtemp (0700) would fail its upload.
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    (outside / "secret").write_text("s")
    (outside / "secret").chmod(0o600)
    make = (
        "umask 077; mkdir -p out/d; echo x > out/d/f; echo y > model.bin; echo z > other.txt; "
        f"ln -s {shlex.quote(str(outside))} link; ln -s {shlex.quote(str(outside))} via"
    )
    outputs = [{"path": p} for p in ("out", "model.bin", "gone", "link", "via/secret")]
    cfg = make_config(tmp_path, make, outputs=outputs)
    r = run_entry(shell, cfg)
    assert r.rc == 0, r.syslog
    # Links out of the working directory (a mount, /): nothing there is the job's to change.
    assert outside.stat().st_mode & 0o777 == 0o700
    assert (outside / "secret").stat().st_mode & 0o777 == 0o600
    work = cfg.work_dir
    assert (work / "out").stat().st_mode & 0o777 == 0o755
    assert (work / "out" / "d").stat().st_mode & 0o777 == 0o755
    assert (work / "out" / "d" / "f").stat().st_mode & 0o777 == 0o644
    assert (work / "model.bin").stat().st_mode & 0o777 == 0o644
    assert (work / "other.txt").stat().st_mode & 0o777 == 0o600  # not an output: left alone


def test_a_program_that_deleted_the_run_dir_still_gets_its_status_written(
    shell: list[str], tmp_path: Path
) -> None:
    # `rm -rf .dsjobs/run`: the status could not be written, ship waited for it for good and the job
    # stayed UPLOADING_OUTPUT.
    run_dir = make_config(tmp_path, "true").layout.run_dir
    cfg = make_config(tmp_path, f"rm -rf {shlex.quote(str(run_dir))}; exit 3")
    r = run_entry(shell, cfg)
    assert r.rc == 3
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.return_code == 3


def test_output_held_open_past_the_drain_by_a_leftover_process_is_told(
    shell: list[str], tmp_path: Path
) -> None:
    # The tees were SIGKILLed after the drain without a word: the job took 10 s longer and whatever
    # the escaped process wrote later was missing from the logs, with nothing saying why.
    cmd = "setsid sh -c 'sleep 5; echo late' & sleep 0.5; echo done"  # past its setsid
    cfg = make_config(tmp_path, cmd)
    script = cfg.layout.entry_script.read_text()
    assert "DSJOBS_TEE_DRAIN=10\n" in script
    cfg.layout.entry_script.write_text(script.replace("DSJOBS_TEE_DRAIN=10\n", "DSJOBS_TEE_DRAIN=1\n"))
    r = run_entry(shell, cfg)
    assert r.rc == 0 and r.out_file == b"done\n"
    assert "the program's output was still held open 1s after it ended" in r.syslog, r.syslog
    cfg = make_config(tmp_path / "2", "echo done")
    assert "still held open" not in run_entry(shell, cfg).syslog
    # And with the run dir deleted by the program: the drain's mark could not be written, which
    # ended the watcher before its kill under dash and busybox, and the job waited for the leftover.
    run_dir = make_config(tmp_path / "3", "true").layout.run_dir
    cmd = f"setsid sh -c 'sleep 8; echo late' & sleep 0.5; rm -rf {shlex.quote(str(run_dir))}; echo done"
    cfg = make_config(tmp_path / "3", cmd)
    cfg.layout.entry_script.write_text(
        cfg.layout.entry_script.read_text().replace("DSJOBS_TEE_DRAIN=10\n", "DSJOBS_TEE_DRAIN=1\n")
    )
    started = time.monotonic()
    r = run_entry(shell, cfg)
    assert r.rc == 0 and time.monotonic() - started < 6


def test_output_the_log_file_could_not_hold_is_told_as_a_file_error(shell: list[str], tmp_path: Path) -> None:
    # The job's disk full: the tee went on copying to the container log, the file ended early, and
    # the shipped logs said nothing of what was missing (the program's own "No space left" included).
    cfg = make_config(tmp_path, "echo out; echo err >&2; exit 4")
    cfg.layout.stdout.unlink(missing_ok=True)
    cfg.layout.stdout.symlink_to("/dev/full")  # every write: ENOSPC
    r = run_entry(shell, cfg)
    assert r.rc == 4 and r.stdout == b"out\n"  # the container log has it
    assert r.err_file == b"err\n"
    status = read_status_file(cfg.layout.status)
    assert status is not None and (status.return_code, status.logs_cut) == (4, ("out",)), status
    assert "the program's stdout could not all be written to its log file" in r.syslog, r.syslog
    (error,) = cut_log_errors(status)
    assert (error.log_file_name, error.type.value) == ("stdout.txt", "UPLOAD_FAILED")
    assert error.description.startswith("stdout.txt is incomplete: the program's stdout could not all be")

    cfg = make_config(tmp_path / "whole", "echo out; echo err >&2")
    r = run_entry(shell, cfg)
    status = read_status_file(cfg.layout.status)
    assert status is not None and status.logs_cut == () and "could not all be written" not in r.syslog
