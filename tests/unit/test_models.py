"""dsjobs.models: CR dumps, aliases, durations, quantities, file placement."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from dsjobs_strategies import full_instance_type, full_spec, full_status
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from dsjobs import models as m
from dsjobs.models import limits as L


def test_cr_dump_is_camel_case_without_nones_and_reads_back() -> None:
    spec = full_spec()
    doc = spec.to_cr()
    assert doc == spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert "jobParameters" in doc and "job_parameters" not in doc
    assert doc["jobParameters"]["inputFiles"][0] == {
        "desc": {"path": "main.py", "var": "MAIN"},
        "sha256": "0123456789abcdef" * 4,
        "sizeBytes": 10,
        "compressionType": "NONE",
    }
    assert doc["dataTtl"] == "14d"
    assert doc["cancel"]["requestedAt"] == "2025-06-01T00:00:00Z"
    assert m.ProjectJobSpec.model_validate(doc) == spec
    status = full_status()
    assert m.ProjectJobStatus.model_validate(status.to_cr()) == status
    assert m.InstanceTypeSpec.model_validate(full_instance_type().to_cr()) == full_instance_type()


def test_minimal_spec_and_defaults() -> None:
    spec = m.ProjectJobSpec.model_validate({"projectId": "p", "jobParameters": {"cmd": "true"}})
    assert spec.data_ttl == timedelta(days=14)
    assert spec.execute is False and spec.cancel is None and spec.retry_policy is None
    assert spec.job_parameters.cloud_instance_types == []
    assert "env" not in spec.to_cr()["jobParameters"]
    assert m.ProjectJobStatus().to_cr() == {
        "conditions": [],
        "dataCleared": False,
        "outputFiles": [],
        "logFiles": [],
        "diagnosticFiles": [],
        "fileErrors": [],
        "outputDatasets": [],
        "statusDetails": "",
        "attempt": 0,
        "podName": "",
        "instanceTypeIndex": 0,
        "retriedFailures": 0,
        "dataSizeBytes": 0,
    }


def test_snake_case_names_are_accepted_too() -> None:
    spec = m.ProjectJobSpec.model_validate({"project_id": "p", "job_parameters": {"cmd": "true"}})
    assert spec.project_id == "p"


def test_a_plain_text_docker_password_cannot_be_stored() -> None:
    assert "password_plain_text" not in m.DockerImageSpec.model_fields
    with pytest.raises(ValidationError):
        m.DockerImageSpec.model_validate({"imageUrl": "ubuntu", "passwordPlainText": "secret"})


def test_timestamps_must_carry_a_zone() -> None:
    with pytest.raises(ValidationError):
        m.ProjectJobStatus(created_at=datetime(2025, 1, 1))
    assert (
        m.ProjectJobStatus(created_at=datetime(2025, 1, 1, tzinfo=UTC)).to_cr()["createdAt"]
        == "2025-01-01T00:00:00Z"
    )


def test_phases() -> None:
    assert [p.value for p in m.JobPhase] == [
        "CREATING", "PREPARING", "EXECUTING", "UPLOADING_OUTPUT", "SUCCESS", "ERROR", "CANCELLING", "CANCELLED"
    ]  # fmt: skip
    assert {p for p in m.JobPhase if p.is_final} == {
        m.JobPhase.SUCCESS,
        m.JobPhase.ERROR,
        m.JobPhase.CANCELLED,
    }


@pytest.mark.parametrize(
    ("text", "value", "canonical"),
    [
        ("14d", timedelta(days=14), "14d"),
        ("336h", timedelta(days=14), "14d"),
        ("1h30m", timedelta(minutes=90), "1h30m"),
        ("90s", timedelta(seconds=90), "1m30s"),
        ("1.5s", timedelta(seconds=1.5), "1s500ms"),
        ("250us", timedelta(microseconds=250), "250us"),
        ("0s", timedelta(), "0s"),
        ("-2h", timedelta(hours=-2), "-2h"),
        ("infinity", L.INFINITE_TTL, "infinity"),
        (3600, timedelta(hours=1), "1h"),
    ],
)
def test_durations(text: str | int, value: timedelta, canonical: str) -> None:
    assert m.parse_duration(text) == value
    assert m.format_duration(value) == canonical


@pytest.mark.parametrize("text", ["", "14", "1 h", "1y", "P14D", "inf", "1e3s", True, None])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        m.parse_duration(text)


LONGEST = L.INFINITE_TTL - timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("text", "value"),
    [("99999999999d", LONGEST), ("-99999999999d", timedelta.min), (1e30, LONGEST), (-1e30, timedelta.min)],
)
def test_a_duration_too_long_for_a_timedelta_is_the_longest_finite_one(
    text: object, value: timedelta
) -> None:
    # The CRD's pattern lets it through: refused as out of range (naming the field), not an
    # unreadable spec, and never taken for `infinity`.
    assert m.parse_duration(text) == value
    spec = m.ProjectJobSpec.model_validate(
        {"projectId": "p", "jobParameters": {"cmd": "true"}, "dataTtl": text}
    )
    assert spec.data_ttl == value and not m.data_ttl_is_infinite(spec.data_ttl)


@given(st.timedeltas())
def test_duration_format_round_trips(value: timedelta) -> None:
    assert m.parse_duration(m.format_duration(value)) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", Fraction(1, 2)), ("4", Fraction(4)), ("32Gi", Fraction(32 * 2**30)), ("1e3", Fraction(1000)),
     ("1.5k", Fraction(1500)), ("2048Mi", Fraction(2**31)), ("2E-1", Fraction(1, 5)), (".5", Fraction(1, 2)),
     (8, Fraction(8)), ("1e100", Fraction(10**100)), ("1e-0100", Fraction(1, 10**100))],
)  # fmt: skip
def test_quantities(text: str | int, value: Fraction) -> None:
    assert m.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1 Gi", " 1", "Gi", "1GB", "1.2.3", "1e1.5", "--1", ".", "1Zi", True])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        m.parse_quantity(text)


@pytest.mark.parametrize("text", ["1e101", "1e-101", "1e10000000", "1e2000000000", "1e" + "9" * 5000])
def test_quantities_of_huge_exponents_are_refused_without_computing_them(text: str) -> None:
    """1e10000000 took 7 s of CPU and 1e2000000000 all memory, in the operator's watch handler."""
    with pytest.raises(ValueError, match="the exponent must be within ±100"):
        m.parse_quantity(text)


def test_quantities_given_as_numbers_become_strings() -> None:
    resources = m.ResourceRequirements.model_validate({"requests": {"cpu": 4, "memory": "1Gi"}})
    assert resources.requests == {"cpu": "4", "memory": "1Gi"}


@pytest.mark.parametrize(
    ("path", "var", "place"),
    [
        ("main.py", "", "main.py"),
        ("./data//train.csv", "", "data/train.csv"),
        ("data/", "DATA", "data"),
        ("/home/me/train.csv", "TRAIN", ".dsjobs-vars/TRAIN/train.csv"),
        ("../up/model.pt", "M", ".dsjobs-vars/M/model.pt"),
        ("/", "ROOT", ".dsjobs-vars/ROOT/ROOT"),
        ("/tmp/x/..", "X", ".dsjobs-vars/X/X"),
        # a Windows client's paths: '\\' separates too, a drive is absolute (as in the runner)
        ("C:\\Users\\me\\x.csv", "X", ".dsjobs-vars/X/x.csv"),
        ("C:x.csv", "X", ".dsjobs-vars/X/x.csv"),
        ("..\\data\\x.csv", "X", ".dsjobs-vars/X/x.csv"),
        ("my\\file.csv", "", "my/file.csv"),
        (".\\data\\\\x.csv\\", "X", "data/x.csv"),
        ("\\\\server\\share\\", "X", ".dsjobs-vars/X/share"),
    ],
)
def test_job_relative_path(path: str, var: str, place: str) -> None:
    assert m.job_relative_path(m.FileDesc(path=path, var=var)) == place


@pytest.mark.parametrize(
    ("path", "var"),
    [("/etc/passwd", ""), ("a/../b", ""), ("/x", "../../etc"), (".", ""), ("a\\..\\..\\x", ""), ("C:\\x", ""),
     ("D:x", ""), ("\\x", "")],
)  # fmt: skip
def test_job_relative_path_refuses_unsafe_files(path: str, var: str) -> None:
    with pytest.raises(ValueError):
        m.job_relative_path(m.FileDesc(path=path, var=var))


def test_data_ttl_infinity() -> None:
    assert m.data_ttl_is_infinite(m.parse_duration("infinity"))
    assert not m.data_ttl_is_infinite(timedelta(days=14))


_MAPS = frozenset({"vars", "labels"})  # user maps, not objects of fields


def _with_unknown_keys(doc: object, depth: int = 0) -> object:
    """`doc` with a key no version of dsjobs knows added to every object in it."""
    if isinstance(doc, dict):
        out = {k: v if k in _MAPS else _with_unknown_keys(v, depth + 1) for k, v in doc.items()}
        out[f"fieldOfANewerVersion{depth}"] = {"any": ["value"]}
        return out
    if isinstance(doc, list):
        return [_with_unknown_keys(v, depth + 1) for v in doc]
    return doc


def test_what_the_cluster_stores_is_read_past_a_newer_versions_keys() -> None:
    # A newer operator (a rollback, a newer replica mid-rollout, the CRD applied first) wrote keys
    # this version does not know: they are skipped at every depth, the rest reads as ever.
    from dsjobs.models.base import read_stored

    spec, status = full_spec(), full_status()
    stored_spec, stored_status = _with_unknown_keys(spec.to_cr()), _with_unknown_keys(status.to_cr())
    assert read_stored(m.ProjectJobSpec, stored_spec) == spec
    assert read_stored(m.ProjectJobStatus, stored_status) == status
    # What a user or the API writes is still held to the known fields.
    with pytest.raises(ValidationError, match="fieldOfANewerVersion0"):
        m.ProjectJobSpec.model_validate(stored_spec)
    # Known keys keep their rules.
    with pytest.raises(ValidationError, match="phase"):
        read_stored(m.ProjectJobStatus, {**status.to_cr(), "phase": "NOT_A_PHASE"})


def test_a_status_patch_leaves_a_newer_versions_keys_alone() -> None:
    from dsjobs.controller.kube import merge_diff
    from dsjobs.models.base import known_of, read_stored

    stored = _with_unknown_keys({**full_status().to_cr(), "phase": "EXECUTING"})
    assert isinstance(stored, dict)
    new = {**full_status().to_cr(), "phase": "SUCCESS"}
    assert "fieldOfANewerVersion0" in merge_diff(stored, new)  # what it was: nulled
    read = read_stored(m.ProjectJobStatus, stored).to_cr()
    assert merge_diff(known_of(stored, read), new) == {"phase": "SUCCESS"}  # at every depth
    # A list the new status changes is written whole (a merge patch cannot do otherwise).
    more = {**new, "fileErrors": [*new["fileErrors"], new["fileErrors"][0]]}
    assert merge_diff(known_of(stored, read), more)["fileErrors"] == more["fileErrors"]


def _paths(doc: object, prefix: str = "") -> set[str]:
    """The dotted paths of the leaves of `doc` (an empty list or map is a leaf: it is written too)."""
    if isinstance(doc, list) and doc:
        return {p for v in doc for p in _paths(v, prefix + "[]")}
    if not isinstance(doc, dict) or not doc:
        return {prefix}
    return {p for k, v in doc.items() for p in _paths(v, f"{prefix}.{k}" if prefix else k)}


def test_a_new_spec_field_defaults_to_none() -> None:
    # The API writes a job's spec whole (to_cr leaves out only None): a new field with another
    # default would be in every job a newer API creates, and an operator rolled back to the build
    # before it ends every such job not yet started InvalidSpec ("is not a field this version of
    # dsjobs knows"). A field added after these must default to None (absent), or come with a
    # note in docs/admin.md's Upgrade on how to roll back.
    # Every optional object present, with only what it must have: the rest is what is written.
    params = {
        "cmd": "x",
        "inputFiles": [{"desc": {"path": "a"}, "sha256": "0" * 64, "sizeBytes": 1}],
        "outputFiles": [{"path": "o"}],
        "arguments": [{"name": "A", "value": "v"}],
        "outputDatasets": [{"name": "d", "var": "D", "sizeGb": 1}],
        "env": {
            "vars": {},
            "dockerImageSpec": {"imageUrl": "x"},
            "pythonEnv": {"condaYaml": "name: x", "pipOptions": {}},
        },
        "extendedWorkingStorage": {"sizeGb": 100},
        "gracefulShutdownParameters": {},
        "sparkParameters": {"connectorId": "c"},
    }
    spec = {"projectId": "p", "jobParameters": params, "retryPolicy": {}, "cancel": {}}
    written = m.ProjectJobSpec.model_validate(spec).to_cr()
    assert _paths(written) == {
        "clearData", "config", "createdById", "dataTtl", "desc", "execute", "finalized", "name",
        "parentJobId", "projectId",
        "cancel.graceful", "cancel.reason",
        "retryPolicy.backoffSeconds", "retryPolicy.maxAttempts", "retryPolicy.retryOnExitCodes",
        "jobParameters.arguments[].name", "jobParameters.arguments[].value",
        "jobParameters.attachProjectDisk", "jobParameters.cloudInstanceTypes", "jobParameters.cmd",
        "jobParameters.datasetIds", "jobParameters.s3MountIds", "jobParameters.env.vars",
        "jobParameters.env.dockerImageSpec.imageUrl", "jobParameters.env.dockerImageSpec.username",
        "jobParameters.env.pythonEnv.condaYaml", "jobParameters.env.pythonEnv.localModules",
        "jobParameters.env.pythonEnv.pythonVersion", "jobParameters.env.pythonEnv.requirements",
        "jobParameters.env.pythonEnv.pipOptions.extraIndexUrls",
        "jobParameters.env.pythonEnv.pipOptions.indexUrl",
        "jobParameters.env.pythonEnv.pipOptions.noDeps",
        "jobParameters.env.pythonEnv.pipOptions.trustedHosts",
        "jobParameters.extendedWorkingStorage.sizeGb", "jobParameters.extendedWorkingStorage.type",
        "jobParameters.gracefulShutdownParameters.signal",
        "jobParameters.sparkParameters.connectorId",
        "jobParameters.inputFiles[].compressionType", "jobParameters.inputFiles[].desc.path",
        "jobParameters.inputFiles[].desc.var", "jobParameters.inputFiles[].sha256",
        "jobParameters.inputFiles[].sizeBytes",
        "jobParameters.outputDatasets[].description", "jobParameters.outputDatasets[].labels",
        "jobParameters.outputDatasets[].name", "jobParameters.outputDatasets[].sizeGb",
        "jobParameters.outputDatasets[].var",
        "jobParameters.outputFiles[].path", "jobParameters.outputFiles[].var",
    }  # fmt: skip
