"""Shapes of a job that validation let through and the runner or the cluster then could not take:
an output below an input file, a path past PATH_MAX once placed, a ZIP named after its var, and a
job whose runner config or final status did not fit (dsjobs.validation, `spec-size`)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from runner_fakes import FileStore

from dsjobs.controller.names import output_dataset_id
from dsjobs.controller.render import (
    MAX_SECRET_DATA_BYTES,
    JobRef,
    runner_config,
    runner_secret,
    secret_size_problem,
)
from dsjobs.controller.status import apply_result
from dsjobs.models import ProjectJobSpec, ProjectJobStatus
from dsjobs.models import limits as L
from dsjobs.models.paths import JOB_WORK_DIR, job_relative_path, placed_path_bytes
from dsjobs.models.status import OutputDataset
from dsjobs.runner.config import Compression, RunnerConfig, RunnerPaths
from dsjobs.runner.result import OutputResult, RunnerResult, RunnerStatus
from dsjobs.runner.stagein import run_stage_in
from dsjobs.storage import input_key, output_key
from dsjobs.validation import Problem, parse_job_spec
from dsjobs.validation.job import job_size_bytes

PROJECT = "proj-a"
#: The longest job name: the runner config and the status keys carry it.
JOB = JobRef(
    name="j" * L.MAX_JOB_NAME,
    namespace="project-a",
    uid="6f1c2b1e-0000-4000-8000-0000000001",
    project_id=PROJECT,
)
#: Generous storage settings (the operator's, beside the runner config in its Secret).
STORAGE_ENV = {
    "DSJOBS_S3_ENDPOINT": "https://" + "s" * 240 + ".example.com:9000",
    "DSJOBS_S3_PUBLIC_ENDPOINT": "https://" + "p" * 240 + ".example.com",
    "DSJOBS_S3_BUCKET": "b" * 63,
    "DSJOBS_S3_ACCESS_KEY": "A" * 128,
    "DSJOBS_S3_SECRET_KEY": "s" * 128,
    "DSJOBS_S3_REGION": "r" * 32,
}


def parse(params: dict[str, Any]) -> tuple[ProjectJobSpec | None, list[Problem]]:
    return parse_job_spec({"projectId": PROJECT, "execute": True, "jobParameters": params})


def rules(params: dict[str, Any]) -> set[tuple[str, str]]:
    return {(p.path, p.rule) for p in parse(params)[1]}


def go_json_bytes(doc: Any) -> int:
    """What the API server (Go's encoding/json, HTML-safe) writes, measured on its own terms."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    for ch, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, escaped)
    return len(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode())


def valid(params: dict[str, Any]) -> ProjectJobSpec:
    spec, problems = parse(params)
    assert spec is not None and problems == [], problems
    return spec


def fill_to(params: dict[str, Any], budget: int) -> dict[str, Any]:
    """`params` with env vars of ASCII that make the job take exactly `budget` bytes."""
    envs: dict[str, str] = {}
    params = {**params, "env": {**params.get("env", {}), "vars": envs}}
    spec = valid(params)
    while sum(job_size_bytes(spec)) < budget - L.MAX_ENV_VALUE_LENGTH - 16:
        envs[f"E{len(envs)}"] = "v" * L.MAX_ENV_VALUE_LENGTH
        spec = valid(params)
    envs["LAST"] = ""
    envs["LAST"] = "v" * (budget - sum(job_size_bytes(valid(params))))
    assert sum(job_size_bytes(valid(params))) == budget
    return params


def one_more_byte(params: dict[str, Any]) -> dict[str, Any]:
    env = params["env"]
    return {**params, "env": {**env, "vars": {**env["vars"], "LAST": env["vars"]["LAST"] + "v"}}}


# --- outputs below input files ------------------------------------------------------------------


def _stage(tmp_path: Path, spec: ProjectJobSpec, store: FileStore) -> tuple[bool, RunnerConfig]:
    config = runner_config(JOB, spec, 1).replace(
        paths=RunnerPaths(work_dir=str(tmp_path / "w"), shared_dir=str(tmp_path / "s"))
    )
    return run_stage_in(config, store, termination_log=str(tmp_path / "term")), config


def test_an_output_below_an_input_file_is_refused_and_would_fail_stage_in(tmp_path: Path) -> None:
    data = b"weights"
    sha = hashlib.sha256(data).hexdigest()
    params = {
        "cmd": "python main.py",
        "inputFiles": [{"desc": {"path": "model"}, "sha256": sha, "sizeBytes": len(data)}],
        "outputFiles": [{"path": "model/metrics.json"}],
    }
    assert rules(params) == {("job_parameters.output_files[0].path", "output-in-input-file")}
    spec = ProjectJobSpec.model_validate({"projectId": PROJECT, "execute": True, "jobParameters": params})
    store = FileStore()
    store.objects[input_key(PROJECT, sha)] = data
    ok, _ = _stage(tmp_path, spec, store)
    assert not ok and "Is a directory" in (tmp_path / "term").read_text()


def test_an_output_inside_a_zip_input_is_fine_and_stages(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model/weights.bin", b"w")
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    spec = valid(
        {
            "cmd": "python main.py",
            "inputFiles": [
                {"desc": {"path": "model"}, "sha256": sha, "sizeBytes": len(data), "compressionType": "ZIP"}
            ],
            # And an input below an output: the output is then a directory, zipped when shipped.
            "outputFiles": [{"path": "model/metrics.json"}, {"path": "more"}],
        }
    )
    store = FileStore()
    store.objects[input_key(PROJECT, sha)] = data
    ok, config = _stage(tmp_path, spec, store)
    assert ok
    assert (config.work_dir / "model" / "weights.bin").read_bytes() == b"w"


# --- NUL in argument values -------------------------------------------------------------------


def test_the_runner_refuses_nul_in_an_argument_value_too() -> None:
    # A kubectl-applied job is validated by the operator; the runner is the last line all the same.
    base = {"project_id": "p", "job_id": "j", "cmd": "echo ${A}"}
    assert RunnerConfig.from_dict({**base, "arguments": {"A": "x\ny"}}).arguments == {"A": "x\ny"}
    with pytest.raises(ValueError, match="argument 'A' contains NUL"):
        RunnerConfig.from_dict({**base, "arguments": {"A": "x\x00y"}})


# --- placed paths -------------------------------------------------------------------------------


def test_the_runner_works_where_the_validator_measures_paths() -> None:
    assert RunnerPaths().work_dir == JOB_WORK_DIR


@pytest.mark.parametrize(
    ("place", "size"),
    [
        ("x" * 100, len("/job/work/") + 100),
        ("a/b.csv", len("/job/work/a/") + 40),  # its download's temporary name is longer
        ("я/" + "x" * 50, len("/job/work/") + 3 + 50),
    ],
)
def test_placed_path_bytes(place: str, size: int) -> None:
    assert placed_path_bytes(place) == size


def test_a_long_path_of_a_var_file_is_placed_by_its_var() -> None:
    # The reviewer's 4096 characters of ~2050 Cyrillic letters: placed as is, 8 KiB, refused; with
    # a var and a path the job cannot use as is, it goes under .dsjobs-vars/<var>/ and is fine.
    path = "/".join(["Ж" * 120] * 34)[: L.MAX_PATH_LENGTH]
    f = {"desc": {"path": path}, "sha256": "a" * 64, "sizeBytes": 1}
    assert rules({"cmd": "x", "inputFiles": [f]}) == {
        ("job_parameters.input_files[0].desc.path", "path-placed-length")
    }
    f["desc"] = {"path": "/" + path[1:], "var": "M"}
    assert rules({"cmd": "x ${M}", "inputFiles": [f]}) == set()


def test_a_zip_named_after_its_var_is_refused_and_would_unpack_elsewhere(tmp_path: Path) -> None:
    name = "Д" * 150  # 300 bytes in UTF-8, 150 characters: a Windows name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name + "/train.csv", "a,b\n")
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    f = {"desc": {"path": "C:\\Users\\me\\" + name, "var": "D"}, "sha256": sha, "sizeBytes": len(data)}
    plain = {"cmd": "python main.py ${D}", "inputFiles": [f]}
    assert rules(plain) == set()  # a file of that name is placed as .dsjobs-vars/D/D: fine
    zipped = {**plain, "inputFiles": [{**f, "compressionType": "ZIP"}]}
    assert rules(zipped) == {("job_parameters.input_files[0].desc.path", "zip-dir-name")}
    spec = ProjectJobSpec.model_validate({"projectId": PROJECT, "execute": True, "jobParameters": zipped})
    assert job_relative_path(spec.job_parameters.input_files[0].desc) == ".dsjobs-vars/D/D"
    store = FileStore()
    store.objects[input_key(PROJECT, sha)] = data
    assert not _stage(tmp_path, spec, store)[0]


# --- what a job takes: its runner config's Secret, its object in etcd -----------------------------


def _widest_config_params() -> dict[str, Any]:
    """Every list at its limit with what the runner config writes beyond the spec's own bytes at
    its largest: var files placed at `.dsjobs-vars/<var>/<var>` from a path of one character,
    mounts of the longest ids, output datasets of the longest vars, NONE local modules, and pip
    packages conda_yaml names many times by an alias. No outputs: the status repeats each at
    ~1.2 KiB, which the config does not take, so they would only leave it more room."""
    var = "V" * 45
    line = "pkg==1.0 ; python_version >= '3' # " + "p" * 900
    conda = "dependencies:\n  - pip: &p\n" + "".join(f"    - {line}{i}\n" for i in range(10))
    conda += "".join("  - pip: *p\n" for _ in range(29))
    return {
        "cmd": "python main.py",
        "inputFiles": [
            {"desc": {"path": "/", "var": f"{var}{i:02}"}, "sha256": "%064x" % (i + 1), "sizeBytes": 1}
            for i in range(L.MAX_LIST_ITEMS)
        ],
        "s3MountIds": [f"s{i:02}" + "x" * 60 for i in range(L.MAX_LIST_ITEMS)],
        "datasetIds": [f"d{i:02}" + "x" * 60 for i in range(L.MAX_LIST_ITEMS)],
        "outputDatasets": [{"name": f"{i}", "var": f"O{i:02}" + "o" * 47} for i in range(L.MAX_LIST_ITEMS)],
        "arguments": [{"name": "A", "value": "1"}],
        "attachProjectDisk": True,
        "gracefulShutdownParameters": {"signal": 15, "timeout": "1h"},
        "env": {
            "pythonEnv": {
                "pythonVersion": "3.11",
                "condaYaml": conda,
                "requirements": ["numpy"],
                "pipOptions": {"noDeps": True},
                "localModules": [
                    {
                        "desc": {"path": "m", "var": f"_LOCAL_MODULE_{i}"},
                        "sha256": "%064x" % (1000 + i),
                        "sizeBytes": 1,
                        "compressionType": "NONE",
                    }
                    for i in range(L.MAX_LIST_ITEMS)
                ],
            }
        },
    }


def test_the_runner_config_fits_its_secret_whenever_the_job_fits_its_budget() -> None:
    assert L.MAX_SPEC_JSON_BYTES + L.RUNNER_CONFIG_MARGIN <= MAX_SECRET_DATA_BYTES
    params = fill_to(_widest_config_params(), L.MAX_SPEC_JSON_BYTES)
    spec = valid(params)
    config = runner_config(JOB, spec, attempt=999)
    secret = runner_secret(JOB, config, STORAGE_ENV, attempt=999)
    assert secret_size_problem(secret, config) is None
    # The margin's claim, the Secret's storage settings (8 KiB of it) aside.
    assert len(config.to_json().encode()) <= sum(job_size_bytes(spec)) + L.RUNNER_CONFIG_MARGIN - 8 * 1024
    assert len(config.python_env.requirements if config.python_env else []) == 301

    _, problems = parse(one_more_byte(params))
    assert [p.rule for p in problems] == ["spec-size"]


def _widest_status_params() -> dict[str, Any]:
    """Outputs whose status entries are the largest: paths of `<` (6 bytes each as the API server
    writes them) as long as an object key allows, repeated in each entry's desc and key; var paths
    of 4096 Cyrillic letters (8 KiB in the spec and again in the status); output datasets whose
    descriptions are of `&`."""
    deep = "/".join(["<" * 250] * 3 + ["<" * 100])
    outputs: list[dict[str, str]] = [{"path": f"{deep}{i:02}"} for i in range(30)]
    cyrillic = "/" + "/".join(["Ж" * 120] * 35)[: L.MAX_PATH_LENGTH - 5]
    outputs += [{"path": f"{cyrillic}/r{i:02}", "var": f"R{i}"} for i in range(12)]
    datasets = [
        {"name": f"ds{i}", "var": f"D{i}", "description": "&" * L.MAX_DESC_LENGTH, "labels": {"a<": "b>"}}
        for i in range(2)
    ]
    return {"cmd": "python main.py", "outputFiles": outputs, "outputDatasets": datasets}


def _finished_status(spec: ProjectJobSpec) -> ProjectJobStatus:
    """Every output uploaded (the largest size, ZIP), every output dataset created."""
    config = runner_config(JOB, spec, 1)
    result = RunnerResult(
        project_id=PROJECT,
        job_id=JOB.name,
        status=RunnerStatus.EXITED,
        return_code=0,
        outputs=[
            OutputResult(
                path=o.path,
                var=o.var,
                index=i,
                key=output_key(PROJECT, JOB.name, o.path),
                sha256="a" * 64,
                size_bytes=2**63 - 1,
                compression=Compression.NONE,
            )
            for i, o in enumerate(config.outputs)
        ],
    )
    status = apply_result(spec, ProjectJobStatus(), result)
    datasets = [
        OutputDataset(desc=d, id=output_dataset_id(JOB.uid, d.var))
        for d in spec.job_parameters.output_datasets
    ]
    return status.model_copy(update={"output_datasets": datasets})


def test_a_job_within_its_budget_leaves_its_status_room_in_etcd() -> None:
    params = _widest_status_params()
    spec = valid(params)
    own, repeated = job_size_bytes(spec)
    assert own < repeated  # the status repeats more than the spec holds of these
    params = fill_to(params, L.MAX_SPEC_JSON_BYTES)
    spec = valid(params)
    status = _finished_status(spec)
    assert len(status.output_files) == len(spec.job_parameters.output_files) == 42
    total = go_json_bytes(spec.to_cr()) + go_json_bytes(status.to_cr())
    # The budget holds the spec and what its status repeats (the status's own few keys aside): the
    # rest of etcd's 1.5 MiB stays for the status's own text and the metadata.
    assert total <= L.MAX_SPEC_JSON_BYTES + 256
    assert L.ETCD_MAX_REQUEST_BYTES - L.MAX_SPEC_JSON_BYTES >= 640 * 1024

    _, problems = parse(one_more_byte(params))
    assert [p.rule for p in problems] == ["spec-size"]


def test_the_reviewers_job_whose_final_status_did_not_fit_is_refused() -> None:
    # 100 outputs of 4096 Cyrillic characters: 0.8 MB of spec, and as much again in its status.
    path = "/" + "/".join(["Ж" * 120] * 34)[: L.MAX_PATH_LENGTH - 1]
    outputs = [{"path": path[: L.MAX_PATH_LENGTH - 4] + f"/r{i:02}", "var": f"O{i}"} for i in range(100)]
    spec, problems = parse({"cmd": "python main.py", "outputFiles": outputs})
    assert spec is not None and [p.rule for p in problems] == ["spec-size"]
    total = go_json_bytes(spec.to_cr()) + go_json_bytes(_finished_status(spec).to_cr())
    assert total > L.ETCD_MAX_REQUEST_BYTES
