"""proto JobParameters <-> models.JobParameters, and the requests that carry them.

The one lossy spot is the docker registry password: proto `password_plain_text` never goes into a
resource. `job_parameters_from_proto` replaces it with a reference to a Secret the caller names
(`docker_password_secret_name`), `docker_password_from_proto` hands the caller the text to store in
that Secret, and `job_parameters_to_proto` never sends a password back (a Get shows the image and
user name only). Everything else round-trips exactly.
"""

from __future__ import annotations

from datetime import timedelta

from dsjobs.convert.common import (
    ConversionError,
    duration,
    file_desc_from_proto,
    file_desc_to_proto,
    file_from_proto,
    file_to_proto,
    from_duration,
)
from dsjobs.models import (
    Argument,
    CloudInstanceType,
    DockerImageSpec,
    Environment,
    ExtendedWorkingStorage,
    GracefulShutdownParameters,
    JobParameters,
    OutputDatasetDesc,
    PipOptions,
    ProjectJobSpec,
    PythonEnv,
    SecretKeyRef,
    SparkParameters,
)
from dsjobs.models import limits as L
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2, project_job_service_pb2
from dsjobs.validation.problems import Problem

DOCKER_PASSWORD_KEY = "password"


def docker_password_secret_name(job_id: str) -> str:
    """The Secret the API creates for a job's plain-text registry password."""
    return f"{job_id}-docker-password"


# --- model -> proto ---------------------------------------------------------------------------


def job_parameters_to_proto(params: JobParameters) -> jobs_pb2.JobParameters:
    pb = jobs_pb2.JobParameters(
        input_files=[file_to_proto(f) for f in params.input_files],
        output_files=[file_desc_to_proto(d) for d in params.output_files],
        s3_mount_ids=params.s3_mount_ids,
        dataset_ids=params.dataset_ids,
        cmd=params.cmd,
        attach_project_disk=params.attach_project_disk,
        cloud_instance_types=[jobs_pb2.CloudInstanceType(name=t.name) for t in params.cloud_instance_types],
        arguments=[jobs_pb2.Argument(name=a.name, value=a.value) for a in params.arguments],
        output_datasets=[output_dataset_desc_to_proto(d) for d in params.output_datasets],
    )
    if params.env is not None:
        pb.env.CopyFrom(_environment_to_proto(params.env))
    if params.extended_working_storage is not None:
        pb.extended_working_storage.CopyFrom(
            jobs_pb2.ExtendedWorkingStorage(
                type=jobs_pb2.ExtendedWorkingStorage.SSD, size_gb=params.extended_working_storage.size_gb
            )
        )
    gs = params.graceful_shutdown_parameters
    if gs is not None:
        pb.graceful_shutdown_parameters.signal = gs.signal
        # Presence matters: setting a sub-message field marks the message present even without timeout.
        pb.graceful_shutdown_parameters.SetInParent()
        if gs.timeout is not None:
            pb.graceful_shutdown_parameters.timeout.CopyFrom(duration(gs.timeout))
    if params.spark_parameters is not None:
        pb.spark_parameters.CopyFrom(
            jobs_pb2.SparkParameters(connector_id=params.spark_parameters.connector_id)
        )
    return pb


def output_dataset_desc_to_proto(d: OutputDatasetDesc) -> jobs_pb2.OutputDatasetDesc:
    return jobs_pb2.OutputDatasetDesc(
        name=d.name, description=d.description, labels=d.labels, size_gb=d.size_gb, var=d.var
    )


def _environment_to_proto(env: Environment) -> jobs_pb2.Environment:
    pb = jobs_pb2.Environment(vars=env.vars)
    if env.docker_image_resource_id is not None:
        pb.docker_image_resource_id = env.docker_image_resource_id
    elif env.docker_image_spec is not None:
        spec = env.docker_image_spec
        pb.docker_image_spec.CopyFrom(
            jobs_pb2.DockerImageSpec(image_url=spec.image_url, username=spec.username)
        )
        if spec.password_ds_secret_name is not None:
            pb.docker_image_spec.password_ds_secret_name = spec.password_ds_secret_name
        # password_secret_ref: the password stays in its Secret.
    if env.python_env is not None:
        py = env.python_env
        pb.python_env.CopyFrom(
            jobs_pb2.PythonEnv(
                conda_yaml=py.conda_yaml,
                local_modules=[file_to_proto(f) for f in py.local_modules],
                python_version=py.python_version,
                requirements=py.requirements,
            )
        )
        if py.pip_options is not None:
            pip = py.pip_options
            pb.python_env.pip_options.CopyFrom(
                jobs_pb2.PipOptions(
                    index_url=pip.index_url,
                    extra_index_urls=pip.extra_index_urls,
                    trusted_hosts=pip.trusted_hosts,
                    no_deps=pip.no_deps,
                )
            )
    return pb


# --- proto -> model ---------------------------------------------------------------------------


def docker_password_from_proto(pb: jobs_pb2.JobParameters) -> str | None:
    """The plain-text registry password of a request, which the caller must store in a Secret."""
    if not pb.HasField("env") or pb.env.WhichOneof("docker_image") != "docker_image_spec":
        return None
    spec = pb.env.docker_image_spec
    return spec.password_plain_text if spec.WhichOneof("password") == "password_plain_text" else None


def job_parameters_from_proto(
    pb: jobs_pb2.JobParameters,
    *,
    docker_password_secret_name: str | None = None,
    path: str = "job_parameters",
) -> JobParameters:
    """The model of proto JobParameters (types only: run `dsjobs.validation` on the result).

    A plain-text registry password becomes a reference to the Secret `docker_password_secret_name`
    (key `password`); without that name such a request raises ConversionError.
    """
    return JobParameters(
        input_files=[file_from_proto(f, f"{path}.input_files[{i}]") for i, f in enumerate(pb.input_files)],
        output_files=[file_desc_from_proto(d) for d in pb.output_files],
        s3_mount_ids=list(pb.s3_mount_ids),
        dataset_ids=list(pb.dataset_ids),
        cmd=pb.cmd,
        env=_environment_from_proto(pb.env, docker_password_secret_name, f"{path}.env")
        if pb.HasField("env")
        else None,
        attach_project_disk=pb.attach_project_disk,
        cloud_instance_types=[CloudInstanceType(name=t.name) for t in pb.cloud_instance_types],
        extended_working_storage=_storage_from_proto(
            pb.extended_working_storage, f"{path}.extended_working_storage"
        )
        if pb.HasField("extended_working_storage")
        else None,
        arguments=[Argument(name=a.name, value=a.value) for a in pb.arguments],
        output_datasets=[output_dataset_desc_from_proto(d) for d in pb.output_datasets],
        graceful_shutdown_parameters=GracefulShutdownParameters(
            timeout=from_duration(
                pb.graceful_shutdown_parameters.timeout, f"{path}.graceful_shutdown_parameters.timeout"
            )
            if pb.graceful_shutdown_parameters.HasField("timeout")
            else None,
            # 0 is proto's "unset": the documented default is SIGTERM.
            signal=pb.graceful_shutdown_parameters.signal or L.DEFAULT_SHUTDOWN_SIGNAL,
        )
        if pb.HasField("graceful_shutdown_parameters")
        else None,
        spark_parameters=SparkParameters(connector_id=pb.spark_parameters.connector_id)
        if pb.HasField("spark_parameters")
        else None,
    )


def output_dataset_desc_from_proto(pb: jobs_pb2.OutputDatasetDesc) -> OutputDatasetDesc:
    return OutputDatasetDesc(
        name=pb.name, description=pb.description, labels=dict(pb.labels), size_gb=pb.size_gb, var=pb.var
    )


def _storage_from_proto(pb: jobs_pb2.ExtendedWorkingStorage, path: str) -> ExtendedWorkingStorage:
    # UNSPECIFIED is read as SSD, the only kind there is.
    if pb.type not in (
        jobs_pb2.ExtendedWorkingStorage.STORAGE_TYPE_UNSPECIFIED,
        jobs_pb2.ExtendedWorkingStorage.SSD,
    ):
        raise ConversionError(f"{path}.type", f"unknown storage type {pb.type}")
    return ExtendedWorkingStorage(size_gb=pb.size_gb)


def _environment_from_proto(pb: jobs_pb2.Environment, secret_name: str | None, path: str) -> Environment:
    docker_id: str | None = None
    docker_spec: DockerImageSpec | None = None
    which = pb.WhichOneof("docker_image")
    if which == "docker_image_resource_id":
        docker_id = pb.docker_image_resource_id
    elif which == "docker_image_spec":
        docker_spec = _docker_from_proto(pb.docker_image_spec, secret_name, f"{path}.docker_image_spec")
    python: PythonEnv | None = None
    if pb.HasField("python_env"):
        py = pb.python_env
        python = PythonEnv(
            conda_yaml=py.conda_yaml,
            local_modules=[
                file_from_proto(f, f"{path}.python_env.local_modules[{i}]")
                for i, f in enumerate(py.local_modules)
            ],
            python_version=py.python_version,
            requirements=list(py.requirements),
            pip_options=PipOptions(
                index_url=py.pip_options.index_url,
                extra_index_urls=list(py.pip_options.extra_index_urls),
                trusted_hosts=list(py.pip_options.trusted_hosts),
                no_deps=py.pip_options.no_deps,
            )
            if py.HasField("pip_options")
            else None,
        )
    return Environment(
        vars=dict(pb.vars),
        docker_image_resource_id=docker_id,
        docker_image_spec=docker_spec,
        python_env=python,
    )


def _docker_from_proto(pb: jobs_pb2.DockerImageSpec, secret_name: str | None, path: str) -> DockerImageSpec:
    ref: SecretKeyRef | None = None
    ds_secret: str | None = None
    which = pb.WhichOneof("password")
    if which == "password_plain_text":
        if secret_name is None:
            raise ConversionError(
                f"{path}.password_plain_text", "a plain-text password needs a Secret to go to"
            )
        ref = SecretKeyRef(name=secret_name, key=DOCKER_PASSWORD_KEY)
    elif which == "password_ds_secret_name":
        ds_secret = pb.password_ds_secret_name
    return DockerImageSpec(
        image_url=pb.image_url,
        username=pb.username,
        password_secret_ref=ref,
        password_ds_secret_name=ds_secret,
    )


# --- requests ---------------------------------------------------------------------------------


def spec_from_create_request(
    req: project_job_service_pb2.CreateProjectJobRequest,
    *,
    created_by_id: str = "",
    docker_password_secret_name: str | None = None,
) -> ProjectJobSpec:
    """The spec of a job created by CreateProjectJob: not executed until ExecuteProjectJob.

    Without `data_ttl` the job keeps the default TTL (14 days, what the CLI always sends).
    """
    return ProjectJobSpec(
        project_id=req.project_id,
        name=req.name,
        desc=req.desc,
        config=req.config,
        data_ttl=from_duration(req.data_ttl, "data_ttl") if req.HasField("data_ttl") else L.DEFAULT_DATA_TTL,
        created_by_id=created_by_id,
        job_parameters=job_parameters_from_proto(
            req.job_parameters, docker_password_secret_name=docker_password_secret_name
        ),
        execute=False,
    )


def spec_from_clone_request(
    source: ProjectJobSpec,
    req: project_job_service_pb2.CloneProjectJobRequest,
    *,
    created_by_id: str = "",
    docker_password_secret_name: str | None = None,
) -> ProjectJobSpec:
    """The spec of a CloneProjectJob copy of `source` (the CLI's `fork`), not executed yet.

    Overrides follow the CLI's fork: inputs and outputs are replaced by var, arguments by name;
    env vars, docker image, working storage and instance types replace the source's when given;
    cmd, mounts, datasets, the Python env and the rest are the source's.
    """
    params = merge_clone_overrides(
        source.job_parameters,
        job_parameters_from_proto(
            req.job_parameters_overrides,
            docker_password_secret_name=docker_password_secret_name,
            path="job_parameters_overrides",
        ),
    )
    return ProjectJobSpec(
        project_id=source.project_id,
        name=req.name or source.name,
        desc=req.desc or source.desc,
        config=source.config,
        data_ttl=from_duration(req.data_ttl, "data_ttl") if req.HasField("data_ttl") else source.data_ttl,
        created_by_id=created_by_id,
        parent_job_id=req.source_job_id,
        job_parameters=params,
        execute=False,
        retry_policy=source.retry_policy,
    )


# JobParameters fields a Clone keeps from its source (as the CLI's fork, which never sends them):
# given in the overrides, they would be dropped without a word.
_CLONE_KEEPS = (
    "cmd",
    "env.python_env",
    "s3_mount_ids",
    "dataset_ids",
    "attach_project_disk",
    "output_datasets",
    "graceful_shutdown_parameters",
    "spark_parameters",
)


def clone_override_problems(
    source: JobParameters, overrides: jobs_pb2.JobParameters, path: str = "job_parameters_overrides"
) -> list[Problem]:
    """What of a Clone's overrides merge_clone_overrides could not apply: an input or output
    without a var or with one the source does not have, an argument the source does not have, a
    var or argument given twice, a field a Clone keeps from its source."""
    problems: list[Problem] = []

    def first(seen: dict[str, str], where: str, name: str) -> bool:
        """Whether `name` is overridden here for the first time (else a var-unique problem)."""
        if name in seen:
            problems.append(Problem(where, "var-unique", f"{name!r} is already overridden at {seen[name]}"))
            return False
        seen[name] = where
        return True

    in_vars = {f.desc.var for f in source.input_files if f.desc.var}
    out_vars = {d.var for d in source.output_files if d.var}
    files = [
        (f"{path}.input_files[{i}].desc.var", f.desc.var, "input", "output")
        for i, f in enumerate(overrides.input_files)
    ]
    files += [
        (f"{path}.output_files[{i}].var", d.var, "output", "input")
        for i, d in enumerate(overrides.output_files)
    ]
    seen_vars: dict[str, str] = {}
    for where, var, kind, other_kind in files:
        own, other = (in_vars, out_vars) if kind == "input" else (out_vars, in_vars)
        if not var:
            text = f"is required: a Clone replaces the source job's {kind} files of the same var"
            problems.append(Problem(where, "clone-var", text))
        elif first(seen_vars, where, var) and var not in own:
            also = f" (it is one of its {other_kind} files)" if var in other else ""
            problems.append(
                Problem(where, "clone-var", f"{var!r} is no var of the source job's {kind} files{also}")
            )
    names = {a.name for a in source.arguments}
    seen_args: dict[str, str] = {}
    for i, a in enumerate(overrides.arguments):
        where = f"{path}.arguments[{i}].name"
        if first(seen_args, where, a.name) and a.name not in names:
            problems.append(Problem(where, "clone-arg", f"{a.name!r} is no argument of the source job"))
    # Set fields only (non-empty lists, true, messages present).
    given = {f.name for f, _ in overrides.ListFields()}
    given |= {f"env.{f.name}" for f, _ in overrides.env.ListFields()}
    for name in _CLONE_KEEPS:
        if name in given:
            problems.append(
                Problem(
                    f"{path}.{name}",
                    "clone-keeps",
                    "a Clone keeps the source job's; create a new job to change it",
                )
            )
    return problems


def merge_clone_overrides(source: JobParameters, overrides: JobParameters) -> JobParameters:
    """Source parameters with Clone overrides applied (see spec_from_clone_request)."""
    new_inputs = {f.desc.var: f for f in overrides.input_files if f.desc.var}
    new_outputs = {d.var: d for d in overrides.output_files if d.var}
    new_args = {a.name: a for a in overrides.arguments}
    env = source.env
    o_env = overrides.env
    if o_env is not None:
        base = env or Environment()
        update: dict[str, object] = {}
        if o_env.vars:
            update["vars"] = o_env.vars
        if o_env.docker_image_resource_id is not None or o_env.docker_image_spec is not None:
            update["docker_image_resource_id"] = o_env.docker_image_resource_id
            update["docker_image_spec"] = o_env.docker_image_spec
        env = base.model_copy(update=update) if update else env
    return source.model_copy(
        update={
            "input_files": [new_inputs.get(f.desc.var, f) if f.desc.var else f for f in source.input_files],
            "output_files": [new_outputs.get(d.var, d) if d.var else d for d in source.output_files],
            "arguments": [new_args.get(a.name, a) for a in source.arguments],
            "env": env,
            "cloud_instance_types": overrides.cloud_instance_types or source.cloud_instance_types,
            "extended_working_storage": overrides.extended_working_storage or source.extended_working_storage,
        }
    )


def data_ttl_from_set_request(req: project_job_service_pb2.SetProjectJobDataTtlRequest) -> timedelta:
    """SetProjectJobDataTtl: no ttl means keep forever (the CLI's `--days infinity`)."""
    return from_duration(req.ttl, "ttl") if req.HasField("ttl") else L.INFINITE_TTL
