"""Session fixture for end-to-end tests of the whole stack: dsjobs deployed once, reused by every test.

    def test_x(dsjobs_stack: StackEnv) -> None: ...   (tests/e2e/conftest.py registers the fixture)

Modes:
- default: the local stack. The dev cluster comes from `cluster_fixtures.dev_cluster` (started once
  for the session when it is not running, stopped at the end only if this session started it);
  dsjobs is then deployed on it as `make up` does (`dsjobs.localstack.up`: the local overlay, the
  storage Secret, a token for the demo project, `<dir>/env`).
- `DSJOBS_E2E_KUBECONFIG=<file>` with `DSJOBS_E2E_ENV=<env file>`: dsjobs already deployed elsewhere
  (`hack/e2e-kind.sh` writes both); nothing is deployed. The env file holds `export` lines for
  DSJOBS_ENDPOINT, DSJOBS_TOKEN and DSJOBS_PROJECT_ID (and DSJOBS_CA with TLS); the same variables
  in the environment work too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cluster_fixtures import REPO_ROOT, SYSTEM_NAMESPACE, ClusterHandle

from dsjobs.cli import parse_env_file

PROJECT_LABEL = "dsjobs.dev/project-id"
DEPLOY_TIMEOUT_S = 600
# One CLI call: the official CLI polls operations every 5 s, a job pip-installs its requirements.
CLI_TIMEOUT_S = 420
_CREATED_JOB = re.compile(r"created job `([a-z0-9-]+)`")


@dataclass
class CliRun:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved as the user sees them

    def ok(self) -> CliRun:
        assert self.returncode == 0, (
            f"`{' '.join(self.argv)}` exited {self.returncode}:\n{self.output[-6000:]}"
        )
        return self

    @property
    def job_id(self) -> str:
        """The id the CLI logged for the job it created (execute, fork)."""
        ids = _CREATED_JOB.findall(self.output)
        assert ids, f"no `created job` line in the CLI output:\n{self.output[-4000:]}"
        return str(ids[-1])


@dataclass
class StackEnv:
    """A deployed dsjobs and how to reach it, as a user would."""

    kubeconfig: Path
    endpoint: str
    token: str
    project_id: str
    project_namespace: str
    system_namespace: str
    local: bool
    ca_file: str | None = None
    kubectl_bin: str = "kubectl"
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "DSJOBS_ENDPOINT": self.endpoint,
                "DSJOBS_TOKEN": self.token,
                "DSJOBS_PROJECT_ID": self.project_id,
                # The CLI must not fall back to a stale .dev/env of the checkout.
                "DSJOBS_ENV_FILE": os.devnull,
            }
        )
        if self.ca_file:
            env["DSJOBS_CA"] = self.ca_file
        env.update(overrides)
        return env

    # ---- kubectl

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc.stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def job_object(self, job_id: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.kubectl_json("get", "projectjob", job_id, "-n", self.project_namespace)
        return obj

    # ---- the official CLI

    def _argv(self, args: Sequence[str], command: str = "datasphere") -> list[str]:
        script = Path(sys.executable).with_name("dsjobs")
        prefix = [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "dsjobs.cli"]
        return [*prefix, command, *args]

    def datasphere(
        self,
        *args: str,
        cwd: Path,
        timeout: float = CLI_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        command: str = "datasphere",
    ) -> CliRun:
        """Runs `dsjobs datasphere <args>` (or another `command` of dsjobs) in `cwd` and waits for it."""
        argv = self._argv(args, command)
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env=dict(env) if env is not None else self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            raise AssertionError(
                f"`{' '.join(args)}` did not finish in {timeout:.0f}s:\n{out[-6000:]}"
            ) from exc
        return CliRun(argv, proc.returncode, proc.stdout)

    def datasphere_popen(self, *args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        """Starts `dsjobs datasphere <args>` in the background, its output going to `log`."""
        with open(log, "wb") as out:
            return subprocess.Popen(
                self._argv(args), cwd=cwd, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def get_job(self, job_id: str, cwd: Path) -> dict[str, Any]:
        """`datasphere project job get --id ... --format json`, parsed."""
        run = self.datasphere(
            "project", "job", "get", "--id", job_id, "--format", "json", cwd=cwd, timeout=120
        )
        run.ok()
        job: dict[str, Any] = _first_json(run.output)
        return job


def _first_json(text: str) -> Any:
    """The JSON document in CLI output that also holds log lines."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "[{":
            try:
                value, _ = decoder.raw_decode(text[i:])
            except ValueError:
                continue
            return value[0] if isinstance(value, list) and len(value) == 1 else value
    raise AssertionError(f"no JSON in the CLI output:\n{text[-3000:]}")


def first_json(text: str) -> Any:
    return _first_json(text)


def poll(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """check()'s first truthy result; fails with `what` (and the last error) after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # transient errors while the system converges
            last_exc = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc})", pytrace=False)


def _project_namespace(kubectl: Callable[..., str], project_id: str) -> str:
    names = kubectl("get", "namespaces", "-l", f"{PROJECT_LABEL}={project_id}", "-o", "name").split()
    if len(names) != 1:
        pytest.fail(
            f"expected one namespace labelled {PROJECT_LABEL}={project_id}, found {names}", pytrace=False
        )
    return str(names[0]).removeprefix("namespace/")


def _external_stack(kubeconfig: Path) -> StackEnv:
    values: dict[str, str] = {}
    if env_file := os.environ.get("DSJOBS_E2E_ENV"):
        values.update(parse_env_file(Path(env_file).read_text()))
    for key in ("DSJOBS_ENDPOINT", "DSJOBS_TOKEN", "DSJOBS_PROJECT_ID", "DSJOBS_CA"):
        if os.environ.get(key):
            values[key] = os.environ[key]
    missing = [k for k in ("DSJOBS_ENDPOINT", "DSJOBS_TOKEN", "DSJOBS_PROJECT_ID") if not values.get(k)]
    if missing:
        pytest.skip(f"DSJOBS_E2E_KUBECONFIG is set but {', '.join(missing)} are not (set DSJOBS_E2E_ENV)")
    stack = StackEnv(
        kubeconfig=kubeconfig,
        endpoint=values["DSJOBS_ENDPOINT"],
        token=values["DSJOBS_TOKEN"],
        project_id=values["DSJOBS_PROJECT_ID"],
        project_namespace="",
        system_namespace=SYSTEM_NAMESPACE,
        local=False,
        ca_file=values.get("DSJOBS_CA"),
    )
    stack.project_namespace = _project_namespace(stack.kubectl, stack.project_id)
    return stack


@pytest.fixture(scope="session")
def dsjobs_stack(dev_cluster: ClusterHandle) -> Iterator[StackEnv]:
    if not dev_cluster.local:
        yield _external_stack(dev_cluster.kubeconfig)
        return

    from dsjobs import localstack

    assert dev_cluster.root is not None
    try:
        stack = localstack.up(dev_cluster.root, start_cluster=False, timeout=DEPLOY_TIMEOUT_S)
    except localstack.StackError as exc:
        pytest.fail(f"deploying dsjobs on the local cluster failed:\n{exc}", pytrace=False)
    yield StackEnv(
        kubeconfig=stack.kubectl.kubeconfig,
        endpoint=stack.env["DSJOBS_ENDPOINT"],
        token=stack.env["DSJOBS_TOKEN"],
        project_id=stack.facts.project_id,
        project_namespace=stack.facts.project_namespace,
        system_namespace=stack.facts.system_namespace,
        local=True,
        kubectl_bin=stack.kubectl.binary,
    )
    if dev_cluster.started_here:  # the cluster goes down after us: leave no stale env file behind
        stack.env_file.unlink(missing_ok=True)


__all__ = ["REPO_ROOT", "CliRun", "StackEnv", "dsjobs_stack", "first_json", "poll"]
