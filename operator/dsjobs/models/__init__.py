"""Pydantic v2 models of ProjectJob and InstanceType: the single source of truth.

`model.to_cr()` (= `model_dump(mode="json", by_alias=True, exclude_none=True)`) is what goes into a
custom resource; `Model.model_validate(cr_dict)` reads one back. The CRDs in `crds/` are generated
from these classes (`python -m dsjobs.crdgen`), and `dsjobs.validation` checks their values.
"""

from dsjobs import serverpython  # noqa: F401  (checks the Python at import)
from dsjobs.models.base import CRModel, Duration, Quantity, format_duration, parse_duration
from dsjobs.models.files import CompressionType, File, FileDesc
from dsjobs.models.instancetype import InstanceTypeSpec, ResourceRequirements, Toleration
from dsjobs.models.paths import is_safe_relative_path, job_relative_path, normalize_relative_path
from dsjobs.models.spec import (
    Argument,
    CancelRequest,
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
    RetryPolicy,
    SecretKeyRef,
    SparkParameters,
    StorageType,
    data_ttl_is_infinite,
)
from dsjobs.models.status import (
    FINAL_PHASES,
    Condition,
    FileError,
    FileErrorType,
    JobPhase,
    OutputDataset,
    Progress,
    ProjectJobStatus,
    StoredFile,
)
from dsjobs.quantity import parse_quantity

GROUP = "dsjobs.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PROJECTJOB_KIND = "ProjectJob"
PROJECTJOB_PLURAL = "projectjobs"
INSTANCETYPE_KIND = "InstanceType"
INSTANCETYPE_PLURAL = "instancetypes"

__all__ = [
    "API_VERSION",
    "FINAL_PHASES",
    "GROUP",
    "INSTANCETYPE_KIND",
    "INSTANCETYPE_PLURAL",
    "PROJECTJOB_KIND",
    "PROJECTJOB_PLURAL",
    "VERSION",
    "Argument",
    "CRModel",
    "CancelRequest",
    "CloudInstanceType",
    "CompressionType",
    "Condition",
    "DockerImageSpec",
    "Duration",
    "Environment",
    "ExtendedWorkingStorage",
    "File",
    "FileDesc",
    "FileError",
    "FileErrorType",
    "GracefulShutdownParameters",
    "InstanceTypeSpec",
    "JobParameters",
    "JobPhase",
    "OutputDataset",
    "OutputDatasetDesc",
    "PipOptions",
    "Progress",
    "ProjectJobSpec",
    "ProjectJobStatus",
    "PythonEnv",
    "Quantity",
    "ResourceRequirements",
    "RetryPolicy",
    "SecretKeyRef",
    "SparkParameters",
    "StorageType",
    "StoredFile",
    "Toleration",
    "data_ttl_is_infinite",
    "format_duration",
    "is_safe_relative_path",
    "job_relative_path",
    "normalize_relative_path",
    "parse_duration",
    "parse_quantity",
]
