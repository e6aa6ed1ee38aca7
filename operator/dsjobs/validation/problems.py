"""Problem records, the collector, and turning pydantic errors into problems."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel, to_snake

from dsjobs.models.base import CRModel
from dsjobs.syntax import SHELL_SPECIAL_ENV

_SEGMENT = re.compile(r"\[[^\]]*\]|[^.\[]+")


def cr_field(path: str) -> str:
    """A field path as the custom resource spells it: `job_parameters.input_files[2]` ->
    `jobParameters.inputFiles[2]` (map keys in brackets stay as they are)."""
    return "".join(
        seg if seg.startswith("[") else ("." if i else "") + to_camel(seg)
        for i, seg in enumerate(_SEGMENT.findall(path))
    )


@dataclass(frozen=True)
class Field:
    """A field a message names, spelled for whoever reads it: `job_parameters.output_files[0].var`
    to the API's clients, `spec.jobParameters.outputFiles[0].var` to kubectl users. With
    `leaf=True` it is the name of a field beside the problem's own (`attach_project_disk`, or
    `attachProjectDisk`)."""

    path: str
    leaf: bool = False

    def spelled(self, *, cr: bool) -> str:
        if not cr:
            return self.path
        return cr_field(self.path) if self.leaf else "spec." + cr_field(self.path)


#: A message as text, or as text and the fields it names (spelled when it is read).
Message = str | tuple[str | Field, ...]


def render(message: tuple[str | Field, ...], *, cr: bool) -> str:
    """A message naming fields, spelled for the API's clients or (`cr`) for kubectl users."""
    return "".join(part if isinstance(part, str) else part.spelled(cr=cr) for part in message)


@dataclass(frozen=True)
class Problem:
    """One broken rule.

    `path` names the field with proto/Python names relative to the spec root, e.g.
    `job_parameters.input_files[2].desc.path` (what the gRPC API reports); `cr_path` is the same
    field as it is spelled in the custom resource (`spec.jobParameters.inputFiles[2].desc.path`
    without the `spec.` prefix). `rule` is a stable short id (`path-parent`, `var-unique`, ...)
    that tests and clients can match on.
    """

    path: str
    rule: str
    message: str
    #: The message as a kubectl user reads it, when it names other fields (see `Field`).
    cr_message: str | None = field(default=None, compare=False)

    @property
    def cr_path(self) -> str:
        return cr_field(self.path)

    @property
    def description(self) -> str:
        """`message [rule]`: what an API client is told about the field."""
        return f"{self.message} [{self.rule}]"

    @property
    def cr_description(self) -> str:
        """`message [rule]` in the custom resource's spelling: what the operator's status says."""
        return f"{self.cr_message or self.message} [{self.rule}]"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def format_problems(problems: Iterable[Problem], *, cr: bool = False) -> str:
    """All problems, one per line: `field: message [rule]`.

    Fields have proto names (`job_parameters.output_files[0].path`), or with `cr=True` the custom
    resource's spelling (`spec.jobParameters.outputFiles[0].path`: what kubectl users see, for the
    operator's status). A problem of the whole spec has no field.
    """
    lines = []
    for p in problems:
        field_name = ("spec." + p.cr_path if cr else p.path) if p.path else ""
        description = p.cr_description if cr else p.description
        lines.append(f"{field_name}: {description}" if field_name else description)
    return "\n".join(lines)


@dataclass
class Collector:
    """Accumulates problems; every check adds to it rather than stopping at the first."""

    problems: list[Problem] = field(default_factory=list)

    def add(self, path: str, rule: str, message: Message) -> None:
        """A problem of the field at `path`; a message naming other fields gives them as `Field`s."""
        if isinstance(message, str):
            self.problems.append(Problem(path, rule, message))
        else:
            self.problems.append(Problem(path, rule, render(message, cr=False), render(message, cr=True)))

    def max_items(self, path: str, items: Sequence[object] | Mapping[str, object], limit: int) -> None:
        if len(items) > limit:
            self.add(path, "max-items", f"must have at most {limit} entries, has {len(items)}")

    def max_length(self, path: str, value: str, limit: int, rule: str = "max-length") -> None:
        if len(value) > limit:
            self.add(path, rule, f"must be at most {limit} characters, is {len(value)}")

    def pattern(self, path: str, value: str, regex: re.Pattern[str], rule: str, what: str) -> bool:
        if regex.fullmatch(value) is None:
            self.add(path, rule, f"{json.dumps(value)[:200]} is not {what}")
            return False
        return True


def at(path: str, name: str) -> str:
    """`a.b` + `c` -> `a.b.c`."""
    return f"{path}.{name}" if path else name


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def key(path: str, k: str) -> str:
    return f"{path}[{json.dumps(k)}]"


@cache
def _alias_to_name() -> dict[str, str]:
    names: dict[str, str] = {}
    pending: list[type[BaseModel]] = [CRModel]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        for name, info in cls.model_fields.items():
            names[info.alias or name] = name
    return names


def problems_from_validation_error(error: ValidationError, prefix: str = "") -> list[Problem]:
    """Pydantic's type errors as problems, with snake_case paths (pydantic reports aliases)."""
    aliases = _alias_to_name()
    problems: list[Problem] = []
    for err in error.errors(include_url=False):
        path = prefix
        loc = err["loc"]
        for n, part in enumerate(loc):
            if isinstance(part, int):
                path = index(path, part)
            elif part in aliases:
                path = at(path, aliases[part])
            elif err["type"] == "extra_forbidden" and n == len(loc) - 1:
                path = at(path, to_snake(part))
            else:  # a dict key (an env var name)
                path = key(path, part)
        rule = {"missing": "required", "extra_forbidden": "unknown-field"}.get(err["type"], "type")
        problems.append(Problem(path, rule, _message(err)))
    return problems


def _message(err: Any) -> str:
    if err["type"] == "missing":
        return "is required"
    if err["type"] == "extra_forbidden":
        return "is not a field this version of dsjobs knows (a typo, or a newer version's field)"
    return str(err["msg"])


# Every rule id a Problem can carry, with what it checks (docs/projectjob.md lists the same).
RULES: dict[str, str] = {
    # generic
    "required": "a required field is missing or empty",
    "unknown-field": "a field the model does not have (e.g. password_plain_text)",
    "type": "a value of the wrong type or format",
    "max-items": "too many list or map entries (100 for files, ids, arguments, instance types)",
    "max-length": "a string longer than its limit",
    "control-chars": "control characters in a name, description, reason or pip index URL; NUL in cmd, "
    "an env or argument value",
    "spec-size": "the spec as stored, with what its status and runner config repeat, above 896 KiB",
    # job
    "project-id": "project id syntax",
    "data-ttl": "data TTL between 1h and 365d, or infinity",
    "retry-attempts": "retry policy attempts 1..10",
    "retry-backoff": "retry policy backoff 0..3600 s",
    "exit-code": "retryable exit codes 1..255",
    "path-empty": "empty file path",
    "path-length": "file path longer than 4096 characters",
    "path-placed-length": "a file placed at a path longer than Linux's PATH_MAX (4095 bytes in /job/work/)",
    "path-control-chars": "control characters in a file path",
    "input-path-nested": "an input placed inside another input (a directory input holding a file input)",
    "output-in-input-file": "an output placed inside an input that is a file (not a ZIP directory)",
    "output-path-nested": "an output placed inside another output (a directory output and a file in it)",
    "output-key-length": "an output path longer than the object store's keys allow (874 bytes)",
    "path-name-length": "a name in the path of a file without a var longer than 255 bytes (UTF-8)",
    "path-absolute": "absolute path (leading '/' or '\\', or a drive like C:) of a file without a var",
    "path-parent": "'..' segment ('/' and '\\' separate) in the path of a file without a var",
    "path-root": "a path that names the working directory itself",
    "path-reserved": "a path inside .dsjobs-vars/",
    "input-path-duplicate": "two inputs at the same place",
    "output-path-duplicate": "two outputs at the same place",
    "var-syntax": "variable name syntax ([0-9A-Za-z_-]{1,50})",
    "var-reserved": "DS_PROJECT_HOME used as a variable",
    "var-unique": "a name declared twice across inputs, outputs, s3 mounts, datasets, arguments",
    "cmd-empty": "empty cmd",
    "cmd-length": "cmd longer than 64 KiB",
    "cmd-rendered-length": "cmd with its ${...} values longer than one argument may be (128 KiB)",
    "cmd-undeclared-var": "${NAME} in cmd that nothing declares (write $${NAME} for the shell)",
    "cmd-var-unsupported": "${NAME} in cmd naming a local module's var (no value)",
    "cmd-project-home": "${DS_PROJECT_HOME} without attach_project_disk",
    "sha256": "sha256 of 64 lowercase hex digits",
    "sha256-size": "the empty file's sha256 with a size other than 0, or size 0 with another sha256",
    "sha256-sizes": "files with one sha256 declared with different sizes",
    "zip-unnamed-dir": "a directory input with a var whose path ends in no name of its own (`.`, `..`)",
    "zip-dir-name": "a directory (ZIP) input with a var whose name cannot be one in the job (over 255 bytes)",
    "zip-empty": "a ZIP input or local module of 0 bytes",
    "size-negative": "negative file size",
    "size-max": "file above 5 GiB",
    "size-total": "inputs and local modules above 10 GiB in total",
    "resource-id": "s3 mount, dataset, docker image or connector id syntax",
    "env-name": "environment variable name syntax",
    "env-reserved": "environment variable the server sets",
    "env-shell": f"the shell's own variable ({', '.join(sorted(SHELL_SPECIAL_ENV))})",
    "env-value-length": "environment variable value longer than 32 KiB",
    "docker-oneof": "both docker_image_resource_id and docker_image_spec",
    "docker-image": "docker image reference syntax",
    "docker-password-oneof": "both password_secret_ref and password_ds_secret_name",
    "secret-name": "Secret name syntax",
    "secret-key": "Secret key syntax",
    "python-version": "python version like 3, 3.11, 3.11.4",
    "conda-yaml": "conda_yaml may pin python and list pip packages only",
    "requirement": "empty requirement line",
    "url": "pip index URL syntax",
    "host": "pip trusted host syntax",
    "working-dir-size": "instance type working dir size limit not positive",
    "shm-size": "instance type /dev/shm size negative",
    "instance-type-name": "instance type name syntax (<family>.<size>)",
    "instance-type-duplicate": "an instance type listed twice",
    "instance-type-unknown": "an instance type the cluster does not have",
    "instance-type-invalid": "an InstanceType of the cluster that breaks its own rules (the operator's)",
    "working-storage-size": "working storage 100..10240 GB",
    "signal": "graceful shutdown signal 1, 2, 10, 12 or 15",
    "graceful-timeout": "graceful shutdown timeout 1s..1h",
    "dataset-name-unique": "two output datasets with one name",
    "dataset-size": "output dataset size 0..10240 GB",
    "label-key": "label or taint key syntax",
    # instance type
    "vcpu": "at least one vCPU",
    "memory": "positive memory",
    "gpus": "non-negative GPU count",
    "quantity": "Kubernetes quantity syntax, not negative",
    "label-value": "label or taint value syntax",
    "toleration": "toleration consistency (operator, value, tolerationSeconds)",
    "resource-name": "resource name syntax",
    "request-above-limit": "a cpu/memory request above its limit",
    "extended-resource": "an extended resource (GPU) whose request differs from its limit",
    "priority-class": "priority class name syntax",
    "schedule-timeout": "schedule timeout 1 s .. 7 days",
}

# Rule ids of API requests beyond the job's spec (dsjobs.convert.params.clone_override_problems);
# docs/projectjob.md lists them with the others.
REQUEST_RULES: dict[str, str] = {
    "clone-var": "a Clone override of an input or output without a var, or with one the source lacks",
    "clone-arg": "a Clone override of an argument the source lacks",
    "clone-keeps": "a Clone override of a field a clone keeps from its source (cmd, python_env, mounts...)",
}
