"""render_pod: one golden set of objects per feature, plus the properties every pod must have.

A feature's golden is what the operator renders for the job: its Pod in golden/pods/<feature>.yaml
(one Pod a file, as tests/e2e/test_deploy.py submits them to the API server) and its Secrets in
golden/secrets/<feature>.yaml: the runner Secret (runner.json, entry.sh, the storage settings) and
the registry Secret when the job's image has credentials, their data decoded for the reader.

Regenerate the golden files after an intended change:

    DSJOBS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_render_pod.py
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass
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
    registry_secret_name,
)
from dsjobs.controller.render import (
    JobRef,
    PvcView,
    Volumes,
    job_cpus,
    needs_registry_secret,
    output_dataset_claims,
    published_dataset_patch,
    pvc_selectors,
    render_pod,
    resolve_volumes,
    runner_config,
    runner_secret,
    secret_size_problem,
    shm_size_limit,
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
from dsjobs.models.instancetype import ResourceRequirements
from dsjobs.models.limits import RESOURCE_ID_PATTERN
from dsjobs.runner.contract import stages_in_python

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_PODS = GOLDEN / "pods"
GOLDEN_SECRETS = GOLDEN / "secrets"
UPDATE = os.environ.get("DSJOBS_UPDATE_GOLDEN") == "1"
SHA = "a" * 64
SHA2 = "b" * 64
SETTINGS = OperatorSettings(working_storage_class="fast-ssd")
JOB = JobRef(
    name="job-1", namespace="project-a", uid="6f1c2b1e-0000-4000-8000-000000000001", project_id="proj-a"
)
TYPES = {e.name: instance_type_spec(e, "base") for e in CATALOG}
# What the operator puts next to the runner config in the runner Secret (fixture values).
STORAGE_ENV = {
    "DSJOBS_S3_ENDPOINT": "http://s3.example.com:9000",
    "DSJOBS_S3_BUCKET": "dsjobs",
    "DSJOBS_S3_ACCESS_KEY": "FIXTURE-ACCESS-KEY",
    "DSJOBS_S3_SECRET_KEY": "fixture-secret-key",
    "DSJOBS_S3_REGION": "us-east-1",
}
# The value the operator reads from the job's passwordSecretRef (a fixture, shown in the golden).
REGISTRY_PASSWORD = "fixture-registry-password"


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
    settings: OperatorSettings = SETTINGS,
) -> dict[str, Any]:
    return render_pod(
        JOB,
        job_spec,
        attempt=attempt,
        instance_type_name=type_name,
        instance_type_index=index,
        instance_type=TYPES[type_name],
        settings=settings,
        volumes=volumes or Volumes(),
        image=image or user_image(job_spec, settings, {}) or "",
        registry_secret=registry,
        spark_secret=spark,
    )


@dataclass(frozen=True)
class RenderedJob:
    """What the operator creates for one attempt of a job: its Pod and Secrets (as handlers.py)."""

    pod: dict[str, Any]
    runner_secret: dict[str, Any]
    registry_secret: dict[str, Any] | None = None

    @property
    def secrets(self) -> list[dict[str, Any]]:
        return [self.runner_secret, *([self.registry_secret] if self.registry_secret else [])]


def render_job(
    job_spec: ProjectJobSpec,
    *,
    type_name: str = "c1.4",
    attempt: int = 1,
    index: int = 0,
    volumes: Volumes | None = None,
    spark: str | None = None,
    settings: OperatorSettings = SETTINGS,
) -> RenderedJob:
    registry: dict[str, Any] | None = None
    if needs_registry_secret(job_spec):
        env = job_spec.job_parameters.env
        assert env is not None and env.docker_image_spec is not None
        registry = registry_secret(
            name=registry_secret_name(pod_name(JOB.name, attempt)),
            namespace=JOB.namespace,
            labels=JOB.labels(),
            owner=JOB.owner(),
            image_url=env.docker_image_spec.image_url,
            username=env.docker_image_spec.username,
            password=REGISTRY_PASSWORD,
        )
    config = runner_config(JOB, job_spec, attempt)
    pod = pod_for(
        job_spec,
        type_name=type_name,
        attempt=attempt,
        index=index,
        volumes=volumes,
        registry=registry["metadata"]["name"] if registry else None,
        spark=spark,
        settings=settings,
    )
    return RenderedJob(pod, runner_secret(JOB, config, STORAGE_ENV, attempt=attempt), registry)


def _features() -> dict[str, RenderedJob]:
    return {
        "basic_cpu": render_job(
            spec(
                inputFiles=[{"desc": {"path": "main.py"}, "sha256": SHA, "sizeBytes": 10}],
                outputFiles=[{"path": "out/result.txt"}],
                env={"vars": {"MODE": "fast"}},
                arguments=[{"name": "EPOCHS", "value": "3"}],
            )
        ),
        "gpu_type": render_job(
            spec(cloudInstanceTypes=[{"name": "g1.1"}]),
            type_name="g1.1",
        ),
        "fallback_second_type": render_job(
            spec(cloudInstanceTypes=[{"name": "g2.8"}, {"name": "g1.1"}]),
            type_name="g1.1",
            attempt=2,
            index=1,
        ),
        "project_disk": render_job(
            spec(attachProjectDisk=True, cmd="ls ${DS_PROJECT_HOME}"),
            volumes=Volumes(project_disk_claim="project-disk"),
        ),
        "s3_mount": render_job(
            spec(s3MountIds=["bucket-1"], cmd="ls ${bucket-1}"),
            volumes=Volumes(mount_claims={"bucket-1": "s3-bucket-1"}),
        ),
        "dataset": render_job(
            spec(datasetIds=["ds-1"], cmd="ls ${ds-1}"),
            volumes=Volumes(mount_claims={"ds-1": "dataset-ds-1"}),
        ),
        "working_storage": render_job(spec(extendedWorkingStorage={"type": "SSD", "sizeGb": 200})),
        "output_dataset": render_job(
            spec(
                cmd="python main.py --save ${MODELS}",
                outputDatasets=[{"name": "models", "var": "MODELS", "sizeGb": 20}],
            )
        ),
        "docker_creds": render_job(
            spec(
                env={
                    "dockerImageSpec": {
                        "imageUrl": "cr.example.com/team/trainer:1.2",
                        "username": "robot",
                        "passwordSecretRef": {"name": "job-1-registry-password", "key": "password"},
                    }
                }
            )
        ),
        "python_env": render_job(
            spec(
                env={
                    "pythonEnv": {
                        "pythonVersion": "3.12",
                        "requirements": ["numpy==2.1.0", "mylib==0.3"],
                        "localModules": [
                            {
                                "desc": {"path": "/tmp/mod.zip", "var": "_LOCAL_MODULE_0"},
                                "sha256": SHA2,
                                "sizeBytes": 2048,
                                "compressionType": "ZIP",
                            }
                        ],
                        "pipOptions": {
                            "indexUrl": "https://pypi.example.com/simple",
                            "extraIndexUrls": [
                                "https://extra.example.com/simple",
                                "http://mirror.local/simple",
                            ],
                            "trustedHosts": ["mirror.local", "pypi.internal:8080"],
                            "noDeps": True,
                        },
                    }
                }
            )
        ),
        "spark_connector": render_job(
            spec(sparkParameters={"connectorId": "bt1spark"}), spark="dsjobs-spark-bt1spark"
        ),
        "graceful_shutdown": render_job(spec(gracefulShutdownParameters={"signal": 10, "timeout": "20s"})),
        "restricted": render_job(
            spec(),
            settings=dataclasses.replace(SETTINGS, job_pod_security="restricted", job_run_as_user=1000),
        ),
    }


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (scripts read as scripts); no anchors for the dicts the
    runner contract shares between containers."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def analyze_scalar(self, scalar: str) -> Any:
        # PyYAML keeps a text with a tab out of block style, which YAML allows (the entry script's
        # TSV headers); golden_texts checks the text loads back as the objects.
        analysis = super().analyze_scalar(scalar)
        if "\n" in scalar and "\t" in scalar:
            analysis.allow_block = super().analyze_scalar(scalar.replace("\t", "x")).allow_block
        return analysis


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def _dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def _decoded(key: str, text: str) -> Any:
    if not key.endswith("json"):  # entry.sh, the storage settings
        return text
    doc = json.loads(text)
    if key == ".dockerconfigjson":
        # Each login's `auth` is base64("username:password"): decoded too, named so.
        doc["auths"] = {
            registry: dict(
                ("auth (decoded)", base64.b64decode(v, validate=True).decode()) if k == "auth" else (k, v)
                for k, v in entry.items()
            )
            for registry, entry in doc["auths"].items()
        }
    return doc


def readable_secret(secret: dict[str, Any]) -> dict[str, Any]:
    """The Secret with `data` replaced by `data (decoded)`: each value as text (JSON parsed), in place."""
    out: dict[str, Any] = {}
    for field, value in secret.items():
        if field != "data":
            out[field] = value
            continue
        decoded: dict[str, Any] = {}
        for key, raw in value.items():
            text = base64.b64decode(raw, validate=True).decode()
            assert base64.b64encode(text.encode()).decode() == raw, key  # nothing lost on the way
            decoded[key] = _decoded(key, text)
        out["data (decoded)"] = decoded
    return out


def golden_texts(feature: str, job: RenderedJob) -> dict[Path, str]:
    secrets_header = (
        f"# The Secrets made with the Pod of ../pods/{feature}.yaml. `data (decoded)` is the test's\n"
        "# view of `data`: each value decoded from base64, the JSON ones parsed.\n"
    )
    readable = [readable_secret(s) for s in job.secrets]
    texts = {
        GOLDEN_PODS / f"{feature}.yaml": _dump(job.pod),
        GOLDEN_SECRETS / f"{feature}.yaml": secrets_header + "".join(f"---\n{_dump(s)}" for s in readable),
    }
    # What the files show is what was rendered (no lossy YAML styling).
    assert yaml.safe_load(texts[GOLDEN_PODS / f"{feature}.yaml"]) == job.pod
    assert list(yaml.safe_load_all(texts[GOLDEN_SECRETS / f"{feature}.yaml"])) == readable
    return texts


JOBS = _features()
FEATURES = {name: job.pod for name, job in JOBS.items()}


@pytest.mark.parametrize("feature", sorted(JOBS))
def test_golden(feature: str) -> None:
    problems: list[str] = []
    for path, text in golden_texts(feature, JOBS[feature]).items():
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists():
            problems.append(f"{path} is missing: run with DSJOBS_UPDATE_GOLDEN=1")
        elif text != (old := path.read_text()):
            diff = difflib.unified_diff(
                old.splitlines(), text.splitlines(), str(path), "rendered", lineterm=""
            )
            problems.append("\n".join(diff))
    assert not problems, (
        f"{feature}: the rendered objects differ from the golden files (DSJOBS_UPDATE_GOLDEN=1 to accept)\n"
        + "\n".join(problems)
    )


def test_no_stale_golden_files() -> None:
    for directory in (GOLDEN_PODS, GOLDEN_SECRETS):
        assert sorted(p.stem for p in directory.glob("*.yaml")) == sorted(JOBS), directory


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
    again = _features()
    assert [golden_texts(f, again[f]) for f in sorted(again)] == [
        golden_texts(f, JOBS[f]) for f in sorted(JOBS)
    ]


@pytest.mark.parametrize("feature", sorted(JOBS))
def test_the_pod_uses_the_job_s_secrets(feature: str) -> None:
    job = JOBS[feature]
    pod_spec = job.pod["spec"]
    (config_volume,) = [v for v in pod_spec["volumes"] if v["name"] == "dsjobs-config"]
    assert config_volume["secret"]["secretName"] == job.runner_secret["metadata"]["name"]
    pulls = [s["name"] for s in pod_spec.get("imagePullSecrets", [])]
    assert pulls == ([job.registry_secret["metadata"]["name"]] if job.registry_secret else [])
    for secret in job.secrets:
        assert secret["metadata"]["namespace"] == job.pod["metadata"]["namespace"]
        assert secret["metadata"]["ownerReferences"] == job.pod["metadata"]["ownerReferences"]
        assert secret["immutable"] is True


def test_gpu_pod_gets_the_catalog_placement() -> None:
    pod = FEATURES["gpu_type"]
    assert pod["spec"]["nodeSelector"] == {"dsjobs.dev/node-pool": "gpu"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
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


@pytest.mark.parametrize(("setting", "expected"), [(None, "Always"), ("IfNotPresent", "IfNotPresent")])
def test_a_job_that_names_its_image_has_it_pulled_with_its_own_credentials(
    setting: str | None, expected: str | None
) -> None:
    # With IfNotPresent a node would run another project's private image that an earlier job
    # pulled there with that project's credentials.
    settings = (
        settings_from_env({})
        if setting is None
        else dataclasses.replace(SETTINGS, job_image_pull_policy=setting)
    )

    def policy(job_spec: ProjectJobSpec, image: str) -> str | None:
        pod = render_pod(
            JOB, job_spec, attempt=1, instance_type_name="c1.4", instance_type_index=0,
            instance_type=TYPES["c1.4"], settings=settings, volumes=Volumes(), image=image,
        )  # fmt: skip
        (job,) = [c for c in pod["spec"]["containers"] if c["name"] == "job"]
        return job.get("imagePullPolicy")

    by_url = spec(env={"dockerImageSpec": {"imageUrl": "cr.example.com/b/model:3"}})
    assert policy(by_url, "cr.example.com/b/model:3") == expected
    assert policy(spec(env={"dockerImageResourceId": "img-1"}), "cr.example.com/b/model:3") == expected
    # The operator's own runtime image: Kubernetes' default, no registry round trip per job.
    assert policy(spec(), "python:3.11-slim") is None


def test_job_image_pull_policy_setting_is_checked() -> None:
    with pytest.raises(SettingsError, match="DSJOBS_JOB_IMAGE_PULL_POLICY='always': must be one of Always"):
        settings_from_env({"DSJOBS_JOB_IMAGE_PULL_POLICY": "always"})


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


def test_job_pods_meet_the_restricted_pod_security_standard_when_asked() -> None:
    # For project namespaces enforcing `restricted`; the runner's containers meet it either way.
    pod = FEATURES["restricted"]
    assert pod["spec"]["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    containers = [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]
    for c in containers:
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert context["runAsNonRoot"] is True, c["name"]
    job = next(c for c in containers if c["name"] == "job")
    assert job["securityContext"]["runAsUser"] == 1000
    # baseline (the default): the job runs as its image's user; the docker default seccomp profile.
    basic = FEATURES["basic_cpu"]
    assert "securityContext" not in next(c for c in basic["spec"]["containers"] if c["name"] == "job")
    assert basic["spec"]["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    # 0: the image's own (non-root) user.
    image_user = dataclasses.replace(SETTINGS, job_pod_security="restricted", job_run_as_user=0)
    job = next(c for c in pod_for(spec(), settings=image_user)["spec"]["containers"] if c["name"] == "job")
    assert "runAsUser" not in job["securityContext"] and job["securityContext"]["runAsNonRoot"] is True


def test_the_program_is_told_its_instance_type_s_cpus() -> None:
    # DSJOBS_CPUS sizes its thread pools (OMP_NUM_THREADS...): the CPU limit in whole CPUs, else the
    # type's vCPUs; the downward API would give the node's CPUs to a type without a limit.
    c14 = TYPES["c1.4"]
    job = next(c for c in FEATURES["basic_cpu"]["spec"]["containers"] if c["name"] == "job")
    assert {"name": "DSJOBS_CPUS", "value": "4"} in job["env"]
    limits = dict(c14.resources.limits)
    for limit, told in (("500m", 1), ("2.5", 3), ("16", 16)):
        typed = c14.model_copy(update={"resources": ResourceRequirements(limits={**limits, "cpu": limit})})
        assert job_cpus(typed) == told
    unlimited = {k: v for k, v in limits.items() if k != "cpu"}
    bare = c14.model_copy(update={"resources": ResourceRequirements(limits=unlimited), "vcpu": 6})
    assert job_cpus(bare) == 6


def test_pod_security_settings_are_checked() -> None:
    with pytest.raises(
        SettingsError, match="DSJOBS_JOB_POD_SECURITY='strict': must be one of baseline, restricted"
    ):
        settings_from_env({"DSJOBS_JOB_POD_SECURITY": "strict"})
    with pytest.raises(SettingsError, match="DSJOBS_JOB_RUN_AS_USER=-1: must not be negative"):
        settings_from_env({"DSJOBS_JOB_RUN_AS_USER": "-1"})


def test_the_job_gets_half_its_memory_as_dev_shm() -> None:
    # Container runtimes give 64 MiB, which PyTorch DataLoader workers and NCCL outgrow.
    pod = FEATURES["basic_cpu"]
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dsjobs-shm")
    assert shm == {"name": "dsjobs-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    main = next(c for c in pod["spec"]["containers"] if c["name"] == "job")
    assert {"name": "dsjobs-shm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    # Only the job's container: the runner's have no use for it.
    others = [c for c in (*pod["spec"]["containers"], *pod["spec"]["initContainers"]) if c is not main]
    assert others and all(m["name"] != "dsjobs-shm" for c in others for m in c.get("volumeMounts", []))
    c14 = TYPES["c1.4"]
    assert c14.resources.limits["memory"] == "32Gi"
    assert shm_size_limit(c14) == "16Gi"
    # The limit, else the request, else what the type advertises; halves in the largest unit.
    odd = c14.model_copy(update={"resources": ResourceRequirements(requests={"memory": "3G"})})
    assert shm_size_limit(odd) == "1500000000"
    bare = c14.model_copy(update={"resources": ResourceRequirements(), "memory": "3Gi"})
    assert shm_size_limit(bare) == "1536Mi"
    # Set: as written; 0: the container runtime's own /dev/shm, no volume.
    assert shm_size_limit(c14.model_copy(update={"shm_size": "2Gi"})) == "2Gi"
    assert shm_size_limit(c14.model_copy(update={"shm_size": "0"})) is None
    off = render_pod(
        JOB,
        spec(),
        attempt=1,
        instance_type_name="c1.4",
        instance_type_index=0,
        instance_type=c14.model_copy(update={"shm_size": "0"}),
        settings=SETTINGS,
        volumes=Volumes(),
        image="python:3.11-slim",
    )
    assert all(v["name"] != "dsjobs-shm" for v in off["spec"]["volumes"])


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
        return {k: v for k, v in pod["spec"]["securityContext"].items() if k != "seccompProfile"}

    wanted = {"fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}
    storage = spec(extendedWorkingStorage={"type": "SSD", "sizeGb": 200})
    datasets = spec(cmd="ls ${D}", outputDatasets=[{"name": "d", "var": "D", "sizeGb": 1}])
    assert context(storage, settings) == wanted
    assert context(datasets, settings) == wanted
    assert context(spec(), settings) == {}  # an emptyDir is 0777 already
    assert context(storage, SETTINGS) == {}  # off by default
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
        # There, but not text: told as such, not as missing (its owner would look for the key).
        (
            {"data": {"config.json": base64.b64encode(b"{\xff}").decode()}},
            "key 'config.json' is not UTF-8 text",
        ),
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
    assert FEATURES["docker_creds"]["spec"]["imagePullSecrets"] == [{"name": "job-1-a1-registry"}]
    by_resource = spec(env={"dockerImageResourceId": "img-1"})
    assert user_image(by_resource, SETTINGS, {"img-1": "cr.example.com/x:1"}) == "cr.example.com/x:1"
    assert user_image(by_resource, SETTINGS, {}) is None


def test_gpu_types_run_the_gpu_python_image_when_there_is_one() -> None:
    gpu, cpu = TYPES["g1.1"], TYPES["c1.4"]
    python = spec(env={"pythonEnv": {"pythonVersion": "3.10"}})
    cuda = dataclasses.replace(SETTINGS, python_gpu_image="reg.example.com/ml/py-cuda:{version}")
    assert user_image(python, cuda, {}, gpu) == "reg.example.com/ml/py-cuda:3.10"
    assert user_image(python, cuda, {}, cpu) == "python:3.10-slim"
    assert user_image(spec(), cuda, {}, gpu) == "reg.example.com/ml/py-cuda:3.11"
    # Unset: GPU types run DSJOBS_PYTHON_IMAGE; a job's own image wins on any type.
    assert user_image(python, SETTINGS, {}, gpu) == "python:3.10-slim"
    own = spec(env={"dockerImageSpec": {"imageUrl": "cr.example.com/x:2"}})
    assert user_image(own, cuda, {}, gpu) == "cr.example.com/x:2"
    # MIG slices are GPUs too.
    mig = gpu.model_copy(
        update={
            "gpus": 0,
            "resources": gpu.resources.model_copy(
                update={
                    "limits": {"nvidia.com/mig-1g.10gb": "1"},
                    "requests": {"nvidia.com/mig-1g.10gb": "1"},
                }
            ),
        }
    )
    assert user_image(python, cuda, {}, mig) == "reg.example.com/ml/py-cuda:3.10"


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
        "dataset 'd1' (its PersistentVolumeClaim 'old-d1' labelled dsjobs.dev/dataset-id=d1 is being deleted)",
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
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert sorted(secrets.values()) == ["dsjobs-project-secrets", "job-1-a2-runner"]
    # The runner's containers mount the runner Secret, the job's container the project secrets only.
    for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        mounted = {secrets[m["name"]] for m in c.get("volumeMounts", ()) if m["name"] in secrets}
        assert mounted == ({"dsjobs-project-secrets"} if c["name"] == "job" else {"job-1-a2-runner"}), c[
            "name"
        ]


def test_a_runner_secret_over_1_mib_is_refused_naming_the_env() -> None:
    # The API accepts specs up to 1 MiB; the config's JSON escaping of env values can make more of
    # them (a control character takes six bytes), and the API server would refuse the Secret.
    job = spec(cmd="true", env={"vars": {f"V{i}": "\x01" * 32768 for i in range(31)}})
    config = runner_config(JOB, job, attempt=1)
    problem = secret_size_problem(runner_secret(JOB, config, {}, attempt=1), config)
    assert problem is not None and "more than the 1048576 a Secret may hold" in problem
    assert "environment variables take 1015891 bytes" in problem
    fits = spec(cmd="true", env={"vars": {f"V{i}": "x" * 32768 for i in range(31)}})
    config = runner_config(JOB, fits, attempt=1)
    assert secret_size_problem(runner_secret(JOB, config, {}, attempt=1), config) is None


def test_a_job_too_big_for_the_shell_stage_in_stages_in_python() -> None:
    """The shell stage-in quotes env values into its entry script (a ' takes five bytes) and names
    the output directories in its `sh -c` argument (one argument: 128 KiB at most): a job the API
    accepted failed ConfigTooLarge, or its stage-in could not start (E2BIG), without inputs."""
    quotes = spec(cmd="true", env={"vars": {f"V{i}": "'" * 32768 for i in range(31)}})
    config = runner_config(JOB, quotes, attempt=1)
    assert stages_in_python(config)
    assert secret_size_problem(runner_secret(JOB, config, {}, attempt=1), config) is None
    deep = "/".join(["d" * 200] * 6)
    outputs = spec(cmd="true", outputFiles=[{"path": f"{deep}/o{i}/r.txt"} for i in range(100)])
    config = runner_config(JOB, outputs, attempt=1)
    assert stages_in_python(config)
    stage_in = pod_for(outputs)["spec"]["initContainers"][0]
    assert len(" ".join(stage_in["command"]).encode()) < 128 * 1024
    plain = spec(cmd="true", outputFiles=[{"path": "out/r.txt"}])
    assert not stages_in_python(runner_config(JOB, plain, attempt=1))


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
    latin1 = {"data": {"accessKey": base64.b64encode("clé".encode("latin-1")).decode(), "secretKey": "cw=="}}
    assert project_storage_env(operator_env, latin1) == (None, "has a 'accessKey' that is not UTF-8 text")


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


def test_the_instance_type_digest_covers_what_goes_into_the_pod_only() -> None:
    # A pod waiting for a node is made again when its type's digest changes: an edit of the
    # type's description, or a field a newer version adds, must not do that.
    import hashlib

    from dsjobs.controller.render import _POD_FIELDS, instance_type_digest, made_from

    assert set(_POD_FIELDS) <= {f.alias for f in InstanceTypeSpec.model_fields.values()}
    base = instance_type_spec(next(e for e in CATALOG if e.gpus))
    digest = instance_type_digest(base)
    for same in ({"description": "edited"}, {"vcpu": base.vcpu + 1}, {"schedule_timeout_seconds": 999}):
        assert instance_type_digest(base.model_copy(update=same)) == digest
    changed = base.model_copy(update={"node_selector": {**base.node_selector, "zone": "b"}})
    assert instance_type_digest(changed) != digest
    assert not made_from(digest, changed) and made_from(digest, base)
    # A pod an older operator made carries the digest of the whole spec: not made again for the
    # upgrade alone, made again when the type did change.
    old_style = hashlib.sha256(
        json.dumps(base.to_cr(), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
    assert made_from(old_style, base) and not made_from(old_style, changed)


def test_runner_config_keeps_input_and_output_vars_and_zip() -> None:
    # No golden job has an output var: lost, `${OUT}` reached the shell as an empty expansion and
    # the program wrote where nothing is uploaded from.
    from dsjobs.controller.render import runner_config
    from dsjobs.runner.cmd import render_config_cmd
    from dsjobs.runner.config import Compression

    s = spec(
        cmd="python main.py --data ${DATA} --out ${OUT}",
        inputFiles=[
            {
                "desc": {"path": "data", "var": "DATA"},
                "sha256": "a" * 64,
                "sizeBytes": 10,
                "compressionType": "ZIP",
            }
        ],
        outputFiles=[{"path": "out/result.txt", "var": "OUT"}],
    )
    config = runner_config(JOB, s, attempt=1)
    assert config.inputs[0].var == "DATA" and config.inputs[0].compression == Compression.ZIP
    assert config.outputs[0].var == "OUT"
    assert "${" not in render_config_cmd(config)


def test_a_registry_password_in_a_project_secret_needs_the_pull_secret() -> None:
    from dsjobs.controller.render import needs_registry_secret

    image = {"imageUrl": "cr.example.com/a/b:1", "username": "u", "passwordDsSecretName": "REGISTRY_PW"}
    assert needs_registry_secret(spec(env={"dockerImageSpec": image}))


def test_a_runner_secret_just_over_1_mib_is_refused() -> None:
    # At the edge, not only far past it: 1-2 MiB passed a doubled bound, and the API server then
    # refused the Secret.
    from dsjobs.controller.render import runner_config, runner_secret, secret_size_problem

    s = spec(cmd="true", env={"vars": {f"V{i}": "x" * 36000 for i in range(31)}})  # ~1.07 MiB
    config = runner_config(JOB, s, attempt=1)
    assert secret_size_problem(runner_secret(JOB, config, {}, attempt=1), config) is not None
