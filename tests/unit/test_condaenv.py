"""conda_yaml -> what a pip-only runner installs (dsjobs.condaenv), and the pod it gives."""

from __future__ import annotations

from typing import Any

import pytest

from dsjobs import condaenv
from dsjobs.condaenv import MAX_PIP_REQUIREMENTS, MAX_PROBLEMS, CondaEnv, read_conda_env
from dsjobs.controller.render import JobRef, runner_config, user_image
from dsjobs.controller.settings import OperatorSettings
from dsjobs.controller.status import graceful_timeout
from dsjobs.models import ProjectJobSpec
from dsjobs.models.limits import DEFAULT_GRACEFUL_TIMEOUT, MAX_CONFIG_LENGTH
from dsjobs.runner.config import GracefulShutdown, PipOptions
from dsjobs.validation import parse_job_spec

# What older DataSphere clients built from the local environment.
CLIENT_ENV = """
name: default
channels:
  - defaults
dependencies:
  - python=3.10.9
  - pip
  - pip:
    - numpy==1.26.4
    - tqdm
"""


def test_the_clients_environment_file_is_a_python_version_and_pip_packages() -> None:
    assert read_conda_env(CLIENT_ENV) == CondaEnv("3.10.9", ["numpy==1.26.4", "tqdm"], [])
    assert read_conda_env("") == CondaEnv()
    assert read_conda_env("dependencies: []") == CondaEnv()


@pytest.mark.parametrize("spec", ["pip", "pip=23", "pip>=23", "pip >=23", "pip==23.3.1"])
def test_pip_itself_in_any_spelling_is_no_problem(spec: str) -> None:
    # The image's Python brings pip; the version asked for does not matter to a pip install.
    assert read_conda_env(f"dependencies: [{spec!r}]") == CondaEnv()


@pytest.mark.parametrize(
    ("spec", "version"),
    [
        ("python", ""),
        ("python=3.11", "3.11"),
        ("python==3.11.4", "3.11.4"),
        ("python=3.12.*", "3.12"),
        ("python 3.9", "3.9"),
    ],
)
def test_one_python_version_in_conda_spellings(spec: str, version: str) -> None:
    assert read_conda_env(f"dependencies: [{spec!r}]") == CondaEnv(version, [], [])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("dependencies: [cudatoolkit=11.8]", "'cudatoolkit=11.8' is a conda package"),
        ("dependencies: [python-dateutil]", "'python-dateutil' is a conda package"),
        ("dependencies: [pipx]", "'pipx' is a conda package"),
        ("dependencies: ['python>=3.9']", "name one Python version"),
        ("dependencies: [{pip: [1]}]", "dependencies[0].pip must be a list of requirements"),
        ("dependencies: [{conda-forge: x}]", "dependencies[0] must be a package or a pip: list"),
        ("dependencies: x", "dependencies must be a list"),
        ("variables: {A: b}", "'variables' is not supported"),
        ("[1, 2]", "must be a mapping"),
        ("a: [", "is not YAML"),
        # PyYAML's constructors raise plain errors for these (once an INTERNAL of the API).
        ("a: 2001-02-30", "is not YAML (day is out of range for month)"),
        ("x: !!float abc", "is not YAML"),
        ("x: !!timestamp 'zz'", "is not YAML"),
        ("[" * 1000, "is not YAML"),
    ],
)
def test_what_pip_cannot_install_is_named(text: str, problem: str) -> None:
    problems = read_conda_env(text).problems
    assert len(problems) == 1 and problem in problems[0], problems


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("dependencies:\n  - pip\n  - a: b: c\n", "line 3, column 9: mapping values are not allowed"),
        ("dependencies:\n  - python=3.11\n  - {pip: [x}\n", "line 3, column 13: "),
        ("name: x\ndependencies: [*nope]\n", "line 2, column 16: found undefined alias"),
    ],
)
def test_text_that_is_not_yaml_is_refused_naming_where(text: str, where: str) -> None:
    [problem] = read_conda_env(text).problems
    assert problem.startswith(f"is not YAML ({where}"), problem


@pytest.mark.parametrize(
    ("text", "first", "count"),
    [
        ("dependencies: [" + "a," * 131_000 + "a]", "dependencies[0] 'a' is a conda package", 131_001),
        ("dependencies:\n" + "- a\n" * 65_000, "dependencies[0] 'a' is a conda package", 65_000),
        ("{" + ", ".join(f"k{i}: 1" for i in range(24_000)) + "}", "'k0' is not supported", 24_000),
    ],
    ids=["flow", "block", "keys"],
)
def test_a_file_at_its_size_limit_lists_its_first_problems_and_counts_the_rest(
    text: str, first: str, count: int
) -> None:
    # Some 130,000 problems: the API would spend seconds wording them and answer only 50.
    assert len(text) <= MAX_CONFIG_LENGTH
    problems = read_conda_env(text).problems
    assert len(problems) == MAX_PROBLEMS + 1 and problems[0].startswith(first)
    assert problems[-1] == f"... and {count - MAX_PROBLEMS} more problems (the first 50 are listed)"


def test_a_handful_of_problems_gets_no_count() -> None:
    problems = read_conda_env("dependencies: [gdal, proj, 'python>=3.9']").problems
    assert len(problems) == 3 and not any(p.startswith("...") for p in problems)


def test_aliases_cannot_make_a_small_file_name_millions_of_pip_requirements() -> None:
    # 48 million requirements from 240 KiB, every one of which the validator and the runner
    # would go through.
    many = "dependencies: [{pip: &a [" + ",".join(["p"] * 2000) + "]}" + ", {pip: *a}" * 20_000 + "]"
    assert len(many) <= MAX_CONFIG_LENGTH
    env = read_conda_env(many)
    assert env.pip == [] and env.problems == [
        f"dependencies[0].pip takes the pip: lists past {MAX_PIP_REQUIREMENTS} requirements "
        f"(at most {MAX_PIP_REQUIREMENTS} in all)"
    ]
    half = MAX_PIP_REQUIREMENTS // 2
    text = "dependencies: [{pip: &a [" + ",".join(["p"] * half) + "]}, {pip: *a}, {pip: *a}]"
    env = read_conda_env(text)
    assert len(env.pip) == MAX_PIP_REQUIREMENTS
    assert [p.split(" takes ")[0] for p in env.problems] == ["dependencies[2].pip"]


def _spec(**python_env: object) -> tuple[ProjectJobSpec | None, list[str]]:
    doc = {"projectId": "p1", "jobParameters": {"cmd": "python main.py", "env": {"pythonEnv": python_env}}}
    spec, problems = parse_job_spec(doc)
    return spec, [f"{p.path} [{p.rule}] {p.message}" for p in problems]


def test_the_validator_names_the_conda_entries_and_a_contradicting_version() -> None:
    _, problems = _spec(condaYaml="dependencies: [python=3.10, gdal]")
    assert problems == [
        "job_parameters.env.python_env.conda_yaml [conda-yaml] dependencies[1] 'gdal' is a conda package: "
        "this server installs with pip only; list it under pip: (or in requirements)"
    ]
    _, problems = _spec(condaYaml="dependencies: [python=3.10]", pythonVersion="3.11")
    assert problems == [
        "job_parameters.env.python_env.conda_yaml [conda-yaml] python=3.10 contradicts python_version 3.11"
    ]
    assert _spec(condaYaml="dependencies: [python=3.11.4]", pythonVersion="3.11")[1] == []


@pytest.mark.parametrize(
    ("python_version", "conda", "image"),
    [
        ("3", "3.11", "python:3.11-slim"),
        ("3.11", "3.11.4", "python:3.11.4-slim"),
        ("3.11.4", "3.11", "python:3.11.4-slim"),
    ],
)
def test_of_two_agreeing_versions_the_more_precise_one_is_run(
    python_version: str, conda: str, image: str
) -> None:
    spec, problems = _spec(condaYaml=f"dependencies: [python={conda}]", pythonVersion=python_version)
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "p1"), spec, 1)
    assert config.python_env is not None and config.python_env.python_version == image[7:-5]
    assert user_image(spec, OperatorSettings(), {}) == image


def test_the_pod_gets_the_conda_python_and_its_pip_packages_after_the_requirements() -> None:
    spec, problems = _spec(condaYaml=CLIENT_ENV, requirements=["six==1.16.0"])
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "p1"), spec, 1)
    assert config.python_env is not None
    assert config.python_env.python_version == "3.10.9"
    assert config.python_env.requirements == ["six==1.16.0", "numpy==1.26.4", "tqdm"]
    assert user_image(spec, OperatorSettings(), {}) == "python:3.10.9-slim"


@pytest.mark.parametrize("pip_options", [None, {"indexUrl": "https://pypi.example.com/simple"}])
def test_a_no_deps_line_of_the_cli_s_requirements_file_becomes_pip_s_option(pip_options: object) -> None:
    # The official CLI sends a requirements file's option lines as requirements; pip refuses
    # --no-deps inside a requirements file ("no such option"), the others it takes there.
    extra = {"pipOptions": pip_options} if pip_options else {}
    wanted = ["six==1.16.0", "--no-deps", "--extra-index-url https://x.example.com/simple"]
    spec, problems = _spec(requirements=wanted, **extra)
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "p1"), spec, 1)
    assert config.python_env is not None
    assert config.python_env.requirements == ["six==1.16.0", "--extra-index-url https://x.example.com/simple"]
    assert config.python_env.pip.no_deps
    without = _spec(requirements=["six==1.16.0"])[0]
    assert without is not None
    no_flag = runner_config(JobRef("job-1", "ns", "uid", "p1"), without, 1).python_env
    assert no_flag is not None and not no_flag.pip.no_deps


def test_every_pip_option_reaches_the_runner() -> None:
    options = {
        "indexUrl": "https://pypi.example.com/simple",
        "extraIndexUrls": ["https://a.example.com/simple", "https://b.example.com/simple"],
        "trustedHosts": ["a.example.com"],
        "noDeps": True,
    }
    spec, problems = _spec(requirements=["six==1.16.0"], pipOptions=options)
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "p1"), spec, 1)
    assert config.python_env is not None
    assert config.python_env.pip == PipOptions(
        index_url="https://pypi.example.com/simple",
        extra_index_urls=["https://a.example.com/simple", "https://b.example.com/simple"],
        trusted_hosts=["a.example.com"],
        no_deps=True,
    )


@pytest.mark.parametrize(
    ("timeout", "seconds"), [(None, DEFAULT_GRACEFUL_TIMEOUT.total_seconds()), ("5s", 5.0)]
)
def test_the_runner_waits_the_timeout_the_pod_is_given(timeout: str | None, seconds: float) -> None:
    # The runner's wait and the pod's grace period come from one default: a runner killing the
    # program before the operator's deadline (or after the kubelet's) would lose the shutdown.
    graceful = {"signal": 2, **({"timeout": timeout} if timeout else {})}
    doc = {
        "projectId": "p1",
        "jobParameters": {"cmd": "python main.py", "gracefulShutdownParameters": graceful},
    }
    spec, problems = parse_job_spec(doc)
    assert problems == [] and spec is not None
    config = runner_config(JobRef("job-1", "ns", "uid", "p1"), spec, 1)
    assert config.graceful_shutdown == GracefulShutdown(signal=2, timeout_seconds=seconds)
    assert graceful_timeout(spec).total_seconds() == seconds


def test_the_same_text_is_read_once_and_each_reader_gets_its_own_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The operator plans a job not yet started at every change of it and renders its pod from it
    # several times: a hostile file at the size limit would cost 0.4 s each time.
    condaenv._read_conda_env.cache_clear()
    loads: list[str] = []
    load = condaenv.yaml.load

    def counting(text: str, Loader: Any) -> Any:
        loads.append(text)
        return load(text, Loader=Loader)

    monkeypatch.setattr(condaenv.yaml, "load", counting)
    text = "dependencies: [python=3.11, {pip: [requests]}, gdal]"
    first = read_conda_env(text)
    first.pip.append("mutated")
    first.problems.clear()
    second = read_conda_env(text)
    assert loads == [text]
    assert second.pip == ["requests"] and second.python_version == "3.11"
    assert len(second.problems) == 1 and "gdal" in second.problems[0]
