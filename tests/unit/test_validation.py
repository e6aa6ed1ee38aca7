"""dsjobs.validation: every rule has a failing and a passing example; the validator never crashes."""

from __future__ import annotations

import copy
import os
import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dsjobs_strategies import (
    SHA,
    SHA_MODULE,
    full_instance_type,
    full_spec,
    full_spec_alternatives,
    job_specs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsjobs import models as m
from dsjobs.controller.render import JobRef, runner_config
from dsjobs.models import limits as L
from dsjobs.runner.cmd import render_config_cmd, unknown_variables
from dsjobs.s3http import EMPTY_SHA256
from dsjobs.validation import (
    RULES,
    Problem,
    cmd_references,
    format_problems,
    parse_instance_type,
    parse_job_spec,
    validate_instance_type,
    validate_job_parameters,
    validate_job_spec,
)
from dsjobs.validation.problems import REQUEST_RULES

Mutation = Callable[[dict[str, Any]], None]
_TOKEN = re.compile(r"\[(\d+)\]|\[\"([^\"]*)\"\]|([^.\[]+)")


def _tokens(path: str) -> list[str | int]:
    out: list[str | int] = []
    for num, quoted, name in _TOKEN.findall(path):
        out.append(int(num) if num else (quoted or name))
    return out


def set_at(path: str, value: Any) -> Mutation:
    """A mutation setting the camelCase `path` (relative to spec) to `value`; DELETE removes it."""

    def apply(doc: dict[str, Any]) -> None:
        *parents, last = _tokens(path)
        node: Any = doc
        for tok in parents:
            if isinstance(tok, str) and tok not in node:
                node[tok] = {}
            node = node[tok]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list) and last == len(node):
            node.append(copy.deepcopy(value))
        else:
            node[last] = copy.deepcopy(value)

    return apply


DELETE = object()


def steps(*mutations: Mutation) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(doc)

    return apply


def base_doc() -> dict[str, Any]:
    return full_spec().to_cr()


#: An InstanceType of the cluster left out of the operator's catalog, and why.
INVALID_TYPES = {"c1.8": "spec.requests.cpu: 16 is above the limit 8 [request-above-limit]"}


def problems_after(mutation: Mutation) -> list[Problem]:
    doc = base_doc()
    mutation(doc)
    _, problems = parse_job_spec(
        doc, known_instance_types={"c1.4", "g1.1", "g2.1"}, invalid_instance_types=INVALID_TYPES
    )
    return problems


IN0 = "jobParameters.inputFiles[0]"
IN1 = "jobParameters.inputFiles[1]"
OUT0 = "jobParameters.outputFiles[0]"
ENV = "jobParameters.env"
DOCKER = f"{ENV}.dockerImageSpec"
PY = f"{ENV}.pythonEnv"
CMD = "jobParameters.cmd"
NO_VAR_CMD = set_at(CMD, "python main.py")
big_file = {"desc": {"path": "big.bin"}, "sha256": SHA, "sizeBytes": L.MAX_FILE_SIZE_BYTES}

# (rule, expected problem path (snake_case), failing mutation, passing mutation)
JOB_RULES: list[tuple[str, str, Mutation, Mutation]] = [
    ("project-id", "project_id", set_at("projectId", "Proj_1"), set_at("projectId", "proj-1")),
    ("control-chars", "name", set_at("name", "a\nb"), set_at("name", "a b ü")),
    (
        "max-length",
        "desc",
        set_at("desc", "x" * (L.MAX_DESC_LENGTH + 1)),
        set_at("desc", "x" * L.MAX_DESC_LENGTH),
    ),
    ("max-length", "config", set_at("config", "x" * (L.MAX_CONFIG_LENGTH + 1)), set_at("config", "cmd: x\n")),
    ("data-ttl", "data_ttl", set_at("dataTtl", "59m"), set_at("dataTtl", "1h")),
    ("data-ttl", "data_ttl", set_at("dataTtl", "366d"), set_at("dataTtl", "365d")),
    ("data-ttl", "data_ttl", set_at("dataTtl", "-1d"), set_at("dataTtl", "infinity")),
    (
        "retry-attempts",
        "retry_policy.max_attempts",
        set_at("retryPolicy.maxAttempts", 0),
        set_at("retryPolicy.maxAttempts", 10),
    ),
    (
        "retry-backoff",
        "retry_policy.backoff_seconds",
        set_at("retryPolicy.backoffSeconds", -1),
        set_at("retryPolicy.backoffSeconds", 0),
    ),
    (
        "exit-code",
        "retry_policy.retry_on_exit_codes[0]",
        set_at("retryPolicy.retryOnExitCodes", [0]),
        set_at("retryPolicy.retryOnExitCodes", [255]),
    ),
    (
        "control-chars",
        "cancel.reason",
        set_at("cancel.reason", "\x00"),
        set_at("cancel.reason", "line1\nline2"),
    ),
    # paths of files without a var
    (
        "path-empty",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", ""),
        set_at(f"{IN1}.desc.path", "d"),
    ),
    (
        "path-absolute",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "/etc/passwd"),
        set_at(f"{IN1}.desc.path", "etc/passwd"),
    ),
    (
        "path-parent",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "a/../../b"),
        set_at(f"{IN1}.desc.path", "a/..b/c.."),
    ),
    (
        "path-parent",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", ".."),
        set_at(f"{IN1}.desc.path", "..."),
    ),
    # a Windows client's paths: '\\' separates segments too, a drive makes a path absolute
    (
        "path-absolute",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "C:\\Users\\me\\data"),
        set_at(f"{IN1}.desc.path", "Users\\me\\data"),
    ),
    (
        "path-absolute",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "\\data"),
        set_at(f"{IN1}.desc.path", "data\\"),
    ),
    (
        "path-parent",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "a\\..\\..\\b"),
        set_at(f"{IN1}.desc.path", "a\\..b\\c.."),
    ),
    (
        "path-reserved",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", ".dsjobs-vars\\x"),
        set_at(f"{IN1}.desc.path", ".dsjobs-vars.x"),
    ),
    (
        "path-root",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "./"),
        set_at(f"{IN1}.desc.path", "./d/"),
    ),
    (
        "path-reserved",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", ".dsjobs-vars/x"),
        set_at(f"{IN1}.desc.path", ".dsjobs-varsx"),
    ),
    (
        "path-control-chars",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "a\x00b"),
        set_at(f"{IN1}.desc.path", "a b"),
    ),
    (
        "path-control-chars",
        "job_parameters.input_files[0].desc.path",
        set_at(f"{IN0}.desc.path", "/x\n"),
        set_at(f"{IN0}.desc.path", "/abs/ok/../main.py"),
    ),
    (
        "path-length",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "a" * (L.MAX_PATH_LENGTH + 1)),
        # A var file's declared path may be that long: it is placed by its var and last name.
        steps(
            set_at(f"{IN1}.desc.var", "DATA"),
            set_at(f"{IN1}.desc.path", "/ab" * (L.MAX_PATH_LENGTH // 3) + "a"),
        ),
    ),
    (  # 2086 characters, 4086 bytes: /job/work/ and it make 4096, over PATH_MAX with its NUL
        "path-placed-length",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", ("я" * 100 + "/") * 20 + "x" * 66),
        set_at(f"{IN1}.desc.path", ("я" * 100 + "/") * 20 + "x" * 65),
    ),
    (  # the temporary name of a download (40 bytes) beside a file of a shorter name counts
        "path-placed-length",
        "job_parameters.input_files[0].desc.path",
        set_at(f"{IN0}.desc.path", ("я" * 100 + "/") * 20 + "x" * 39 + "/m.py"),
        set_at(f"{IN0}.desc.path", ("я" * 100 + "/") * 20 + "x" * 24 + "/m.py"),
    ),
    (
        "path-name-length",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "data/" + "я" * 127 + ".c"),  # 256 bytes: NTFS takes it, Linux not
        set_at(f"{IN1}.desc.path", "data/" + "я" * 126 + ".c"),
    ),
    (
        "path-absolute",
        "job_parameters.output_files[0].path",
        steps(set_at(f"{OUT0}.var", ""), set_at(CMD, "x"), set_at(f"{OUT0}.path", "/out")),
        steps(set_at(CMD, "x"), set_at(f"{OUT0}.path", "/out")),
    ),
    (
        "path-empty",
        "job_parameters.env.python_env.local_modules[0].desc.path",
        set_at(f"{PY}.localModules[0].desc.path", ""),
        set_at(f"{PY}.localModules[0].desc.path", "C:\\tmp\\x"),
    ),
    # duplicates
    (
        "input-path-duplicate",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "./main.py"),
        set_at(f"{IN1}.desc.path", "main2.py"),
    ),
    (
        "input-path-nested",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", "main.py/inner.csv"),  # the CLI refuses it as well
        set_at(f"{IN1}.desc.path", "main.pyx/inner.csv"),
    ),
    (
        "input-path-duplicate",
        "job_parameters.input_files[1].desc.path",
        set_at(f"{IN1}.desc.path", ".\\main.py"),
        set_at(f"{IN1}.desc.path", "main\\py"),
    ),
    (
        "output-path-duplicate",
        "job_parameters.output_files[1].path",
        set_at("jobParameters.outputFiles[1]", {"path": "out//result.txt"}),
        set_at("jobParameters.outputFiles[1]", {"path": "out/result2.txt"}),
    ),
    (
        "output-path-nested",
        "job_parameters.output_files[2].path",
        steps(
            set_at("jobParameters.outputFiles[1]", {"path": "res"}),
            set_at("jobParameters.outputFiles[2]", {"path": "res/x.txt"}),
        ),
        steps(
            set_at("jobParameters.outputFiles[1]", {"path": "res"}),
            set_at("jobParameters.outputFiles[2]", {"path": "resx/x.txt"}),
        ),
    ),
    (  # stage-in made the output's directory `main.py`, then could not write the input there
        "output-in-input-file",
        "job_parameters.output_files[0].path",
        set_at(f"{OUT0}.path", "main.py/metrics.json"),
        set_at(f"{OUT0}.path", "data/metrics.json"),  # `data` is a ZIP input: a directory
    ),
    (
        "output-key-length",
        "job_parameters.output_files[1].path",
        set_at(
            "jobParameters.outputFiles[1]", {"path": "/".join(["a" * 255, "b" * 255, "c" * 255, "d" * 107])}
        ),
        set_at(
            "jobParameters.outputFiles[1]", {"path": "/".join(["a" * 255, "b" * 255, "c" * 255, "d" * 106])}
        ),
    ),
    # variables
    (
        "var-syntax",
        "job_parameters.input_files[0].desc.var",
        set_at(f"{IN0}.desc.var", "MA IN"),
        set_at(f"{IN0}.desc.var", "MAIN"),
    ),
    (
        "var-syntax",
        "job_parameters.input_files[0].desc.var",
        set_at(f"{IN0}.desc.var", "x" * 51),
        steps(NO_VAR_CMD, set_at(f"{IN0}.desc.var", "my-var_1")),
    ),
    (
        "var-reserved",
        "job_parameters.input_files[0].desc.var",
        set_at(f"{IN0}.desc.var", "DS_PROJECT_HOME"),
        steps(NO_VAR_CMD, set_at(f"{IN0}.desc.var", "DS_PROJECT_HOME2")),
    ),
    (
        "var-syntax",
        "job_parameters.arguments[0].name",
        set_at("jobParameters.arguments[0].name", "l r"),
        set_at("jobParameters.arguments[0].name", "LR"),
    ),
    (
        "var-reserved",
        "job_parameters.arguments[0].name",
        set_at("jobParameters.arguments[0].name", "DS_PROJECT_HOME"),
        set_at("jobParameters.arguments[0].name", "LR"),
    ),
    (
        "var-syntax",
        "job_parameters.output_datasets[0].var",
        set_at("jobParameters.outputDatasets[0].var", ""),
        set_at("jobParameters.outputDatasets[0].var", "OUTDS"),
    ),
    (
        "var-unique",
        "job_parameters.output_files[0].var",
        steps(NO_VAR_CMD, set_at(f"{OUT0}.var", "MAIN")),
        steps(NO_VAR_CMD, set_at(f"{OUT0}.var", "MAIN2")),
    ),
    (
        "var-unique",
        "job_parameters.arguments[0].name",
        steps(NO_VAR_CMD, set_at("jobParameters.arguments[0].name", "s3conn1")),
        NO_VAR_CMD,
    ),
    (
        "var-unique",
        "job_parameters.dataset_ids[0]",
        steps(NO_VAR_CMD, set_at("jobParameters.datasetIds", ["s3conn1"])),
        NO_VAR_CMD,
    ),
    (
        "var-unique",
        "job_parameters.env.python_env.local_modules[0].desc.var",
        set_at(f"{PY}.localModules[0].desc.var", "MAIN"),
        set_at(f"{PY}.localModules[0].desc.var", "_LOCAL_MODULE_7"),
    ),
    # cmd
    ("cmd-empty", "job_parameters.cmd", set_at(CMD, "  "), set_at(CMD, "true")),
    (
        "cmd-rendered-length",
        "job_parameters.cmd",
        # Each ${LR} is the argument's value: twice 64 KiB is more than one argv string may be.
        steps(set_at(CMD, "python ${LR} ${LR}"), set_at("jobParameters.arguments[0].value", "x" * 65536)),
        steps(set_at(CMD, "python ${LR} ${LR}"), set_at("jobParameters.arguments[0].value", "x" * 65000)),
    ),
    (
        "cmd-length",
        "job_parameters.cmd",
        set_at(CMD, "x" * (L.MAX_CMD_LENGTH + 1)),
        set_at(CMD, "x" * L.MAX_CMD_LENGTH),
    ),
    (
        "cmd-undeclared-var",
        "job_parameters.cmd",
        set_at(CMD, "echo ${HOME}"),
        set_at(CMD, "echo $HOME ${MAIN}"),
    ),
    # `$${...}` is the escape for the shell: nothing inside it is a reference
    ("cmd-undeclared-var", "job_parameters.cmd", set_at(CMD, "echo ${X:-1}"), set_at(CMD, "echo $${X:-1}")),
    (
        "cmd-undeclared-var",
        "job_parameters.cmd",
        set_at(CMD, "echo ${HOME} $${MAIN}"),
        set_at(CMD, "echo $${HOME} $${MAIN} ${MAIN}"),
    ),
    # local module vars are declared but have no value in cmd (output dataset vars do: see below)
    (
        "cmd-var-unsupported",
        "job_parameters.cmd",
        set_at(CMD, "ls ${_LOCAL_MODULE_0}"),
        set_at(CMD, "ls ${MAIN}"),
    ),
    (
        "cmd-project-home",
        "job_parameters.cmd",
        steps(set_at("jobParameters.attachProjectDisk", False), set_at(CMD, "ls ${DS_PROJECT_HOME}")),
        set_at(CMD, "ls ${DS_PROJECT_HOME}"),
    ),
    ("control-chars", "job_parameters.cmd", set_at(CMD, "echo \x00"), set_at(CMD, "echo 1\necho 2\t")),
    (  # the shell drops a NUL: the job would get another value than the one given
        "control-chars",
        "job_parameters.arguments[0].value",
        set_at("jobParameters.arguments[0].value", "0.\x001"),
        set_at("jobParameters.arguments[0].value", "0.1\n0.2\t"),
    ),
    # files
    (
        "sha256",
        "job_parameters.input_files[0].sha256",
        set_at(f"{IN0}.sha256", SHA.upper()),
        set_at(f"{IN0}.sha256", "f" * 64),
    ),
    (
        "sha256",
        "job_parameters.env.python_env.local_modules[0].sha256",
        set_at(f"{PY}.localModules[0].sha256", ""),
        set_at(f"{PY}.localModules[0].sha256", SHA_MODULE),
    ),
    (
        "size-negative",
        "job_parameters.input_files[0].size_bytes",
        set_at(f"{IN0}.sizeBytes", -1),
        set_at(f"{IN0}.sizeBytes", 1),
    ),
    (
        "sha256-size",
        "job_parameters.input_files[0].sha256",
        set_at(f"{IN0}.sizeBytes", 0),
        steps(set_at(f"{IN0}.sizeBytes", 0), set_at(f"{IN0}.sha256", EMPTY_SHA256)),
    ),
    (
        "sha256-size",
        "job_parameters.env.python_env.local_modules[0].sha256",
        set_at(f"{PY}.localModules[0].sha256", EMPTY_SHA256),
        set_at(f"{PY}.localModules[0].sha256", SHA_MODULE),
    ),
    (
        "zip-empty",
        "job_parameters.input_files[0].compression_type",
        steps(
            set_at(f"{IN0}.sizeBytes", 0),
            set_at(f"{IN0}.sha256", EMPTY_SHA256),
            set_at(f"{IN0}.compressionType", "ZIP"),
        ),
        steps(
            set_at(f"{IN0}.sizeBytes", 0),
            set_at(f"{IN0}.sha256", EMPTY_SHA256),
            set_at(f"{IN0}.compressionType", "NONE"),
        ),
    ),
    (
        "zip-unnamed-dir",
        "job_parameters.input_files[1].desc.path",
        steps(set_at(f"{IN1}.desc", {"path": ".", "var": "ROOT"}), set_at(CMD, "ls ${ROOT}")),
        steps(set_at(f"{IN1}.desc", {"path": "../myproject", "var": "ROOT"}), set_at(CMD, "ls ${ROOT}")),
    ),
    (  # 128 Cyrillic letters: NTFS takes the name, Linux does not; unpacked under it, not the var
        "zip-dir-name",
        "job_parameters.input_files[1].desc.path",
        steps(set_at(f"{IN1}.desc", {"path": "C:\\me\\" + "я" * 128, "var": "D"}), set_at(CMD, "ls ${D}")),
        steps(set_at(f"{IN1}.desc", {"path": "C:\\me\\" + "я" * 127, "var": "D"}), set_at(CMD, "ls ${D}")),
    ),
    (
        "zip-dir-name",
        "job_parameters.input_files[1].desc.path",
        steps(set_at(f"{IN1}.desc", {"path": "/x/.dsjobs-vars", "var": "D"}), set_at(CMD, "ls ${D}")),
        steps(set_at(f"{IN1}.desc", {"path": "/x/dsjobs-vars", "var": "D"}), set_at(CMD, "ls ${D}")),
    ),
    (  # a Windows drive alone names no directory of its own either
        "zip-dir-name",
        "job_parameters.input_files[1].desc.path",
        steps(set_at(f"{IN1}.desc", {"path": "C:", "var": "D"}), set_at(CMD, "ls ${D}")),
        steps(set_at(f"{IN1}.desc", {"path": "C:\\data", "var": "D"}), set_at(CMD, "ls ${D}")),
    ),
    (
        "sha256-sizes",
        "job_parameters.input_files[1].size_bytes",
        set_at(f"{IN1}.sha256", SHA),
        steps(set_at(f"{IN1}.sha256", SHA), set_at(f"{IN1}.sizeBytes", 10)),
    ),
    (
        "size-max",
        "job_parameters.input_files[0].size_bytes",
        set_at(f"{IN0}.sizeBytes", L.MAX_FILE_SIZE_BYTES + 1),
        set_at(f"{IN0}.sizeBytes", L.MAX_FILE_SIZE_BYTES),
    ),
    (
        "size-total",
        "job_parameters.input_files",
        set_at("jobParameters.inputFiles", [{**big_file, "desc": {"path": f"b{i}"}} for i in range(3)]),
        steps(
            NO_VAR_CMD,
            set_at("jobParameters.inputFiles", [{**big_file, "desc": {"path": f"b{i}"}} for i in range(2)]),
            set_at(f"{PY}.localModules", []),
        ),
    ),
    (
        "max-items",
        "job_parameters.input_files",
        steps(
            NO_VAR_CMD,
            set_at(
                "jobParameters.inputFiles",
                [{"desc": {"path": f"f{i}"}, "sha256": SHA, "sizeBytes": 1} for i in range(101)],
            ),
        ),
        steps(
            NO_VAR_CMD,
            set_at(
                "jobParameters.inputFiles",
                [{"desc": {"path": f"f{i}"}, "sha256": SHA, "sizeBytes": 1} for i in range(100)],
            ),
        ),
    ),
    (
        "max-items",
        "job_parameters.output_files",
        steps(NO_VAR_CMD, set_at("jobParameters.outputFiles", [{"path": f"f{i}"} for i in range(101)])),
        steps(NO_VAR_CMD, set_at("jobParameters.outputFiles", [{"path": f"f{i}"} for i in range(100)])),
    ),
    (
        "max-items",
        "job_parameters.s3_mount_ids",
        steps(NO_VAR_CMD, set_at("jobParameters.s3MountIds", [f"s{i}" for i in range(101)])),
        steps(NO_VAR_CMD, set_at("jobParameters.s3MountIds", [f"s{i}" for i in range(100)])),
    ),
    (
        "max-items",
        "job_parameters.dataset_ids",
        steps(NO_VAR_CMD, set_at("jobParameters.datasetIds", [f"d{i}" for i in range(101)])),
        steps(NO_VAR_CMD, set_at("jobParameters.datasetIds", [f"d{i}" for i in range(100)])),
    ),
    (
        "max-items",
        "job_parameters.arguments",
        steps(NO_VAR_CMD, set_at("jobParameters.arguments", [{"name": f"a{i}"} for i in range(101)])),
        steps(NO_VAR_CMD, set_at("jobParameters.arguments", [{"name": f"a{i}"} for i in range(100)])),
    ),
    (
        "max-items",
        "job_parameters.cloud_instance_types",
        set_at("jobParameters.cloudInstanceTypes", [{"name": f"x{i}.1"} for i in range(101)]),
        set_at("jobParameters.cloudInstanceTypes", []),
    ),
    # ids
    (
        "resource-id",
        "job_parameters.s3_mount_ids[0]",
        steps(NO_VAR_CMD, set_at("jobParameters.s3MountIds", ["S3!"])),
        steps(NO_VAR_CMD, set_at("jobParameters.s3MountIds", ["bfbq0as4v1x7n8a2k3mr"])),
    ),
    (
        "resource-id",
        "job_parameters.spark_parameters.connector_id",
        set_at("jobParameters.sparkParameters.connectorId", "-x"),
        set_at("jobParameters.sparkParameters.connectorId", ""),
    ),
    # environment
    (
        "env-name",
        'job_parameters.env.vars["1X"]',
        set_at(f"{ENV}.vars", {"1X": "v"}),
        set_at(f"{ENV}.vars", {"_X1": "v"}),
    ),
    (
        "env-name",
        'job_parameters.env.vars["A-B"]',
        set_at(f"{ENV}.vars", {"A-B": "v"}),
        set_at(f"{ENV}.vars", {"A_B": "v"}),
    ),
    (
        "env-reserved",
        'job_parameters.env.vars["JOB_PROGRESS_FILENAME"]',
        set_at(f"{ENV}.vars", {"JOB_PROGRESS_FILENAME": "v"}),
        set_at(f"{ENV}.vars", {"JOB_PROGRESS": "v"}),
    ),
    (
        "env-reserved",
        'job_parameters.env.vars["DSJOBS_X"]',
        set_at(f"{ENV}.vars", {"DSJOBS_X": "v"}),
        set_at(f"{ENV}.vars", {"DSJOBSX": "v"}),
    ),
    (
        "env-shell",
        'job_parameters.env.vars["UID"]',
        set_at(f"{ENV}.vars", {"UID": "v"}),
        set_at(f"{ENV}.vars", {"UID_": "v"}),
    ),
    (
        "env-value-length",
        'job_parameters.env.vars["A"]',
        set_at(f"{ENV}.vars", {"A": "x" * (L.MAX_ENV_VALUE_LENGTH + 1)}),
        set_at(f"{ENV}.vars", {"A": "x" * L.MAX_ENV_VALUE_LENGTH}),
    ),
    (
        # In characters within the limit, but past Linux's 128 KiB for `A=value` and its NUL: the
        # job ended "exec: /usr/bin/setsid: Argument list too long", code 126.
        "env-value-length",
        'job_parameters.env.vars["A"]',
        set_at(f"{ENV}.vars", {"A": "\U0001f600" * L.MAX_ENV_VALUE_LENGTH}),
        set_at(f"{ENV}.vars", {"A": "\U0001f600" * (L.MAX_ENV_VALUE_LENGTH - 1)}),
    ),
    (  # execve takes C strings: the value would end at the NUL, the job seeing another value
        "control-chars",
        'job_parameters.env.vars["A"]',
        set_at(f"{ENV}.vars", {"A": "a\x00b"}),
        set_at(f"{ENV}.vars", {"A": "a\tb\nc"}),
    ),
    (
        "max-items",
        "job_parameters.env.vars",
        set_at(f"{ENV}.vars", {f"V{i}": "" for i in range(L.MAX_ENV_VARS + 1)}),
        set_at(f"{ENV}.vars", {f"V{i}": "" for i in range(L.MAX_ENV_VARS)}),
    ),
    (
        "docker-oneof",
        "job_parameters.env",
        set_at(f"{ENV}.dockerImageResourceId", "image1"),
        steps(set_at(f"{ENV}.dockerImageResourceId", "image1"), set_at(DOCKER, DELETE)),
    ),
    (
        "resource-id",
        "job_parameters.env.docker_image_resource_id",
        steps(set_at(f"{ENV}.dockerImageResourceId", "Image 1"), set_at(DOCKER, DELETE)),
        steps(set_at(f"{ENV}.dockerImageResourceId", "bfbq0as4v1x7n8a2k3mr"), set_at(DOCKER, DELETE)),
    ),
    (
        "docker-image",
        "job_parameters.env.docker_image_spec.image_url",
        set_at(f"{DOCKER}.imageUrl", "Ubuntu:22.04"),
        set_at(f"{DOCKER}.imageUrl", "ubuntu:22.04"),
    ),
    (
        "docker-password-oneof",
        "job_parameters.env.docker_image_spec",
        set_at(f"{DOCKER}.passwordDsSecretName", "pw"),
        steps(set_at(f"{DOCKER}.passwordDsSecretName", "pw"), set_at(f"{DOCKER}.passwordSecretRef", DELETE)),
    ),
    (
        "secret-name",
        "job_parameters.env.docker_image_spec.password_secret_ref.name",
        set_at(f"{DOCKER}.passwordSecretRef.name", "Bad_Name"),
        set_at(f"{DOCKER}.passwordSecretRef.name", "a.b-c"),
    ),
    (
        "secret-key",
        "job_parameters.env.docker_image_spec.password_secret_ref.key",
        set_at(f"{DOCKER}.passwordSecretRef.key", "a/b"),
        set_at(f"{DOCKER}.passwordSecretRef.key", ".dockerconfigjson"),
    ),
    (
        "required",
        "job_parameters.env.docker_image_spec.password_ds_secret_name",
        steps(set_at(f"{DOCKER}.passwordSecretRef", DELETE), set_at(f"{DOCKER}.passwordDsSecretName", "")),
        steps(
            set_at(f"{DOCKER}.passwordSecretRef", DELETE),
            set_at(f"{DOCKER}.passwordDsSecretName", "DOCKER_PW"),
        ),
    ),
    (
        # A key of the project's Secret of secrets: Execute was refused, always.
        "secret-key",
        "job_parameters.env.docker_image_spec.password_ds_secret_name",
        steps(
            set_at(f"{DOCKER}.passwordSecretRef", DELETE), set_at(f"{DOCKER}.passwordDsSecretName", "my pw/1")
        ),
        steps(
            set_at(f"{DOCKER}.passwordSecretRef", DELETE),
            set_at(f"{DOCKER}.passwordDsSecretName", "my-pw_1.x"),
        ),
    ),
    (  # too long for a Secret's key: told by its length alone, not also by the key pattern
        "max-length",
        "job_parameters.env.docker_image_spec.password_ds_secret_name",
        steps(
            set_at(f"{DOCKER}.passwordSecretRef", DELETE), set_at(f"{DOCKER}.passwordDsSecretName", "a" * 254)
        ),
        steps(
            set_at(f"{DOCKER}.passwordSecretRef", DELETE), set_at(f"{DOCKER}.passwordDsSecretName", "a" * 253)
        ),
    ),
    (
        "conda-yaml",
        "job_parameters.env.python_env.conda_yaml",
        set_at(f"{PY}.condaYaml", "dependencies: [cudatoolkit=11.8]"),
        set_at(f"{PY}.condaYaml", "dependencies: [pip, {pip: [numpy]}]"),
    ),
    (  # too long to be read: told by its length, not parsed
        "max-length",
        "job_parameters.env.python_env.conda_yaml",
        set_at(f"{PY}.condaYaml", "dependencies: [pip]\n" + "#" * (L.MAX_CONFIG_LENGTH - 19)),
        set_at(f"{PY}.condaYaml", "dependencies: [pip]\n" + "#" * (L.MAX_CONFIG_LENGTH - 20)),
    ),
    (
        "python-version",
        "job_parameters.env.python_env.python_version",
        set_at(f"{PY}.pythonVersion", "2.7"),
        set_at(f"{PY}.pythonVersion", "3"),
    ),
    (
        "python-version",
        "job_parameters.env.python_env.python_version",
        set_at(f"{PY}.pythonVersion", "3.11.4.1"),
        set_at(f"{PY}.pythonVersion", "3.11.4"),
    ),
    (
        "python-version",
        "job_parameters.env.python_env.python_version",
        set_at(f"{PY}.pythonVersion", "3.x"),
        set_at(f"{PY}.pythonVersion", ""),
    ),
    (
        "requirement",
        "job_parameters.env.python_env.requirements[0]",
        set_at(f"{PY}.requirements", [" "]),
        set_at(f"{PY}.requirements", ["torch>=2; python_version>'3'"]),
    ),
    (  # pip reads requirements files with str.splitlines: the rest would be an option line
        "requirement",
        "job_parameters.env.python_env.requirements[0]",
        set_at(f"{PY}.requirements", ["six\u2028--index-url http://127.0.0.1:9/simple"]),
        set_at(f"{PY}.requirements", ["six --index-url http://127.0.0.1:9/simple"]),
    ),
    (
        "requirement",
        "job_parameters.env.python_env.conda_yaml",
        set_at(f"{PY}.condaYaml", 'dependencies:\n- pip:\n  - "six\\x85-e ."'),
        set_at(f"{PY}.condaYaml", "dependencies:\n- pip:\n  - six"),
    ),
    (
        "max-items",
        "job_parameters.env.python_env.requirements",
        set_at(f"{PY}.requirements", ["x"] * (L.MAX_REQUIREMENTS + 1)),
        set_at(f"{PY}.requirements", ["x"] * L.MAX_REQUIREMENTS),
    ),
    (  # the URL pattern's \\S matches NUL
        "control-chars",
        "job_parameters.env.python_env.pip_options.index_url",
        set_at(f"{PY}.pipOptions.indexUrl", "https://pypi.example.com/\x00simple"),
        set_at(f"{PY}.pipOptions.indexUrl", "https://pypi.example.com/simple"),
    ),
    (
        "control-chars",
        "job_parameters.env.python_env.pip_options.extra_index_urls[0]",
        set_at(f"{PY}.pipOptions.extraIndexUrls", ["https://a.b/\x01"]),
        set_at(f"{PY}.pipOptions.extraIndexUrls", ["https://a.b/x"]),
    ),
    (
        "url",
        "job_parameters.env.python_env.pip_options.index_url",
        set_at(f"{PY}.pipOptions.indexUrl", "ftp://x"),
        set_at(f"{PY}.pipOptions.indexUrl", "http://10.0.0.1:8080/simple"),
    ),
    (
        "url",
        "job_parameters.env.python_env.pip_options.extra_index_urls[0]",
        set_at(f"{PY}.pipOptions.extraIndexUrls", ["https://a b"]),
        set_at(f"{PY}.pipOptions.extraIndexUrls", ["https://user:pw@a.b/x"]),
    ),
    (
        "url",
        "job_parameters.env.python_env.pip_options.index_url",
        set_at(f"{PY}.pipOptions.indexUrl", "https://a.b/" + "x" * (L.MAX_SHORT_STRING - 11)),
        set_at(f"{PY}.pipOptions.indexUrl", "https://a.b/" + "x" * (L.MAX_SHORT_STRING - 12)),
    ),
    (
        "host",
        "job_parameters.env.python_env.pip_options.trusted_hosts[0]",
        set_at(f"{PY}.pipOptions.trustedHosts", ["a b"]),
        set_at(f"{PY}.pipOptions.trustedHosts", ["a.b:443"]),
    ),
    (  # a DNS name's 253 characters and a port: the longest a host can be
        "host",
        "job_parameters.env.python_env.pip_options.trusted_hosts[0]",
        set_at(f"{PY}.pipOptions.trustedHosts", ["a" * 253 + ":655350"]),
        set_at(f"{PY}.pipOptions.trustedHosts", ["a" * 253 + ":65535"]),
    ),
    # instance types
    (
        "instance-type-name",
        "job_parameters.cloud_instance_types[0].name",
        set_at("jobParameters.cloudInstanceTypes", [{"name": "C1.4"}]),
        set_at("jobParameters.cloudInstanceTypes", [{"name": "c1.4"}]),
    ),
    (
        "instance-type-name",
        "job_parameters.cloud_instance_types[0].name",
        set_at("jobParameters.cloudInstanceTypes", [{"name": "c14"}]),
        set_at("jobParameters.cloudInstanceTypes", [{"name": "g2.1"}]),
    ),
    (
        "instance-type-duplicate",
        "job_parameters.cloud_instance_types[1].name",
        set_at("jobParameters.cloudInstanceTypes", [{"name": "c1.4"}, {"name": "c1.4"}]),
        set_at("jobParameters.cloudInstanceTypes", [{"name": "g1.1"}, {"name": "c1.4"}]),
    ),
    (
        "instance-type-unknown",
        "job_parameters.cloud_instance_types[0].name",
        set_at("jobParameters.cloudInstanceTypes", [{"name": "c9.9"}]),
        set_at("jobParameters.cloudInstanceTypes", [{"name": "g2.1"}]),
    ),
    (
        "instance-type-invalid",
        "job_parameters.cloud_instance_types[0].name",
        set_at("jobParameters.cloudInstanceTypes", [{"name": "c1.8"}]),
        set_at("jobParameters.cloudInstanceTypes", [{"name": "g2.1"}]),
    ),
    # storage, shutdown, datasets
    (
        "working-storage-size",
        "job_parameters.extended_working_storage.size_gb",
        set_at("jobParameters.extendedWorkingStorage.sizeGb", 99),
        set_at("jobParameters.extendedWorkingStorage.sizeGb", 100),
    ),
    (
        "working-storage-size",
        "job_parameters.extended_working_storage.size_gb",
        set_at("jobParameters.extendedWorkingStorage.sizeGb", 10241),
        set_at("jobParameters.extendedWorkingStorage.sizeGb", 10240),
    ),
    (
        "signal",
        "job_parameters.graceful_shutdown_parameters.signal",
        set_at("jobParameters.gracefulShutdownParameters.signal", 9),
        set_at("jobParameters.gracefulShutdownParameters.signal", 15),
    ),
    (
        "signal",
        "job_parameters.graceful_shutdown_parameters.signal",
        set_at("jobParameters.gracefulShutdownParameters.signal", 0),
        set_at("jobParameters.gracefulShutdownParameters.signal", 12),
    ),
    (
        "graceful-timeout",
        "job_parameters.graceful_shutdown_parameters.timeout",
        set_at("jobParameters.gracefulShutdownParameters.timeout", "500ms"),
        set_at("jobParameters.gracefulShutdownParameters.timeout", "1s"),
    ),
    (
        "graceful-timeout",
        "job_parameters.graceful_shutdown_parameters.timeout",
        set_at("jobParameters.gracefulShutdownParameters.timeout", "1h1s"),
        set_at("jobParameters.gracefulShutdownParameters.timeout", "1h"),
    ),
    (
        "dataset-name-unique",
        "job_parameters.output_datasets[1].name",
        set_at("jobParameters.outputDatasets[1]", {"name": "ds", "var": "D2"}),
        set_at("jobParameters.outputDatasets[1]", {"name": "ds2", "var": "D2"}),
    ),
    (
        "required",
        "job_parameters.output_datasets[0].name",
        set_at("jobParameters.outputDatasets[0].name", ""),
        set_at("jobParameters.outputDatasets[0].name", "n"),
    ),
    (
        "dataset-size",
        "job_parameters.output_datasets[0].size_gb",
        set_at("jobParameters.outputDatasets[0].sizeGb", -1),
        set_at("jobParameters.outputDatasets[0].sizeGb", 0),
    ),
    (
        "var-reserved",
        "job_parameters.output_datasets[0].var",
        set_at("jobParameters.outputDatasets[0].var", "DS_PROJECT_HOME"),
        set_at("jobParameters.outputDatasets[0].var", "DS_PROJECT_HOME_2"),
    ),
    # whole spec and types
    (
        "spec-size",
        "",
        set_at(f"{ENV}.vars", {f"V{i}": "x" * 30000 for i in range(40)}),
        set_at(f"{ENV}.vars", {f"V{i}": "x" * 30000 for i in range(30)}),
    ),
    (  # measured in UTF-8, as etcd stores it: 2 bytes per Cyrillic letter (not 6 as a JSON escape)
        "spec-size",
        "",
        set_at(f"{ENV}.vars", {f"V{i}": "ж" * 15000 for i in range(40)}),
        set_at(f"{ENV}.vars", {f"V{i}": "ж" * 15000 for i in range(30)}),
    ),
    (  # measured as the API server writes it: Go's JSON escapes & (and <, >) to 6 bytes
        "spec-size",
        "",
        set_at(f"{ENV}.vars", {f"V{i}": "&" * 30000 for i in range(6)}),
        set_at(f"{ENV}.vars", {f"V{i}": "&" * 30000 for i in range(4)}),
    ),
    ("required", "job_parameters.cmd", set_at(CMD, DELETE), set_at(CMD, "x")),
    (
        "unknown-field",
        "job_parameters.env.docker_image_spec.password_plain_text",
        set_at(f"{DOCKER}.passwordPlainText", "secret"),
        set_at(f"{DOCKER}.username", "u"),
    ),
    (
        "type",
        "job_parameters.input_files[0].size_bytes",
        set_at(f"{IN0}.sizeBytes", "big"),
        set_at(f"{IN0}.sizeBytes", "12"),
    ),
    ("type", "data_ttl", set_at("dataTtl", "14 days"), set_at("dataTtl", 3600)),
    (
        "type",
        'job_parameters.env.vars["A"]',
        set_at(f"{ENV}.vars", {"A": 1}),
        set_at(f"{ENV}.vars", {"A": "1"}),
    ),
]


@pytest.mark.parametrize(
    ("rule", "path", "bad", "good"), JOB_RULES, ids=[f"{r[0]}@{r[1]}" for r in JOB_RULES]
)
def test_job_rule(rule: str, path: str, bad: Mutation, good: Mutation) -> None:
    problems = problems_after(bad)
    assert (path, rule) in {(p.path, p.rule) for p in problems}, format_problems(problems)
    assert problems_after(good) == []


def test_every_rule_has_examples_and_every_emitted_rule_is_documented() -> None:
    tested = {row[0] for row in JOB_RULES} | {row[0] for row in IT_RULES}
    assert set(RULES) - tested == set()
    emitted = {p.rule for row in JOB_RULES for p in problems_after(row[2])}
    emitted |= {p.rule for row in IT_RULES for p in _it_problems(row[2], row[3])}
    assert emitted - set(RULES) == set()


def test_full_examples_are_valid() -> None:
    assert validate_job_spec(full_spec()) == []
    for spec in full_spec_alternatives():
        assert validate_job_spec(spec) == []


def test_all_problems_are_reported_at_once() -> None:
    problems = problems_after(
        steps(
            set_at(f"{IN1}.desc.path", "/abs"),
            set_at(f"{IN0}.sha256", "x"),
            set_at(CMD, "echo ${NOPE}"),
            set_at("dataTtl", "1m"),
            set_at(f"{ENV}.vars", {"1": "x"}),
        )
    )
    assert {p.rule for p in problems} >= {
        "path-absolute",
        "sha256",
        "cmd-undeclared-var",
        "data-ttl",
        "env-name",
    }


def test_a_job_too_large_is_told_which_parts_are_largest() -> None:
    # The problem has no field of its own: it did not say what to make smaller.
    big = steps(
        set_at(f"{ENV}.vars", {f"V{i}": "x" * 30000 for i in range(40)}), set_at("config", "y" * 200000)
    )
    [problem] = [p for p in problems_after(big) if p.rule == "spec-size"]
    parts = problem.message.split("; the largest parts: ")[1].split(", ")
    assert [part.split(" ")[0] for part in parts][:2] == ["job_parameters.env", "config"], problem.message
    assert parts[1] == "config 200002 bytes"  # as stored: the JSON string with its quotes


def test_problem_paths_and_formatting() -> None:
    p = Problem("job_parameters.input_files[2].desc.path", "path-parent", "bad")
    assert p.cr_path == "jobParameters.inputFiles[2].desc.path"
    assert (
        Problem('job_parameters.env.vars["MY_VAR"]', "env-name", "x").cr_path
        == 'jobParameters.env.vars["MY_VAR"]'
    )
    assert str(p) == "job_parameters.input_files[2].desc.path: bad"
    problems = [p, Problem("", "spec-size", "too big")]
    assert format_problems(problems) == f"{p} [path-parent]\ntoo big [spec-size]"
    # the operator's status speaks the resource's language (kubectl users see camelCase fields)
    assert format_problems(problems, cr=True) == (
        "spec.jobParameters.inputFiles[2].desc.path: bad [path-parent]\ntoo big [spec-size]"
    )


# (rule, failing mutation, what the API's message says, what the resource's status says): a
# message naming another field spells it as its reader does (kubectl users read camelCase).
OTHER_FIELDS: list[tuple[str, Mutation, str, str]] = [
    (
        "var-unique",
        steps(NO_VAR_CMD, set_at(f"{OUT0}.var", "MAIN")),
        "'MAIN' is already declared at job_parameters.input_files[0].desc.var",
        "'MAIN' is already declared at spec.jobParameters.inputFiles[0].desc.var",
    ),
    (
        "cmd-var-unsupported",
        set_at(CMD, "ls ${_LOCAL_MODULE_0}"),
        "the var of job_parameters.env.python_env.local_modules[0].desc.var: ",
        "the var of spec.jobParameters.env.pythonEnv.localModules[0].desc.var: ",
    ),
    (
        "cmd-project-home",
        steps(set_at("jobParameters.attachProjectDisk", False), set_at(CMD, "ls ${DS_PROJECT_HOME}")),
        "but attach_project_disk is false",
        "but attachProjectDisk is false",
    ),
    (
        "output-in-input-file",
        set_at(f"{OUT0}.path", "main.py/metrics.json"),
        "the input file of job_parameters.input_files[0].desc.path: ",
        "the input file of spec.jobParameters.inputFiles[0].desc.path: ",
    ),
    (
        "sha256-size",
        set_at(f"{IN0}.sizeBytes", 0),
        "and only of it; size_bytes 0 disagrees",
        "and only of it; sizeBytes 0 disagrees",
    ),
    (
        "sha256-sizes",
        set_at(f"{IN1}.sha256", SHA),
        "disagrees with job_parameters.input_files[0].size_bytes (10)",
        "disagrees with spec.jobParameters.inputFiles[0].sizeBytes (10)",
    ),
    (
        "docker-password-oneof",
        steps(
            set_at(f"{DOCKER}.passwordSecretRef", {"name": "regcred", "key": "password"}),
            set_at(f"{DOCKER}.passwordDsSecretName", "regpass"),
        ),
        "password_secret_ref and password_ds_secret_name are mutually exclusive",
        "passwordSecretRef and passwordDsSecretName are mutually exclusive",
    ),
    (
        "spec-size",
        set_at("config", "y" * 1_000_000),
        "; the largest parts: config 1000002 bytes, job_parameters.",
        "; the largest parts: spec.config 1000002 bytes, spec.jobParameters.",
    ),
]


@pytest.mark.parametrize(
    ("rule", "mutation", "api_text", "cr_text"), OTHER_FIELDS, ids=[row[0] for row in OTHER_FIELDS]
)
def test_a_message_names_other_fields_as_its_reader_spells_them(
    rule: str, mutation: Mutation, api_text: str, cr_text: str
) -> None:
    [problem] = [p for p in problems_after(mutation) if p.rule == rule]
    assert api_text in format_problems([problem]), problem
    assert cr_text in format_problems([problem], cr=True), problem
    assert api_text not in format_problems([problem], cr=True) or api_text == cr_text


def test_a_message_naming_no_other_field_reads_the_same_to_both() -> None:
    [problem] = [p for p in problems_after(set_at(f"{IN0}.sizeBytes", -1)) if p.rule == "size-negative"]
    assert problem.cr_message is None and problem.cr_description == problem.description


def test_var_paths_may_be_absolute_like_the_cli_allows() -> None:
    doc = base_doc()
    doc["jobParameters"]["inputFiles"][0]["desc"]["path"] = "/home/user/../data/train.csv"
    spec, problems = parse_job_spec(doc)
    assert problems == [] and spec is not None
    assert m.job_relative_path(spec.job_parameters.input_files[0].desc) == ".dsjobs-vars/MAIN/train.csv"


def test_clone_overrides_validate_with_a_custom_root() -> None:
    params = m.JobParameters(cmd="echo ${X}")
    problems = validate_job_parameters(params, path="job_parameters_overrides")
    assert [(p.path, p.rule) for p in problems] == [("job_parameters_overrides.cmd", "cmd-undeclared-var")]


def test_without_a_catalog_any_well_formed_type_is_accepted() -> None:
    doc = base_doc()
    doc["jobParameters"]["cloudInstanceTypes"] = [{"name": "z9.big"}]
    assert parse_job_spec(doc)[1] == []


def test_an_image_given_as_a_resource_id_is_told_where_an_image_goes() -> None:
    # The CLI's config `docker: python:3.12-slim` (a string) is a resource id on DataSphere.
    wrong = steps(set_at(f"{ENV}.dockerImageResourceId", "python:3.12-slim"), set_at(DOCKER, DELETE))
    (problem,) = problems_after(wrong)
    assert problem.message == '"python:3.12-slim" is not an id (an image by its URL: docker: {image: ...})'
    plain = steps(set_at(f"{ENV}.dockerImageResourceId", "Image 1"), set_at(DOCKER, DELETE))
    assert [p.message for p in problems_after(plain)] == ['"Image 1" is not an id']


@pytest.mark.parametrize(
    "image",
    [
        "ubuntu",
        "ubuntu:22.04",
        "library/ubuntu",
        "cr.yandex/crp1234/image:tag",
        "localhost:5000/a/b_c__d-e.f:1.0",
        "[::1]:5000/x",
        "python@sha256:" + SHA,
        "a/b:tag@sha256:" + SHA,
    ],
)
def test_docker_references_accepted(image: str) -> None:
    assert problems_after(set_at(f"{DOCKER}.imageUrl", image)) == []


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Ubuntu",
        "ubuntu:",
        "a//b",
        "-a",
        "a:b:c",
        "a b",
        "ubuntu@sha256:abc",
        "a/" + "b" * 260,
        "a:" + "t" * 129,
    ],
)
def test_docker_references_rejected(image: str) -> None:
    rules = {p.rule for p in problems_after(set_at(f"{DOCKER}.imageUrl", image))}
    assert "docker-image" in rules


# --- instance types ---------------------------------------------------------------------------

GPU = "nvidia.com/gpu"


def set_resource(kind: str, name: str, value: Any) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        if value is DELETE:
            del doc["resources"][kind][name]
        else:
            doc["resources"][kind][name] = value

    return apply


IT_RULES: list[tuple[str, str, str, Mutation, Mutation]] = [
    # (rule, path, name, bad, good)
    ("vcpu", "vcpu", "g1.1", set_at("vcpu", 0), set_at("vcpu", 1)),
    ("quantity", "memory", "g1.1", set_at("memory", "lots"), set_at("memory", "48G")),
    ("memory", "memory", "g1.1", set_at("memory", "0"), set_at("memory", 1024)),
    ("gpus", "gpus", "g1.1", set_at("gpus", -1), set_at("gpus", 0)),
    (
        "working-dir-size",
        "working_dir_size_limit",
        "g1.1",
        set_at("workingDirSizeLimit", "0"),
        set_at("workingDirSizeLimit", "20Gi"),
    ),
    ("shm-size", "shm_size", "g1.1", set_at("shmSize", "-1Gi"), set_at("shmSize", "0")),
    ("quantity", "shm_size", "g1.1", set_at("shmSize", "big"), set_at("shmSize", "8Gi")),
    (
        "label-key",
        'node_selector["bad key"]',
        "g1.1",
        set_at("nodeSelector", {"bad key": "x"}),
        set_at("nodeSelector", {"a.b/c": "x"}),
    ),
    (
        "label-value",
        'node_selector["a"]',
        "g1.1",
        set_at("nodeSelector", {"a": "b c"}),
        set_at("nodeSelector", {"a": ""}),
    ),
    (
        "toleration",
        "tolerations[0].operator",
        "g1.1",
        set_at("tolerations[0].key", ""),
        set_at("tolerations[0]", {"operator": "Exists"}),
    ),
    (
        "toleration",
        "tolerations[1].value",
        "g1.1",
        set_at("tolerations[1].value", "x"),
        set_at("tolerations[1].value", ""),
    ),
    (
        "toleration",
        "tolerations[1].toleration_seconds",
        "g1.1",
        set_at("tolerations[1].effect", "NoSchedule"),
        set_at("tolerations[1].tolerationSeconds", DELETE),
    ),
    (
        "label-key",
        "tolerations[0].key",
        "g1.1",
        set_at("tolerations[0].key", "a b"),
        set_at("tolerations[0].key", "a"),
    ),
    (
        "resource-name",
        'resources.requests["a b"]',
        "g1.1",
        set_resource("requests", "a b", "1"),
        set_resource("requests", "cpu", "500m"),
    ),
    (
        "quantity",
        'resources.limits["cpu"]',
        "g1.1",
        set_resource("limits", "cpu", "1 core"),
        set_resource("limits", "cpu", "1e1"),
    ),
    (
        "quantity",
        'resources.requests["cpu"]',
        "g1.1",
        set_resource("requests", "cpu", "-1"),
        set_resource("requests", "cpu", "0"),
    ),
    (
        "request-above-limit",
        'resources.requests["memory"]',
        "g1.1",
        set_resource("requests", "memory", "49Gi"),
        set_resource("requests", "memory", "3Gi"),
    ),
    (
        "extended-resource",
        'resources.requests["nvidia.com/gpu"]',
        "g1.1",
        set_resource("requests", GPU, "2"),
        set_resource("requests", GPU, 1),
    ),
    (
        "extended-resource",
        'resources.limits["nvidia.com/gpu"]',
        "g1.1",
        set_resource("requests", GPU, DELETE),
        steps(set_resource("requests", GPU, DELETE), set_resource("limits", GPU, DELETE)),
    ),
    (
        "priority-class",
        "priority_class_name",
        "g1.1",
        set_at("priorityClassName", "Batch"),
        set_at("priorityClassName", ""),
    ),
    (
        "schedule-timeout",
        "schedule_timeout_seconds",
        "g1.1",
        set_at("scheduleTimeoutSeconds", 0),
        set_at("scheduleTimeoutSeconds", 1),
    ),
    (
        "max-items",
        "tolerations",
        "g1.1",
        set_at("tolerations", [{"operator": "Exists"}] * 33),
        set_at("tolerations", [{"operator": "Exists"}] * 32),
    ),
    ("type", "vcpu", "g1.1", set_at("vcpu", "eight"), set_at("vcpu", "8")),
]


def _it_problems(name: str, mutation: Mutation) -> list[Problem]:
    doc = full_instance_type().to_cr()
    mutation(doc)
    return parse_instance_type(name, doc)[1]


@pytest.mark.parametrize(
    ("rule", "path", "name", "bad", "good"), IT_RULES, ids=[f"{r[0]}@{r[1]}" for r in IT_RULES]
)
def test_instance_type_rule(rule: str, path: str, name: str, bad: Mutation, good: Mutation) -> None:
    problems = _it_problems(name, bad)
    assert (path, rule) in {(p.path, p.rule) for p in problems}, format_problems(problems)
    assert _it_problems(name, good) == []


def test_an_instance_type_quantity_of_a_huge_exponent_is_told_as_such() -> None:
    problems = _it_problems("c1.4", set_at("memory", "1e10000000"))
    assert [(p.path, p.message) for p in problems] == [
        ("memory", "'1e10000000': the exponent must be within ±100")
    ], problems


@pytest.mark.parametrize(
    ("name", "ok"), [("c1.4", True), ("g2.mig", True), ("C1.4", False), ("c1", False), ("1c.4", False)]
)
def test_instance_type_names(name: str, ok: bool) -> None:
    rules = {p.rule for p in parse_instance_type(name, full_instance_type().to_cr())[1]}
    assert ("instance-type-name" not in rules) is ok
    if not ok:
        assert "instance-type-name" in {p.rule for p in parse_instance_type(name, {"vcpu": "x"})[1]}


def test_the_default_catalog_is_valid() -> None:
    from dsjobs.instancetypes import CATALOG, instance_type_spec

    for profile in ("base", "local"):
        for entry in CATALOG:
            assert validate_instance_type(entry.name, instance_type_spec(entry, profile)) == []


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
spec_keys = st.sampled_from(
    [
        "projectId",
        "jobParameters",
        "cmd",
        "inputFiles",
        "desc",
        "path",
        "var",
        "sha256",
        "sizeBytes",
        "env",
        "vars",
        "dockerImageSpec",
        "imageUrl",
        "dataTtl",
        "cloudInstanceTypes",
        "name",
        "outputFiles",
        "signal",
        "gracefulShutdownParameters",
        "timeout",
        "pythonEnv",
        "localModules",
        "arguments",
        "value",
        "execute",
    ]
)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with random values planted at random places (reaches the semantic checks)."""
    doc = draw(job_specs()).to_cr()
    for _ in range(draw(st.integers(1, 4))):
        node: Any = doc
        while True:
            if isinstance(node, dict) and node and draw(st.booleans()):
                k = draw(st.sampled_from(sorted(node)))
                if isinstance(node[k], dict | list) and node[k]:
                    node = node[k]
                    continue
                node[k] = draw(json_values | st.text())
            elif isinstance(node, list) and node:
                i = draw(st.integers(0, len(node) - 1))
                if isinstance(node[i], dict | list) and node[i]:
                    node = node[i]
                    continue
                node[i] = draw(json_values)
            elif isinstance(node, dict):
                node[draw(spec_keys)] = draw(json_values)
            break
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.dictionaries(spec_keys, json_values), mutated_specs()))
def test_the_validator_never_crashes(doc: Any) -> None:
    data = doc if isinstance(doc, dict) else {"spec": doc}
    spec, problems = parse_job_spec(data, known_instance_types=["c1.4"])
    assert (spec is None) <= bool(problems)
    for p in problems:
        assert p.rule in RULES and isinstance(str(p), str) and isinstance(p.cr_path, str)
    parse_instance_type("c1.4", data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_specs())
def test_generated_valid_specs_are_accepted(spec: m.ProjectJobSpec) -> None:
    assert validate_job_spec(spec) == []
    # and they survive the CR round trip unchanged
    assert m.ProjectJobSpec.model_validate(spec.to_cr()) == spec


path_text = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(["a", ".", "..", "", "b.c", "...", "/", "\\", ".dsjobs-vars", "x\x00", "C:", "c:x"]),
        max_size=6,
    ).flatmap(lambda segments: st.sampled_from(["/", "\\"]).map(lambda sep: sep.join(segments))),
)


@settings(max_examples=500, deadline=None)
@given(path_text, st.sampled_from(["", "V", "_LOCAL_MODULE_0"]))
def test_no_accepted_path_escapes_the_working_directory(path: str, var: str) -> None:
    root = "/job/work"
    doc = base_doc()
    doc["jobParameters"]["cmd"] = "true"
    doc["jobParameters"]["inputFiles"] = [{"desc": {"path": path, "var": var}, "sha256": SHA, "sizeBytes": 1}]
    doc["jobParameters"]["outputFiles"] = [{"path": path + "_out" if path else "", "var": ""}]
    spec, problems = parse_job_spec(doc)
    path_rules = {p.rule for p in problems if p.path.startswith("job_parameters.input_files[0]")}
    if spec is None or path_rules:
        return
    desc = spec.job_parameters.input_files[0].desc
    place = m.job_relative_path(desc)
    for candidate in [path, place] if not var else [place]:
        full = os.path.normpath(os.path.join(root, candidate))
        assert full.startswith(root + "/"), (path, var, full)
        assert posixpath.commonpath([root, full]) == root


@settings(max_examples=500, deadline=None)
@given(path_text, st.sampled_from(["", "V"]), path_text)
def test_the_runner_takes_every_path_the_validator_accepts(path: str, var: str, other: str) -> None:
    """One rule for separators and absolute paths: nothing validated fails in runner_config."""
    doc = {
        "projectId": "proj1",
        "execute": True,
        "jobParameters": {
            "cmd": "ls ${V}" if var else "ls",
            "inputFiles": [
                {"desc": {"path": path, "var": var}, "sha256": SHA, "sizeBytes": 1},
                {"desc": {"path": other}, "sha256": SHA, "sizeBytes": 1},
            ],
            "outputFiles": [{"path": other, "var": ""}],
        },
    }
    spec, problems = parse_job_spec(doc)
    if spec is None or problems:
        return
    config = runner_config(JobRef("job-1", "ns", "uid", "proj1"), spec, 0)
    params = spec.job_parameters
    assert [f.path for f in config.inputs] == [m.job_relative_path(f.desc) for f in params.input_files]
    assert [f.path for f in config.outputs] == [m.job_relative_path(d) for d in params.output_files]


@pytest.mark.parametrize(
    ("path", "place"),
    [("C:\\Users\\me\\train.csv", ".dsjobs-vars/V/train.csv"), ("..\\data\\train.csv", ".dsjobs-vars/V/train.csv"),
     ("/home/me/train.csv", ".dsjobs-vars/V/train.csv"), ("data\\train.csv", "data/train.csv")],
)  # fmt: skip
def test_windows_paths_with_a_var_run_like_posix_ones(path: str, place: str) -> None:
    doc = {
        "projectId": "proj1",
        "jobParameters": {
            "cmd": "python ${V}",
            "inputFiles": [{"desc": {"path": path, "var": "V"}, "sha256": SHA, "sizeBytes": 1}],
        },
    }
    spec, problems = parse_job_spec(doc)
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "proj1"), spec, 0)
    assert render_config_cmd(config) == f"python /job/work/{place}"


def test_the_escape_passes_validation_and_reaches_the_shell_unsubstituted() -> None:
    cmd = "echo $${HOME} $${X:-1} ${A} $${A}"
    doc = {"projectId": "proj1", "jobParameters": {"cmd": cmd, "arguments": [{"name": "A", "value": "1"}]}}
    spec, problems = parse_job_spec(doc)
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "proj1"), spec, 0)
    assert render_config_cmd(config) == "echo ${HOME} ${X:-1} 1 ${A}"


def test_an_output_dataset_var_is_the_directory_the_job_writes_the_dataset_to() -> None:
    doc = {
        "projectId": "proj1",
        "jobParameters": {
            "cmd": "python train.py --save ${MODELS}",
            "outputDatasets": [{"name": "models", "var": "MODELS", "sizeGb": 2}],
        },
    }
    spec, problems = parse_job_spec(doc)
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "proj1"), spec, 0)
    assert render_config_cmd(config) == "python train.py --save /job/output-datasets/MODELS"


@pytest.mark.parametrize("cmd", ["${A} $${B} ${C:-1} $$${D} ${E${F}} ${} ${G", "x $${A}${B}"])
def test_the_validator_sees_the_references_the_runner_substitutes(cmd: str) -> None:
    assert cmd_references(cmd) == unknown_variables(cmd, {})


def test_an_empty_instance_type_list_is_checked_as_the_default_type() -> None:
    doc = {"projectId": "proj1", "jobParameters": {"cmd": "ls"}}
    _, problems = parse_job_spec(doc, known_instance_types={"g1.1"})
    assert [(p.path, p.rule) for p in problems] == [
        ("job_parameters.cloud_instance_types", "instance-type-unknown")
    ]
    assert problems[0].message.startswith("c1.4 is not an instance type of this cluster")
    assert problems[0].message.endswith("; it has g1.1")
    assert parse_job_spec(doc, known_instance_types={"c1.4"})[1] == []


def test_an_unknown_instance_type_is_told_what_the_cluster_has() -> None:
    doc = {"projectId": "proj1", "jobParameters": {"cmd": "ls", "cloudInstanceTypes": [{"name": "z9.x"}]}}
    many = {f"c{i}.4" for i in range(30)}
    [problem] = parse_job_spec(doc, known_instance_types=many)[1]
    assert problem.message.startswith(
        "z9.x is not an instance type of this cluster; it has c0.4, c1.4, c10.4"
    )
    assert problem.message.endswith(" and 10 more")
    [problem] = parse_job_spec(doc, known_instance_types=set())[1]
    assert problem.message.endswith("it has none (ask your admin for an InstanceType catalog)")


def test_every_rule_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "projectjob.md").read_text()
    assert [rule for rule in (*RULES, *REQUEST_RULES) if f"`{rule}`" not in doc] == []


def test_every_rule_of_a_clone_s_overrides_is_listed() -> None:
    from dsjobs.convert.params import clone_override_problems
    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2

    source = m.JobParameters.model_validate(
        {
            "cmd": "true",
            "arguments": [{"name": "a", "value": "1"}],
            "outputFiles": [{"path": "o", "var": "O"}],
        }
    )
    o = jobs_pb2.JobParameters(
        cmd="x", arguments=[jobs_pb2.Argument(name="b"), jobs_pb2.Argument(name="a")] * 2
    )
    o.output_files.add(path="p")
    o.output_files.add(path="q", var="O")
    o.output_files.add(path="r", var="O")
    rules = {p.rule for p in clone_override_problems(source, o)}
    assert rules == {"clone-var", "clone-arg", "clone-keeps", "var-unique"}
    assert rules <= set(RULES) | set(REQUEST_RULES)


def test_an_output_dataset_s_size_has_an_upper_bound() -> None:
    # Else a claim of 10^9 GB that no provisioner ever makes.
    _, problems = parse_job_spec(
        {
            "projectId": "proj-a",
            "jobParameters": {
                "cmd": "python x.py",
                "outputDatasets": [{"name": "d", "var": "D", "sizeGb": 10**9}],
            },
        }
    )
    assert any(p.rule == "dataset-size" for p in problems), problems


def test_ephemeral_storage_may_be_requested_below_its_limit() -> None:
    from dsjobs.validation.instancetype import parse_instance_type

    _, problems = parse_instance_type(
        "c9.1",
        {
            "vcpu": 1,
            "memory": "1Gi",
            "resources": {"requests": {"ephemeral-storage": "1Gi"}, "limits": {"ephemeral-storage": "20Gi"}},
        },
    )
    assert problems == []
