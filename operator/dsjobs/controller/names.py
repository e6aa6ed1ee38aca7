"""Names, labels and annotations of the objects the operator creates (docs/contracts.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

PROJECT_LABEL: Final = "dsjobs.dev/project-id"
JOB_LABEL: Final = "dsjobs.dev/job-id"
ATTEMPT_LABEL: Final = "dsjobs.dev/attempt"
INSTANCE_TYPE_LABEL: Final = "dsjobs.dev/instance-type"
INSTANCE_TYPE_INDEX_ANNOTATION: Final = "dsjobs.dev/instance-type-index"
# A digest of the InstanceType spec the pod was rendered from: a waiting pod of a type an admin
# changed since is made again.
INSTANCE_TYPE_DIGEST_ANNOTATION: Final = "dsjobs.dev/instance-type-digest"
#: The runner contract the pod was rendered for (runner.contract.RUNNER_CONTRACT; none: 1): a pod
#: made before an upgrade runs the runner of its day, and is dealt with as that one understands.
RUNNER_CONTRACT_ANNOTATION: Final = "dsjobs.dev/runner-contract"
#: kubectl's choice of container for `logs` and `exec` when none is named.
DEFAULT_CONTAINER_ANNOTATION: Final = "kubectl.kubernetes.io/default-container"
#: Service meshes' opt-outs of sidecar injection (Istio reads the label, Linkerd the annotation).
ISTIO_INJECT_LABEL: Final = "sidecar.istio.io/inject"
LINKERD_INJECT_ANNOTATION: Final = "linkerd.io/inject"
#: Node autoscalers' "do not take this node away while the pod runs" (terminal pods do not count).
KARPENTER_DO_NOT_DISRUPT_ANNOTATION: Final = "karpenter.sh/do-not-disrupt"
CLUSTER_AUTOSCALER_SAFE_TO_EVICT_ANNOTATION: Final = "cluster-autoscaler.kubernetes.io/safe-to-evict"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "dsjobs-operator"
# Marks the Secrets made for a job, so that cleanup never touches the user's own.
SECRET_ROLE_LABEL: Final = "dsjobs.dev/secret-role"
# The roles of the operator's own Secrets. The API's `registry-password` Secret (a plain-text
# registry password) is not one: Clone copies it from a finished job; it goes with the job.
RUNNER_SECRET_ROLE: Final = "runner"
REGISTRY_SECRET_ROLE: Final = "registry"
# Secrets that hold a registry password (the API's <job>-docker-password; a kubectl user labels
# their own): the only ones a dockerImageSpec.passwordSecretRef may name.
REGISTRY_PASSWORD_ROLE: Final = "registry-password"

S3_MOUNT_LABEL: Final = "dsjobs.dev/s3-mount-id"
DATASET_LABEL: Final = "dsjobs.dev/dataset-id"
PROJECT_DISK_LABEL: Final = "dsjobs.dev/project-disk"
# On the claims a job writes its output datasets to. While the job runs they belong to it (owner
# reference, no dataset-id label: nobody else can mount a half-written dataset); when it succeeds
# they get the dataset-id label and lose the owner reference, so they outlive the job.
OUTPUT_DATASET_LABEL: Final = "dsjobs.dev/output-dataset"
DATASET_NAME_ANNOTATION: Final = "dsjobs.dev/dataset-name"
DATASET_DESCRIPTION_ANNOTATION: Final = "dsjobs.dev/dataset-description"
DATASET_LABELS_ANNOTATION: Final = "dsjobs.dev/dataset-labels"

# Our finalizer: stored data outlives the ProjectJob unless somebody deletes it first.
FINALIZER: Final = "dsjobs.dev/cleanup"
# When the API accepted the job's Execute (RFC 3339): its Execute operation is told apart from an
# earlier one by it, and the operator judges the data's expiry at that time, not at its own.
EXECUTE_REQUESTED_AT: Final = "dsjobs.dev/execute-requested-at"
# Project secrets: one Secret per project namespace, one key per secret (env var name = key).
PROJECT_SECRETS_NAME: Final = "dsjobs-project-secrets"
# The project's docker images: ConfigMap in its namespace, key = docker image resource id, value =
# the image.
DOCKER_IMAGES_CONFIGMAP: Final = "dsjobs-docker-images"
# Project storage credentials (DSJOBS_STORAGE_CREDENTIALS=project): keys accessKey, secretKey, for
# an object store user the admin limited to the project's prefix projects/<project-id>/.
PROJECT_STORAGE_SECRET_NAME: Final = "dsjobs-project-storage"
PROJECT_STORAGE_ACCESS_KEY: Final = "accessKey"
PROJECT_STORAGE_SECRET_KEY: Final = "secretKey"

_MAX_NAME = 253


def _fit(base: str, suffix: str, limit: int = _MAX_NAME) -> str:
    """`base + suffix`, shortening base with a hash when the result would exceed the limit."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:10]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"


def pod_name(job: str, attempt: int) -> str:
    """Deterministic: the same job and attempt always name the same pod (create-if-absent)."""
    return _fit(job, f"-a{attempt}")


def registry_secret_name(job: str) -> str:
    return _fit(job, "-registry")


def runner_secret_name(job: str) -> str:
    return _fit(job, "-runner")


def output_dataset_id(job_uid: str, var: str) -> str:
    """The id of the dataset a job creates from its output dataset `var`: 20 characters like
    DataSphere's ids, unique per job object (a job created again under the same name makes new
    datasets, never writes into the old ones)."""
    return "ds" + hashlib.sha256(f"{job_uid}/{var}".encode()).hexdigest()[:18]


def output_dataset_claim_name(dataset_id: str) -> str:
    return f"dsjobs-dataset-{dataset_id}"


def spark_connector_secret_name(connector_id: str) -> str:
    """The Secret of a project's Spark connector (key `config.json`): a fixed name, so the operator
    needs only `get` on Secrets, never `list` (which would read every Secret of the cluster)."""
    return f"dsjobs-spark-{connector_id}"


def pending_output_datasets_selector(job: str) -> str:
    """The claims of a job's output datasets that were not published (the job did not succeed)."""
    return f"{JOB_LABEL}={job},{OUTPUT_DATASET_LABEL},!{DATASET_LABEL}"


def job_labels(project_id: str, job: str) -> dict[str, str]:
    return {PROJECT_LABEL: project_id, JOB_LABEL: job, MANAGED_BY_LABEL: MANAGED_BY}


#: The label the API puts on what it creates (api.core.job_labels).
API_CREATED_BY_LABEL: Final = "app.kubernetes.io/created-by"
API_CREATED_BY: Final = "dsjobs-api"


def api_registry_password_selector(job: str) -> str:
    """The label selector of the API's Secrets of a job's plain-text registry password (never a
    user's own Secret: only the API labels its Secrets so)."""
    return f"{JOB_LABEL}={job},{SECRET_ROLE_LABEL}={REGISTRY_PASSWORD_ROLE},{API_CREATED_BY_LABEL}={API_CREATED_BY}"


def operator_secrets_selector(job: str) -> str:
    """The label selector of the Secrets the operator made for a job (its cleanup deletes them)."""
    return f"{JOB_LABEL}={job},{SECRET_ROLE_LABEL} in ({RUNNER_SECRET_ROLE},{REGISTRY_SECRET_ROLE})"


def project_holder(namespaces: Iterable[Mapping[str, Any]]) -> str:
    """Of the namespaces labelled with one project id, the name of the one that holds the project
    ("" for none): the oldest, then by name. The API serves the project from it and the operator
    runs only its jobs: a project's stored data is one prefix, which the jobs of a second
    namespace carrying the label would share (and delete)."""
    held = min(
        (
            (str(meta.get("creationTimestamp", "")), str(meta.get("name", "")))
            for meta in ((ns.get("metadata") or {}) for ns in namespaces)
            if meta.get("name")
        ),
        default=("", ""),
    )
    return held[1]
