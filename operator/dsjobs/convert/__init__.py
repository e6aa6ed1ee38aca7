"""Pure conversions between the public DataSphere protos and dsjobs.models.

    params = job_parameters_from_proto(req.job_parameters, docker_password_secret_name=...)
    spec = spec_from_create_request(req, created_by_id=..., docker_password_secret_name=...)
    password = docker_password_from_proto(req.job_parameters)   # store it in that Secret
    pb = job_parameters_to_proto(spec.job_parameters)
    job = job_to_proto(job_id, spec, status, created_at=...)     # or job_from_resource(cr_dict)

Values are only converted, not checked: run `dsjobs.validation` on what comes from a client.
"""

from dsjobs.convert.common import (
    PHASE_TO_PROTO,
    ConversionError,
    duration,
    file_desc_from_proto,
    file_desc_to_proto,
    file_from_proto,
    file_to_proto,
    from_duration,
    from_timestamp,
    phase_to_proto,
    timestamp,
)
from dsjobs.convert.job import (
    file_error_to_proto,
    job_from_resource,
    job_metadata_to_proto,
    job_to_proto,
    parse_resource,
    progress_to_proto,
)
from dsjobs.convert.params import (
    DOCKER_PASSWORD_KEY,
    data_ttl_from_set_request,
    docker_password_from_proto,
    docker_password_secret_name,
    job_parameters_from_proto,
    job_parameters_to_proto,
    merge_clone_overrides,
    spec_from_clone_request,
    spec_from_create_request,
)

__all__ = [
    "DOCKER_PASSWORD_KEY",
    "PHASE_TO_PROTO",
    "ConversionError",
    "data_ttl_from_set_request",
    "docker_password_from_proto",
    "docker_password_secret_name",
    "duration",
    "file_desc_from_proto",
    "file_desc_to_proto",
    "file_error_to_proto",
    "file_from_proto",
    "file_to_proto",
    "from_duration",
    "from_timestamp",
    "job_from_resource",
    "job_metadata_to_proto",
    "job_parameters_from_proto",
    "job_parameters_to_proto",
    "job_to_proto",
    "merge_clone_overrides",
    "parse_resource",
    "phase_to_proto",
    "progress_to_proto",
    "spec_from_clone_request",
    "spec_from_create_request",
    "timestamp",
]
