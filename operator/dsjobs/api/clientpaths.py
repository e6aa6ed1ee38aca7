"""Output paths as a caller may get them back.

The official CLI writes every output it downloads to the output's `desc.path`, relative to its
working directory: an absolute path or one with `..` lands anywhere the user may write. That is
the job's creator's own choice for their own job (`/home/me/result.csv: OUT`), but a path a job's
creator wrote must not be where another user's CLI writes: a project member downloading (or
forking) a colleague's job would get `~/.bashrc` or `~/.ssh/authorized_keys` written. So every
other caller sees such an output at the place the job itself had it, `.dsjobs-vars/<var>/<name>`
(models.paths.job_relative_path), relative like any other output path.

Whose paths they are is `spec.createdById`: set by the API from the caller's identity, and held to
the creator's own name for jobs applied with kubectl by the admission policy
projectjobs-created-by-their-creator (crds/).
"""

from __future__ import annotations

import dataclasses

from dsjobs.api.operations import JobSnapshot
from dsjobs.models import ProjectJobSpec, ProjectJobStatus
from dsjobs.models.files import FileDesc
from dsjobs.models.paths import is_safe_relative_path, job_relative_path


def client_desc(desc: FileDesc) -> FileDesc:
    """`desc` with a path that stays inside the client's directory."""
    if is_safe_relative_path(desc.path):
        return desc
    return desc.model_copy(update={"path": job_relative_path(desc)})


def spec_as_seen_by(spec: ProjectJobSpec, username: str) -> ProjectJobSpec:
    """The spec as `username` may get it back: unchanged for the job's creator."""
    params = spec.job_parameters
    if _is_creator(spec, username) or all(is_safe_relative_path(d.path) for d in params.output_files):
        return spec
    outputs = [client_desc(d) for d in params.output_files]
    return spec.model_copy(update={"job_parameters": params.model_copy(update={"output_files": outputs})})


def status_as_seen_by(spec: ProjectJobSpec, status: ProjectJobStatus, username: str) -> ProjectJobStatus:
    if _is_creator(spec, username) or all(is_safe_relative_path(f.desc.path) for f in status.output_files):
        return status
    files = [f.model_copy(update={"desc": client_desc(f.desc)}) for f in status.output_files]
    return status.model_copy(update={"output_files": files})


def as_seen_by(job: JobSnapshot, username: str) -> JobSnapshot:
    """The job as `username` may get it back in a response (never to be written back)."""
    spec = spec_as_seen_by(job.spec, username)
    status = status_as_seen_by(job.spec, job.status, username)
    if spec is job.spec and status is job.status:
        return job
    return dataclasses.replace(job, spec=spec, status=status)


def _is_creator(spec: ProjectJobSpec, username: str) -> bool:
    return bool(spec.created_by_id) and spec.created_by_id == username
