"""constraints.txt (`make lock`) pins what `make install`, CI and the Dockerfile install: it must agree
with pyproject.toml's ranges and be what this venv holds, or a fresh clone tests other versions."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)$")


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt:{number}: {line!r} is not name==version"
        name = canonicalize_name(match[1])
        assert name not in found, f"constraints.txt:{number}: {match[1]} pinned twice"
        found[name] = Version(match[2])
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        listed += extra
    return [Requirement(text) for text in listed if canonicalize_name(Requirement(text).name) != "dsjobs"]


def test_every_pyproject_requirement_is_pinned_within_its_range() -> None:
    pinned = pins()
    problems = []
    for requirement in requirements():
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement}: not in constraints.txt")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: constraints.txt pins {version}, outside the range")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_the_venv_holds_the_pinned_versions() -> None:
    wrong = []
    for name, version in pins().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{name}: pinned {version}, not installed")
            continue
        if installed != version:
            wrong.append(f"{name}: pinned {version}, installed {installed}")
    assert not wrong, "run `make install` (it installs with -c constraints.txt):\n" + "\n".join(wrong)
