"""Hypothesis strategies and fixtures for job specs: valid specs, fully populated examples.

Models are built by keyword inside composites, not with `st.builds`: pydantic's signature uses the
camelCase aliases, so `builds` would pass both spellings.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from dsjobs import models as m
from dsjobs.models import limits as L
from dsjobs.s3http import EMPTY_SHA256

SHA = "0123456789abcdef" * 4
# Other contents of full_spec (one content has one size).
SHA_DATA = "fedcba9876543210" * 4
SHA_MODULE = "00112233445566778899aabbccddeeff" * 2

_VAR_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
_SEGMENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)

safe_paths = st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join).filter(m.is_safe_relative_path)
sha256s = st.text("0123456789abcdef", min_size=64, max_size=64)


def _size_of(sha256: str) -> int:
    """One content has one size (validation's sha256-sizes): the size follows from the hash."""
    return 1 + int(sha256, 16) % (L.MAX_FILE_SIZE_BYTES // 4)


# The empty file has one hash and is never a ZIP (validation's sha256-size and zip-empty).
contents = st.one_of(
    st.builds(
        lambda sha256, compression_type: {
            "sha256": sha256,
            "size_bytes": _size_of(sha256),
            "compression_type": compression_type,
        },
        sha256=sha256s.filter(lambda h: h != EMPTY_SHA256),
        compression_type=st.sampled_from(m.CompressionType),
    ),
    st.just({"sha256": EMPTY_SHA256, "size_bytes": 0, "compression_type": m.CompressionType.NONE}),
)
resource_ids = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
instance_type_names = st.from_regex(r"\A[a-z][a-z0-9]{0,3}\.[a-z0-9]{1,4}\Z")
env_names = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,12}\Z").filter(
    lambda n: (
        n not in L.RESERVED_ENV_VARS
        and n not in L.SHELL_SPECIAL_ENV_VARS
        and not n.startswith(L.RESERVED_ENV_PREFIX)
    )
)
printable = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"), max_size=30
)
utc_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
durations_ms = st.integers(min_value=1000, max_value=3600 * 1000).map(lambda ms: timedelta(milliseconds=ms))


def _none_inside_another(paths: list[str]) -> bool:
    """No input (output) placed inside another (`input-path-nested`, `output-path-nested`)."""
    places = [m.normalize_relative_path(p) for p in paths]
    return not any(q.startswith(p + "/") for p in places for q in places)


def _none_inside(outputs: list[str], inputs: list[str]) -> bool:
    """No output placed inside an input (`output-in-input-file`, for a file input)."""
    places = [m.normalize_relative_path(p) for p in inputs]
    return not any(m.normalize_relative_path(o).startswith(p + "/") for o in outputs for p in places)


@st.composite
def job_parameters(draw: st.DrawFn, *, with_secret_ref: bool = True) -> m.JobParameters:
    """Valid JobParameters: unique vars, safe paths, declared `${...}` references only."""
    names = draw(
        st.lists(
            st.text(_VAR_ALPHABET, min_size=1, max_size=8).filter(lambda v: v not in L.RESERVED_CMD_VARS),
            unique=True,
            min_size=12,
            max_size=12,
        )
    )
    pool = iter(names)
    n_in = draw(st.integers(0, 3))
    in_paths = draw(
        st.lists(safe_paths, unique_by=m.normalize_relative_path, min_size=n_in, max_size=n_in).filter(
            _none_inside_another
        )
    )
    inputs = [
        m.File(desc=m.FileDesc(path=p, var=next(pool) if draw(st.booleans()) else ""), **draw(contents))
        for p in in_paths
    ]
    n_out = draw(st.integers(0, 3))
    out_paths = draw(
        st.lists(safe_paths, unique_by=m.normalize_relative_path, min_size=n_out, max_size=n_out)
        .filter(_none_inside_another)
        .filter(lambda outs: _none_inside(outs, in_paths))
    )
    outputs = [m.FileDesc(path=p, var=next(pool) if draw(st.booleans()) else "") for p in out_paths]
    ids = [i for i in draw(st.lists(resource_ids, unique=True, max_size=4)) if i not in names]
    split = draw(st.integers(0, len(ids)))
    arguments = [m.Argument(name=next(pool), value=draw(printable)) for _ in range(draw(st.integers(0, 2)))]
    declared = [d.desc.var for d in inputs] + [d.var for d in outputs] + ids + [a.name for a in arguments]
    refs = [f"${{{v}}}" for v in declared if v]
    cmd = "python main.py " + " ".join(draw(st.permutations(refs)))
    env = None
    if draw(st.booleans()):
        docker_id, docker_spec = None, None
        choice = draw(st.integers(0, 2))
        if choice == 1:
            docker_id = draw(resource_ids)
        elif choice == 2:
            password = draw(st.integers(0, 2 if with_secret_ref else 1))
            docker_spec = m.DockerImageSpec(
                image_url=draw(
                    st.sampled_from(["ubuntu", "python:3.11-slim", "cr.example.com:5000/team/img:1.2"])
                ),
                username=draw(st.sampled_from(["", "robot"])),
                password_ds_secret_name="registry-password" if password == 1 else None,
                password_secret_ref=m.SecretKeyRef(name="job-docker", key="password")
                if password == 2
                else None,
            )
        python = None
        if draw(st.booleans()):
            python = m.PythonEnv(
                conda_yaml=draw(st.sampled_from(["", "name: x\n"])),
                local_modules=[
                    m.File(
                        desc=m.FileDesc(path="/tmp/tmpabc123", var="_LOCAL_MODULE_0"),
                        sha256=(module_sha := draw(sha256s.filter(lambda h: h != EMPTY_SHA256))),
                        size_bytes=_size_of(module_sha),
                        compression_type=m.CompressionType.ZIP,
                    )
                ]
                if draw(st.booleans())
                else [],
                python_version=draw(st.sampled_from(["", "3", "3.11", "3.11.4"])),
                requirements=draw(
                    st.lists(st.sampled_from(["numpy==2.1.0", "pandas", "torch>=2"]), max_size=3)
                ),
                pip_options=m.PipOptions(
                    index_url="https://pypi.example.com/simple",
                    extra_index_urls=["https://extra.example.com/simple"],
                    trusted_hosts=["pypi.example.com", "10.0.0.1:8080"],
                    no_deps=draw(st.booleans()),
                )
                if draw(st.booleans())
                else None,
            )
        env = m.Environment(
            vars=draw(st.dictionaries(env_names, printable, max_size=3)),
            docker_image_resource_id=docker_id,
            docker_image_spec=docker_spec,
            python_env=python,
        )
    return m.JobParameters(
        input_files=inputs,
        output_files=outputs,
        s3_mount_ids=ids[:split],
        dataset_ids=ids[split:],
        cmd=cmd,
        env=env,
        attach_project_disk=draw(st.booleans()),
        cloud_instance_types=[
            m.CloudInstanceType(name=n) for n in draw(st.lists(instance_type_names, unique=True, max_size=3))
        ],
        extended_working_storage=draw(
            st.none()
            | st.integers(L.MIN_WORKING_STORAGE_GB, L.MAX_WORKING_STORAGE_GB).map(
                lambda n: m.ExtendedWorkingStorage(size_gb=n)
            )
        ),
        arguments=arguments,
        output_datasets=[
            m.OutputDatasetDesc(
                name=f"ds-{i}",
                description=draw(printable),
                labels=draw(st.dictionaries(st.sampled_from(["a", "team"]), st.sampled_from(["x", "y"]))),
                size_gb=draw(st.integers(0, 100)),
                var=next(pool),
            )
            for i in range(draw(st.integers(0, 2)))
        ],
        graceful_shutdown_parameters=draw(
            st.none()
            | st.tuples(st.none() | durations_ms, st.sampled_from(sorted(L.SHUTDOWN_SIGNALS.values()))).map(
                lambda ts: m.GracefulShutdownParameters(timeout=ts[0], signal=ts[1])
            )
        ),
        spark_parameters=draw(st.none() | resource_ids.map(lambda c: m.SparkParameters(connector_id=c))),
    )


@st.composite
def job_specs(draw: st.DrawFn, *, with_secret_ref: bool = True) -> m.ProjectJobSpec:
    return m.ProjectJobSpec(
        project_id=draw(resource_ids),
        name=draw(printable),
        desc=draw(printable),
        config=draw(st.sampled_from(["", "cmd: python main.py\n"])),
        data_ttl=draw(
            st.sampled_from([L.DEFAULT_DATA_TTL, L.INFINITE_TTL, timedelta(hours=1), timedelta(days=365)])
        ),
        created_by_id=draw(st.sampled_from(["", "user-1"])),
        parent_job_id=draw(st.sampled_from(["", "job-0"])),
        job_parameters=draw(job_parameters(with_secret_ref=with_secret_ref)),
        execute=draw(st.booleans()),
        cancel=draw(
            st.none()
            | st.tuples(printable, st.booleans(), utc_times).map(
                lambda t: m.CancelRequest(reason=t[0], graceful=t[1], requested_at=t[2])
            )
        ),
        clear_data=draw(st.booleans()),
        retry_policy=draw(
            st.none()
            | st.tuples(
                st.integers(1, L.MAX_ATTEMPTS), st.integers(0, 60), st.lists(st.integers(1, 255), max_size=3)
            ).map(lambda t: m.RetryPolicy(max_attempts=t[0], backoff_seconds=t[1], retry_on_exit_codes=t[2]))
        ),
    )


def full_spec() -> m.ProjectJobSpec:
    """A spec with every field set (the CRD coverage test walks it)."""
    return m.ProjectJobSpec(
        project_id="proj1",
        name="train",
        desc="a job",
        config="cmd: python main.py\n",
        data_ttl=timedelta(days=14),
        created_by_id="user-1",
        parent_job_id="job-0",
        execute=True,
        cancel=m.CancelRequest(reason="user", graceful=True, requested_at=datetime(2025, 6, 1, tzinfo=UTC)),
        clear_data=True,
        retry_policy=m.RetryPolicy(max_attempts=3, backoff_seconds=5, retry_on_exit_codes=[137]),
        job_parameters=m.JobParameters(
            input_files=[
                m.File(desc=m.FileDesc(path="main.py", var="MAIN"), sha256=SHA, size_bytes=10),
                m.File(
                    desc=m.FileDesc(path="data"),
                    sha256=SHA_DATA,
                    size_bytes=20,
                    compression_type=m.CompressionType.ZIP,
                ),
            ],
            output_files=[m.FileDesc(path="out/result.txt", var="RESULT")],
            s3_mount_ids=["s3conn1"],
            dataset_ids=["dataset1"],
            cmd="python ${MAIN} --out ${RESULT} --s3 ${s3conn1} --ds ${dataset1} --lr ${LR}",
            env=m.Environment(
                vars={"FOO": "bar"},
                docker_image_spec=m.DockerImageSpec(
                    image_url="cr.example.com/team/image:1.0",
                    username="robot",
                    password_secret_ref=m.SecretKeyRef(name="job-docker", key="password"),
                ),
                python_env=m.PythonEnv(
                    conda_yaml="name: x\n",
                    local_modules=[
                        m.File(
                            desc=m.FileDesc(path="/tmp/tmpx", var="_LOCAL_MODULE_0"),
                            sha256=SHA_MODULE,
                            size_bytes=5,
                            compression_type=m.CompressionType.ZIP,
                        )
                    ],
                    python_version="3.11",
                    requirements=["numpy==2.1.0"],
                    pip_options=m.PipOptions(
                        index_url="https://pypi.example.com/simple",
                        extra_index_urls=["https://extra.example.com/simple"],
                        trusted_hosts=["pypi.example.com"],
                        no_deps=True,
                    ),
                ),
            ),
            attach_project_disk=True,
            cloud_instance_types=[m.CloudInstanceType(name="g1.1"), m.CloudInstanceType(name="c1.4")],
            extended_working_storage=m.ExtendedWorkingStorage(size_gb=200),
            arguments=[m.Argument(name="LR", value="0.1")],
            output_datasets=[
                m.OutputDatasetDesc(name="ds", description="d", labels={"a": "b"}, size_gb=10, var="OUTDS")
            ],
            graceful_shutdown_parameters=m.GracefulShutdownParameters(
                timeout=timedelta(seconds=30), signal=2
            ),
            spark_parameters=m.SparkParameters(connector_id="spark1"),
        ),
    )


def full_spec_alternatives() -> list[m.ProjectJobSpec]:
    """The branches of the spec's oneofs that full_spec() does not take."""
    base = full_spec()
    params = base.job_parameters
    assert params.env is not None and params.env.docker_image_spec is not None
    by_id = base.model_copy(
        update={
            "job_parameters": params.model_copy(
                update={
                    "env": params.env.model_copy(
                        update={"docker_image_spec": None, "docker_image_resource_id": "image1"}
                    )
                }
            )
        }
    )
    by_ds_secret = base.model_copy(
        update={
            "job_parameters": params.model_copy(
                update={
                    "env": params.env.model_copy(
                        update={
                            "docker_image_spec": params.env.docker_image_spec.model_copy(
                                update={
                                    "password_secret_ref": None,
                                    "password_ds_secret_name": "registry-password",
                                }
                            )
                        }
                    )
                }
            )
        }
    )
    return [by_id, by_ds_secret]


def full_status() -> m.ProjectJobStatus:
    t = datetime(2025, 6, 1, 11, 0, 12, tzinfo=UTC)
    stored = m.StoredFile(
        desc=m.FileDesc(path="out/result.txt", var="RESULT"),
        sha256=SHA,
        size_bytes=3,
        compression_type=m.CompressionType.NONE,
        key="projects/proj1/jobs/job1/outputs/out/result.txt",
    )
    return m.ProjectJobStatus(
        phase=m.JobPhase.SUCCESS,
        conditions=[
            m.Condition(
                type="Scheduled",
                status="True",
                reason="PodScheduled",
                message="ok",
                last_transition_time=t,
                observed_generation=1,
            )
        ],
        created_at=t,
        started_at=t,
        finished_at=t,
        data_expires_at=t + timedelta(days=14),
        data_cleared=False,
        return_code=0,
        actual_cloud_instance_type="g1.1",
        image="cr.example.com/team/trainer:1",
        output_files=[stored],
        log_files=[stored.model_copy(update={"desc": m.FileDesc(path="stdout.txt"), "key": "k"})],
        diagnostic_files=[stored.model_copy(update={"desc": m.FileDesc(path=".system.log")})],
        file_errors=[
            m.FileError(
                output_file_desc=m.FileDesc(path="missing.txt"),
                description="not found",
                type=m.FileErrorType.NOT_FOUND,
            ),
            m.FileError(log_file_name="stderr.txt", description="failed", type=m.FileErrorType.UPLOAD_FAILED),
        ],
        output_datasets=[
            m.OutputDataset(
                desc=m.OutputDatasetDesc(
                    name="ds", description="d", labels={"a": "b"}, size_gb=10, var="OUTDS"
                ),
                id="dsid1",
            )
        ],
        status_details="done",
        progress=m.Progress(progress=21, message="epoch 2", create_time=t),
        attempt=1,
        pod_name="job1-1",
        instance_type_index=0,
        observed_generation=2,
        data_size_bytes=100,
    )


def full_instance_type() -> m.InstanceTypeSpec:
    return m.InstanceTypeSpec(
        vcpu=8,
        memory="48Gi",
        gpus=1,
        gpu_model="NVIDIA V100",
        description="8 vCPU",
        node_selector={"dsjobs.dev/node-pool": "gpu"},
        tolerations=[
            m.Toleration(key="nvidia.com/gpu", operator="Equal", value="present", effect="NoSchedule"),
            m.Toleration(
                key="node.kubernetes.io/unreachable",
                operator="Exists",
                effect="NoExecute",
                toleration_seconds=30,
            ),
        ],
        resources=m.ResourceRequirements(
            requests={"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
            limits={"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        ),
        priority_class_name="batch",
        schedule_timeout_seconds=300,
        working_dir_size_limit="20Gi",
    )


def cr(spec: m.ProjectJobSpec) -> dict[str, Any]:
    return spec.to_cr()
