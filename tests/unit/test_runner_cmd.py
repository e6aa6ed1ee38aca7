"""cmd templating: every kind of variable, unknown names, the $${...} escape."""

from __future__ import annotations

import pytest

from dsjobs.runner.cmd import cmd_variables, render_cmd, render_config_cmd, unknown_variables
from dsjobs.runner.config import RunnerConfig

SHA = "0" * 64


def config(cmd: str, **kw: object) -> RunnerConfig:
    return RunnerConfig(project_id="p", job_id="j", cmd=cmd, **kw)  # type: ignore[arg-type]


def test_every_variable_kind() -> None:
    cfg = config(
        "run ${IN} ${OUT} ${conn1} ${S3V} ${ds1} ${DSV} ${NEWDS} ${EPOCHS} ${DS_PROJECT_HOME}",
        inputs=[{"path": "data/train.csv", "var": "IN", "sha256": SHA, "size_bytes": 1}],
        outputs=[{"path": "out/model.pt", "var": "OUT"}],
        s3_mounts=[
            {"id": "conn1", "mount_path": "/job/s3/conn1"},
            {"id": "conn2", "var": "S3V", "mount_path": "/job/s3/conn2"},
        ],
        datasets=[
            {"id": "ds1", "mount_path": "/job/datasets/ds1"},
            {"id": "ds2", "var": "DSV", "mount_path": "/job/datasets/ds2"},
        ],
        output_datasets=[{"id": "new", "var": "NEWDS", "mount_path": "/job/output-datasets/new"}],
        arguments={"EPOCHS": "10"},
        project_disk_path="/job/project",
    )
    assert render_config_cmd(cfg) == (
        "run /job/work/data/train.csv /job/work/out/model.pt /job/s3/conn1 /job/s3/conn2 "
        "/job/datasets/ds1 /job/datasets/ds2 /job/output-datasets/new 10 /job/project"
    )
    # Mounts answer to their id as well as their var (the CLI rewrites vars to ids).
    assert cmd_variables(cfg)["conn2"] == "/job/s3/conn2"
    assert "new" not in cmd_variables(cfg)  # an output dataset's id is the operator's, not the job's


def test_unknown_names_and_plain_dollars_are_left_to_the_shell() -> None:
    v = {"A": "x"}
    assert render_cmd("echo ${HOME} $A $$ ${A}${A} ${} ${A", v) == "echo ${HOME} $A $$ xx ${} ${A"
    assert unknown_variables("echo ${HOME} ${A} ${HOME} $${B} ${C}", v) == ["HOME", "C"]


def test_double_dollar_escapes_a_known_name() -> None:
    assert render_cmd("echo $${A} ${A} $$$${A}", {"A": "x"}) == "echo ${A} x $$${A}"


def test_values_are_inserted_verbatim() -> None:
    assert render_cmd("cp ${SRC} .", {"SRC": "/a b/$(x)"}) == "cp /a b/$(x) ."


def test_project_home_only_when_the_disk_is_attached() -> None:
    assert render_config_cmd(config("ls ${DS_PROJECT_HOME}")) == "ls ${DS_PROJECT_HOME}"


def test_variables_must_be_unique_and_not_reserved() -> None:
    with pytest.raises(ValueError, match="unique"):
        config("x", arguments={"A": "1"}, outputs=[{"path": "o", "var": "A"}])
    with pytest.raises(ValueError, match="unique"):
        config("x", s3_mounts=[{"id": "c", "mount_path": "/m1"}], datasets=[{"id": "c", "mount_path": "/m2"}])
    with pytest.raises(ValueError, match="reserved"):
        config("x", arguments={"DS_PROJECT_HOME": "1"})
