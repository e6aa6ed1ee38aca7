"""render_pod: one golden pod per feature, plus the properties every pod must have.

Regenerate the golden files after an intended change:

    DSJOBS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render_pod.py
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsjobs.controller.names import (
    ATTEMPT_LABEL,
    DATASET_LABEL,
    JOB_LABEL,
    OUTPUT_DATASET_LABEL,
    PROJECT_LABEL,
    output_dataset_id,
    pod_name,
)
from dsjobs.controller.render import (
    JobRef,
    PvcView,
    Volumes,
    output_dataset_claims,
    published_dataset_patch,
    pvc_selectors,
    render_pod,
    resolve_volumes,
    runner_config,
    runner_secret,
    secret_size_problem,
    user_image,
    working_storage_class_problem,
    working_storage_source,
)
from dsjobs.controller.secrets import (
    dockerconfigjson,
    project_storage_env,
    registry_of,
    registry_secret,
    secret_value,
    spark_connector_problem,
)
from dsjobs.controller.settings import OperatorSettings, SettingsError, settings_from_env
from dsjobs.instancetypes import CATALOG, instance_type_spec
from dsjobs.models import InstanceTypeSpec, ProjectJobSpec
from dsjobs.models.limits import RESOURCE_ID_PATTERN

GOLDEN = Path(__file__).parent / "golden" / "pods"
UPDATE = os.environ.get("DSJOBS_UPDATE_GOLDEN") == "1"
SHA = "a" * 64
SHA2 = "b" * 64
SETTINGS = OperatorSettings(working_storage_class="fast-ssd")
JOB = JobRef(
    name="job-1", namespace="project-a", uid="6f1c2b1e-0000-4000-8000-000000000001", project_id="proj-a"
)
TYPES = {e.name: instance_type_spec(e, "base") for e in CATALOG}


def spec(**params: Any) -> ProjectJobSpec:
    return ProjectJobSpec.model_validate(
        {"projectId": "proj-a", "execute": True, "jobParameters": {"cmd": "python main.py", **params}}
    )


def pod_for(
    job_spec: ProjectJobSpec,
    *,
    type_name: str = "c1.4",
    attempt: int = 1,
    index: int = 0,
    volumes: Volumes | None = None,
    image: str | None = None,
    registry: str | None = None,
    spark: str | None = None,
) -> dict[str, Any]:
    return render_pod(
        JOB,
        job_spec,
        attempt=attempt,
        instance_type_name=type_name,
        instance_type_index=index,
        instance_type=TYPES[type_name],
        settings=SETTINGS,
        volumes=volumes or Volumes(),
        image=image or user_image(job_spec, SETTINGS, {}) or "",
        registry_secret=registry,
        spark_secret=spark,
    )


def _features() -> dict[str, dict[str, Any]]:
    return {
        "basic_cpu": pod_for(
            spec(
                inputFiles=[{"desc": {"path": "main.py"}, "sha256": SHA, "sizeBytes": 10}],
                outputFiles=[{"path": "out/result.txt"}],
                env={"vars": {"MODE": "fast"}},
                arguments=[{"name": "EPOCHS", "value": "3"}],
            )
        ),
        "gpu_type": pod_for(
            spec(cloudInstanceTypes=[{"name": "g1.1"}]),
            type_name="g1.1",
        ),
        "fallback_second_type": pod_for(
            spec(cloudInstanceTypes=[{"name": "g2.8"}, {"name": "g1.1"}]),
            type_name="g1.1",
            attempt=2,
            index=1,
        ),
        "project_disk": pod_for(
            spec(attachProjectDisk=True, cmd="ls ${DS_PROJECT_HOME}"),
            volumes=Volumes(project_disk_claim="project-disk"),
        ),
        "s3_mount": pod_for(
            spec(s3MountIds=["bucket-1"], cmd="ls ${bucket-1}"),
            volumes=Volumes(mount_claims={"bucket-1": "s3-bucket-1"}),
        ),
        "dataset": pod_for(
            spec(datasetIds=["ds-1"], cmd="ls ${ds-1}"),
            volumes=Volumes(mount_claims={"ds-1": "dataset-ds-1"}),
        ),
        "working_storage": pod_for(spec(extendedWorkingStorage={"type": "SSD", "sizeGb": 200})),
        "output_dataset": pod_for(
            spec(
                cmd="python main.py --save ${MODELS}",
                outputDatasets=[{"name": "models", "var": "MODELS", "sizeGb": 20}],
            )
        ),
        "docker_creds": pod_for(
            spec(
                env={
                    "dockerImageSpec": {
                        "imageUrl": "cr.example.com/team/trainer:1.2",
                        "username": "robot",
                        "passwordSecretRef": {"name": "job-1-registry-password", "key": "password"},
                    }
                }
            ),
            registry="job-1-registry",
        ),
        "python_env": pod_for(
            spec(
                env={
                    "pythonEnv": {
                        "pythonVersion": "3.12",
                        "requirements": ["numpy==2.1.0"],
                        "localModules": [
                            {
                                "desc": {"path": "/tmp/mod.zip", "var": "_LOCAL_MODULE_0"},
                                "sha256": SHA2,
                                "compressionType": "ZIP",
                            }
                        ],
                        "pipOptions": {"indexUrl": "https://pypi.example.com/simple", "noDeps": True},
                    }
                }
            )
        ),
        "spark_connector": pod_for(
            spec(sparkParameters={"connectorId": "bt1spark"}), spark="dsjobs-spark-bt1spark"
        ),
        "graceful_shutdown": pod_for(spec(gracefulShutdownParameters={"signal": 10, "timeout": "20s"})),
    }


def _dump(obj: Any) -> str:
    # Through JSON: no YAML anchors for the dicts the runner contract shares between containers.
    return yaml.safe_dump(json.loads(json.dumps(obj)), sort_keys=False, width=120)


FEATURES = _features()


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_golden(feature: str) -> None:
    path = GOLDEN / f"{feature}.yaml"
    text = _dump(FEATURES[feature])
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"{path} is missing: run with DSJOBS_UPDATE_GOLDEN=1")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{feature}: pod differs from {path} (DSJOBS_UPDATE_GOLDEN=1 to accept)"


def test_no_stale_golden_files() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.yaml")) == sorted(FEATURES)


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_every_pod_has_identity_and_safety(feature: str) -> None:
    pod = FEATURES[feature]
    meta, pod_spec = pod["metadata"], pod["spec"]
    attempt = meta["labels"][ATTEMPT_LABEL]
    assert meta["name"] == f"job-1-a{attempt}"
    assert meta["labels"][JOB_LABEL] == "job-1"
    assert meta["labels"][PROJECT_LABEL] == "proj-a"
    (owner,) = meta["ownerReferences"]
    assert owner["kind"] == "ProjectJob" and owner["uid"] == JOB.uid and owner["controller"] is True
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["automountServiceAccountToken"] is False
    names = [c["name"] for c in pod_spec["initContainers"]] + [c["name"] for c in pod_spec["containers"]]
    assert names == ["stage-in", "job", "ship"]
    # The runner's containers (they hold the storage credentials) as the restricted standard asks.
    for c in [*pod_spec["initContainers"], *pod_spec["containers"][1:]]:
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, c["name"]
    job = pod_spec["containers"][0]
    # Storage credentials and the runner config never reach the user's container.
    assert not any("DSJOBS_S3" in json.dumps(e) for e in job.get("env", []))
    assert all(m["name"] != "dsjobs-config" for m in job["volumeMounts"])


def test_render_is_deterministic() -> None:
    assert _dump(_features()) == _dump(FEATURES)


def test_gpu_pod_gets_the_catalog_placement() -> None:
    pod = FEATURES["gpu_type"]
    assert pod["spec"]["nodeSelector"] == {"dsjobs.dev/node-pool": "gpu"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}
    ]
    job = pod["spec"]["containers"][0]
    assert job["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["metadata"]["labels"]["dsjobs.dev/instance-type"] == "g1.1"


def test_priority_class_comes_from_the_type() -> None:
    it = TYPES["c1.4"].model_copy(update={"priority_class_name": "batch-low"})
    pod = render_pod(
        JOB, spec(), attempt=1, instance_type_name="c1.4", instance_type_index=0, instance_type=it,
        settings=SETTINGS, volumes=Volumes(), image="python:3.11-slim",
    )  # fmt: skip
    assert pod["spec"]["priorityClassName"] == "batch-low"


def test_runner_containers_get_a_cpu_limit_only_when_one_is_set() -> None:
    def runner_limits(settings: OperatorSettings) -> list[dict[str, str]]:
        pod = render_pod(
            JOB, spec(), attempt=1, instance_type_name="c1.4", instance_type_index=0,
            instance_type=TYPES["c1.4"], settings=settings, volumes=Volumes(), image="python:3.11-slim",
        )  # fmt: skip
        containers = [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]
        return [c["resources"]["limits"] for c in containers if c["name"] != "job"]

    assert runner_limits(SETTINGS) == [{"memory": "512Mi"}] * 2  # CPU limits throttle uploads
    limited = settings_from_env({"DSJOBS_RUNNER_CPU_LIMIT": "500m"})
    assert runner_limits(limited) == [{"memory": "512Mi", "cpu": "500m"}] * 2


@pytest.mark.parametrize("registry", [None, "job-1-registry"])
def test_a_private_runner_image_gets_its_pull_secret_and_policy_on_the_runner_containers_only(
    registry: str | None,
) -> None:
    settings = settings_from_env(
        {"DSJOBS_RUNNER_IMAGE_PULL_SECRET": "runner-pull", "DSJOBS_RUNNER_IMAGE_PULL_POLICY": "Always"}
    )
    pod = render_pod(
        JOB, spec(), attempt=1, instance_type_name="c1.4", instance_type_index=0,
        instance_type=TYPES["c1.4"], settings=settings, volumes=Volumes(), image="python:3.11-slim",
        registry_secret=registry,
    )  # fmt: skip
    # With a job image's own secret too: one list, as ServiceAccount admission adds none then.
    assert pod["spec"]["imagePullSecrets"] == [{"name": n} for n in (registry, "runner-pull") if n]
    containers = [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]
    policies = {c["name"]: c.get("imagePullPolicy") for c in containers}
    assert policies == {"stage-in": "Always", "ship": "Always", "job": None}
    plain = pod_for(spec())
    assert "imagePullSecrets" not in plain["spec"]
    assert all(
        "imagePullPolicy" not in c for c in [*plain["spec"]["initContainers"], *plain["spec"]["containers"]]
    )


def test_working_storage_is_an_ephemeral_ssd_claim() -> None:
    work = next(v for v in FEATURES["working_storage"]["spec"]["volumes"] if v["name"] == "dsjobs-work")
    claim = work["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "200Gi"
    assert claim["storageClassName"] == "fast-ssd"
    # Without it: a scratch emptyDir as big as the type's system disk (DataSphere's ~20 GB).
    basic = next(v for v in FEATURES["basic_cpu"]["spec"]["volumes"] if v["name"] == "dsjobs-work")
    assert basic == {"name": "dsjobs-work", "emptyDir": {"sizeLimit": "20Gi"}}
    # The runner's shared volume (logs, pip packages) is on the system disk too, also with
    # working storage; output directories are zipped straight into their upload, not into it.
    for feature in ("basic_cpu", "working_storage"):
        shared = next(v for v in FEATURES[feature]["spec"]["volumes"] if v["name"] == "dsjobs-shared")
        assert shared == {"name": "dsjobs-shared", "emptyDir": {"sizeLimit": "20Gi"}}
    unlimited = TYPES["c1.4"].model_copy(update={"working_dir_size_limit": None})
    assert working_storage_source(spec(), JOB, SETTINGS, unlimited) == {"emptyDir": {}}


def _storage_class(name: str, default: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if default is not None:
        meta["annotations"] = {default: "true"}
    return {"metadata": meta, "provisioner": "example.com/csi"}


def test_working_storage_needs_its_class_or_a_default_one() -> None:
    fast, slow = _storage_class("fast-ssd"), _storage_class("slow")
    assert working_storage_class_problem("fast-ssd", [slow, fast]) is None
    assert working_storage_class_problem("nvme", [slow, fast]) == (
        "working storage: StorageClass 'nvme' (DSJOBS_WORKING_STORAGE_CLASS) does not exist"
    )
    # Unset: the cluster's default class provisions the claim (either annotation, as the
    # DefaultStorageClass admission plugin reads them).
    for annotation in (
        "storageclass.kubernetes.io/is-default-class",
        "storageclass.beta.kubernetes.io/is-default-class",
    ):
        assert working_storage_class_problem("", [slow, _storage_class("std", annotation)]) is None
    no_default = (
        "working storage: the cluster has no default StorageClass and DSJOBS_WORKING_STORAGE_CLASS names none"
    )
    assert working_storage_class_problem("", [slow, fast]) == no_default
    assert working_storage_class_problem("", []) == no_default
    not_default = {
        "metadata": {"name": "x", "annotations": {"storageclass.kubernetes.io/is-default-class": "false"}}
    }
    assert working_storage_class_problem("", [not_default]) == no_default


def test_dataset_is_read_only_and_s3_mount_is_writable() -> None:
    ds = FEATURES["dataset"]["spec"]
    vol = next(v for v in ds["volumes"] if "persistentVolumeClaim" in v)
    assert vol["persistentVolumeClaim"] == {"claimName": "dataset-ds-1", "readOnly": True}
    mount = next(m for m in ds["containers"][0]["volumeMounts"] if m["name"] == vol["name"])
    assert mount["mountPath"] == "/job/datasets/ds-1" and mount["readOnly"] is True
    s3 = FEATURES["s3_mount"]["spec"]
    mount = next(m for m in s3["containers"][0]["volumeMounts"] if m["mountPath"].startswith("/job/s3/"))
    assert mount["mountPath"] == "/job/s3/bucket-1" and not mount.get("readOnly")


def test_output_datasets_are_writable_claims_owned_by_the_job_until_published() -> None:
    job_spec = spec(
        cmd="python main.py ${A} ${B}",
        outputDatasets=[
            {"name": "Models", "description": "weights", "labels": {"team": "cv"}, "var": "A", "sizeGb": 20},
            # The official CLI sends "500Mb" as 0 GiB.
            {"name": "tiny", "var": "B", "sizeGb": 0},
        ],
    )
    claims = output_dataset_claims(JOB, job_spec, SETTINGS)
    ids = [output_dataset_id(JOB.uid, v) for v in ("A", "B")]
    assert len(set(ids)) == 2 and all(len(i) == 20 and re.fullmatch(RESOURCE_ID_PATTERN, i) for i in ids)
    assert [c["metadata"]["name"] for c in claims] == [f"dsjobs-dataset-{i}" for i in ids]
    first = claims[0]
    assert first["metadata"]["ownerReferences"] == [JOB.owner()]
    assert first["metadata"]["labels"] == {**JOB.labels(), OUTPUT_DATASET_LABEL: "true"}
    assert DATASET_LABEL not in first["metadata"]["labels"]  # nobody mounts it before it is published
    assert first["metadata"]["annotations"] == {
        "dsjobs.dev/dataset-name": "Models",
        "dsjobs.dev/dataset-description": "weights",
        "dsjobs.dev/dataset-labels": '{"team": "cv"}',
    }
    assert first["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "20Gi"}},
        "storageClassName": "fast-ssd",
    }
    assert claims[1]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert published_dataset_patch(ids[0]) == {
        "metadata": {"labels": {DATASET_LABEL: ids[0]}, "ownerReferences": None}
    }
    # Another job object (even under the same name) makes other datasets.
    assert output_dataset_id("another-uid", "A") not in ids

    pod = pod_for(job_spec)["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    for var, dataset_id in zip(("A", "B"), ids, strict=True):
        mount = mounts[f"/job/output-datasets/{var}"]
        assert not mount.get("readOnly")
        assert vols[mount["name"]]["persistentVolumeClaim"] == {
            "claimName": f"dsjobs-dataset-{dataset_id}",
            "readOnly": False,
        }
    assert output_dataset_claims(JOB, spec(), SETTINGS) == []


def test_volume_fs_group_is_set_only_for_pods_with_volumes_dsjobs_provisions() -> None:
    settings = OperatorSettings(working_storage_class="fast-ssd", volume_fs_group=10001)

    def context(job_spec: ProjectJobSpec, with_settings: OperatorSettings) -> Any:
        pod = render_pod(
            JOB,
            job_spec,
            attempt=1,
            instance_type_name="c1.4",
            instance_type_index=0,
            instance_type=TYPES["c1.4"],
            settings=with_settings,
            volumes=Volumes(),
            image="python:3.11-slim",
        )
        return pod["spec"].get("securityContext")

    wanted = {"fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}
    storage = spec(extendedWorkingStorage={"type": "SSD", "sizeGb": 200})
    datasets = spec(cmd="ls ${D}", outputDatasets=[{"name": "d", "var": "D", "sizeGb": 1}])
    assert context(storage, settings) == wanted
    assert context(datasets, settings) == wanted
    assert context(spec(), settings) is None  # an emptyDir is 0777 already
    assert context(storage, SETTINGS) is None  # off by default
    with pytest.raises(SettingsError, match="DSJOBS_VOLUME_FS_GROUP"):
        settings_from_env({"DSJOBS_VOLUME_FS_GROUP": "-1"})
    assert settings_from_env({"DSJOBS_VOLUME_FS_GROUP": "10001"}).volume_fs_group == 10001


def test_a_spark_connector_is_a_config_file_named_by_the_env_the_client_reads() -> None:
    pod = FEATURES["spark_connector"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "dsjobs-spark"]
    assert volume["secret"] == {
        "secretName": "dsjobs-spark-bt1spark",
        "items": [{"key": "config.json", "path": "config.json"}],
    }
    main = pod["containers"][0]
    assert {"name": "dsjobs-spark", "mountPath": "/job/.spark", "readOnly": True} in main["volumeMounts"]
    assert {"name": "JOB_DATAPROC_CONNECTION_CONFIG", "value": "/job/.spark/config.json"} in main["env"]
    # Only the job's container: the runner's never see it.
    for c in [*pod["initContainers"], *pod["containers"][1:]]:
        assert all(m["name"] != "dsjobs-spark" for m in c["volumeMounts"])
    assert all(v["name"] != "dsjobs-spark" for v in FEATURES["basic_cpu"]["spec"]["volumes"])


def _spark_secret(config: Any) -> dict[str, Any]:
    text = config if isinstance(config, str) else json.dumps(config)
    return {"data": {"config.json": base64.b64encode(text.encode()).decode()}}


GOOD_SPARK = {"master_node_host": "h:15002", "connection_mode": "SPARK_CONNECT", "session_params": {"a": "b"}}


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        (_spark_secret(GOOD_SPARK), None),
        (_spark_secret({**GOOD_SPARK, "session_params": {}}), None),
        (None, "does not exist"),
        ({"data": {}}, "has no key 'config.json'"),
        (_spark_secret("{nope"), "key 'config.json' is not JSON"),
        (_spark_secret([1]), "key 'config.json' must be a JSON object"),
        (_spark_secret({**GOOD_SPARK, "master_node_host": 1}), "master_node_host must be a string"),
        (_spark_secret({**GOOD_SPARK, "connection_mode": "YARN"}), "connection_mode must be one of"),
        (
            _spark_secret({**GOOD_SPARK, "session_params": {"a": 1}}),
            "session_params must be an object of strings",
        ),
        (_spark_secret({k: v for k, v in GOOD_SPARK.items() if k != "session_params"}), "session_params"),
    ],
)
def test_a_spark_connector_is_checked_as_the_official_client_reads_it(
    secret: dict[str, Any] | None, problem: str | None
) -> None:
    found = spark_connector_problem(secret)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_images() -> None:
    assert FEATURES["python_env"]["spec"]["containers"][0]["image"] == "python:3.12-slim"
    assert FEATURES["basic_cpu"]["spec"]["containers"][0]["image"] == "python:3.11-slim"
    assert FEATURES["docker_creds"]["spec"]["containers"][0]["image"] == "cr.example.com/team/trainer:1.2"
    assert FEATURES["docker_creds"]["spec"]["imagePullSecrets"] == [{"name": "job-1-registry"}]
    by_resource = spec(env={"dockerImageResourceId": "img-1"})
    assert user_image(by_resource, SETTINGS, {"img-1": "cr.example.com/x:1"}) == "cr.example.com/x:1"
    assert user_image(by_resource, SETTINGS, {}) is None


def test_resolve_volumes_by_label() -> None:
    job_spec = spec(s3MountIds=["b1"], datasetIds=["d1", "d2"], attachProjectDisk=True, cmd="true")
    assert pvc_selectors(job_spec) == [
        "dsjobs.dev/s3-mount-id in (b1)",
        "dsjobs.dev/dataset-id in (d1,d2)",
        "dsjobs.dev/project-disk=true",
    ]
    pvcs = [
        PvcView("z-s3", {"dsjobs.dev/s3-mount-id": "b1"}),
        PvcView("a-s3", {"dsjobs.dev/s3-mount-id": "b1"}),
        PvcView("old-d1", {"dsjobs.dev/dataset-id": "d1"}, deleting=True),
        PvcView("disk", {"dsjobs.dev/project-disk": "true"}),
    ]
    volumes, missing = resolve_volumes(job_spec, pvcs)
    assert volumes.mount_claims == {"b1": "a-s3"}  # first by name, deleting ones skipped
    assert volumes.project_disk_claim == "disk"
    assert missing == [
        "dataset 'd1' (no PersistentVolumeClaim labelled dsjobs.dev/dataset-id=d1)",
        "dataset 'd2' (no PersistentVolumeClaim labelled dsjobs.dev/dataset-id=d2)",
    ]


def test_runner_config_places_var_files_and_mounts() -> None:
    job_spec = spec(
        inputFiles=[{"desc": {"path": "/home/me/data.csv", "var": "DATA"}, "sha256": SHA, "sizeBytes": 3}],
        outputFiles=[{"path": "res.txt", "var": "OUT"}],
        s3MountIds=["b1"],
        gracefulShutdownParameters={"signal": 12, "timeout": "7s"},
        cmd="python run.py ${DATA} ${OUT} ${b1}",
    )
    config = runner_config(JOB, job_spec, attempt=3)
    assert config.attempt == 3 and config.job_id == "job-1" and config.project_id == "proj-a"
    assert config.inputs[0].path == ".dsjobs-vars/DATA/data.csv"
    assert config.outputs[0].path == "res.txt"
    assert config.s3_mounts[0].mount_path == "/job/s3/b1"
    assert config.graceful_shutdown is not None
    assert (config.graceful_shutdown.signal, config.graceful_shutdown.timeout_seconds) == (12, 7.0)


def test_runner_secret_holds_config_and_storage_only_for_the_runner() -> None:
    config = runner_config(JOB, spec(), attempt=2)
    secret = runner_secret(JOB, config, {"DSJOBS_S3_ENDPOINT": "http://s3:9000"}, attempt=2)
    assert secret["metadata"]["name"] == "job-1-a2-runner"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == JOB.uid
    assert secret_value(secret, "DSJOBS_S3_ENDPOINT") == "http://s3:9000"
    assert json.loads(secret_value(secret, "runner.json") or "")["attempt"] == 2
    pod = pod_for(spec(), attempt=2)
    assert pod["spec"]["volumes"][-1]["secret"]["secretName"] == "job-1-a2-runner"


def test_a_runner_secret_over_1_mib_is_refused_naming_the_env() -> None:
    # The API accepts specs up to 1 MiB; the entry script's shell quoting of env values can make
    # more of them (each ' becomes '\''), and the API server would refuse the Secret.
    job = spec(cmd="true", env={"vars": {f"V{i}": "'" * 32768 for i in range(31)}})
    config = runner_config(JOB, job, attempt=1)
    problem = secret_size_problem(runner_secret(JOB, config, {}, attempt=1), config)
    assert problem is not None and "more than the 1048576 a Secret may hold" in problem
    assert "environment variables (with the project's secrets) take 1015891 bytes" in problem
    fits = spec(cmd="true", env={"vars": {f"V{i}": "x" * 32768 for i in range(31)}})
    config = runner_config(JOB, fits, attempt=1)
    assert secret_size_problem(runner_secret(JOB, config, {}, attempt=1), config) is None


def test_registry_secret_is_a_dockerconfigjson_owned_by_the_job() -> None:
    secret = registry_secret(
        name="job-1-registry",
        namespace="project-a",
        labels=JOB.labels(),
        owner=JOB.owner(),
        image_url="cr.example.com:5000/team/img:1",
        username="robot",
        password="s3cret",
    )
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    doc = json.loads(secret_value(secret, ".dockerconfigjson") or "")
    entry = doc["auths"]["cr.example.com:5000"]
    assert entry["username"] == "robot" and entry["password"] == "s3cret"
    assert entry["auth"] == "cm9ib3Q6czNjcmV0"  # base64("robot:s3cret")
    assert registry_of("python:3.11") == "https://index.docker.io/v1/"
    assert registry_of("library/python") == "https://index.docker.io/v1/"
    assert registry_of("localhost/img") == "localhost"
    assert json.loads(dockerconfigjson("ghcr.io/a/b", "u", "p"))["auths"]["ghcr.io"]["username"] == "u"


def test_project_storage_credentials_replace_only_the_key_pair() -> None:
    operator_env = {
        "DSJOBS_S3_ENDPOINT": "http://s3:9000",
        "DSJOBS_S3_BUCKET": "dsjobs",
        "DSJOBS_S3_ACCESS_KEY": "BUCKET-WIDE",
        "DSJOBS_S3_SECRET_KEY": "bucket-wide-secret",
    }
    project = {"data": {"accessKey": "UFJPSkVDVA==", "secretKey": "cy1zZWNyZXQ="}}  # PROJECT, s-secret
    env, problem = project_storage_env(operator_env, project)
    assert problem == "" and env == {
        "DSJOBS_S3_ENDPOINT": "http://s3:9000",
        "DSJOBS_S3_BUCKET": "dsjobs",
        "DSJOBS_S3_ACCESS_KEY": "PROJECT",
        "DSJOBS_S3_SECRET_KEY": "s-secret",
    }
    assert project_storage_env(operator_env, {"stringData": {"accessKey": "A"}}) == (
        None,
        "has no 'secretKey'",
    )
    assert project_storage_env(operator_env, {}) == (None, "has no 'accessKey' and no 'secretKey'")
    newline = {"stringData": {"accessKey": "A\n", "secretKey": " s "}}
    env, _ = project_storage_env(operator_env, newline)
    assert env is not None and (env["DSJOBS_S3_ACCESS_KEY"], env["DSJOBS_S3_SECRET_KEY"]) == ("A", "s")
    inner = {"stringData": {"accessKey": "A B", "secretKey": "s"}}
    assert project_storage_env(operator_env, inner) == (
        None,
        "has a 'accessKey' with whitespace or control characters",
    )


def test_long_names_still_give_valid_object_names() -> None:
    name = pod_name("j" * 250, 10)
    assert len(name) <= 253 and name.endswith("-a10")
    assert pod_name("j" * 250, 10) == name != pod_name("j" * 249 + "k", 10)
    assert pod_name("job-1", 2) == "job-1-a2"


def test_catalog_types_render() -> None:
    for name, it in TYPES.items():
        assert isinstance(it, InstanceTypeSpec)
        pod = pod_for(spec(cloudInstanceTypes=[{"name": name}]), type_name=name)
        assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == str(it.vcpu)
