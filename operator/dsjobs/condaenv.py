"""PURE: what a PythonEnv's `conda_yaml` asks for, as far as a pip-only runner can give it.

    read_conda_env(text) -> CondaEnv(python_version, pip, problems)

The jobs API carries an `environment.yml` (older DataSphere clients built one: the interpreter's
version, `pip`, and the pip packages under `pip:`). This server installs with pip into the image's
Python, so it honours that shape: `python=3.X[.Y]` picks the interpreter (the default image's
version), the `pip:` list joins `requirements`. Anything only conda can install (a conda package,
`variables`, an environment file of another shape) is a problem naming the entry, never ignored.
The first MAX_PROBLEMS problems are worded, the others counted; the `pip:` lists hold at most
MAX_PIP_REQUIREMENTS in all.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from dsjobs.models.limits import MAX_REQUIREMENTS

# `python`, `python=3.11`, `python==3.11.4`, `python=3.11.*`, `python 3.11` (conda's match specs
# for one version; ranges such as `python>=3.9` name none).
_PYTHON: Final = re.compile(r"^python(?:\s*(?:==?|\s)\s*(3(?:\.[0-9]{1,3}){0,2})(?:\.\*)?)?$")
# A match spec's package name (before any version, build or bracket part).
_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]*")
# Keys of an environment file that say nothing about what to install.
_IGNORED_KEYS: Final = frozenset({"name", "channels", "prefix"})
# libyaml's parser when PyYAML was built with it: the pure-Python one takes seconds for a
# conda_yaml at its size limit (256 KiB of `[a,a,...]`), which the API would spend per request.
_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Problems listed at most; a last one counts the rest. A file at its size limit has some 130,000
# entries to complain about, and one INVALID_ARGUMENT lists 50 at most anyway (api.errors).
MAX_PROBLEMS: Final = 50
# What its `pip:` lists may hold in all, as `requirements` may: aliases (`{pip: *a}` repeated)
# make a small file name millions of them, which the validator and the runner would go through.
MAX_PIP_REQUIREMENTS: Final = MAX_REQUIREMENTS


@dataclass(frozen=True)
class CondaEnv:
    python_version: str = ""
    pip: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _Problems:
    """The first MAX_PROBLEMS problems, and how many more there were."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.more = 0

    def add(self, problem: str) -> None:
        if self.full:
            self.more += 1
        else:
            self.listed.append(problem)

    @property
    def full(self) -> bool:
        """Whether further problems are only counted (then they need no wording: see `count`)."""
        return len(self.listed) >= MAX_PROBLEMS

    def count(self) -> None:
        """One more problem, past the listed ones."""
        self.more += 1

    def result(self) -> list[str]:
        if not self.more:
            return self.listed
        return [*self.listed, f"... and {self.more} more problems (the first {MAX_PROBLEMS} are listed)"]


def _not_yaml(exc: Exception) -> str:
    """What is wrong with text that does not load, with where when the parser says it."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None and problem:
        return f"is not YAML (line {mark.line + 1}, column {mark.column + 1}: {problem})"
    return f"is not YAML ({(str(exc).splitlines() or [type(exc).__name__])[0]})"


def read_conda_env(text: str) -> CondaEnv:
    """What an environment.yml asks for, and what this server cannot install from it.

    The same text is read again and again: the operator plans a job not yet started at every
    change of it (a hostile one at the size limit takes some 0.4 s), and renders its pod from it
    several times; so the latest readings are kept (copies are handed out: the lists are mutable).
    """
    env = _read_conda_env(text)
    return CondaEnv(env.python_version, list(env.pip), list(env.problems))


@functools.lru_cache(maxsize=64)
def _read_conda_env(text: str) -> CondaEnv:
    if not text.strip():
        return CondaEnv()
    try:
        doc: Any = yaml.load(text, Loader=_LOADER)  # a safe loader, C or Python
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors raise plain errors for a date like 2001-02-30, `!!float abc` or
        # a value nested too deep: input to refuse like any other that is not YAML.
        return CondaEnv(problems=[_not_yaml(exc)])
    if not isinstance(doc, dict):
        return CondaEnv(problems=["must be a mapping (an environment.yml)"])
    problems = _Problems()
    for key in doc:
        if key not in _IGNORED_KEYS and key != "dependencies":
            problems.add(
                f"{key!r} is not supported: this server installs pip packages only "
                "(environment variables go in env.vars)"
            )
    deps = doc.get("dependencies") or []
    if not isinstance(deps, list):
        problems.add("dependencies must be a list")
        return CondaEnv(problems=problems.result())
    version = ""
    pip: list[str] = []
    too_many_pip = False
    for i, dep in enumerate(deps):
        where = f"dependencies[{i}]"
        if isinstance(dep, dict) and list(dep) == ["pip"]:
            packages = dep["pip"] or []
            if too_many_pip:
                continue  # said once; its entries are not even looked at (they may be millions)
            if isinstance(packages, list) and len(pip) + len(packages) > MAX_PIP_REQUIREMENTS:
                too_many_pip = True
                problems.add(
                    f"{where}.pip takes the pip: lists past {MAX_PIP_REQUIREMENTS} requirements "
                    f"(at most {MAX_PIP_REQUIREMENTS} in all)"
                )
            elif not isinstance(packages, list) or not all(
                isinstance(p, str) and p.strip() for p in packages
            ):
                problems.add(f"{where}.pip must be a list of requirements")
            else:
                pip.extend(p.strip() for p in packages)
            continue
        if not isinstance(dep, str):
            problems.add(f"{where} must be a package or a pip: list")
            continue
        spec = dep.strip()
        python = _PYTHON.match(spec)
        if python:
            if python.group(1):
                version = python.group(1)
            continue
        name = _NAME.match(spec)[0]  # type: ignore[index]  # matches every string
        if name == "pip":
            continue
        if problems.full:
            problems.count()  # no need to word the 130,000 others a file may hold
        elif name == "python":
            problems.add(f"{where} {spec!r}: name one Python version, like python=3.11")
        else:
            problems.add(
                f"{where} {spec!r} is a conda package: this server installs with pip only; "
                "list it under pip: (or in requirements)"
            )
    return CondaEnv(version, pip, problems.result())
