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
import re

from dsjobs.api.operations import JobSnapshot
from dsjobs.models import ProjectJobSpec, ProjectJobStatus
from dsjobs.models.files import FileDesc
from dsjobs.models.paths import VAR_FILES_DIR, is_safe_relative_path, job_relative_path

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


def client_desc(desc: FileDesc) -> FileDesc:
    """`desc` with a path that stays inside the client's directory; never raises (a job applied
    with kubectl may hold a path the validator would refuse: `.`, `.dsjobs-vars/x` without a var)."""
    if is_safe_relative_path(desc.path):
        return desc
    try:
        path = job_relative_path(desc)
    except ValueError:
        # No place the job could have had it (no var, or one the validator refuses): a plain
        # name below the client's directory.
        path = f"{VAR_FILES_DIR}/{_SAFE_NAME.sub('_', desc.var) or 'unnamed'}"
    return desc.model_copy(update={"path": path})


def spec_as_seen_by(spec: ProjectJobSpec, username: str) -> ProjectJobSpec:
    """The spec as `username` may get it back: unchanged for the job's creator."""
    params = spec.job_parameters
    if is_creator(spec, username) or all(is_safe_relative_path(d.path) for d in params.output_files):
        return spec
    outputs = [client_desc(d) for d in params.output_files]
    return spec.model_copy(update={"job_parameters": params.model_copy(update={"output_files": outputs})})


def status_as_seen_by(spec: ProjectJobSpec, status: ProjectJobStatus, username: str) -> ProjectJobStatus:
    """Its stored outputs and their errors named as the spec's outputs are for `username`."""
    error_descs = [e.output_file_desc for e in status.file_errors if e.output_file_desc is not None]
    if is_creator(spec, username) or all(
        is_safe_relative_path(d.path) for d in (*(f.desc for f in status.output_files), *error_descs)
    ):
        return status
    files = [f.model_copy(update={"desc": client_desc(f.desc)}) for f in status.output_files]
    errors = [
        e
        if e.output_file_desc is None
        else e.model_copy(update={"output_file_desc": client_desc(e.output_file_desc)})
        for e in status.file_errors
    ]
    return status.model_copy(update={"output_files": files, "file_errors": errors})


def as_seen_by(job: JobSnapshot, username: str) -> JobSnapshot:
    """The job as `username` may get it back in a response (never to be written back)."""
    spec = spec_as_seen_by(job.spec, username)
    status = status_as_seen_by(job.spec, job.status, username)
    if spec is job.spec and status is job.status:
        return job
    return dataclasses.replace(job, spec=spec, status=status)


def is_creator(spec: ProjectJobSpec, username: str) -> bool:
    """Whether `username` created the job (a job without spec.createdById, applied with kubectl,
    is nobody's)."""
    return bool(spec.created_by_id) and spec.created_by_id == username
