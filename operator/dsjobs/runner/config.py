"""`RunnerConfig`: everything the runner needs to know about one job run (its own contract).

The operator builds it, serializes it with `RunnerConfig.to_json` into the key `runner.json` of a
Secret (it carries the job's environment variables, which may hold project secrets) and the runner
containers read it from ``$DSJOBS_RUNNER_CONFIG_FILE`` (the mounted Secret) or, for small configs
and tests, from ``$DSJOBS_RUNNER_CONFIG`` (the JSON itself). See docs/runner.md.
"""

from __future__ import annotations

import os
import posixpath
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

from dsjobs.records import Record, rule
from dsjobs.storage import check_id, check_sha256, normalize_relpath
from dsjobs.syntax import SHELL_SPECIAL_ENV, breaks_lines

ENV_CONFIG = "DSJOBS_RUNNER_CONFIG"
ENV_CONFIG_FILE = "DSJOBS_RUNNER_CONFIG_FILE"
#: Set by the entry script for the program, as on DataSphere.
ENV_PROGRESS_FILE = "JOB_PROGRESS_FILENAME"
ENV_PROJECT_HOME = "DS_PROJECT_HOME"
#: Set on the job container: the directory holding the project secrets as files (one per key).
#: Keys that are no shell names (`hf-token`, as DataSphere allows) reach the program from there:
#: every POSIX shell on the way drops them from the environment the pod gave it.
ENV_PROJECT_SECRETS = "DSJOBS_PROJECT_SECRETS"
RESERVED_VARS = frozenset({ENV_PROJECT_HOME})
#: Environment names the job may not set: ours, or the entry script's own namespace.
RESERVED_ENV = frozenset({ENV_PROGRESS_FILE, ENV_PROJECT_HOME})
#: The entry script's own shell variables use this prefix (dsjobs.models.limits reserves it too).
RESERVED_ENV_PREFIX = "DSJOBS_"

#: Signals DataSphere allows for graceful shutdown (numbers as on Linux).
GRACEFUL_SIGNALS: Mapping[int, str] = {
    int(signal.SIGHUP): "HUP",
    int(signal.SIGINT): "INT",
    int(signal.SIGUSR1): "USR1",
    int(signal.SIGUSR2): "USR2",
    int(signal.SIGTERM): "TERM",
}

_VAR_RE = re.compile(r"^[^\s{}$/]{1,100}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PYVER_RE = re.compile(r"^3(\.\d+){0,2}$")


def _check_unique_paths(kind: str, paths: list[str]) -> None:
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        raise ValueError(f"{kind} paths must be unique: {', '.join(dup)}")


class Compression(StrEnum):
    NONE = "NONE"
    ZIP = "ZIP"


def _check_var(v: str) -> str:
    if not _VAR_RE.match(v):
        raise ValueError(f"invalid variable name {v!r}")
    return v


def _check_abs(kind: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        if not v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"{kind} must be absolute without '..': {v!r}")
        return posixpath.normpath(v)

    return check


@dataclass(frozen=True, kw_only=True)
class InputFile(Record):
    """A file placed at ``work_dir/path`` (ZIP: extracted into the parent of that path)."""

    path: str = field(metadata=rule(check=normalize_relpath))
    var: str | None = field(default=None, metadata=rule(check=_check_var))
    sha256: str = field(metadata=rule(check=check_sha256))
    size_bytes: int = field(metadata=rule(ge=0))
    compression: Compression = Compression.NONE


@dataclass(frozen=True, kw_only=True)
class LocalModule(Record):
    """A zipped Python local module; extracted into its own directory put on PYTHONPATH.

    Its ``path`` is whatever the client sent (a temp file name) and is not used for placement.
    """

    path: str = ""
    var: str | None = None
    sha256: str = field(metadata=rule(check=check_sha256))
    size_bytes: int = field(metadata=rule(ge=0))
    compression: Compression = Compression.ZIP


@dataclass(frozen=True, kw_only=True)
class OutputFile(Record):
    """Collected from ``work_dir/path`` after the program exits.

    ``path`` is where the job writes it (dsjobs.models.job_relative_path of the declared file);
    ``desc_path`` is the path as the client declared it, reported back in the result (default:
    ``path``).
    """

    path: str = field(metadata=rule(check=normalize_relpath))
    var: str | None = field(default=None, metadata=rule(check=_check_var))
    desc_path: str | None = None


@dataclass(frozen=True, kw_only=True)
class Mount(Record):
    """An S3 connector or dataset volume, referenced in ``cmd`` by ``${var}`` or ``${id}``; an
    output dataset (a volume the job writes a new dataset to), by its ``${var}`` only."""

    id: str = field(metadata=rule(check=_check_var))
    var: str | None = field(default=None, metadata=rule(check=_check_var))
    mount_path: str = field(metadata=rule(check=_check_abs("mount path")))


@dataclass(frozen=True, kw_only=True)
class PipOptions(Record):
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    trusted_hosts: list[str] = field(default_factory=list)
    no_deps: bool = False


def _check_python_version(v: str) -> str | None:
    if v != "" and not _PYVER_RE.match(v):
        raise ValueError(f"unsupported python version {v!r}")
    return v or None


def _check_requirements(v: list[str]) -> list[str]:
    for r in v:
        # One requirement per line of requirements.txt: a line break (pip splits lines as
        # str.splitlines does) would smuggle in options.
        if "\x00" in r or breaks_lines(r):
            raise ValueError(f"invalid requirement {r!r}")
    return [r.strip() for r in v if r.strip()]


@dataclass(frozen=True, kw_only=True)
class PythonEnv(Record):
    python_version: str | None = field(default=None, metadata=rule(check=_check_python_version))
    requirements: list[str] = field(default_factory=list, metadata=rule(check=_check_requirements))
    pip: PipOptions = field(default_factory=PipOptions)


def _check_signal(v: int) -> int:
    if v not in GRACEFUL_SIGNALS:
        raise ValueError(f"signal {v} is not one of {sorted(GRACEFUL_SIGNALS)}")
    return v


@dataclass(frozen=True, kw_only=True)
class GracefulShutdown(Record):
    signal: int = field(default=int(signal.SIGTERM), metadata=rule(check=_check_signal))
    timeout_seconds: float = field(metadata=rule(gt=0, le=24 * 3600))

    @property
    def signal_name(self) -> str:
        return GRACEFUL_SIGNALS[self.signal]


@dataclass(frozen=True, kw_only=True)
class RunnerPaths(Record):
    """Fixed paths inside the pod. Tests point them at temp dirs."""

    work_dir: str = field(default="/job/work", metadata=rule(check=_check_abs("path")))
    shared_dir: str = field(default="/job/.dsjobs", metadata=rule(check=_check_abs("path")))


@dataclass(frozen=True, kw_only=True)
class ShipSettings(Record):
    flush_interval_seconds: float = field(default=0.5, metadata=rule(gt=0, le=1.0))
    #: An unterminated line is shipped as is after waiting this long for its newline.
    partial_line_seconds: float = field(default=1.0, metadata=rule(ge=0))
    #: The entry script beats every 2 s; silence this long (without an exit status) = lost.
    heartbeat_timeout_seconds: float = field(default=30.0, metadata=rule(gt=2))
    chunk_bytes: int = field(default=1024 * 1024, metadata=rule(ge=1024, le=16 * 1024 * 1024))
    upload_attempts: int = field(default=5, metadata=rule(ge=1))


def _check_env(v: dict[str, str]) -> dict[str, str]:
    for name, value in v.items():
        if not _ENV_RE.match(name):
            raise ValueError(f"environment variable name {name!r} is not a valid shell name")
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"environment variable {name!r} is reserved")
        if name in SHELL_SPECIAL_ENV:
            raise ValueError(f"environment variable {name!r} is the shell's own (readonly or numeric)")
        if "\x00" in value:
            raise ValueError(f"environment variable {name!r} contains NUL")
    return v


def _check_arguments(v: dict[str, str]) -> dict[str, str]:
    for name, value in v.items():
        _check_var(name)
        if "\x00" in value:  # the shell would drop it and run the job with another value
            raise ValueError(f"argument {name!r} contains NUL")
    return v


@dataclass(frozen=True, kw_only=True)
class RunnerConfig(Record):
    version: Literal[1] = 1
    project_id: str = field(metadata=rule(check=lambda v: check_id("project", v)))
    job_id: str = field(metadata=rule(check=lambda v: check_id("job", v)))
    attempt: int = field(default=0, metadata=rule(ge=0))
    cmd: str = field(metadata=rule(min_length=1))
    inputs: list[InputFile] = field(default_factory=list)
    local_modules: list[LocalModule] = field(default_factory=list)
    outputs: list[OutputFile] = field(default_factory=list)
    arguments: dict[str, str] = field(default_factory=dict, metadata=rule(check=_check_arguments))
    s3_mounts: list[Mount] = field(default_factory=list)
    datasets: list[Mount] = field(default_factory=list)
    output_datasets: list[Mount] = field(default_factory=list)
    project_disk_path: str | None = field(default=None, metadata=rule(check=_check_abs("project disk path")))
    env: dict[str, str] = field(default_factory=dict, metadata=rule(check=_check_env))
    python_env: PythonEnv | None = None
    graceful_shutdown: GracefulShutdown | None = None
    paths: RunnerPaths = field(default_factory=RunnerPaths)
    ship: ShipSettings = field(default_factory=ShipSettings)

    def _validate(self) -> None:
        names: list[str] = []
        files: list[InputFile | OutputFile] = [*self.inputs, *self.outputs]
        for f in files:
            if f.var:
                names.append(f.var)
        for m in (*self.s3_mounts, *self.datasets):
            names.append(m.id)
            if m.var and m.var != m.id:
                names.append(m.var)
        for m in self.output_datasets:
            if not m.var:
                raise ValueError(f"output dataset {m.id} has no var")
            names.append(m.var)
        names.extend(self.arguments)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variables must be unique: {', '.join(dup)}")
        reserved = sorted(RESERVED_VARS.intersection(names))
        if reserved:
            raise ValueError(f"reserved variable names: {', '.join(reserved)}")
        # An output may be an input's path (a job that reads model.pt and writes it back): stage-in
        # puts the input there, ship collects whatever is there at the end.
        _check_unique_paths("input", [f.path for f in self.inputs])
        _check_unique_paths("output", [f.path for f in self.outputs])
        shared = self.paths.shared_dir
        if shared == self.paths.work_dir or shared.startswith(self.paths.work_dir + "/"):
            raise ValueError("the shared dir must not be inside the working dir")
        for m in (*self.s3_mounts, *self.datasets, *self.output_datasets):
            if m.mount_path in {"/", self.paths.work_dir, shared} or m.mount_path.startswith(shared + "/"):
                raise ValueError(f"mount path {m.mount_path} collides with the runner's directories")

    @property
    def layout(self) -> SharedLayout:
        return SharedLayout(Path(self.paths.shared_dir))

    @property
    def work_dir(self) -> Path:
        return Path(self.paths.work_dir)

    def work_dirs(self) -> list[Path]:
        """The directories stage-in makes in the working dir: the dir itself and the parents of the
        declared outputs (the job writes outputs in place; var-named ones live in directories it did
        not create). New ones are world-writable, like the layout's."""
        return [self.work_dir, *((self.work_dir / out.path).parent for out in self.outputs)]

    def to_json(self, *, exclude_defaults: bool = True, exclude_none: bool = False) -> str:
        """Compact: a field at its default is left out (the runner reads it back as the default)."""
        return super().to_json(exclude_defaults=exclude_defaults, exclude_none=exclude_none)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> RunnerConfig:
        """From ``$DSJOBS_RUNNER_CONFIG_FILE`` (preferred) or ``$DSJOBS_RUNNER_CONFIG``."""
        env = os.environ if environ is None else environ
        path = env.get(ENV_CONFIG_FILE)
        if path:
            return cls.from_json(Path(path).read_bytes())
        text = env.get(ENV_CONFIG)
        if text:
            return cls.from_json(text)
        raise RuntimeError(f"no runner config: set {ENV_CONFIG_FILE} or {ENV_CONFIG}")


@dataclass(frozen=True)
class SharedLayout:
    """Files in the shared volume (``paths.shared_dir``) that the runner's pieces exchange."""

    root: Path

    @property
    def entry_script(self) -> Path:
        return self.root / "entry.sh"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def stdout(self) -> Path:
        return self.logs_dir / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.logs_dir / "stderr.log"

    @property
    def system_log(self) -> Path:
        return self.logs_dir / "system.log"

    @property
    def progress(self) -> Path:
        return self.logs_dir / "job_progress.jsonl"

    @property
    def docker_stats(self) -> Path:
        return self.logs_dir / "docker_stats.tsv"

    @property
    def gpu_stats(self) -> Path:
        return self.logs_dir / "gpu_stats.tsv"

    @property
    def diagnostic_files(self) -> tuple[Path, ...]:
        """The entry script's resource-usage samples: stored under their own names as the job's
        diagnostic files (the official CLI's `download-files --with-diagnostics`)."""
        return (self.docker_stats, self.gpu_stats)

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def status(self) -> Path:
        return self.run_dir / "status"

    @property
    def heartbeat(self) -> Path:
        return self.run_dir / "heartbeat"

    @property
    def started(self) -> Path:
        return self.run_dir / "started"

    @property
    def kill_now(self) -> Path:
        """Made by ship when the operator asked for a forced cancel: the entry script's graceful
        timer SIGKILLs the program at once instead of waiting out the graceful-shutdown timeout."""
        return self.run_dir / "kill-now"

    @property
    def alive(self) -> Path:
        """A FIFO the entry script holds open for writing while it lives (stage-in makes it 0666):
        its reader sees EOF once that process is gone, however stalled it was before."""
        return self.run_dir / "alive"

    @property
    def stats_prev(self) -> Path:
        """The entry script's previous CPU sample (usage, time), for the next one's percentage."""
        return self.run_dir / "stats.prev"

    @property
    def python_dir(self) -> Path:
        return self.root / "python"

    @property
    def venv_dir(self) -> Path:
        """The virtual environment the job's requirements go into (the entry script makes it)."""
        return self.python_dir / "venv"

    @property
    def site_dir(self) -> Path:
        """Where pip installs the requirements when the image's Python cannot make a venv."""
        return self.python_dir / "site"

    @property
    def requirements(self) -> Path:
        return self.python_dir / "requirements.txt"

    def module_dir(self, index: int) -> Path:
        return self.python_dir / "modules" / str(index)

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def dirs(self) -> tuple[Path, ...]:
        """What stage-in makes, world-writable: the user's container may run as any uid and must
        write logs/run/python."""
        return (self.root, self.logs_dir, self.run_dir, self.python_dir, self.site_dir, self.tmp_dir)

    @property
    def shared_files(self) -> tuple[Path, ...]:
        """The log files that more than one uid appends to (stage-in and ship as the runner's uid,
        the entry script as the job's): stage-in creates them 0666, or the first writer would
        lock the others out with its umask."""
        return (self.system_log,)

    def create(self) -> None:
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o777)
