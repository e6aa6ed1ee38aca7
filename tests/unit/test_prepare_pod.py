"""prepare_pod: what the operator creates for an attempt from what it read, or the job's ERROR.

The objects are those of the render goldens (test_render_pod.render_job: one path for both); each
problem fails the job with its reason and a message naming the cause, checked in a fixed order,
before anything would be created.
"""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from test_render_pod import (
    GOOD_SPARK,
    JOB,
    REGISTRY_PASSWORD,
    SETTINGS,
    STORAGE_ENV,
    TYPES,
    RenderedJob,
    _spark_secret,
    _storage_class,
    render_job,
    spec,
)

from dsjobs.controller.plan import CreatePod
from dsjobs.controller.prepare import (
    PodInputs,
    PreparedPod,
    needs_docker_images,
    needs_project_storage,
    needs_storage_classes,
    prepare_pod,
    registry_password,
    registry_password_source,
    spark_secret_name,
)
from dsjobs.controller.render import PvcView, Volumes
from dsjobs.controller.secrets import secret_value
from dsjobs.controller.settings import OperatorSettings
from dsjobs.controller.status import COND_FINISHED, StatusUpdate, get_condition
from dsjobs.models import JobPhase, ProjectJobSpec, ProjectJobStatus

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
C14 = CreatePod(attempt=1, type_index=0, instance_type="c1.4")
FRESH = ProjectJobStatus()
REGISTRY_ROLE = {"dsjobs.dev/secret-role": "registry-password"}


def _secret(data: dict[str, str], labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"metadata": {"labels": labels or {}, **meta}, "data": encoded}


# The job's own registry password Secret, as the API makes it: owned by the job.
OWN_PASSWORD = _secret(
    {"password": REGISTRY_PASSWORD},
    REGISTRY_ROLE,
    ownerReferences=[{"kind": "ProjectJob", "name": JOB.name, "uid": JOB.uid}],
    annotations={"dsjobs.dev/registry-hosts": "cr.example.com"},
)
DOCKER_CREDS = {
    "dockerImageSpec": {
        "imageUrl": "cr.example.com/team/trainer:1.2",
        "username": "robot",
        "passwordSecretRef": {"name": "job-1-registry-password", "key": "password"},
    }
}


def prepare(
    job_spec: ProjectJobSpec,
    inputs: PodInputs | None = None,
    *,
    action: CreatePod = C14,
    status: ProjectJobStatus = FRESH,
    settings: OperatorSettings = SETTINGS,
) -> StatusUpdate | PreparedPod:
    found = inputs if inputs is not None else PodInputs(TYPES[action.instance_type])
    return prepare_pod(JOB, job_spec, action, status, found, settings, STORAGE_ENV, NOW)


def prepared(job_spec: ProjectJobSpec, inputs: PodInputs | None = None, **kw: Any) -> RenderedJob:
    answer = prepare(job_spec, inputs, **kw)
    assert isinstance(answer, PreparedPod), answer
    return RenderedJob(answer.pod, answer.runner_secret, answer.registry_secret)


def failure(answer: StatusUpdate | PreparedPod) -> tuple[str, str]:
    """(reason, message) of the job's ERROR."""
    assert isinstance(answer, StatusUpdate), answer
    assert answer.status.phase == JobPhase.ERROR
    finished = get_condition(answer.status, COND_FINISHED)
    assert finished is not None
    return finished.reason, finished.message


def test_the_objects_are_those_of_the_render_goldens() -> None:
    basic = spec(
        inputFiles=[{"desc": {"path": "main.py"}, "sha256": "a" * 64, "sizeBytes": 10}],
        env={"vars": {"MODE": "fast"}},
    )
    assert prepared(basic) == render_job(basic)
    gpu = spec(cloudInstanceTypes=[{"name": "g1.1"}])
    g11 = CreatePod(attempt=1, type_index=0, instance_type="g1.1")
    assert prepared(gpu, PodInputs(TYPES["g1.1"]), action=g11) == render_job(gpu, type_name="g1.1")
    fallback = spec(cloudInstanceTypes=[{"name": "g2.8"}, {"name": "g1.1"}])
    second = CreatePod(attempt=2, type_index=1, instance_type="g1.1")
    assert prepared(fallback, PodInputs(TYPES["g1.1"]), action=second) == render_job(
        fallback, type_name="g1.1", attempt=2, index=1
    )
    creds = spec(env=DOCKER_CREDS)
    with_password = PodInputs(TYPES["c1.4"], registry_password_secret=OWN_PASSWORD)
    assert prepared(creds, with_password) == render_job(creds)
    spark = spec(sparkParameters={"connectorId": "bt1spark"})
    connector = PodInputs(TYPES["c1.4"], spark_secret=_spark_secret(GOOD_SPARK))
    assert prepared(spark, connector) == render_job(spark, spark="dsjobs-spark-bt1spark")
    working = spec(extendedWorkingStorage={"type": "SSD", "sizeGb": 200})
    classes = PodInputs(TYPES["c1.4"], storage_classes=[_storage_class("fast-ssd")])
    assert prepared(working, classes) == render_job(working)


def test_volumes_are_the_claims_found_by_label() -> None:
    job_spec = spec(s3MountIds=["bucket-1"], attachProjectDisk=True, cmd="ls ${bucket-1}")
    pvcs = [
        PvcView("s3-bucket-1", {"dsjobs.dev/s3-mount-id": "bucket-1"}),
        PvcView("project-disk", {"dsjobs.dev/project-disk": "true"}),
    ]
    volumes = Volumes(mount_claims={"bucket-1": "s3-bucket-1"}, project_disk_claim="project-disk")
    assert prepared(job_spec, PodInputs(TYPES["c1.4"], pvcs=pvcs)) == render_job(job_spec, volumes=volumes)


PROJECT_STORAGE = dataclasses.replace(SETTINGS, storage_credentials="project")


@pytest.mark.parametrize(
    ("params", "inputs", "settings", "reason", "message"),
    [
        pytest.param(
            {},
            PodInputs(None, {"c1.4": "spec.resources: bad quantity"}),
            SETTINGS,
            "UnknownInstanceType",
            "c1.4",
            id="unknown-type",
        ),
        pytest.param(
            {"datasetIds": ["ds-1"]},
            None,
            SETTINGS,
            "MissingVolume",
            "missing dataset 'ds-1' (no PersistentVolumeClaim labelled dsjobs.dev/dataset-id=ds-1)",
            id="missing-dataset",
        ),
        pytest.param(
            {"attachProjectDisk": True},
            None,
            SETTINGS,
            "MissingVolume",
            "missing project disk (no PersistentVolumeClaim labelled dsjobs.dev/project-disk=true)",
            id="missing-project-disk",
        ),
        pytest.param(  # one being deleted is no disk to mount
            {"attachProjectDisk": True},
            PodInputs(
                TYPES["c1.4"], pvcs=[PvcView("pd", {"dsjobs.dev/project-disk": "true"}, deleting=True)]
            ),
            SETTINGS,
            "MissingVolume",
            "missing project disk (its PersistentVolumeClaim 'pd' labelled dsjobs.dev/project-disk=true "
            "is being deleted)",
            id="project-disk-deleting",
        ),
        pytest.param(
            {"env": {"dockerImageResourceId": "trainer"}},
            PodInputs(TYPES["c1.4"], docker_images={"other": "img:1"}),
            SETTINGS,
            "UnknownDockerImage",
            "docker image resource 'trainer' is not defined (ConfigMap dsjobs-docker-images, key trainer)",
            id="unknown-image-resource",
        ),
        pytest.param(
            {"sparkParameters": {"connectorId": "bt1spark"}},
            None,
            SETTINGS,
            "SparkConnector",
            "Spark connector 'bt1spark': Secret 'dsjobs-spark-bt1spark' does not exist",
            id="spark-secret-missing",
        ),
        pytest.param(
            {"extendedWorkingStorage": {"type": "SSD", "sizeGb": 20}},
            PodInputs(TYPES["c1.4"], storage_classes=[_storage_class("slow")]),
            SETTINGS,
            "WorkingStorageClass",
            "working storage: StorageClass 'fast-ssd' (DSJOBS_WORKING_STORAGE_CLASS) does not exist",
            id="no-storage-class",
        ),
        pytest.param(
            {},
            None,
            PROJECT_STORAGE,
            "StorageCredentials",
            "project storage credentials: Secret 'dsjobs-project-storage' in namespace project-a not found "
            "(the operator runs with DSJOBS_STORAGE_CREDENTIALS=project)",
            id="project-storage-missing",
        ),
        pytest.param(
            {"env": DOCKER_CREDS},
            None,
            SETTINGS,
            "RegistryCredentials",
            "registry password: no Secret 'job-1-registry-password' labelled "
            "dsjobs.dev/secret-role=registry-password in namespace project-a",
            id="registry-secret-missing",
        ),
    ],
)
def test_each_problem_fails_the_job_naming_it(
    params: dict[str, Any], inputs: PodInputs | None, settings: OperatorSettings, reason: str, message: str
) -> None:
    found_reason, found_message = failure(prepare(spec(**params), inputs, settings=settings))
    assert found_reason == reason
    assert message in found_message


def test_problems_are_told_in_a_fixed_order() -> None:
    # Everything wrong at once: the instance type first, then volumes, the image, Spark, the
    # storage class, the storage credentials (the registry password comes after them: a job with an
    # image resource id has none).
    everything = {
        "datasetIds": ["ds-1"],
        "env": {"dockerImageResourceId": "trainer"},
        "sparkParameters": {"connectorId": "bt1spark"},
        "extendedWorkingStorage": {"type": "SSD", "sizeGb": 20},
    }
    order = ["UnknownInstanceType", "MissingVolume", "UnknownDockerImage", "SparkConnector"]
    inputs = PodInputs(None)
    for expected in order:
        assert failure(prepare(spec(**everything), inputs, settings=PROJECT_STORAGE))[0] == expected
        inputs = {
            "UnknownInstanceType": PodInputs(TYPES["c1.4"]),
            "MissingVolume": PodInputs(TYPES["c1.4"], pvcs=[PvcView("d", {"dsjobs.dev/dataset-id": "ds-1"})]),
            "UnknownDockerImage": dataclasses.replace(inputs, docker_images={"trainer": "img:1"}),
            "SparkConnector": dataclasses.replace(inputs, spark_secret=_spark_secret(GOOD_SPARK)),
        }[expected]
    assert failure(prepare(spec(**everything), inputs, settings=PROJECT_STORAGE))[0] == "WorkingStorageClass"
    inputs = dataclasses.replace(inputs, storage_classes=[_storage_class("fast-ssd")])
    assert failure(prepare(spec(**everything), inputs, settings=PROJECT_STORAGE))[0] == "StorageCredentials"
    storage = _secret({"accessKey": "AK", "secretKey": "SK"})
    inputs = dataclasses.replace(inputs, project_storage_secret=storage)
    answer = prepare(spec(**everything), inputs, settings=PROJECT_STORAGE)
    assert isinstance(answer, PreparedPod)
    # The project's key pair replaces the operator's in the runner Secret; the image is the table's.
    assert answer.image == "img:1"
    keys = (secret_value(answer.runner_secret, k) for k in ("DSJOBS_S3_ACCESS_KEY", "DSJOBS_S3_SECRET_KEY"))
    assert tuple(keys) == ("AK", "SK")


def test_a_retry_runs_the_image_the_first_attempt_recorded() -> None:
    job_spec = spec(env={"dockerImageResourceId": "trainer"})
    assert not needs_docker_images(job_spec, ProjectJobStatus(image="img:1"))
    retry = CreatePod(attempt=2, type_index=0, instance_type="c1.4")
    # The project's table no longer has it: the recorded image still runs.
    answer = prepare(job_spec, PodInputs(TYPES["c1.4"]), action=retry, status=ProjectJobStatus(image="img:1"))
    assert isinstance(answer, PreparedPod) and answer.image == "img:1"


def test_registry_password_problems_name_the_secret_and_key() -> None:
    creds = spec(env=DOCKER_CREDS)
    assert registry_password("project-a", creds, JOB.uid, OWN_PASSWORD) == (REGISTRY_PASSWORD, "")
    unlabelled = _secret({"password": "x"})
    # Missing or not a registry password: one answer (which names exist is not told).
    assert registry_password("project-a", creds, JOB.uid, unlabelled) == registry_password(
        "project-a", creds, JOB.uid, None
    )
    other_job = _secret(
        {"password": "x"}, REGISTRY_ROLE, ownerReferences=[{"kind": "ProjectJob", "name": "b", "uid": "u2"}]
    )
    assert (
        "holds the registry password of ProjectJob 'b'"
        in registry_password("project-a", creds, JOB.uid, other_job)[1]
    )
    wrong_key = {**OWN_PASSWORD, "data": {}}
    assert registry_password("project-a", creds, JOB.uid, wrong_key) == (
        None,
        "registry password: Secret 'job-1-registry-password' has no key 'password'",
    )
    # The key is there but its value is no text (a latin-1 file, `kubectl create secret --from-file`):
    # "has no key 'password'" sent its owner looking for a key the Secret shows.
    latin1 = {**OWN_PASSWORD, "data": {"password": base64.b64encode("pässwort".encode("latin-1")).decode()}}
    assert registry_password("project-a", creds, JOB.uid, latin1) == (
        None,
        "registry password: key 'password' of Secret 'job-1-registry-password' is not UTF-8 text",
    )
    too_long = {**OWN_PASSWORD, "data": {"password": base64.b64encode(b"p" * 65537).decode()}}
    assert registry_password("project-a", creds, JOB.uid, too_long) == (
        None,
        "registry password: key 'password' of Secret 'job-1-registry-password' holds 65537 bytes, more "
        "than the 65536 a registry password may have",
    )
    longest = {**OWN_PASSWORD, "data": {"password": base64.b64encode(b"p" * 65536).decode()}}
    assert registry_password("project-a", creds, JOB.uid, longest) == ("p" * 65536, "")
    # passwordDsSecretName: a key of the project secrets, no label needed.
    ds = spec(env={"dockerImageSpec": {"imageUrl": "cr.example.com/t:1", "passwordDsSecretName": "REG"}})
    assert registry_password_source(ds) == ("dsjobs-project-secrets", "REG")
    assert registry_password("project-a", ds, JOB.uid, None) == (
        None,
        "registry password: Secret 'dsjobs-project-secrets' not found in namespace project-a",
    )
    assert registry_password("project-a", ds, JOB.uid, _secret({"REG": "pw"})) == ("pw", "")


def test_a_runner_config_over_a_secret_s_size_fails_the_job_naming_the_env() -> None:
    # JSON escapes a control character in six bytes: a spec the API took can make a config over
    # the 1 MiB a Secret holds; the API server's refusal would repeat at every reconcile.
    big = spec(cmd="true", env={"vars": {f"V{i}": "\x01" * 32768 for i in range(31)}})
    reason, message = failure(prepare(big))
    assert reason == "ConfigTooLarge"
    assert message.endswith(
        "more than the 1048576 a Secret may hold; its environment variables take 1015891 bytes"
    )


def test_a_spec_the_runner_would_refuse_fails_the_job_before_any_pod() -> None:
    # The validator refuses it first (control-chars); should one get past it, the runner's own
    # config check fails the job naming the cause, not a pod that cannot start.
    reason, message = failure(prepare(spec(cmd="true", env={"vars": {"A": "a\x00b"}})))
    assert (reason, message) == (
        "InvalidSpec",
        "the job cannot be run: env: environment variable 'A' contains NUL",
    )


def test_a_job_needs_only_what_it_uses() -> None:
    plain = spec()
    assert not needs_docker_images(plain, FRESH)
    assert spark_secret_name(plain) is None
    assert not needs_storage_classes(plain)
    assert registry_password_source(plain) is None
    assert not needs_project_storage(SETTINGS) and needs_project_storage(PROJECT_STORAGE)
    # Nothing read beyond the instance type is what a plain job needs.
    assert isinstance(prepare(plain, PodInputs(TYPES["c1.4"])), PreparedPod)
    assert needs_storage_classes(spec(outputDatasets=[{"name": "m", "var": "M", "sizeGb": 1}]))
    assert spark_secret_name(spec(sparkParameters={"connectorId": "c1"})) == "dsjobs-spark-c1"
