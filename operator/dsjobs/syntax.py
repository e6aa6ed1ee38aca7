"""Syntax the validator and the runner must read alike, in a module without imports from dsjobs:
the runner's processes use it without importing the models (~20 ms of CPU each).

- Paths as the client sent them, on any OS: `/` and `\\` both separate segments, and a path is
  absolute when it starts with either or with a drive (`C:`). Used by dsjobs.models.paths (what
  the validator accepts) and dsjobs.storage.normalize_relpath (where the runner puts files).
- Environment names the job's shell keeps to itself (SHELL_SPECIAL_ENV): refused by
  dsjobs.validation and by the runner config.
- Lines as pip reads a requirements file (str.splitlines: beyond \n and \r, \v, \f, \x1c-\x1e,
  U+0085, U+2028, U+2029): a requirement must be one, or the rest is a line (an option) of its own.
  Refused by dsjobs.validation and by the runner config.
- References in `cmd`: `${NAME}` (NAME without braces) refers to a job variable; `$${...}` is the
  escape that reaches the shell as `${...}` (group 1 is the extra `$`, group 2 the name). Checked
  by dsjobs.validation, substituted by dsjobs.runner.cmd.
"""

from __future__ import annotations

import re
from typing import Final

#: Shell variables a script cannot export as given: readonly in bash (also as /bin/sh), or
#: arithmetic in dash/bash (a non-number fails). Exporting one ends the shell that runs the program.
SHELL_SPECIAL_ENV: Final = frozenset(
    {
        "BASHOPTS",
        "BASH_VERSINFO",
        "EUID",
        "HISTCMD",
        "OPTIND",
        "PPID",
        "RANDOM",
        "SHELLOPTS",
        "SRANDOM",
        "UID",
    }
)
CMD_REFERENCE_PATTERN: Final = r"\$(\$?)\{([^{}]*)\}"
#: RE2 (for the CRD's CEL rules) matching exactly the paths `escape_problem` refuses: a leading
#: separator, a drive as the first named segment, or a `..` segment.
ESCAPING_PATH_PATTERN: Final = r"^[/\\]|^(\.?[/\\])*[A-Za-z]:|(^|[/\\])\.\.([/\\]|$)"

_SEPARATOR = re.compile(r"[/\\]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def path_segments(path: str) -> list[str]:
    """`a\\b/c` -> `["a", "b", "c"]`: both `/` and `\\` separate segments."""
    return _SEPARATOR.split(path)


def named_segments(path: str) -> list[str]:
    """The segments that name something (no empty ones, no `.`)."""
    return [s for s in path_segments(path) if s not in ("", ".")]


def is_absolute_path(path: str) -> bool:
    """A leading `/` or `\\`, or a drive (`C:`, also as `./C:`: normalizing must not make a path absolute)."""
    if path.startswith(("/", "\\")):
        return True
    named = named_segments(path)
    return bool(named) and _DRIVE.match(named[0]) is not None


def escape_problem(path: str) -> tuple[str, str] | None:
    """(rule, message) when `path` leaves the directory it is relative to (absolute or `..`), or None."""
    if is_absolute_path(path):
        return "path-absolute", "must be relative (no leading '/' or '\\', no drive like 'C:')"
    if ".." in path_segments(path):
        return "path-parent", "must not contain a '..' segment ('/' and '\\' both separate segments)"
    return None


def join_segments(path: str) -> str:
    """The `/`-separated form of a path without `..`: `.\\data//x.csv/` -> `data/x.csv`; `.` for none."""
    return "/".join(named_segments(path)) or "."


def strip_drive(segment: str) -> str:
    """`C:x.csv` -> `x.csv` (a drive-relative first segment)."""
    return _DRIVE.sub("", segment)


def breaks_lines(text: str) -> bool:
    """Whether `text` holds a line break as pip reads requirements files (a trailing one too)."""
    return len(f"{text}.".splitlines()) > 1
