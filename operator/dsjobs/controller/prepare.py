"""The last checks before a job's pod is made, and what is made for it (pure).

The operator fetches what a job's pod needs (`PodInputs`: its instance type, the claims its
volumes select, the project's docker image table, the Secrets it reads, the storage classes) and
`prepare_pod` answers the objects to create (`PreparedPod`) or the job's ERROR naming the first
problem, checked in a fixed order: instance type, volumes, image, Spark connector, working storage
class, project storage credentials, registry password, runner config. Nothing is created before
all of them pass, so a job that fails one leaves nothing behind. The `needs_*` functions tell the
operator which of the inputs a job needs: the same functions decide here, so what is fetched and
what is checked cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dsjobs.controller.names import (
    DOCKER_IMAGES_CONFIGMAP,
    PROJECT_SECRETS_NAME,
    PROJECT_STORAGE_SECRET_NAME,
    REGISTRY_PASSWORD_ROLE,
    SECRET_ROLE_LABEL,
    pod_name,
    registry_secret_name,
    spark_connector_secret_name,
)
from dsjobs.controller.plan import CreatePod, gone_type_problem
from dsjobs.controller.render import (
    JobRef,
    PvcView,
    needs_registry_secret,
    render_pod,
    resolve_volumes,
    runner_config,
    runner_secret,
    secret_size_problem,
    user_image,
    working_storage_class_problem,
)
from dsjobs.controller.secrets import (
    holds_key,
    is_registry_password,
    project_storage_env,
    registry_password_length_problem,
    registry_password_source_problem,
    registry_secret,
    secret_value,
    spark_connector_problem,
)
from dsjobs.controller.settings import PROJECT_CREDENTIALS, STORAGE_CREDENTIALS_ENV, OperatorSettings
from dsjobs.controller.status import StatusUpdate, fail
from dsjobs.models import InstanceTypeSpec, ProjectJobSpec, ProjectJobStatus


@dataclass(frozen=True)
class PodInputs:
    """What the operator read from the cluster for a job's pod. A Secret or table the job does
    not need (see the `needs_*` functions) is left at its default; one it needs that does not
    exist is None."""

    #: The job's instance type from the catalog; None: not there (nothing else is needed then).
    instance_type: InstanceTypeSpec | None
    #: Catalog entries that exist but cannot be read: name -> why (for the message).
    invalid_types: Mapping[str, str] = field(default_factory=dict)
    #: The claims the job's volumes select (render.pvc_selectors).
    pvcs: Sequence[PvcView] = ()
    #: The project's docker image table (ConfigMap dsjobs-docker-images data).
    docker_images: Mapping[str, str] = field(default_factory=dict)
    spark_secret: Mapping[str, Any] | None = None
    storage_classes: Sequence[Mapping[str, Any]] = ()
    project_storage_secret: Mapping[str, Any] | None = None
    registry_password_secret: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PreparedPod:
    """The objects to create for an attempt, in this order: the registry Secret (if any), the
    runner Secret, the pod; and the job container's image, recorded in the status."""

    pod: dict[str, Any]
    runner_secret: dict[str, Any]
    registry_secret: dict[str, Any] | None
    image: str


def needs_docker_images(spec: ProjectJobSpec, status: ProjectJobStatus) -> bool:
    """The project's docker image table: for a docker image resource id, unless an earlier attempt
    recorded the image (a retry or fallback runs what the first attempt ran)."""
    env = spec.job_parameters.env
    return not status.image and env is not None and bool(env.docker_image_resource_id)


def spark_secret_name(spec: ProjectJobSpec) -> str | None:
    """The Secret of the job's Spark connector, if it has one."""
    sp = spec.job_parameters.spark_parameters
    return spark_connector_secret_name(sp.connector_id) if sp is not None and sp.connector_id else None


def needs_storage_classes(spec: ProjectJobSpec) -> bool:
    """Working storage and output datasets are claims of the configured storage class."""
    params = spec.job_parameters
    return params.extended_working_storage is not None or bool(params.output_datasets)


def needs_project_storage(settings: OperatorSettings) -> bool:
    return settings.storage_credentials == PROJECT_CREDENTIALS


def registry_password_source(spec: ProjectJobSpec) -> tuple[str, str] | None:
    """(Secret name, key) holding the registry password of the job's image, if it needs one: its
    passwordSecretRef, or the project secrets' key passwordDsSecretName."""
    if not needs_registry_secret(spec):
        return None
    image = spec.job_parameters.docker_image()
    assert image is not None
    if image.password_secret_ref is not None:
        return image.password_secret_ref.name, image.password_secret_ref.key
    return PROJECT_SECRETS_NAME, str(image.password_ds_secret_name)


def registry_password(
    namespace: str, spec: ProjectJobSpec, job_uid: str, secret: Mapping[str, Any] | None
) -> tuple[str | None, str]:
    """(password, "") from the Secret `registry_password_source` names, or (None, what is wrong)."""
    source = registry_password_source(spec)
    image = spec.job_parameters.docker_image()
    assert source is not None and image is not None
    name, key = source
    by_ref = image.password_secret_ref is not None
    if by_ref and (secret is None or not is_registry_password(secret)):
        # One answer for both: the job's user may not read the namespace's Secrets, and two
        # would tell them which Secret names exist.
        return None, (
            f"registry password: no Secret {name!r} labelled {SECRET_ROLE_LABEL}={REGISTRY_PASSWORD_ROLE} "
            f"in namespace {namespace} (only such Secrets are used as passwords)"
        )
    if secret is None:
        return None, f"registry password: Secret {name!r} not found in namespace {namespace}"
    problem = registry_password_source_problem(
        secret, by_ref=by_ref, job_uid=job_uid, image_url=image.image_url
    )
    if problem:
        return None, f"registry password: Secret {name!r} {problem}"
    value = secret_value(secret, key)
    if value is None:
        if holds_key(secret, key):
            return None, f"registry password: key {key!r} of Secret {name!r} is not UTF-8 text"
        return None, f"registry password: Secret {name!r} has no key {key!r}"
    too_long = registry_password_length_problem(value)
    if too_long:
        return None, f"registry password: key {key!r} of Secret {name!r} {too_long}"
    return value, ""


def prepare_pod(
    ref: JobRef,
    spec: ProjectJobSpec,
    action: CreatePod,
    status: ProjectJobStatus,
    inputs: PodInputs,
    settings: OperatorSettings,
    storage_env: Mapping[str, str],
    now: datetime,
) -> StatusUpdate | PreparedPod:
    """The objects of the attempt `action` makes, or the job's ERROR naming the first problem."""
    instance_type = inputs.instance_type
    if instance_type is None:
        gone = gone_type_problem(action.instance_type, inputs.invalid_types)
        return fail(spec, status, "UnknownInstanceType", gone, now)

    volumes, missing = resolve_volumes(spec, inputs.pvcs)
    if missing:
        return fail(spec, status, "MissingVolume", "missing " + "; ".join(missing), now)

    env = spec.job_parameters.env
    docker_images = inputs.docker_images if needs_docker_images(spec, status) else {}
    image = status.image or user_image(spec, settings, docker_images, instance_type)
    if image is None:
        rid = env.docker_image_resource_id if env is not None else ""
        return fail(
            spec,
            status,
            "UnknownDockerImage",
            f"docker image resource {rid!r} is not defined (ConfigMap {DOCKER_IMAGES_CONFIGMAP}, key {rid})",
            now,
        )

    spark = spark_secret_name(spec)
    if spark is not None:
        problem = spark_connector_problem(inputs.spark_secret)
        if problem is not None:
            sp = spec.job_parameters.spark_parameters
            assert sp is not None
            return fail(
                spec,
                status,
                "SparkConnector",
                f"Spark connector {sp.connector_id!r}: Secret {spark!r} {problem}",
                now,
            )

    if needs_storage_classes(spec):
        problem = working_storage_class_problem(settings.working_storage_class, inputs.storage_classes)
        if problem is not None:
            return fail(spec, status, "WorkingStorageClass", problem, now)

    if needs_project_storage(settings):
        scoped, why = project_storage_env(storage_env, inputs.project_storage_secret)
        if scoped is None:
            return fail(
                spec,
                status,
                "StorageCredentials",
                f"project storage credentials: Secret {PROJECT_STORAGE_SECRET_NAME!r} in namespace "
                f"{ref.namespace} {why} (the operator runs with {STORAGE_CREDENTIALS_ENV}={PROJECT_CREDENTIALS})",
                now,
            )
        storage_env = scoped

    registry: str | None = None
    registry_body: dict[str, Any] | None = None
    if needs_registry_secret(spec):
        assert env is not None and env.docker_image_spec is not None
        password, why = registry_password(ref.namespace, spec, ref.uid, inputs.registry_password_secret)
        if password is None:
            return fail(spec, status, "RegistryCredentials", why, now)
        # Per attempt, as the runner's: a retry reads the password again (a rotated registry
        # token), and create-if-absent would keep the first attempt's.
        registry = registry_secret_name(pod_name(ref.name, action.attempt))
        registry_body = registry_secret(
            name=registry,
            namespace=ref.namespace,
            labels=ref.labels(),
            owner=ref.owner(),
            image_url=env.docker_image_spec.image_url,
            username=env.docker_image_spec.username,
            password=password,
        )
    try:
        config = runner_config(ref, spec, action.attempt)
    except ValueError as exc:
        return fail(spec, status, "InvalidSpec", f"the job cannot be run: {exc}", now)
    secret = runner_secret(ref, config, storage_env, attempt=action.attempt)
    too_large = secret_size_problem(secret, config)
    if too_large is not None:
        return fail(spec, status, "ConfigTooLarge", too_large, now)
    pod = render_pod(
        ref,
        spec,
        attempt=action.attempt,
        instance_type_name=action.instance_type,
        instance_type_index=action.type_index,
        instance_type=instance_type,
        settings=settings,
        volumes=volumes,
        image=image,
        registry_secret=registry,
        spark_secret=spark,
    )
    return PreparedPod(pod, secret, registry_body, image)
