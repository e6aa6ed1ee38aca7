"""The `dsjobs datasphere` launcher: where it points the official CLI; and the make entry points
(`make demo`, `make up`, ...) that start the local stack the launcher talks to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsjobs.cli import CliError, Target, parse_env_file, resolve_target, split_args


def test_env_file_parsing_handles_export_quotes_and_comments() -> None:
    text = "# made by make up\nexport DSJOBS_ENDPOINT=127.0.0.1:9090\nDSJOBS_TOKEN='abc def'\nnonsense\n"
    assert parse_env_file(text) == {"DSJOBS_ENDPOINT": "127.0.0.1:9090", "DSJOBS_TOKEN": "abc def"}


@pytest.mark.parametrize(
    ("flag", "environ", "file_text", "expected"),
    [
        ("h:1", {"DSJOBS_ENDPOINT": "h:2"}, "DSJOBS_ENDPOINT=h:3", "h:1"),
        (None, {"DSJOBS_ENDPOINT": "h:2"}, "DSJOBS_ENDPOINT=h:3", "h:2"),
        (None, {}, "DSJOBS_ENDPOINT=h:3", "h:3"),
    ],
)
def test_flag_beats_environment_beats_env_file(
    flag: str | None, environ: dict[str, str], file_text: str, expected: str
) -> None:
    target = resolve_target(endpoint=flag, token=None, ca_file=None, environ=environ, env_file_text=file_text)
    assert target.endpoint == expected


def test_token_and_ca_come_along() -> None:
    target = resolve_target(
        endpoint=None,
        token=None,
        ca_file=None,
        environ={"DSJOBS_ENDPOINT": "h:1", "DSJOBS_TOKEN": "t", "DSJOBS_CA": "/ca.pem"},
        env_file_text=None,
    )
    assert target == Target(endpoint="h:1", token="t", ca_file="/ca.pem")


def test_missing_endpoint_is_a_clear_error() -> None:
    with pytest.raises(CliError, match="DSJOBS_ENDPOINT"):
        resolve_target(endpoint=None, token=None, ca_file=None, environ={}, env_file_text=None)


def test_official_cli_help_runs_through_the_launcher() -> None:
    # A subprocess: the official client's descriptors must not share a process with ours.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsjobs.cli",
            "datasphere",
            "--endpoint",
            "127.0.0.1:1",
            "project",
            "job",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "execute" in proc.stdout and "attach" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "ours", "rest"),
    [
        (["-l", "DEBUG", "project", "job", "list"], {}, ["-l", "DEBUG", "project", "job", "list"]),
        (
            ["--endpoint", "h:1", "--token=t", "-t", "x", "project"],
            {"endpoint": "h:1", "token": "t"},
            ["-t", "x", "project"],
        ),
        (["--ca", "/c", "project", "--endpoint", "z"], {"ca_file": "/c"}, ["project", "--endpoint", "z"]),
    ],
)
def test_our_options_are_taken_only_from_the_front(
    argv: list[str], ours: dict[str, str], rest: list[str]
) -> None:
    assert split_args(argv) == (ours, rest)


def test_option_without_value_is_an_error() -> None:
    with pytest.raises(CliError, match="--token needs a value"):
        split_args(["--token"])


def test_official_global_options_reach_the_official_cli() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsjobs.cli",
            "datasphere",
            "--endpoint",
            "127.0.0.1:1",
            "-l",
            "DEBUG",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "project" in proc.stdout


# ------------------------------------------------------------------ make and hack/ entry points

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("up", "VENV_PYTHON={py} bash hack/up.sh"),
        ("down", "VENV_PYTHON={py} bash hack/down.sh"),
        ("demo", "VENV_PYTHON={py} bash hack/demo.sh"),
        ("bench", "VENV_PYTHON={py} bash hack/bench.sh"),
        ("e2e-kind", "VENV_PYTHON={py} bash hack/e2e-kind.sh"),
        ("proto", "PYTHON={py} bash hack/gen-proto.sh"),
    ],
)
def test_make_hands_the_venvs_python_to_the_scripts(target: str, command: str, tmp_path: Path) -> None:
    # PYTHON (the interpreter that creates the venv) and VENV set on make's command line: make
    # exports PYTHON to every recipe, so the scripts must get the venv's python under their own name.
    venv = tmp_path / "venv"
    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), target, "PYTHON=python3.11", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"python3.11 -m venv {venv}" in proc.stdout
    assert command.format(py=venv / "bin" / "python") in [line.strip() for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("script", ["up", "down", "demo"])
def test_local_stack_scripts_run_the_venvs_python_not_python(script: str, tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "ran $*"\n')
    stub.chmod(0o755)
    env = dict(os.environ, VENV_PYTHON=str(stub), PYTHON="/nonexistent/python3.11")
    proc = subprocess.run(
        ["bash", str(REPO / "hack" / f"{script}.sh"), "--flag"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ran -m dsjobs.localstack {script} --flag"


def test_no_hack_script_takes_python_for_the_venvs() -> None:
    # gen-proto.sh alone reads PYTHON: its documented interface (the drift test sets it), and
    # `make proto` sets it explicitly.
    readers = sorted(p.name for p in (REPO / "hack").glob("*.sh") if "${PYTHON:-" in p.read_text())
    assert readers == ["gen-proto.sh"], readers
