"""PURE: what a PythonEnv's `conda_yaml` asks for, as far as a pip-only runner can give it.

    read_conda_env(text) -> CondaEnv(python_version, pip, problems)

The jobs API carries an `environment.yml` (older DataSphere clients built one: the interpreter's
version, `pip`, and the pip packages under `pip:`). This server installs with pip into the image's
Python, so it honours that shape: `python=3.X[.Y]` picks the interpreter (the default image's
version), the `pip:` list joins `requirements`. Anything only conda can install (a conda package,
`variables`, an environment file of another shape) is a problem naming the entry, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

# `python`, `python=3.11`, `python==3.11.4`, `python=3.11.*`, `python 3.11` (conda's match specs
# for one version; ranges such as `python>=3.9` name none).
_PYTHON: Final = re.compile(r"^python(?:\s*(?:==?|\s)\s*(3(?:\.[0-9]{1,3}){0,2})(?:\.\*)?)?$")
# A match spec's package name (before any version, build or bracket part).
_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]*")
# Keys of an environment file that say nothing about what to install.
_IGNORED_KEYS: Final = frozenset({"name", "channels", "prefix"})


@dataclass(frozen=True)
class CondaEnv:
    python_version: str = ""
    pip: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_conda_env(text: str) -> CondaEnv:
    if not text.strip():
        return CondaEnv()
    try:
        doc: Any = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors raise plain errors for a date like 2001-02-30, `!!float abc` or
        # a value nested too deep: input to refuse like any other that is not YAML.
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return CondaEnv(problems=[f"is not YAML ({first})"])
    if not isinstance(doc, dict):
        return CondaEnv(problems=["must be a mapping (an environment.yml)"])
    problems = [
        f"{key!r} is not supported: this server installs pip packages only (environment variables go in env.vars)"
        for key in doc
        if key not in _IGNORED_KEYS and key != "dependencies"
    ]
    deps = doc.get("dependencies") or []
    if not isinstance(deps, list):
        return CondaEnv(problems=[*problems, "dependencies must be a list"])
    version = ""
    pip: list[str] = []
    for i, dep in enumerate(deps):
        where = f"dependencies[{i}]"
        if isinstance(dep, dict) and list(dep) == ["pip"]:
            packages = dep["pip"] or []
            if not isinstance(packages, list) or not all(isinstance(p, str) and p.strip() for p in packages):
                problems.append(f"{where}.pip must be a list of requirements")
            else:
                pip.extend(p.strip() for p in packages)
            continue
        if not isinstance(dep, str):
            problems.append(f"{where} must be a package or a pip: list")
            continue
        spec = dep.strip()
        name = _NAME.match(spec)[0]  # type: ignore[index]  # matches every string
        python = _PYTHON.match(spec)
        if python:
            if python.group(1):
                version = python.group(1)
        elif name == "python":
            problems.append(f"{where} {spec!r}: name one Python version, like python=3.11")
        elif name != "pip":
            problems.append(
                f"{where} {spec!r} is a conda package: this server installs with pip only; "
                "list it under pip: (or in requirements)"
            )
    return CondaEnv(version, pip, problems)
