"""Rules of a ProjectJob spec. Pure: no cluster, no clock, no I/O."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_snake

from dsjobs.condaenv import read_conda_env
from dsjobs.models import limits as L
from dsjobs.models.files import CompressionType, File, FileDesc
from dsjobs.models.paths import (
    JOB_WORK_DIR,
    job_relative_path,
    last_name,
    named_by_var,
    path_problem,
    placed_path_bytes,
)
from dsjobs.models.spec import (
    DockerImageSpec,
    Environment,
    JobParameters,
    OutputDatasetDesc,
    ProjectJobSpec,
    PythonEnv,
)
from dsjobs.models.status import OutputDataset, StoredFile
from dsjobs.s3http import EMPTY_SHA256
from dsjobs.syntax import CMD_REFERENCE_PATTERN, breaks_lines, named_segments
from dsjobs.validation.problems import (
    Collector,
    Field,
    Problem,
    at,
    index,
    key,
    problems_from_validation_error,
)

_SHA256 = re.compile(L.SHA256_PATTERN)
_VAR = re.compile(L.VAR_PATTERN)
_RESOURCE_ID = re.compile(L.RESOURCE_ID_PATTERN)
# What an image reference has and a resource id never does: a tag, a registry path or host.
_IMAGE_LIKE = re.compile(r"[:/.]")
_INSTANCE_TYPE = re.compile(L.INSTANCE_TYPE_NAME_PATTERN)
_ENV_NAME = re.compile(L.ENV_VAR_NAME_PATTERN)
_PYTHON_VERSION = re.compile(L.PYTHON_VERSION_PATTERN)
_DOCKER_REFERENCE = re.compile(L.DOCKER_REFERENCE_PATTERN)
_DOCKER_NAME_PREFIX = re.compile(r"^[^:@]*(?::[0-9]+/[^:@]*)?")
_SECRET_NAME = re.compile(L.SECRET_NAME_PATTERN)
_SECRET_KEY = re.compile(L.SECRET_KEY_PATTERN)
_URL = re.compile(L.URL_PATTERN)
_HOST_PORT = re.compile(L.HOST_PORT_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# `${NAME}` in cmd; `$${...}` is the escape the runner passes to the shell (see cmd_references).
CMD_VAR_REFERENCE = re.compile(CMD_REFERENCE_PATTERN)
# Declarations whose var the runner has no value for: local modules are put on PYTHONPATH (the
# CLI's `_LOCAL_MODULE_<i>` is not a cmd variable there).
_NOT_CMD_VARS = {
    "env.python_env.local_modules[": "local modules are put on PYTHONPATH; their vars have no value in cmd",
}


def parse_job_spec(
    data: Mapping[str, Any],
    *,
    known_instance_types: Collection[str] | None = None,
    invalid_instance_types: Mapping[str, str] | None = None,
) -> tuple[ProjectJobSpec | None, list[Problem]]:
    """Read a CR's `spec` (camelCase or snake_case keys) and check it: (spec or None, all problems).

    Type errors make the spec unreadable, so they come back alone; otherwise every rule is checked.
    """
    try:
        spec = ProjectJobSpec.model_validate(data)
    except ValidationError as exc:
        return None, problems_from_validation_error(exc)
    return spec, validate_job_spec(
        spec, known_instance_types=known_instance_types, invalid_instance_types=invalid_instance_types
    )


def data_ttl_problem(ttl: timedelta, *, infinity_writable: bool = True) -> str | None:
    """What is wrong with a data TTL (None: nothing). The operator checks a TTL changed after
    the job started with it too: a kubectl edit is not validated otherwise.

    `infinity_writable`: whether the writer could have written `infinity` (a CR can; a protobuf
    Duration cannot, so the API's message does not offer it)."""
    if ttl != L.INFINITE_TTL and not (L.MIN_DATA_TTL <= ttl <= L.MAX_DATA_TTL):
        return "must be between 1h and 365d" + (", or infinity" if infinity_writable else "")
    return None


def cancel_reason_problems(reason: str) -> list[Problem]:
    """The rules of spec.cancel.reason, for the API's Cancel (which writes it there)."""
    c = Collector()
    _text(c, "reason", reason, L.MAX_DESC_LENGTH, allow_newlines=True)
    return c.problems


def validate_job_spec(
    spec: ProjectJobSpec,
    *,
    known_instance_types: Collection[str] | None = None,
    invalid_instance_types: Mapping[str, str] | None = None,
    infinity_writable: bool = True,
) -> list[Problem]:
    """Every problem of a job spec (empty when valid).

    `known_instance_types`, when given, are the InstanceType names of the cluster: a job naming
    another one is rejected. The API and the operator pass the catalog they see.
    `invalid_instance_types`: InstanceTypes of the cluster left out of that catalog, with what is
    wrong with each (the operator's): a job naming one is told so, not that the cluster lacks it.
    `infinity_writable`: see `data_ttl_problem` (False for the API's requests).
    """
    c = Collector()
    c.pattern("project_id", spec.project_id, _RESOURCE_ID, "project-id", "a project id")
    _text(c, "name", spec.name, L.MAX_NAME_LENGTH)
    _text(c, "desc", spec.desc, L.MAX_DESC_LENGTH, allow_newlines=True)
    c.max_length("config", spec.config, L.MAX_CONFIG_LENGTH)
    c.max_length("created_by_id", spec.created_by_id, L.MAX_USER_ID_LENGTH)
    c.max_length("parent_job_id", spec.parent_job_id, 253)
    ttl_problem = data_ttl_problem(spec.data_ttl, infinity_writable=infinity_writable)
    if ttl_problem is not None:
        c.add("data_ttl", "data-ttl", ttl_problem)
    if spec.cancel is not None:
        _text(c, "cancel.reason", spec.cancel.reason, L.MAX_DESC_LENGTH, allow_newlines=True)
    if spec.retry_policy is not None:
        rp = spec.retry_policy
        if not 1 <= rp.max_attempts <= L.MAX_ATTEMPTS:
            c.add("retry_policy.max_attempts", "retry-attempts", f"must be between 1 and {L.MAX_ATTEMPTS}")
        if not 0 <= rp.backoff_seconds <= L.MAX_BACKOFF_SECONDS:
            c.add(
                "retry_policy.backoff_seconds",
                "retry-backoff",
                f"must be between 0 and {L.MAX_BACKOFF_SECONDS}",
            )
        c.max_items("retry_policy.retry_on_exit_codes", rp.retry_on_exit_codes, 32)
        for i, code in enumerate(rp.retry_on_exit_codes):
            if not 1 <= code <= 255:
                c.add(index("retry_policy.retry_on_exit_codes", i), "exit-code", "must be between 1 and 255")
    c.problems += validate_job_parameters(
        spec.job_parameters,
        known_instance_types=known_instance_types,
        invalid_instance_types=invalid_instance_types,
    )
    own, repeated = job_size_bytes(spec)
    if own + repeated > L.MAX_SPEC_JSON_BYTES:
        repeats: tuple[str | Field, ...] = (
            (
                f", and {repeated} that its status repeats of its outputs (each one's path and object "
                "key) and output datasets, and its runner config of the pip packages of ",
                Field("job_parameters.env.python_env.conda_yaml"),
            )
            if repeated
            else ()
        )
        c.add(
            "",
            "spec-size",
            (
                f"the job takes {own + repeated} bytes, at most {L.MAX_SPEC_JSON_BYTES} are allowed "
                f"(etcd holds it with its status in {L.ETCD_MAX_REQUEST_BYTES} bytes, a Secret its "
                f"runner config in 1 MiB): {own} as the API server stores its spec (JSON in UTF-8, "
                "where <, > and & take 6 bytes)",
                *repeats,
                "; the largest parts: ",
                *_largest_parts(spec),
            ),
        )
    return c.problems


def _largest_parts(spec: ProjectJobSpec, count: int = 3) -> tuple[str | Field, ...]:
    """The spec's largest fields as stored (`config`, `job_parameters.env`, ...), for a job too
    large: which one to make smaller."""
    doc = spec.to_cr()
    params = doc.get("jobParameters") or {}
    sizes = {to_snake(k): stored_json_bytes(v) for k, v in doc.items() if k != "jobParameters"}
    sizes.update({f"job_parameters.{to_snake(k)}": stored_json_bytes(v) for k, v in params.items()})
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:count]
    parts: list[str | Field] = []
    for name, size in largest:
        parts += [", " if parts else "", Field(name), f" {size} bytes"]
    return tuple(parts)


def stored_json_bytes(doc: Any) -> int:
    """The bytes of `doc` as the API server writes it to etcd: Go's encoding/json, compact, UTF-8.

    Go escapes `<`, `>` and `&` (6 bytes for 1) and U+2028, U+2029 (6 for 3); Python does not. A
    lone surrogate (JSON may carry one) becomes U+FFFD there: 3 bytes, as surrogatepass counts it."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode("utf-8", "surrogatepass"))
    html = text.count("<") + text.count(">") + text.count("&")
    return size + 5 * html + 3 * (text.count("\u2028") + text.count("\u2029"))


#: Stand-ins for what the finished status adds to each output: the largest object size, the
#: longest job id (a DNS label), a dataset id (20 characters, dsjobs.controller.names; 63 here).
_ANY_SIZE = 2**63 - 1
_ANY_JOB_ID = "j" * L.MAX_JOB_NAME
_ANY_DATASET_ID = "d" * 63


def job_size_bytes(spec: ProjectJobSpec) -> tuple[int, int]:
    """(the spec's bytes as stored, what the status and the runner config repeat of it): see
    L.MAX_SPEC_JSON_BYTES, which their sum must not exceed."""
    params = spec.job_parameters
    repeated = 0
    for d in params.output_files:
        try:
            place = job_relative_path(d)
        except ValueError:  # refused anyway; its path stands in
            place = d.path
        stored = StoredFile.model_construct(
            desc=d,
            sha256="0" * 64,
            size_bytes=_ANY_SIZE,
            compression_type=CompressionType.NONE,
            key=f"projects/{spec.project_id}/jobs/{_ANY_JOB_ID}/outputs/{place}",  # storage.output_key
        )
        repeated += stored_json_bytes(stored.to_cr()) + 1  # and a comma
    for ds in params.output_datasets:
        repeated += stored_json_bytes(OutputDataset.model_construct(desc=ds, id=_ANY_DATASET_ID).to_cr()) + 1
    python_env = params.env.python_env if params.env is not None else None
    if python_env is not None and len(python_env.conda_yaml) <= L.MAX_CONFIG_LENGTH:
        pip = read_conda_env(python_env.conda_yaml).pip
        repeated += sum(len(json.dumps(line, ensure_ascii=False).encode()) + 1 for line in pip)
    return stored_json_bytes(spec.to_cr()), repeated


def validate_job_parameters(
    params: JobParameters,
    *,
    path: str = "job_parameters",
    known_instance_types: Collection[str] | None = None,
    invalid_instance_types: Mapping[str, str] | None = None,
) -> list[Problem]:
    """Every problem of JobParameters (also used for CloneProjectJob overrides after merging)."""
    c = Collector()
    _files(c, params, path)
    _ids(c, at(path, "s3_mount_ids"), params.s3_mount_ids)
    _ids(c, at(path, "dataset_ids"), params.dataset_ids)
    _arguments(c, params, path)
    _output_datasets(c, at(path, "output_datasets"), params.output_datasets)
    _vars_unique(c, params, path)
    _cmd(c, params, path)
    if params.env is not None:
        _environment(c, at(path, "env"), params.env)
    _instance_types(c, params, path, known_instance_types, invalid_instance_types or {})
    ws = params.extended_working_storage
    if ws is not None and not L.MIN_WORKING_STORAGE_GB <= ws.size_gb <= L.MAX_WORKING_STORAGE_GB:
        c.add(
            at(path, "extended_working_storage.size_gb"),
            "working-storage-size",
            f"must be between {L.MIN_WORKING_STORAGE_GB} and {L.MAX_WORKING_STORAGE_GB} GB",
        )
    gs = params.graceful_shutdown_parameters
    if gs is not None:
        gpath = at(path, "graceful_shutdown_parameters")
        if gs.signal not in L.SHUTDOWN_SIGNALS.values():
            allowed = ", ".join(
                f"{n} ({s})" for s, n in sorted(L.SHUTDOWN_SIGNALS.items(), key=lambda kv: kv[1])
            )
            c.add(at(gpath, "signal"), "signal", f"must be one of {allowed}")
        if gs.timeout is not None and not L.MIN_GRACEFUL_TIMEOUT <= gs.timeout <= L.MAX_GRACEFUL_TIMEOUT:
            c.add(at(gpath, "timeout"), "graceful-timeout", "must be between 1s and 1h")
    sp = params.spark_parameters
    if sp is not None and sp.connector_id:
        c.pattern(
            at(path, "spark_parameters.connector_id"), sp.connector_id, _RESOURCE_ID, "resource-id", "an id"
        )
    return c.problems


def _text(c: Collector, path: str, value: str, limit: int, *, allow_newlines: bool = False) -> None:
    c.max_length(path, value, limit)
    checked = value.replace("\n", "").replace("\t", "").replace("\r", "") if allow_newlines else value
    if _CONTROL.search(checked):
        c.add(path, "control-chars", "must not contain control characters")


# --- files ------------------------------------------------------------------------------------


def _files(c: Collector, params: JobParameters, path: str) -> None:
    inputs_path, outputs_path = at(path, "input_files"), at(path, "output_files")
    c.max_items(inputs_path, params.input_files, L.MAX_LIST_ITEMS)
    c.max_items(outputs_path, params.output_files, L.MAX_LIST_ITEMS)
    uploads: list[tuple[str, File]] = []
    input_places: dict[str, list[str]] = {}
    # Inputs that are files (not ZIP): their place is no directory to hold anything.
    file_places: dict[str, str] = {}
    for i, f in enumerate(params.input_files):
        fpath = index(inputs_path, i)
        ppath = at(fpath, "desc.path")
        zipped = f.compression_type == CompressionType.ZIP
        if _desc(c, at(fpath, "desc"), f.desc):
            place = job_relative_path(f.desc)
            input_places.setdefault(place, []).append(ppath)
            if not zipped:
                file_places.setdefault(place, ppath)
            _placed_length(c, ppath, place)
        if zipped and f.desc.var and _unnamed_directory(f.desc.path):
            c.add(
                ppath,
                "zip-unnamed-dir",
                f"directory {f.desc.path!r} has no name of its own: the CLI zips its files relative to "
                "it (or outside it, for '..'), so they would not be where the var points; give the "
                "directory by a path ending in its name, e.g. '../myproject'",
            )
        elif zipped and _VAR.fullmatch(f.desc.var) and named_by_var(f.desc):
            # Its entries are unpacked as the CLI named them (`<directory>/...`), beside a place
            # named after the var: `${VAR}` would name an empty directory.
            c.add(
                ppath,
                "zip-dir-name",
                f"a directory (ZIP) input is unpacked under its own name, and {_name_problem(f.desc.path)}: "
                f"${{{f.desc.var}}} would name an empty directory; rename the directory",
            )
        uploads.append((fpath, f))
    output_places: dict[str, list[str]] = {}
    for i, d in enumerate(params.output_files):
        dpath = index(outputs_path, i)
        if _desc(c, dpath, d):
            place = job_relative_path(d)
            output_places.setdefault(place, []).append(at(dpath, "path"))
            _placed_length(c, at(dpath, "path"), place)
    env = params.env
    if env is not None and env.python_env is not None:
        modules_path = at(path, "env.python_env.local_modules")
        c.max_items(modules_path, env.python_env.local_modules, L.MAX_LIST_ITEMS)
        for i, f in enumerate(env.python_env.local_modules):
            mpath = index(modules_path, i)
            _desc(c, at(mpath, "desc"), f.desc, location=False)
            uploads.append((mpath, f))
    _duplicates(c, input_places, "input-path-duplicate", "another input file already lives at {place!r}")
    _nested(c, input_places, "input")
    _duplicates(c, output_places, "output-path-duplicate", "another output file is already at {place!r}")
    _nested(c, output_places, "output")
    _outputs_in_input_files(c, output_places, file_places)
    for place, paths in output_places.items():
        size = len(place.encode())
        if size > L.MAX_OUTPUT_PLACE_BYTES:
            c.add(
                paths[0],
                "output-key-length",
                f"is {size} bytes as stored (UTF-8, below the job's outputs/): the object store's "
                f"keys take at most {L.MAX_OUTPUT_PLACE_BYTES} there (S3: 1024 bytes in all); "
                "shorten the path",
            )
    total = 0
    # One content has one size: the store holds one object per sha256, checked against the size
    # of whichever declaration came first.
    sizes: dict[str, tuple[str, int]] = {}
    for fpath, f in uploads:
        total += max(f.size_bytes, 0)
        first = sizes.setdefault(f.sha256, (fpath, f.size_bytes))
        if first[1] != f.size_bytes:
            c.add(
                at(fpath, "size_bytes"),
                "sha256-sizes",
                (
                    f"{f.size_bytes} disagrees with ",
                    Field(at(first[0], "size_bytes")),
                    f" ({first[1]}) for the same sha256 {f.sha256}: one content has one size",
                ),
            )
        if not _SHA256.fullmatch(f.sha256):
            c.add(at(fpath, "sha256"), "sha256", "must be 64 lowercase hex digits")
        elif (f.size_bytes == 0) != (f.sha256 == EMPTY_SHA256):
            # Contradictory: the store could never hold what is described (the empty file is
            # never stored, see storage.is_stored_input).
            c.add(
                at(fpath, "sha256"),
                "sha256-size",
                (
                    f"{EMPTY_SHA256} is the sha256 of the empty file, and only of it; ",
                    Field("size_bytes", leaf=True),
                    f" {f.size_bytes} disagrees",
                ),
            )
        elif f.size_bytes == 0 and f.compression_type == CompressionType.ZIP:
            c.add(at(fpath, "compression_type"), "zip-empty", "an empty file is not a ZIP archive")
        if f.size_bytes < 0:
            c.add(at(fpath, "size_bytes"), "size-negative", "must not be negative")
        elif f.size_bytes > L.MAX_FILE_SIZE_BYTES:
            c.add(
                at(fpath, "size_bytes"), "size-max", f"a file may have at most {L.MAX_FILE_SIZE_BYTES} bytes"
            )
    if total > L.MAX_TOTAL_UPLOAD_BYTES:
        c.add(
            inputs_path,
            "size-total",
            f"input files and local modules total {total} bytes, at most {L.MAX_TOTAL_UPLOAD_BYTES} are allowed",
        )


def _name_problem(path: str) -> str:
    """Why the last name of `path` cannot name a directory in the working directory."""
    name = last_name(path)
    if not name:
        return f"{json.dumps(path, ensure_ascii=False)[:100]} names none"
    size = len(name.encode())
    if size > L.MAX_NAME_BYTES:
        return f"its name is {size} bytes (UTF-8), over Linux's {L.MAX_NAME_BYTES}"
    return f"its name {json.dumps(name, ensure_ascii=False)} cannot be used in the job's working directory"


def _placed_length(c: Collector, path: str, place: str) -> None:
    size = placed_path_bytes(place)
    if size > L.MAX_PLACED_PATH_BYTES:
        c.add(
            path,
            "path-placed-length",
            f"is placed at a path of {size} bytes in the job (UTF-8, below {JOB_WORK_DIR}/, counting "
            f"the temporary name a download takes beside it): Linux takes at most "
            f"{L.MAX_PLACED_PATH_BYTES} bytes (PATH_MAX, {L.MAX_PLACED_PATH_BYTES + 1} with its NUL); "
            "shorten it",
        )


def _unnamed_directory(path: str) -> bool:
    """A path whose last segment names no directory (`.`, `..`, `/`): the official CLI zips such
    a directory's entries relative to its parent, which is itself (`.`) or above it (`..`)."""
    segments = named_segments(path)
    return not segments or segments[-1] == ".."


def _desc(c: Collector, path: str, desc: FileDesc, *, location: bool = True) -> bool:
    """Check a file description; whether it has a usable place in the working directory.

    A file with a var may have any path (the CLI allows absolute paths and `..` then), but never
    control characters or an unbounded length. Local modules (`location=False`) ignore their path.
    """
    ok = True
    if desc.var:
        if not c.pattern(at(path, "var"), desc.var, _VAR, "var-syntax", f"a variable name ({L.VAR_PATTERN})"):
            ok = False
        elif desc.var in L.RESERVED_CMD_VARS:
            c.add(at(path, "var"), "var-reserved", f"{desc.var} is reserved")
    if not location or desc.var:
        problem = path_problem(desc.path)
        if problem is not None and problem[0] in ("path-empty", "path-length", "path-control-chars"):
            c.add(at(path, "path"), problem[0], problem[1])
            ok = False
        return ok
    problem = path_problem(desc.path)
    if problem is not None:
        c.add(at(path, "path"), problem[0], problem[1])
        return False
    return ok


def _duplicates(c: Collector, places: dict[str, list[str]], rule: str, message: str) -> None:
    for place, paths in places.items():
        for p in paths[1:]:
            c.add(p, rule, message.format(place=place))


def _nested(c: Collector, places: dict[str, list[str]], what: str) -> None:
    """An input (output) placed inside another (`a` and `a/b`, a directory `data` and
    `data/x.csv`): inputs would overwrite each other or fail to be written, in an order no one
    chose; outputs would be stored twice, as keys a store keeping them as files cannot hold. The
    official CLI refuses both."""
    names = sorted(places)
    for place in names:
        parent = place.rsplit("/", 1)[0] if "/" in place else ""
        while parent:
            if parent in places:
                for p in places[place][:1]:
                    c.add(
                        p,
                        f"{what}-path-nested",
                        f"{place!r} is inside {what} {parent!r}: an {what} cannot hold another",
                    )
                break
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""


def _outputs_in_input_files(
    c: Collector, output_places: dict[str, list[str]], file_places: dict[str, str]
) -> None:
    """An output below an input that is a file (input `model`, output `model/metrics.json`): stage-in
    makes the output's directory first and then cannot write the input there, and no job could
    write below a file. A ZIP input is a directory: outputs inside it are fine."""
    for place, paths in output_places.items():
        parent = place
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in file_places:
                c.add(
                    paths[0],
                    "output-in-input-file",
                    (
                        f"{place!r} is inside {parent!r}, the input file of ",
                        Field(file_places[parent]),
                        ": nothing can be placed below a file (a directory input is a ZIP)",
                    ),
                )
                break


# --- names and references ---------------------------------------------------------------------


def _ids(c: Collector, path: str, ids: list[str]) -> None:
    c.max_items(path, ids, L.MAX_LIST_ITEMS)
    for i, rid in enumerate(ids):
        c.pattern(
            index(path, i), rid, _RESOURCE_ID, "resource-id", "a resource id (lowercase letters, digits, '-')"
        )


def _arguments(c: Collector, params: JobParameters, path: str) -> None:
    apath = at(path, "arguments")
    c.max_items(apath, params.arguments, L.MAX_LIST_ITEMS)
    for i, arg in enumerate(params.arguments):
        ipath = index(apath, i)
        valid = c.pattern(
            at(ipath, "name"), arg.name, _VAR, "var-syntax", f"a variable name ({L.VAR_PATTERN})"
        )
        if valid and arg.name in L.RESERVED_CMD_VARS:
            c.add(at(ipath, "name"), "var-reserved", f"{arg.name} is reserved")
        c.max_length(at(ipath, "value"), arg.value, L.MAX_CMD_LENGTH)
        if "\x00" in arg.value:  # the shell drops it: the job would get another value
            c.add(at(ipath, "value"), "control-chars", "must not contain NUL")


def _output_datasets(c: Collector, path: str, datasets: list[OutputDatasetDesc]) -> None:
    c.max_items(path, datasets, L.MAX_LIST_ITEMS)
    names = Counter(ds.name for ds in datasets)
    for i, ds in enumerate(datasets):
        dpath = index(path, i)
        if not ds.name:
            c.add(at(dpath, "name"), "required", "must not be empty")
        elif names[ds.name] > 1:
            c.add(at(dpath, "name"), "dataset-name-unique", f"{ds.name!r} is used by another output dataset")
        _text(c, at(dpath, "name"), ds.name, L.MAX_NAME_LENGTH)
        _text(c, at(dpath, "description"), ds.description, L.MAX_DESC_LENGTH, allow_newlines=True)
        valid = c.pattern(at(dpath, "var"), ds.var, _VAR, "var-syntax", f"a variable name ({L.VAR_PATTERN})")
        if valid and ds.var in L.RESERVED_CMD_VARS:
            c.add(at(dpath, "var"), "var-reserved", f"{ds.var} is reserved")
        if not 0 <= ds.size_gb <= L.MAX_WORKING_STORAGE_GB:
            c.add(at(dpath, "size_gb"), "dataset-size", f"must be between 0 and {L.MAX_WORKING_STORAGE_GB}")
        c.max_items(at(dpath, "labels"), ds.labels, 64)
        for k, v in ds.labels.items():
            c.max_length(key(at(dpath, "labels"), k), k, 63, "label-key")
            c.max_length(key(at(dpath, "labels"), k), v, 63)


def declared_vars(params: JobParameters) -> dict[str, list[str]]:
    """Every name `cmd` may reference as `${name}` -> the field paths that declare it (relative)."""
    names: dict[str, list[str]] = {}

    def declare(name: str, where: str) -> None:
        if name:
            names.setdefault(name, []).append(where)

    for i, f in enumerate(params.input_files):
        declare(f.desc.var, f"input_files[{i}].desc.var")
    for i, d in enumerate(params.output_files):
        declare(d.var, f"output_files[{i}].var")
    for i, rid in enumerate(params.s3_mount_ids):
        declare(rid, f"s3_mount_ids[{i}]")
    for i, rid in enumerate(params.dataset_ids):
        declare(rid, f"dataset_ids[{i}]")
    for i, arg in enumerate(params.arguments):
        declare(arg.name, f"arguments[{i}].name")
    for i, ds in enumerate(params.output_datasets):
        declare(ds.var, f"output_datasets[{i}].var")
    if params.env is not None and params.env.python_env is not None:
        for i, f in enumerate(params.env.python_env.local_modules):
            declare(f.desc.var, f"env.python_env.local_modules[{i}].desc.var")
    return names


def _vars_unique(c: Collector, params: JobParameters, path: str) -> None:
    for name, places in declared_vars(params).items():
        for where in places[1:]:
            c.add(
                at(path, where),
                "var-unique",
                (f"{name!r} is already declared at ", Field(at(path, places[0]))),
            )


def cmd_references(cmd: str) -> list[str]:
    """The names `cmd` refers to as `${NAME}`, in order, once each; escapes (`$${...}`) are skipped."""
    return list(dict.fromkeys(m.group(2) for m in CMD_VAR_REFERENCE.finditer(cmd) if not m.group(1)))


def _cmd(c: Collector, params: JobParameters, path: str) -> None:
    cpath = at(path, "cmd")
    if not params.cmd.strip():
        c.add(cpath, "cmd-empty", "must not be empty")
    c.max_length(cpath, params.cmd, L.MAX_CMD_LENGTH, "cmd-length")
    if "\x00" in params.cmd:
        c.add(cpath, "control-chars", "must not contain NUL")
    declared = declared_vars(params)
    for name in cmd_references(params.cmd):
        ref = f"${{{name[:100]}}}"
        places = declared.get(name, [])
        if name == L.DS_PROJECT_HOME:
            if not params.attach_project_disk:
                c.add(
                    cpath,
                    "cmd-project-home",
                    ("uses ${DS_PROJECT_HOME} but ", Field("attach_project_disk", leaf=True), " is false"),
                )
        elif not places:
            c.add(
                cpath,
                "cmd-undeclared-var",
                f"refers to {ref}, which no input, output, s3 mount, dataset or argument declares "
                f"(to leave it to the shell, write ${ref})",
            )
        elif all(_no_cmd_value(where) for where in places):
            why = _no_cmd_value(places[0])
            c.add(
                cpath,
                "cmd-var-unsupported",
                (f"refers to {ref}, the var of ", Field(at(path, places[0])), f": {why}"),
            )
    size = rendered_cmd_bytes(params)
    if size > L.MAX_RENDERED_CMD_BYTES:
        c.add(
            cpath,
            "cmd-rendered-length",
            f"with its ${{...}} values (arguments verbatim, paths under the job's directories) is up "
            f"to {size} bytes: the program's shell takes it as one argument, which Linux limits to "
            f"{L.MAX_RENDERED_CMD_BYTES} bytes",
        )


#: What a `${var}` of a file, a mount or DS_PROJECT_HOME adds at most besides its own path: the
#: operator's working dir or mount root (settings, unknown here; a few dozen bytes in practice).
_PLACE_ALLOWANCE = 256


def rendered_cmd_bytes(params: JobParameters) -> int:
    """An upper bound of `cmd`'s size in bytes once the runner has put in its `${...}` values
    (dsjobs.runner.cmd): arguments as they are, file vars as their path below a directory."""
    values: dict[str, int] = {L.DS_PROJECT_HOME: _PLACE_ALLOWANCE}
    for rid in (*params.s3_mount_ids, *params.dataset_ids):
        values[rid] = _PLACE_ALLOWANCE
    for ds in params.output_datasets:
        if ds.var:
            values[ds.var] = _PLACE_ALLOWANCE
    for f in params.input_files:
        if f.desc.var:
            values[f.desc.var] = _PLACE_ALLOWANCE + len(f.desc.path.encode())
    for d in params.output_files:
        if d.var:
            values[d.var] = _PLACE_ALLOWANCE + len(d.path.encode())
    for arg in params.arguments:
        values[arg.name] = len(arg.value.encode())
    size = len(params.cmd.encode())
    for m in CMD_VAR_REFERENCE.finditer(params.cmd):
        if not m.group(1) and m.group(2) in values:
            size += values[m.group(2)] - len(m.group(0).encode())
    return size


def _no_cmd_value(where: str) -> str | None:
    """Why the var declared at `where` (relative to JobParameters) has no value in cmd, or None."""
    return next((why for prefix, why in _NOT_CMD_VARS.items() if where.startswith(prefix)), None)


# --- environment ------------------------------------------------------------------------------


def _environment(c: Collector, path: str, env: Environment) -> None:
    vpath = at(path, "vars")
    c.max_items(vpath, env.vars, L.MAX_ENV_VARS)
    for name, value in env.vars.items():
        npath = key(vpath, name)
        if c.pattern(
            npath, name, _ENV_NAME, "env-name", "an environment variable name (a C identifier)"
        ) and (name in L.RESERVED_ENV_VARS or name.startswith(L.RESERVED_ENV_PREFIX)):
            c.add(npath, "env-reserved", f"{name} is set by the server")
        elif name in L.SHELL_SPECIAL_ENV_VARS:
            c.add(
                npath,
                "env-shell",
                f"{name} is the job shell's own variable (readonly or numeric) and cannot be set",
            )
        if len(value) > L.MAX_ENV_VALUE_LENGTH:
            c.max_length(npath, value, L.MAX_ENV_VALUE_LENGTH, "env-value-length")
        elif (size := len(f"{name}={value}".encode("utf-8", "surrogatepass")) + 1) > L.MAX_ENV_STRING_BYTES:
            c.add(
                npath,
                "env-value-length",
                f"{name}=<value> is {size} bytes (UTF-8, with its NUL): Linux allows one environment "
                f"variable at most {L.MAX_ENV_STRING_BYTES}",
            )
        if "\x00" in value:
            c.add(npath, "control-chars", "must not contain NUL")
    if env.docker_image_resource_id is not None and env.docker_image_spec is not None:
        _mutually_exclusive(c, path, "docker-oneof", "docker_image_resource_id", "docker_image_spec")
    if env.docker_image_resource_id is not None:
        rid = env.docker_image_resource_id
        # The CLI's `docker: python:3.12` (a string) names a resource; users mean the image.
        what = "an id" if not _IMAGE_LIKE.search(rid) else "an id (an image by its URL: docker: {image: ...})"
        c.pattern(at(path, "docker_image_resource_id"), rid, _RESOURCE_ID, "resource-id", what)
    if env.docker_image_spec is not None:
        _docker(c, at(path, "docker_image_spec"), env.docker_image_spec)
    if env.python_env is not None:
        _python(c, at(path, "python_env"), env.python_env)


def _mutually_exclusive(c: Collector, path: str, rule: str, first: str, second: str) -> None:
    """Two fields of `path` (a oneof) both set."""
    c.add(path, rule, (Field(first, leaf=True), " and ", Field(second, leaf=True), " are mutually exclusive"))


def docker_reference_problem(reference: str) -> str | None:
    """Why `reference` is not an image reference (distribution/reference grammar), or None."""
    if not _DOCKER_REFERENCE.fullmatch(reference):
        return "is not an image reference like registry.example.com/team/image:tag"
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:  # strip the tag (a ':' before the last '/' is a registry port)
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    if len(name) > L.MAX_DOCKER_NAME_LENGTH:
        return f"has a repository name longer than {L.MAX_DOCKER_NAME_LENGTH} characters"
    return None


def _docker(c: Collector, path: str, spec: DockerImageSpec) -> None:
    problem = docker_reference_problem(spec.image_url) if len(spec.image_url) <= 512 else "is too long"
    if problem is not None:
        c.add(at(path, "image_url"), "docker-image", f"{json.dumps(spec.image_url)[:200]} {problem}")
    _text(c, at(path, "username"), spec.username, L.MAX_SHORT_STRING)
    if spec.password_secret_ref is not None and spec.password_ds_secret_name is not None:
        _mutually_exclusive(
            c, path, "docker-password-oneof", "password_secret_ref", "password_ds_secret_name"
        )
    ref = spec.password_secret_ref
    if ref is not None:
        c.pattern(
            at(path, "password_secret_ref.name"), ref.name, _SECRET_NAME, "secret-name", "a Secret name"
        )
        c.pattern(at(path, "password_secret_ref.key"), ref.key, _SECRET_KEY, "secret-key", "a Secret key")
    name = spec.password_ds_secret_name
    if name is not None:
        if not name:
            c.add(at(path, "password_ds_secret_name"), "required", "must not be empty")
        elif len(name) <= 253:
            # A key of the project's Secret of secrets: any other name is never there.
            c.pattern(
                at(path, "password_ds_secret_name"),
                name,
                _SECRET_KEY,
                "secret-key",
                "a project secret's name (letters, digits, -, _ and .)",
            )
        _text(c, at(path, "password_ds_secret_name"), name, 253)


def _python(c: Collector, path: str, env: PythonEnv) -> None:
    if env.python_version:
        c.pattern(
            at(path, "python_version"),
            env.python_version,
            _PYTHON_VERSION,
            "python-version",
            "like 3, 3.11 or 3.11.4",
        )
    cpath = at(path, "conda_yaml")
    c.max_length(cpath, env.conda_yaml, L.MAX_CONFIG_LENGTH)
    if len(env.conda_yaml) <= L.MAX_CONFIG_LENGTH:
        conda = read_conda_env(env.conda_yaml)
        for problem in conda.problems:
            c.add(cpath, "conda-yaml", problem)
        if (
            conda.python_version
            and env.python_version
            and not _same_python(conda.python_version, env.python_version)
        ):
            c.add(
                cpath,
                "conda-yaml",
                (
                    f"python={conda.python_version} contradicts ",
                    Field("python_version", leaf=True),
                    f" {env.python_version}",
                ),
            )
        for line in conda.pip:
            _requirement(c, cpath, line)
    rpath = at(path, "requirements")
    c.max_items(rpath, env.requirements, L.MAX_REQUIREMENTS)
    for i, line in enumerate(env.requirements):
        if not line.strip():
            c.add(index(rpath, i), "requirement", "must not be empty")
        _requirement(c, index(rpath, i), line)
    pip = env.pip_options
    if pip is None:
        return
    ppath = at(path, "pip_options")
    if pip.index_url:
        _url(c, at(ppath, "index_url"), pip.index_url)
    c.max_items(at(ppath, "extra_index_urls"), pip.extra_index_urls, L.MAX_LIST_ITEMS)
    for i, url in enumerate(pip.extra_index_urls):
        _url(c, index(at(ppath, "extra_index_urls"), i), url)
    c.max_items(at(ppath, "trusted_hosts"), pip.trusted_hosts, L.MAX_LIST_ITEMS)
    for i, host in enumerate(pip.trusted_hosts):
        hpath = index(at(ppath, "trusted_hosts"), i)
        if len(host) > 259:
            c.add(hpath, "host", "is too long")
        else:
            c.pattern(hpath, host, _HOST_PORT, "host", "a host or host:port")


def _requirement(c: Collector, path: str, line: str) -> None:
    """One line of the requirements.txt the runner writes: a line break (pip's include U+2028)
    would make the rest a line of its own, such as an option (`--index-url ...`)."""
    _text(c, path, line, L.MAX_SHORT_STRING)
    if not _CONTROL.search(line) and breaks_lines(line):  # the control characters: told above
        c.add(path, "requirement", "must be one line (no U+0085, U+2028 or U+2029 line break)")


def _same_python(a: str, b: str) -> bool:
    """Whether two versions can name one interpreter (3.11 and 3.11.4 can, 3.11 and 3.12 cannot)."""
    pa, pb = a.split("."), b.split(".")
    return pa[: len(pb)] == pb[: len(pa)]


def _url(c: Collector, path: str, url: str) -> None:
    if len(url) > L.MAX_SHORT_STRING:
        c.add(path, "url", f"must be at most {L.MAX_SHORT_STRING} characters")
    elif _CONTROL.search(url):  # the pattern's \S (RE2's too, in the CRD) lets NUL and others by
        c.add(path, "control-chars", "must not contain control characters")
    else:
        c.pattern(path, url, _URL, "url", "an http(s) URL")


def _known_types(known: Collection[str], most: int = 20) -> str:
    """What the cluster offers, for the message (a catalog may be long)."""
    if not known:
        return "it has none (ask your admin for an InstanceType catalog)"
    names = sorted(known)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"it has {', '.join(names[:most])}{more}"


def _invalid_type(c: Collector, path: str, name: str, invalid: Mapping[str, str]) -> bool:
    """An InstanceType of the cluster that breaks its own rules: said so, with what is wrong (an
    admin's to fix), rather than as a type the cluster lacks."""
    why = invalid.get(name)
    if why is None:
        return False
    c.add(
        path,
        "instance-type-invalid",
        f"InstanceType {name} is invalid, so no job runs on it (an admin fixes it: kubectl get dsit "
        f"{name} -o yaml): {why}",
    )
    return True


def _instance_types(
    c: Collector,
    params: JobParameters,
    path: str,
    known: Collection[str] | None,
    invalid: Mapping[str, str],
) -> None:
    tpath = at(path, "cloud_instance_types")
    c.max_items(tpath, params.cloud_instance_types, L.MAX_LIST_ITEMS)
    if known is not None and not params.cloud_instance_types:
        (default,) = params.instance_type_names()
        if default not in known and not _invalid_type(c, tpath, default, invalid):
            message = (
                f"{default} is not an instance type of this cluster (an empty list means {default}); "
                f"{_known_types(known)}"
            )
            c.add(tpath, "instance-type-unknown", message)
    seen: set[str] = set()
    for i, it in enumerate(params.cloud_instance_types):
        npath = at(index(tpath, i), "name")
        if len(it.name) > 63 or not _INSTANCE_TYPE.fullmatch(it.name):
            c.add(
                npath,
                "instance-type-name",
                f"{json.dumps(it.name)[:100]} is not an instance type name like c1.4",
            )
            continue
        if it.name in seen:
            c.add(npath, "instance-type-duplicate", f"{it.name} is listed twice")
        seen.add(it.name)
        if known is not None and it.name not in known and not _invalid_type(c, npath, it.name, invalid):
            c.add(
                npath,
                "instance-type-unknown",
                f"{it.name} is not an instance type of this cluster; {_known_types(known)}",
            )
