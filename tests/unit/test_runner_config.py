"""RunnerConfig: validation, serialization, loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsjobs.runner.config import RunnerConfig

SHA = "ab" * 32


def base(**kw: object) -> dict[str, object]:
    return {"project_id": "p", "job_id": "j", "cmd": "true", **kw}


def test_round_trip_through_json(tmp_path: Path) -> None:
    cfg = RunnerConfig.from_dict(
        base(
            inputs=[{"path": "./a//b.txt", "var": "B", "sha256": SHA, "size_bytes": 3, "compression": "ZIP"}],
            outputs=[{"path": "out", "desc_path": "/abs/out"}],
            env={"A": "1"},
            python_env={"python_version": "3.11", "requirements": ["x==1", " "], "pip": {"no_deps": True}},
            graceful_shutdown={"signal": 10, "timeout_seconds": 5},
        )
    )
    assert cfg.inputs[0].path == "a/b.txt"
    assert cfg.python_env is not None and cfg.python_env.requirements == ["x==1"]
    assert cfg.graceful_shutdown is not None and cfg.graceful_shutdown.signal_name == "USR1"
    text = cfg.to_json()
    assert RunnerConfig.from_json(text) == cfg
    f = tmp_path / "runner.json"
    f.write_text(text)
    assert RunnerConfig.load({"DSJOBS_RUNNER_CONFIG_FILE": str(f)}) == cfg
    assert RunnerConfig.load({"DSJOBS_RUNNER_CONFIG": text}) == cfg
    with pytest.raises(RuntimeError):
        RunnerConfig.load({})


@pytest.mark.parametrize(
    "bad",
    [
        {"inputs": [{"path": "../x", "sha256": SHA, "size_bytes": 1}]},
        {"inputs": [{"path": "/etc/passwd", "sha256": SHA, "size_bytes": 1}]},
        {"inputs": [{"path": "x", "sha256": "nothex", "size_bytes": 1}]},
        {"outputs": [{"path": "a"}, {"path": "./a"}]},
        {
            "inputs": [
                {"path": "a", "sha256": SHA, "size_bytes": 1},
                {"path": "./a", "sha256": SHA, "size_bytes": 1},
            ]
        },
        {"env": {"BAD-NAME": "x"}},
        {"env": {"JOB_PROGRESS_FILENAME": "x"}},
        {"env": {"DSJOBS_CMD": "x"}},
        {"graceful_shutdown": {"signal": 9, "timeout_seconds": 1}},
        {"graceful_shutdown": {"signal": 15, "timeout_seconds": 0}},
        {"python_env": {"python_version": "2.7"}},
        {"python_env": {"requirements": ["a\n--index-url http://evil"]}},
        {"s3_mounts": [{"id": "c", "mount_path": "relative"}]},
        {"s3_mounts": [{"id": "c", "mount_path": "/job/.dsjobs/x"}]},
        {"paths": {"work_dir": "/job/work", "shared_dir": "/job/work/.dsjobs"}},
        {"project_id": "../other"},
        {"cmd": ""},
        {"unknown_field": 1},
    ],
)
def test_invalid_configs_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RunnerConfig.from_dict(base(**bad))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # execve takes C strings; the shell drops a NUL: the job would run with another value.
        ({"env": {"A": "a\x00b"}}, "env: environment variable 'A' contains NUL"),
        ({"env": {"UID": "1"}}, "env: environment variable 'UID' is the shell's own (readonly or numeric)"),
        ({"arguments": {"A": "a\x00b"}}, "arguments: argument 'A' contains NUL"),
        ({"arguments": {"a b": "1"}}, "arguments: invalid variable name 'a b'"),
        ({"arguments": {"DS_PROJECT_HOME": "x"}}, "reserved variable names: DS_PROJECT_HOME"),
        (
            {"arguments": {"A": "1"}, "inputs": [{"path": "x", "var": "A", "sha256": SHA, "size_bytes": 1}]},
            "variables must be unique: A",
        ),
        # Its id is the operator's: the job would have no name to find its mount by.
        (
            {"output_datasets": [{"id": "ds1", "mount_path": "/job/datasets/ds1"}]},
            "output dataset ds1 has no var",
        ),
    ],
)
def test_invalid_configs_are_refused_naming_the_cause(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        RunnerConfig.from_dict(base(**bad))
    assert str(refused.value) == message


def test_an_output_may_be_written_where_an_input_was_placed() -> None:
    # A job that reads model.pt and writes it back (resume training) is legitimate.
    cfg = RunnerConfig.from_dict(
        base(inputs=[{"path": "model.pt", "sha256": SHA, "size_bytes": 1}], outputs=[{"path": "./model.pt"}])
    )
    assert cfg.inputs[0].path == cfg.outputs[0].path == "model.pt"


def test_the_runner_does_not_import_the_job_models_or_pydantic() -> None:
    # Every job pod starts the runner twice (stage-in, ship): importing the ProjectJob models would
    # cost each ~20 ms of CPU (docs/benchmarks.md), pydantic itself ~80 ms (hence dsjobs.records),
    # boto3's client ~160 ms (hence dsjobs.s3http). Shared rules live in dsjobs.syntax instead.
    import subprocess
    import sys

    code = (
        "import sys, dsjobs.runner.__main__, dsjobs.runner.ship, dsjobs.runner.stagein\n"
        "print(sorted(m for m in sys.modules if m.startswith(('dsjobs.models', 'dsjobs.validation'))"
        " or m.split('.')[0] in ('pydantic', 'boto3', 's3transfer')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_runner_refuses_the_env_names_the_api_refuses() -> None:
    # The runner cannot import dsjobs.models (above), so the two sets are kept equal here.
    from dsjobs.models import limits
    from dsjobs.runner import config

    assert config.RESERVED_ENV == limits.RESERVED_ENV_VARS
    assert config.RESERVED_ENV_PREFIX == limits.RESERVED_ENV_PREFIX
    assert config.SHELL_SPECIAL_ENV == limits.SHELL_SPECIAL_ENV_VARS


@pytest.mark.parametrize(("command", "status"), [("stage-in", "STAGE_IN_FAILED"), ("ship", "SETUP_FAILED")])
def test_a_config_the_runner_cannot_read_is_told_as_a_version_skew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, status: str
) -> None:
    # A runner image older than its operator meets a field it does not know: the job's status
    # says that, not "staging inputs failed: Error" (the init container's bare exit).
    import json

    from dsjobs.controller.podview import ContainerView
    from dsjobs.controller.status import _stage_in_failure
    from dsjobs.runner import __main__ as runner_main
    from dsjobs.runner.result import parse_termination_message

    message = tmp_path / "termination-log"
    monkeypatch.setenv("DSJOBS_TERMINATION_LOG", str(message))
    monkeypatch.delenv("DSJOBS_RUNNER_CONFIG_FILE", raising=False)
    monkeypatch.setenv("DSJOBS_RUNNER_CONFIG", json.dumps(base(attempt=2, a_newer_feature=[1])))
    assert runner_main.main([command]) == 2
    result = parse_termination_message(message.read_text())
    assert (result.status, result.project_id, result.job_id, result.attempt) == (status, "p", "j", 2)
    assert "a_newer_feature" in result.reason and "DSJOBS_RUNNER_IMAGE" in result.reason
    if command == "stage-in":
        view = ContainerView(name="stage-in", state="terminated", exit_code=2, message=message.read_text())
        assert _stage_in_failure(view) == result.reason
