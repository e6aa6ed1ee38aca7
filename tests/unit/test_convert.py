"""dsjobs.convert: proto <-> models, table-tested, with round-trip properties."""

from __future__ import annotations

import base64
import subprocess
import sys
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dsjobs_strategies import SHA, full_spec, full_spec_alternatives, full_status, job_parameters
from google.protobuf.duration_pb2 import Duration
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel

from dsjobs import convert as c
from dsjobs import models as m
from dsjobs.convert import listsizes
from dsjobs.models import limits as L
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc
from dsjobs.validation import validate_job_spec

T0 = datetime(2025, 6, 1, 11, 0, 12, tzinfo=UTC)


def _file(path: str = "main.py", var: str = "", compression: int = jobs_pb2.NONE) -> jobs_pb2.File:
    return jobs_pb2.File(
        desc=jobs_pb2.FileDesc(path=path, var=var), sha256=SHA, size_bytes=7, compression_type=compression
    )


# --- proto -> model tables ------------------------------------------------------------------------


def test_minimal_parameters() -> None:
    params = c.job_parameters_from_proto(jobs_pb2.JobParameters(cmd="python main.py"))
    assert params == m.JobParameters(cmd="python main.py")
    assert params.env is None and params.graceful_shutdown_parameters is None


@pytest.mark.parametrize(
    ("proto_value", "model_value"),
    [
        (jobs_pb2.FILE_COMPRESSION_TYPE_UNSPECIFIED, m.CompressionType.NONE),
        (jobs_pb2.NONE, m.CompressionType.NONE),
        (jobs_pb2.ZIP, m.CompressionType.ZIP),
    ],
)
def test_compression_types(proto_value: int, model_value: m.CompressionType) -> None:
    params = c.job_parameters_from_proto(
        jobs_pb2.JobParameters(cmd="x", input_files=[_file(compression=proto_value)])
    )
    assert params.input_files[0].compression_type == model_value


def test_unknown_enum_numbers_are_conversion_errors() -> None:
    with pytest.raises(c.ConversionError) as err:
        c.job_parameters_from_proto(
            jobs_pb2.JobParameters(cmd="x", input_files=[_file(), _file(compression=9)])
        )
    assert err.value.path == "job_parameters.input_files[1].compression_type"
    pb = jobs_pb2.JobParameters(cmd="x")
    pb.extended_working_storage.type = 5  # type: ignore[assignment]
    with pytest.raises(c.ConversionError):
        c.job_parameters_from_proto(pb)


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (10**14, 0),
        (-(10**14), 0),
        (315_576_000_001, 0),
        (1, 1_000_000_000),
        (2**63 - 1, 0),
        (3601, -999_999_999),
        (-1, 1),
    ],
)
def test_durations_beyond_protobufs_range_are_conversion_errors(seconds: int, nanos: int) -> None:
    """timedelta overflows past ~2.7 million years: an error naming the field, never OverflowError."""
    pb = jobs_pb2.JobParameters(cmd="x")
    pb.graceful_shutdown_parameters.timeout.seconds = seconds
    pb.graceful_shutdown_parameters.timeout.nanos = nanos
    with pytest.raises(c.ConversionError) as err:
        c.job_parameters_from_proto(pb, path="job_parameters_overrides")
    assert err.value.path == "job_parameters_overrides.graceful_shutdown_parameters.timeout"
    assert "315576000000" in str(err.value) or "nanos must have the sign of seconds" in str(err.value)
    req = svc.CreateProjectJobRequest(job_parameters=jobs_pb2.JobParameters(cmd="x"))
    req.data_ttl.seconds = seconds
    req.data_ttl.nanos = nanos
    with pytest.raises(c.ConversionError) as err:
        c.spec_from_create_request(req)
    assert err.value.path == "data_ttl"


def test_durations_at_protobufs_limit_convert() -> None:
    assert c.from_duration(Duration(seconds=315_576_000_000, nanos=999_999_999)) > timedelta(days=3_652_000)


def test_defaults_for_proto_zero_values() -> None:
    pb = jobs_pb2.JobParameters(cmd="x")
    pb.graceful_shutdown_parameters.SetInParent()
    pb.extended_working_storage.size_gb = 200
    params = c.job_parameters_from_proto(pb)
    assert params.graceful_shutdown_parameters == m.GracefulShutdownParameters(timeout=None, signal=15)
    assert params.extended_working_storage == m.ExtendedWorkingStorage(type=m.StorageType.SSD, size_gb=200)


def test_every_field_maps() -> None:
    pb = jobs_pb2.JobParameters(
        input_files=[_file("main.py", "MAIN"), _file("data", "", jobs_pb2.ZIP)],
        output_files=[jobs_pb2.FileDesc(path="out.txt", var="OUT")],
        s3_mount_ids=["s3a"],
        dataset_ids=["ds1"],
        cmd="python ${MAIN} ${OUT}",
        attach_project_disk=True,
        cloud_instance_types=[
            jobs_pb2.CloudInstanceType(name="g1.1"),
            jobs_pb2.CloudInstanceType(name="c1.4"),
        ],
        extended_working_storage=jobs_pb2.ExtendedWorkingStorage(
            type=jobs_pb2.ExtendedWorkingStorage.SSD, size_gb=150
        ),
        arguments=[jobs_pb2.Argument(name="LR", value="0.1")],
        output_datasets=[
            jobs_pb2.OutputDatasetDesc(name="d", description="x", labels={"a": "b"}, size_gb=3, var="D")
        ],
        graceful_shutdown_parameters=jobs_pb2.GracefulShutdownParameters(
            timeout=Duration(seconds=30, nanos=500_000_000), signal=2
        ),
        spark_parameters=jobs_pb2.SparkParameters(connector_id="sp1"),
        env=jobs_pb2.Environment(
            vars={"A": "1"},
            docker_image_resource_id="img1",
            python_env=jobs_pb2.PythonEnv(
                conda_yaml="c",
                local_modules=[_file("/tmp/t", "_LOCAL_MODULE_0", jobs_pb2.ZIP)],
                python_version="3.11",
                requirements=["numpy"],
                pip_options=jobs_pb2.PipOptions(
                    index_url="https://i/simple",
                    extra_index_urls=["https://e"],
                    trusted_hosts=["i"],
                    no_deps=True,
                ),
            ),
        ),
    )
    params = c.job_parameters_from_proto(pb)
    assert params.input_files[0] == m.File(
        desc=m.FileDesc(path="main.py", var="MAIN"), sha256=SHA, size_bytes=7
    )
    assert params.input_files[1].compression_type == m.CompressionType.ZIP
    assert params.output_files == [m.FileDesc(path="out.txt", var="OUT")]
    assert (params.s3_mount_ids, params.dataset_ids, params.attach_project_disk) == (["s3a"], ["ds1"], True)
    assert [t.name for t in params.cloud_instance_types] == ["g1.1", "c1.4"]
    assert params.extended_working_storage == m.ExtendedWorkingStorage(size_gb=150)
    assert params.arguments == [m.Argument(name="LR", value="0.1")]
    assert params.output_datasets == [
        m.OutputDatasetDesc(name="d", description="x", labels={"a": "b"}, size_gb=3, var="D")
    ]
    assert params.graceful_shutdown_parameters == m.GracefulShutdownParameters(
        timeout=timedelta(seconds=30.5), signal=2
    )
    assert params.spark_parameters == m.SparkParameters(connector_id="sp1")
    assert params.env is not None and params.env.python_env is not None
    assert params.env.vars == {"A": "1"} and params.env.docker_image_resource_id == "img1"
    assert params.env.python_env.pip_options == m.PipOptions(
        index_url="https://i/simple", extra_index_urls=["https://e"], trusted_hosts=["i"], no_deps=True
    )
    assert params.env.python_env.local_modules[0].desc.var == "_LOCAL_MODULE_0"
    assert c.job_parameters_to_proto(params) == pb


# --- the docker password --------------------------------------------------------------------------


def _docker_params(**password: str) -> jobs_pb2.JobParameters:
    return jobs_pb2.JobParameters(
        cmd="x",
        env=jobs_pb2.Environment(
            docker_image_spec=jobs_pb2.DockerImageSpec(
                image_url="cr.example.com/a/b:1", username="u", **password
            )
        ),
    )


def test_a_plain_text_password_goes_to_a_secret() -> None:
    pb = _docker_params(password_plain_text="hunter2")
    assert c.docker_password_from_proto(pb) == "hunter2"
    name = c.docker_password_secret_name("job1")
    params = c.job_parameters_from_proto(pb, docker_password_secret_name=name)
    assert params.env is not None and params.env.docker_image_spec is not None
    assert params.env.docker_image_spec.password_secret_ref == m.SecretKeyRef(name="job1-docker-password")
    assert "hunter2" not in str(params.model_dump())
    # and it is never sent back
    back = c.job_parameters_to_proto(params)
    assert back.env.docker_image_spec.WhichOneof("password") is None
    assert back.env.docker_image_spec.image_url == "cr.example.com/a/b:1"


def test_a_plain_text_password_without_a_secret_is_refused() -> None:
    with pytest.raises(c.ConversionError) as err:
        c.job_parameters_from_proto(_docker_params(password_plain_text="x"))
    assert err.value.path == "job_parameters.env.docker_image_spec.password_plain_text"


def test_a_project_secret_password_round_trips() -> None:
    pb = _docker_params(password_ds_secret_name="DOCKER_PW")
    assert c.docker_password_from_proto(pb) is None
    params = c.job_parameters_from_proto(pb)
    assert params.env is not None and params.env.docker_image_spec is not None
    assert params.env.docker_image_spec.password_ds_secret_name == "DOCKER_PW"
    assert c.job_parameters_to_proto(params) == pb
    assert c.docker_password_from_proto(jobs_pb2.JobParameters(cmd="x")) is None


# --- round trips ----------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(job_parameters(with_secret_ref=False))
def test_model_proto_model_is_identity(params: m.JobParameters) -> None:
    assert c.job_parameters_from_proto(c.job_parameters_to_proto(params)) == params


@_SETTINGS
@given(job_parameters(with_secret_ref=False))
def test_proto_model_proto_is_identity(params: m.JobParameters) -> None:
    pb = c.job_parameters_to_proto(params)
    wire = pb.SerializeToString(deterministic=True)
    again = jobs_pb2.JobParameters.FromString(wire)
    assert c.job_parameters_to_proto(c.job_parameters_from_proto(again)) == again


def _ours(field: Any) -> bool:
    """A field whose own fields count: a message of the yandex protos, not a map entry."""
    nested = field.message_type
    return nested is not None and nested.full_name.startswith("yandex.") and not nested.GetOptions().map_entry


def _proto_paths(desc: Any, prefix: str = "") -> set[str]:
    """Every field path of a message type, through its nested yandex messages."""
    out: set[str] = set()
    for f in desc.fields:
        out.add(prefix + f.name)
        if _ours(f):
            out |= _proto_paths(f.message_type, f"{prefix}{f.name}.")
    return out


def _set_paths(msg: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f, value in msg.ListFields():
        out.add(prefix + f.name)
        if _ours(f):
            for item in value if f.is_repeated else [value]:
                out |= _set_paths(item, f"{prefix}{f.name}.")
    return out


def test_the_converter_fills_every_field_of_the_proto() -> None:
    # Driven by the proto, not the model: a field the proto gains and the converter ignores fails
    # here (the round trips above only see fields the model has).
    every = _proto_paths(jobs_pb2.JobParameters.DESCRIPTOR)
    filled: set[str] = set()
    for spec in [full_spec(), *full_spec_alternatives()]:
        filled |= _set_paths(c.job_parameters_to_proto(spec.job_parameters))
    # A registry password reaches a CR only as a Secret reference (the API moves it there).
    assert every - filled == {"env.docker_image_spec.password_plain_text"}
    plain = jobs_pb2.JobParameters()
    plain.env.docker_image_spec.image_url = "cr.example.com/i:1"
    plain.env.docker_image_spec.password_plain_text = "pw"
    assert c.docker_password_from_proto(plain) == "pw"


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (through Optional, list, dict)."""
    if typing.get_origin(tp) is None:
        return [tp] if isinstance(tp, type) and issubclass(tp, BaseModel) else []
    return [found for arg in typing.get_args(tp) for found in _models_in(arg)]


def _model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        out.add(prefix + name)
        for nested in _models_in(field.annotation):
            out |= _model_paths(nested, f"{prefix}{name}.")
    return out


def test_the_model_and_the_proto_have_the_same_fields() -> None:
    # A field the model gains without the proto (or the reverse) is one the round trips never see:
    # the strategies do not draw it, and the converter drops it without a word.
    secret_ref = "env.docker_image_spec.password_secret_ref"
    assert _model_paths(m.JobParameters) - _proto_paths(jobs_pb2.JobParameters.DESCRIPTOR) == {
        secret_ref,  # the API's Secret of a plain-text password, or a project secret's name
        f"{secret_ref}.name",
        f"{secret_ref}.key",
    }
    assert _proto_paths(jobs_pb2.JobParameters.DESCRIPTOR) - _model_paths(m.JobParameters) == {
        "env.docker_image_spec.password_plain_text",  # moved into a Secret, never in the model
    }


def test_the_full_specs_round_trip_through_the_proto() -> None:
    # Every field the strategies' hand-made specs fill, where the drawn ones may leave a new one at
    # its default on both sides.
    for spec in [full_spec(), *full_spec_alternatives()]:
        params = spec.job_parameters
        docker = params.env.docker_image_spec if params.env is not None else None
        if docker is not None and docker.password_secret_ref is not None:
            # The password stays in its Secret: the wire carries no reference to it.
            env = params.env.model_copy(
                update={"docker_image_spec": docker.model_copy(update={"password_secret_ref": None})}
            )
            params = params.model_copy(update={"env": env})
        assert c.job_parameters_from_proto(c.job_parameters_to_proto(params)) == params


_OFFICIAL_BUILD = """
import base64, os, sys
from datasphere.config import parse_config
from pathlib import Path
os.chdir(sys.argv[1])
cfg = parse_config(Path("config.yaml"))
print(base64.b64encode(cfg.get_job_params(None, []).SerializeToString()).decode())
"""
_OFFICIAL_COMPARE = """
import base64, sys
from datasphere.api import jobs_pb2
a, b = (jobs_pb2.JobParameters.FromString(base64.b64decode(x)) for x in sys.argv[1:3])
print("equal" if a == b else f"differ:\\n{a}\\n---\\n{b}")
"""
CLI_CONFIG = """\
name: train
cmd: python ./main.py --data ${DATA} --out ${RESULT} --lr ${LR} --s3 ${S3}
args:
  LR: "0.1"
inputs:
  - ./main.py
  - data/train.csv: DATA
outputs:
  - result.txt: RESULT
  - logs/
s3-mounts:
  - bfbq0as4v1x7n8a2k3mr: S3
env:
  vars:
    - MODE: fast
  docker:
    image: cr.example.com/team/image:1.0
    username: robot
    password:
      secret-id: DOCKER_PW
cloud-instance-types: [g1.1, c1.4]
working-storage:
  size: 150Gb
graceful-shutdown:
  signal: SIGINT
  timeout: 30s
"""


def _official(script: str, *args: str) -> str:
    # The official client registers the same proto names as dsjobs.pb: it gets its own process.
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_what_the_official_cli_sends_converts_validates_and_comes_back(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CLI_CONFIG)
    (tmp_path / "main.py").write_text("print(1)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("a,b\n")
    sent = base64.b64decode(_official(_OFFICIAL_BUILD, str(tmp_path)))
    ours = jobs_pb2.JobParameters.FromString(sent)
    params = c.job_parameters_from_proto(ours)
    spec = m.ProjectJobSpec(project_id="p1", job_parameters=params)
    assert validate_job_spec(spec) == []
    assert params.cmd.endswith("--s3 ${bfbq0as4v1x7n8a2k3mr}")  # the CLI sends mount ids, not vars
    assert params.input_files[0].desc.path == "./main.py"
    assert m.job_relative_path(params.input_files[0].desc) == "main.py"
    back = c.job_parameters_to_proto(params).SerializeToString()
    verdict = _official(_OFFICIAL_COMPARE, base64.b64encode(sent).decode(), base64.b64encode(back).decode())
    assert verdict == "equal"


# --- requests ---------------------------------------------------------------------------------------


def test_spec_from_create_request() -> None:
    req = svc.CreateProjectJobRequest(
        project_id="p1",
        job_parameters=jobs_pb2.JobParameters(cmd="echo hi"),
        config="cmd: echo hi\n",
        name="n",
        desc="d",
        data_ttl=Duration(seconds=14 * 86400),
    )
    spec = c.spec_from_create_request(req, created_by_id="user-1")
    assert spec == m.ProjectJobSpec(
        project_id="p1",
        name="n",
        desc="d",
        config="cmd: echo hi\n",
        data_ttl=timedelta(days=14),
        created_by_id="user-1",
        job_parameters=m.JobParameters(cmd="echo hi"),
        execute=False,
    )
    req.ClearField("data_ttl")
    assert c.spec_from_create_request(req).data_ttl == L.DEFAULT_DATA_TTL


def test_set_data_ttl() -> None:
    assert c.data_ttl_from_set_request(svc.SetProjectJobDataTtlRequest(job_id="j")) == L.INFINITE_TTL
    req = svc.SetProjectJobDataTtlRequest(job_id="j", ttl=Duration(seconds=86400))
    assert c.data_ttl_from_set_request(req) == timedelta(days=1)


def test_clone_applies_the_clis_fork_overrides() -> None:
    source = full_spec()
    overrides = jobs_pb2.JobParameters(
        input_files=[_file("other.py", "MAIN")],
        output_files=[jobs_pb2.FileDesc(path="out/other.txt", var="RESULT")],
        arguments=[jobs_pb2.Argument(name="LR", value="0.5")],
        env=jobs_pb2.Environment(vars={"NEW": "1"}, docker_image_resource_id="img2"),
        cloud_instance_types=[jobs_pb2.CloudInstanceType(name="c1.8")],
        extended_working_storage=jobs_pb2.ExtendedWorkingStorage(size_gb=300),
    )
    req = svc.CloneProjectJobRequest(
        source_job_id="job-src",
        job_parameters_overrides=overrides,
        name="copy",
        data_ttl=Duration(seconds=7200),
    )
    spec = c.spec_from_clone_request(source, req, created_by_id="user-2")
    p = spec.job_parameters
    assert (
        p.input_files[0].desc.path == "other.py" and p.input_files[1] == source.job_parameters.input_files[1]
    )
    assert p.output_files[0].path == "out/other.txt"
    assert p.arguments == [m.Argument(name="LR", value="0.5")]
    assert p.env is not None and p.env.vars == {"NEW": "1"}
    assert p.env.docker_image_resource_id == "img2" and p.env.docker_image_spec is None
    assert source.job_parameters.env is not None
    assert p.env.python_env == source.job_parameters.env.python_env
    assert [t.name for t in p.cloud_instance_types] == ["c1.8"]
    assert p.extended_working_storage == m.ExtendedWorkingStorage(size_gb=300)
    assert (p.cmd, p.s3_mount_ids, p.attach_project_disk) == (
        source.job_parameters.cmd,
        source.job_parameters.s3_mount_ids,
        True,
    )
    assert (spec.name, spec.desc, spec.parent_job_id, spec.data_ttl) == (
        "copy",
        "a job",
        "job-src",
        timedelta(hours=2),
    )
    assert spec.execute is False and spec.cancel is None and spec.created_by_id == "user-2"


def test_clone_without_overrides_copies_the_parameters() -> None:
    source = full_spec()
    spec = c.spec_from_clone_request(source, svc.CloneProjectJobRequest(source_job_id="s"))
    assert spec.job_parameters == source.job_parameters and spec.data_ttl == source.data_ttl


# --- status -> Job --------------------------------------------------------------------------------


def test_job_to_proto() -> None:
    spec, status = full_spec(), full_status()
    job = c.job_to_proto("job1", spec, status)
    assert (job.id, job.name, job.desc, job.project_id, job.created_by_id, job.parent_job_id) == (
        "job1", "train", "a job", "proj1", "user-1", "job-0"
    )  # fmt: skip
    assert job.status == jobs_pb2.SUCCESS and job.config == spec.config
    assert c.from_timestamp(job.created_at) == T0 and c.from_timestamp(job.finished_at) == T0
    assert c.from_timestamp(job.started_at) == T0
    assert c.from_timestamp(job.data_expires_at) == T0 + timedelta(days=14)
    assert job.actual_cloud_instance_type.name == "g1.1"
    assert job.output_files[0] == jobs_pb2.File(
        desc=jobs_pb2.FileDesc(path="out/result.txt", var="RESULT"), sha256=SHA, size_bytes=3,
        compression_type=jobs_pb2.NONE,
    )  # fmt: skip
    assert job.log_files[0].desc.path == "stdout.txt" and job.diagnostic_files[0].desc.path == ".system.log"
    assert job.file_errors[0].output_file_desc.path == "missing.txt"
    assert job.file_errors[0].type == jobs_pb2.FileUploadError.NOT_FOUND
    assert job.file_errors[1].WhichOneof("file_type") == "log_file_name"
    assert job.file_errors[1].type == jobs_pb2.FileUploadError.UPLOAD_FAILED
    assert job.output_datasets[0].id == "dsid1" and job.output_datasets[0].desc.var == "OUTDS"
    assert (job.data_size_bytes, job.status_details, job.data_cleared) == (100, "done", False)
    assert job.job_parameters == c.job_parameters_to_proto(spec.job_parameters)


def test_the_converter_fills_every_field_of_job_and_job_metadata() -> None:
    # Driven by the proto, as for JobParameters: a Job field the converter ignores (one a proto
    # upgrade brings, or one dropped from job_to_proto) fails here; test_job_to_proto lists fields.
    spec, status = full_spec(), full_status().model_copy(update={"data_cleared": True})
    for message, built in (
        (jobs_pb2.Job, c.job_to_proto("job1", spec, status)),
        (jobs_pb2.JobMetadata, c.job_metadata_to_proto("job1", spec, status)),
    ):
        unset = {f.name for f in message.DESCRIPTOR.fields} - {f.name for f, _ in built.ListFields()}
        assert unset == set(), f"{message.DESCRIPTOR.name}: {sorted(unset)}"


def test_a_job_without_status_is_creating() -> None:
    job = c.job_to_proto("job1", full_spec(), None, created_at=T0)
    assert job.status == jobs_pb2.CREATING and c.from_timestamp(job.created_at) == T0
    for field in ("started_at", "finished_at", "data_expires_at", "actual_cloud_instance_type"):
        assert not job.HasField(field)


@pytest.mark.parametrize("phase", list(m.JobPhase))
def test_every_phase_has_its_proto_status(phase: m.JobPhase) -> None:
    assert jobs_pb2.JobStatus.Name(c.phase_to_proto(phase)) == phase.value


def test_job_metadata_and_progress() -> None:
    meta = c.job_metadata_to_proto("job1", full_spec(), full_status())
    assert (meta.id, meta.name, meta.description, meta.status, meta.status_details) == (
        "job1", "train", "a job", jobs_pb2.SUCCESS, "done"
    )  # fmt: skip
    assert c.from_timestamp(meta.data_expires_at) == T0 + timedelta(days=14)
    assert meta.project_id == "proj1" and meta.parent_job_id == "job-0" and meta.created_by_id == "user-1"
    progress = c.progress_to_proto(m.Progress(progress=21, message="epoch 2", create_time=T0))
    assert (progress.progress, progress.message, c.from_timestamp(progress.create_time)) == (
        21,
        "epoch 2",
        T0,
    )
    assert not c.progress_to_proto(m.Progress()).HasField("create_time")


def test_job_from_resource() -> None:
    obj = {
        "apiVersion": m.API_VERSION,
        "kind": "ProjectJob",
        "metadata": {"name": "job1", "namespace": "p1", "creationTimestamp": "2025-06-01T11:00:12Z"},
        "spec": full_spec().to_cr(),
    }
    job = c.job_from_resource(obj)
    assert job.id == "job1" and job.status == jobs_pb2.CREATING and c.from_timestamp(job.created_at) == T0
    obj["status"] = full_status().to_cr()
    assert c.job_from_resource(obj) == c.job_to_proto("job1", full_spec(), full_status())


def test_times_and_durations_beyond_what_protobuf_holds_saturate() -> None:
    # A status time the CRD's date-time format accepts but UTC cannot hold, and a graceful-shutdown
    # timeout of `infinity`: Get/List answered INTERNAL, or a Duration no client could print.
    early = datetime.fromisoformat("0001-01-01T00:00:00+00:01")
    assert c.common.timestamp(early).ToDatetime() == datetime(1, 1, 1)
    late = datetime.fromisoformat("9999-12-31T23:59:59-00:01")
    assert c.common.timestamp(late).ToDatetime() == datetime(9999, 12, 31, 23, 59, 59, 999999)
    assert c.common.duration(timedelta.max).seconds == c.common.MAX_DURATION_SECONDS
    assert c.common.duration(timedelta(days=-(10**8))).seconds == -c.common.MAX_DURATION_SECONDS
    assert c.common.duration(timedelta(seconds=90)).seconds == 90


# --- list sizes, checked on the message before it is converted -----------------------------------


def _repeated_fields(descriptor: Any, path: str = "") -> list[str]:
    found = []
    for f in descriptor.fields:
        sub = f"{path}.{f.name}" if path else f.name
        entry = f.message_type
        is_map = entry is not None and entry.GetOptions().map_entry
        if f.is_repeated:
            found.append(sub)
        if entry is not None and not is_map and not entry.full_name.startswith("google."):
            found += _repeated_fields(entry, sub)
    return found


def _fill(params: jobs_pb2.JobParameters, path: str, count: int) -> None:
    """`count` more entries in the list or map at `path` (a list of messages on the way has one)."""
    *parents, last = path.split(".")
    message: Any = params
    for name in parents:
        message = getattr(message, name)
        if hasattr(message, "add"):  # a list of messages
            message = message[0] if len(message) else message.add()
    target = getattr(message, last)
    for i in range(len(target), len(target) + count):
        if hasattr(target, "add"):
            target.add()
        elif hasattr(target, "append"):
            target.append(f"e{i}")
        else:
            target[f"k{i}"] = "v"


def test_list_limits_cover_every_list_of_the_proto() -> None:
    limits = listsizes.list_limits()
    assert sorted(_repeated_fields(jobs_pb2.JobParameters.DESCRIPTOR)) == sorted(limits)
    assert limits["env.python_env.requirements"] == L.MAX_REQUIREMENTS
    assert limits["env.vars"] == L.MAX_ENV_VARS


@pytest.mark.parametrize("path", sorted(_repeated_fields(jobs_pb2.JobParameters.DESCRIPTOR)))
def test_an_oversized_list_is_refused_as_validation_refuses_it(path: str) -> None:
    limit = listsizes.list_limits()[path]
    req = svc.CreateProjectJobRequest(
        project_id="p", name="n", job_parameters=jobs_pb2.JobParameters(cmd="x")
    )
    _fill(req.job_parameters, path, limit)
    assert listsizes.oversized_lists(req.job_parameters, "job_parameters") == []
    _fill(req.job_parameters, path, 1)
    early = listsizes.oversized_lists(req.job_parameters, "job_parameters")
    where = "job_parameters." + path.replace("output_datasets.", "output_datasets[0].")
    assert [(p.path, p.rule, p.message) for p in early] == [
        (where, "max-items", f"must have at most {limit} entries, has {limit + 1}")
    ]
    spec = c.spec_from_create_request(req, created_by_id="u", docker_password_secret_name="s")
    assert early[0] in validate_job_spec(spec)


def test_the_entries_of_an_oversized_list_are_not_looked_at() -> None:
    params = jobs_pb2.JobParameters(cmd="x")
    for i in range(1000):
        params.output_datasets.add(name=f"d{i}", labels={f"k{j}": "v" for j in range(65)})
    problems = listsizes.oversized_lists(params, "job_parameters_overrides")
    assert [p.path for p in problems] == ["job_parameters_overrides.output_datasets"]


def test_clone_keeps_the_source_s_config_and_retry_policy() -> None:
    from dsjobs_strategies import full_spec

    from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc

    source = full_spec()
    clone = c.spec_from_clone_request(source, svc.CloneProjectJobRequest(source_job_id="s"))
    assert clone.config == source.config and clone.retry_policy == source.retry_policy


def test_job_metadata_carries_the_job_s_times() -> None:
    # The Execute operation's metadata: the CLI shows them.
    from dsjobs_strategies import full_spec, full_status

    status = full_status()
    meta = c.job_metadata_to_proto("job1", full_spec(), status)
    assert c.from_timestamp(meta.created_at) == status.created_at
    assert c.from_timestamp(meta.started_at) == status.started_at
    assert c.from_timestamp(meta.finished_at) == status.finished_at
