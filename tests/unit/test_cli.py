"""The `dsjobs datasphere` launcher: where it points the official CLI."""

from __future__ import annotations

import subprocess
import sys

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
