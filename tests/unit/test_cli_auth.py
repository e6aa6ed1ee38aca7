"""`dsjobs datasphere` sends the dsjobs token and nothing else: never the user's Yandex Cloud
credentials, which the official CLI would otherwise pick up on its own (YC_IAM_TOKEN, YC_TOKEN,
YC_OAUTH_TOKEN, `-t`, `--profile`, `yc`, the metadata server).

The official CLI runs in a subprocess (its descriptors must not share a process with ours); a fake
gRPC server in this process records the `authorization` header of every call it gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

REAL_IAM = "t1.REAL-YANDEX-CLOUD-IAM-TOKEN"
REAL_OAUTH = "y0_REAL-YANDEX-OAUTH-TOKEN"


@dataclass
class Spy:
    endpoint: str
    calls: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, spy: Spy) -> None:
        self.spy = spy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        metadata = dict(details.invocation_metadata)
        auth = metadata.get("authorization")
        self.spy.calls.append((details.method, auth if isinstance(auth, str) else None))

        def reject(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "spy")

        handler: Callable[[bytes, grpc.ServicerContext], bytes] = reject
        return grpc.unary_unary_rpc_method_handler(handler)


@pytest.fixture
def spy() -> Iterator[Spy]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    spy = Spy(endpoint=f"127.0.0.1:{port}")
    server.add_generic_rpc_handlers((_Handler(spy),))
    server.start()
    try:
        yield spy
    finally:
        server.stop(None)


def run_cli(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DSJOBS_", "YC_"))}
    base.update(
        DSJOBS_ENV_FILE=str(tmp_path / "no-env-file"),
        no_proxy="127.0.0.1,localhost",
        NO_PROXY="127.0.0.1,localhost",
        YC_IAM_TOKEN=REAL_IAM,
        YC_TOKEN=REAL_OAUTH,
        YC_OAUTH_TOKEN=REAL_OAUTH,
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "dsjobs.cli", "datasphere", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=base,
        cwd=tmp_path,
    )


LIST = ("project", "job", "list", "-p", "p1")


def test_without_a_dsjobs_token_nothing_is_sent(spy: Spy, tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "--endpoint", spy.endpoint, "--log-dir", str(tmp_path / "logs"), *LIST, env={})
    assert proc.returncode == 2, proc.stderr
    assert "--token" in proc.stderr and "DSJOBS_TOKEN" in proc.stderr
    assert spy.calls == []


@pytest.mark.parametrize(
    ("env", "official_args"),
    [
        ({}, ()),
        ({"YC_AUTH": "oauth,md,yc"}, ("-t", REAL_OAUTH, "--profile", "work")),
        # DEV: the official CLI would send no authorization at all (and use other protos).
        ({"SERVER_ENV": "DEV"}, ()),
    ],
)
def test_only_the_dsjobs_token_is_sent(
    spy: Spy, tmp_path: Path, env: dict[str, str], official_args: tuple[str, ...]
) -> None:
    proc = run_cli(
        tmp_path,
        "--endpoint",
        spy.endpoint,
        "--token",
        "dsjobs-token",
        *official_args,
        "--log-dir",
        str(tmp_path / "logs"),
        *LIST,
        env=env,
    )
    assert proc.returncode != 0  # the spy rejects every call
    assert spy.calls, proc.stderr
    assert {auth for _, auth in spy.calls} == {"Bearer dsjobs-token"}
    assert {method for method, _ in spy.calls} == {"/yandex.cloud.datasphere.v2.jobs.ProjectJobService/List"}


def test_env_file_token_goes_only_to_the_env_file_endpoint(spy: Spy, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("export DSJOBS_ENDPOINT=127.0.0.1:1\nexport DSJOBS_TOKEN=local-stack-token\n")
    proc = run_cli(
        tmp_path,
        "--endpoint",
        spy.endpoint,
        "--log-dir",
        str(tmp_path / "logs"),
        *LIST,
        env={"DSJOBS_ENV_FILE": str(env_file)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "--token" in proc.stderr
    assert spy.calls == []

    env_file.write_text(f"export DSJOBS_ENDPOINT={spy.endpoint}\nexport DSJOBS_TOKEN=local-stack-token\n")
    run_cli(tmp_path, "--log-dir", str(tmp_path / "logs"), *LIST, env={"DSJOBS_ENV_FILE": str(env_file)})
    assert {auth for _, auth in spy.calls} == {"Bearer local-stack-token"}


class _Paging(grpc.GenericRpcHandler):
    """List answers one job and a next page, then an empty page; the token file is renewed
    between the two calls."""

    def __init__(self, spy: Spy, token_file: Path) -> None:
        self.spy, self.token_file = spy, token_file

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2
        from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import project_job_service_pb2 as svc

        auth = dict(details.invocation_metadata).get("authorization")
        self.spy.calls.append((details.method, auth if isinstance(auth, str) else None))
        first = len(self.spy.calls) == 1

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            if first:
                self.token_file.write_text("renewed-token\n")
                page = svc.ListProjectJobResponse(
                    jobs=[jobs_pb2.Job(id="j1", name="a")], next_page_token="p2"
                )
                return page.SerializeToString()
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)


def test_a_token_file_is_read_again_for_every_call(tmp_path: Path) -> None:
    # A job outliving its token (OIDC, `kubectl create token`): whatever renews the file keeps the
    # CLI's polls and log stream going; a token given once could never change.
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    spy = Spy(endpoint=f"127.0.0.1:{port}")
    server.add_generic_rpc_handlers((_Paging(spy, token_file),))
    server.start()
    try:
        proc = run_cli(
            tmp_path,
            "--endpoint",
            spy.endpoint,
            "--log-dir",
            str(tmp_path / "logs"),
            *LIST,
            env={"DSJOBS_TOKEN_FILE": str(token_file)},
        )
    finally:
        server.stop(None)
    assert proc.returncode == 0, proc.stderr
    assert [auth for _, auth in spy.calls] == ["Bearer first-token", "Bearer renewed-token"]


def test_the_official_cli_does_not_ask_pypi_after_a_command(spy: Spy, tmp_path: Path) -> None:
    # It checks for a newer CLI after every command, with no timeout: without internet access (a
    # private cluster, here a dead proxy) a command that succeeded exited 1, or hung.
    dead = "http://127.0.0.1:9"
    proc = run_cli(
        tmp_path,
        "--endpoint",
        spy.endpoint,
        "--token",
        "t",
        "version",
        env={"https_proxy": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "HTTP_PROXY": dead},
    )
    assert proc.returncode == 0, proc.stderr
    assert "0.10.0" in proc.stdout + proc.stderr and "pypi" not in proc.stderr.lower()


def test_a_refused_call_ends_in_one_line_that_says_what_to_do(spy: Spy, tmp_path: Path) -> None:
    # The official CLI let a failed call end it with a 40-line traceback.
    proc = run_cli(
        tmp_path,
        "--endpoint",
        spy.endpoint,
        "--token",
        "t",
        "--log-dir",
        str(tmp_path / "logs"),
        *LIST,
        env={},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "dsjobs: UNAUTHENTICATED: spy (the token was refused: renew it (DSJOBS_TOKEN))"
    )


def test_a_missing_ca_file_is_a_usage_error(spy: Spy, tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "--endpoint", spy.endpoint, "--token", "t", "--ca", "no-such.pem", *LIST, env={})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot read the CA bundle no-such.pem (--ca / DSJOBS_CA)" in proc.stderr
    assert spy.calls == []
