"""Where a declared file lives inside the job's working directory.

The official CLI lets a file with a `var` have any path (even absolute or with `..`): the path is the
client's name for it and the job reaches it through `${var}`. A file without a var lives at its
path, so that path must stay inside the working directory. These helpers are pure and shared by the
validator (what is accepted) and the runner (where files go, `dsjobs.storage.normalize_relpath`),
so both agree.

The CLI sends paths as the user wrote them, on any OS: a Windows user's `data\\train.csv` or
`C:\\Users\\me\\train.csv`. So `/` and `\\` both separate segments, and a path is absolute when it
starts with either or with a drive (`C:`). `data\\train.csv` therefore lives at `data/train.csv`.
"""

from __future__ import annotations

import re
from typing import Final, Protocol

from dsjobs.models.limits import MAX_NAME_BYTES, MAX_PATH_LENGTH, PARTIAL_NAME_BYTES, VAR_PATTERN
from dsjobs.syntax import escape_problem, join_segments, named_segments, strip_drive

# Files whose path cannot be used are placed under this directory of the working directory, one
# sub-directory per var. Paths without a var may not point into it.
VAR_FILES_DIR: Final = ".dsjobs-vars"
#: The job's working directory in its pod (dsjobs.runner.config.RunnerPaths.work_dir, which cannot
#: import this module: a test keeps the two equal). The kernel limits whole paths, this prefix too.
JOB_WORK_DIR: Final = "/job/work"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VAR = re.compile(VAR_PATTERN)


class HasPathAndVar(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def var(self) -> str: ...


def path_problem(path: str) -> tuple[str, str] | None:
    """(rule, message) saying why `path` cannot be a location inside the working directory, or None."""
    if not path:
        return "path-empty", "must not be empty"
    if len(path) > MAX_PATH_LENGTH:
        return "path-length", f"must be at most {MAX_PATH_LENGTH} characters"
    if _CONTROL.search(path):
        return "path-control-chars", "must not contain control characters"
    if any(len(segment.encode()) > MAX_NAME_BYTES for segment in named_segments(path)):
        # A Windows name of 128..255 Cyrillic letters fits NTFS, not a Linux file system.
        return "path-name-length", f"must not have a name longer than {MAX_NAME_BYTES} bytes (UTF-8)"
    escape = escape_problem(path)
    if escape is not None:
        return escape[0], f"{escape[1]}, or the file needs a var"
    normalized = join_segments(path)
    if normalized == ".":
        return (
            "path-root",
            "must name a file or directory inside the working directory, not the directory itself",
        )
    if normalized == VAR_FILES_DIR or normalized.startswith(VAR_FILES_DIR + "/"):
        return "path-reserved", f"must not be inside {VAR_FILES_DIR}/ (reserved for files with a var)"
    return None


def is_safe_relative_path(path: str) -> bool:
    """Whether `path` names a location strictly inside the working directory."""
    return path_problem(path) is None


def normalize_relative_path(path: str) -> str:
    """`./data//x.csv/` (or `.\\data\\x.csv`) -> `data/x.csv`; raises ValueError for an unsafe path."""
    problem = path_problem(path)
    if problem is not None:
        raise ValueError(f"path {path!r} {problem[1]}")
    return join_segments(path)


def job_relative_path(desc: HasPathAndVar) -> str:
    """Where a declared input or output lives, relative to the job's working directory.

    A safe relative path is used as is (normalized), with or without a var, so a job that opens
    `data/train.csv` finds it where the client had it. A file with a var and an unusable path goes
    to `.dsjobs-vars/<var>/<last path segment>` (the segment keeps the file's extension):
    `/home/me/train.csv` and `C:\\Users\\me\\train.csv` alike.
    Raises ValueError for a file without a var whose path is unsafe (the validator rejects those).
    """
    if is_safe_relative_path(desc.path) or not desc.var:
        return normalize_relative_path(desc.path)
    if not _VAR.fullmatch(desc.var):  # the var becomes a directory name: never trust it unchecked
        raise ValueError(f"invalid var {desc.var!r}")
    last = last_name(desc.path)
    name = last if is_safe_relative_path(last) else desc.var
    return f"{VAR_FILES_DIR}/{desc.var}/{name}"


def last_name(path: str) -> str:
    """The last name of a path as the client wrote it (`C:` stripped from a first one); "" for none."""
    segments = named_segments(path)
    if segments:
        segments[0] = strip_drive(segments[0])
    return segments[-1] if segments else ""


def named_by_var(desc: HasPathAndVar) -> bool:
    """Whether `job_relative_path` names the file after its var: its path is unusable and so is its
    last name (over 255 bytes, `.dsjobs-vars`, none at all)."""
    return (
        bool(desc.var)
        and not is_safe_relative_path(desc.path)
        and not is_safe_relative_path(last_name(desc.path))
    )


def placed_path_bytes(place: str) -> int:
    """The UTF-8 bytes of the longest absolute path the runner uses for a file at `place` (as
    `job_relative_path` gives it): the file's own, or the temporary name beside it that a download
    is written to first (dsjobs.storage's `.dsjobs-partial-<hash>`) when that name is longer."""
    parent, _, name = place.rpartition("/")
    longest = max(len(name.encode()), PARTIAL_NAME_BYTES)
    return len(JOB_WORK_DIR.encode()) + 1 + (len(parent.encode()) + 1 if parent else 0) + longest
