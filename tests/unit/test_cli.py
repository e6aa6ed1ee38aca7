"""The `dsjobs datasphere` launcher: where it points the official CLI; and the make entry points
(`make demo`, `make up`, ...) that start the local stack the launcher talks to."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsjobs import cli
from dsjobs.cli import (
    CliError,
    Target,
    grpc_proxy_env,
    parse_env_file,
    read_token_file,
    requests_ca_bundle,
    resolve_target,
    split_args,
)
from dsjobs.devcluster import S3Config
from dsjobs.localstack import env_file_text, write_private


def test_env_file_parsing_handles_export_quotes_and_comments() -> None:
    text = "# made by make up\nexport DSJOBS_ENDPOINT=127.0.0.1:9090\nDSJOBS_TOKEN='abc def'\nnonsense\n"
    assert parse_env_file(text) == {"DSJOBS_ENDPOINT": "127.0.0.1:9090", "DSJOBS_TOKEN": "abc def"}


@pytest.mark.parametrize(
    ("flag", "environ", "file_text", "expected"),
    [
        ("h:1", {"DSJOBS_ENDPOINT": "h:2"}, "DSJOBS_ENDPOINT=127.0.0.1:3", "h:1"),
        (None, {"DSJOBS_ENDPOINT": "h:2"}, "DSJOBS_ENDPOINT=127.0.0.1:3", "h:2"),
        (None, {}, "DSJOBS_ENDPOINT=127.0.0.1:3", "127.0.0.1:3"),
    ],
)
def test_flag_beats_environment_beats_env_file(
    flag: str | None, environ: dict[str, str], file_text: str, expected: str
) -> None:
    target = resolve_target(endpoint=flag, token="t", ca_file=None, environ=environ, env_file_text=file_text)
    assert target.endpoint == expected


def test_token_and_ca_come_along() -> None:
    target = resolve_target(
        endpoint=None,
        token=None,
        ca_file=None,
        environ={"DSJOBS_ENDPOINT": "h:1", "DSJOBS_TOKEN": "t", "DSJOBS_CA": "/ca.pem"},
        env_file_text=None,
    )
    assert target == Target(endpoint="h:1", token="t", ca_file="/ca.pem")


def test_missing_endpoint_is_a_clear_error() -> None:
    with pytest.raises(CliError, match="DSJOBS_ENDPOINT"):
        resolve_target(endpoint=None, token=None, ca_file=None, environ={}, env_file_text=None)


LOCAL_STACK_FILE = (
    "export DSJOBS_ENDPOINT=127.0.0.1:17090\nexport DSJOBS_TOKEN=local\nexport DSJOBS_CA=/local-ca.pem\n"
)


@pytest.mark.parametrize(
    ("flag", "environ"),
    [("elsewhere:443", {}), (None, {"DSJOBS_ENDPOINT": "elsewhere:443"})],
)
def test_env_file_token_never_goes_to_an_endpoint_named_elsewhere(
    flag: str | None, environ: dict[str, str]
) -> None:
    with pytest.raises(
        CliError, match=r"--token.*DSJOBS_TOKEN.*goes only with the endpoint there \(127.0.0.1:17090\)"
    ):
        resolve_target(
            endpoint=flag, token=None, ca_file=None, environ=environ, env_file_text=LOCAL_STACK_FILE
        )


@pytest.mark.parametrize(
    ("flag", "environ"), [("127.0.0.1:17090", {}), (None, {"DSJOBS_ENDPOINT": "127.0.0.1:17090"})]
)
def test_env_file_token_and_ca_go_with_its_endpoint_given_again_by_hand(
    flag: str | None, environ: dict[str, str]
) -> None:
    # Was "no dsjobs token for 127.0.0.1:17090: ... goes only with the endpoint there (127.0.0.1:17090)".
    target = resolve_target(
        endpoint=flag, token=None, ca_file=None, environ=environ, env_file_text=LOCAL_STACK_FILE
    )
    assert target == Target(endpoint="127.0.0.1:17090", token="local", ca_file="/local-ca.pem")


def test_env_file_ca_stays_with_the_env_file_endpoint() -> None:
    target = resolve_target(
        endpoint="elsewhere:443", token="t", ca_file=None, environ={}, env_file_text=LOCAL_STACK_FILE
    )
    assert target == Target(endpoint="elsewhere:443", token="t", ca_file=None)


def test_env_file_token_and_ca_go_with_its_own_endpoint() -> None:
    target = resolve_target(
        endpoint=None, token=None, ca_file=None, environ={}, env_file_text=LOCAL_STACK_FILE
    )
    assert target == Target(endpoint="127.0.0.1:17090", token="local", ca_file="/local-ca.pem")


def test_explicit_token_and_ca_go_with_any_endpoint() -> None:
    environ = {"DSJOBS_TOKEN": "env-token", "DSJOBS_CA": "/env-ca.pem"}
    target = resolve_target(
        endpoint="elsewhere:443", token=None, ca_file=None, environ=environ, env_file_text=LOCAL_STACK_FILE
    )
    assert target == Target(endpoint="elsewhere:443", token="env-token", ca_file="/env-ca.pem")
    target = resolve_target(
        endpoint=None, token="flag-token", ca_file=None, environ=environ, env_file_text=LOCAL_STACK_FILE
    )
    assert target == Target(endpoint="127.0.0.1:17090", token="flag-token", ca_file="/env-ca.pem")


@pytest.mark.parametrize("endpoint", ["evil.example.com:9090", "10.0.0.5:443", "[2001:db8::1]:443"])
def test_an_explicit_token_is_not_sent_to_a_remote_endpoint_only_the_env_file_names(endpoint: str) -> None:
    # The file is read from the current directory: a checkout of someone else's could name any host.
    text = f"export DSJOBS_ENDPOINT={endpoint}\n"
    with pytest.raises(CliError, match=rf"not sent to {re.escape(endpoint)}, which only the env file names"):
        resolve_target(
            endpoint=None, token=None, ca_file=None, environ={"DSJOBS_TOKEN": "real"}, env_file_text=text
        )
    # Its own token goes there; with the endpoint given explicitly too, so does the user's.
    own = resolve_target(
        endpoint=None, token=None, ca_file=None, environ={}, env_file_text=text + "DSJOBS_TOKEN=f\n"
    )
    assert own.token == "f"
    mine = resolve_target(endpoint=endpoint, token="real", ca_file=None, environ={}, env_file_text=text)
    assert (mine.endpoint, mine.token) == (endpoint, "real")
    for local in ("127.0.0.1:17090", "localhost:1", "[::1]:9"):
        assert (
            resolve_target(
                endpoint=None,
                token="real",
                ca_file=None,
                environ={},
                env_file_text=f"DSJOBS_ENDPOINT={local}\n",
            ).token
            == "real"
        )


def test_missing_token_is_a_clear_error() -> None:
    with pytest.raises(CliError, match=r"no dsjobs token for h:1: pass --token TOKEN or set DSJOBS_TOKEN"):
        resolve_target(endpoint="h:1", token=None, ca_file=None, environ={}, env_file_text=None)


def test_missing_token_exits_2_before_the_official_cli_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DSJOBS_TOKEN", raising=False)
    monkeypatch.delenv("DSJOBS_ENDPOINT", raising=False)
    monkeypatch.setenv("DSJOBS_ENV_FILE", "/nonexistent/env")
    monkeypatch.setenv("YC_IAM_TOKEN", "t1.REAL")

    def must_not_run(target: Target, argv: object) -> int:
        raise AssertionError(f"the official CLI ran with {target}")

    monkeypatch.setattr(cli, "run_datasphere", must_not_run)
    assert cli.main(["datasphere", "--endpoint", "h:1", "project", "job", "list", "-p", "p1"]) == 2
    assert "--token" in capsys.readouterr().err


def test_official_cli_help_runs_through_the_launcher() -> None:
    # A subprocess: the official client's descriptors must not share a process with ours.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsjobs.cli",
            "datasphere",
            "--endpoint",
            "127.0.0.1:1",
            "--token",
            "t",
            "project",
            "job",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "execute" in proc.stdout and "attach" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "ours", "rest"),
    [
        (["-l", "DEBUG", "project", "job", "list"], {}, ["-l", "DEBUG", "project", "job", "list"]),
        (
            ["--endpoint", "h:1", "--token=t", "-t", "x", "project"],
            {"endpoint": "h:1", "token": "t"},
            ["-t", "x", "project"],
        ),
        (["--ca", "/c", "project", "--endpoint", "z"], {"ca_file": "/c"}, ["project", "--endpoint", "z"]),
    ],
)
def test_our_options_are_taken_only_from_the_front(
    argv: list[str], ours: dict[str, str], rest: list[str]
) -> None:
    assert split_args(argv) == (ours, rest)


def test_download_files_takes_our_options_anywhere() -> None:
    # Its options are all ours; taken from the front only, `--id J --endpoint H` was told
    # "no dsjobs endpoint: pass --endpoint".
    argv = ["--id", "j", "--endpoint", "h:1", "--with-logs", "--token=t", "--insecure"]
    assert split_args(argv, anywhere=True) == (
        {"endpoint": "h:1", "token": "t", "insecure": "1"},
        ["--id", "j", "--with-logs"],
    )


def test_option_without_value_is_an_error() -> None:
    with pytest.raises(CliError, match="--token needs a value"):
        split_args(["--token"])


def test_official_global_options_reach_the_official_cli() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsjobs.cli",
            "datasphere",
            "--endpoint",
            "127.0.0.1:1",
            "--token",
            "t",
            "-l",
            "DEBUG",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "project" in proc.stdout


# ------------------------------------------------------------------ make and hack/ entry points

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("up", "VENV_PYTHON={py} bash hack/up.sh"),
        ("down", "VENV_PYTHON={py} bash hack/down.sh"),
        ("demo", "VENV_PYTHON={py} bash hack/demo.sh"),
        ("bench", "VENV_PYTHON={py} bash hack/bench.sh"),
        ("e2e-kind", "VENV_PYTHON={py} bash hack/e2e-kind.sh"),
        ("proto", "PYTHON={py} bash hack/gen-proto.sh"),
    ],
)
def test_make_hands_the_venvs_python_to_the_scripts(target: str, command: str, tmp_path: Path) -> None:
    # PYTHON (the interpreter that creates the venv) and VENV set on make's command line: make
    # exports PYTHON to every recipe, so the scripts must get the venv's python under their own name.
    venv = tmp_path / "venv"
    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), target, "PYTHON=python3.11", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"python3.11 -m venv {venv}" in proc.stdout
    assert command.format(py=venv / "bin" / "python") in [line.strip() for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("script", ["up", "down", "demo"])
def test_local_stack_scripts_run_the_venvs_python_not_python(script: str, tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "ran $*"\n')
    stub.chmod(0o755)
    env = dict(os.environ, VENV_PYTHON=str(stub), PYTHON="/nonexistent/python3.11")
    proc = subprocess.run(
        ["bash", str(REPO / "hack" / f"{script}.sh"), "--flag"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ran -m dsjobs.localstack {script} --flag"


def test_no_hack_script_takes_python_for_the_venvs() -> None:
    # gen-proto.sh alone reads PYTHON: its documented interface (the drift test sets it), and
    # `make proto` sets it explicitly.
    readers = sorted(p.name for p in (REPO / "hack").glob("*.sh") if "${PYTHON:-" in p.read_text())
    assert readers == ["gen-proto.sh"], readers


# ------------------------------------------------------------------ files with secrets the local stack writes


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_env_file_becomes_private_even_when_it_existed_world_readable(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("old\n")
    env_file.chmod(0o644)
    write_private(env_file, env_file_text({"DSJOBS_TOKEN": "secret"}))
    assert _mode(env_file) == 0o600
    assert env_file.read_text().endswith("export DSJOBS_TOKEN=secret\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env"]  # no temp file left behind


def test_s3_settings_become_private_even_when_they_existed_world_readable(tmp_path: Path) -> None:
    env_path, json_path = tmp_path / "s3.env", tmp_path / "s3.json"
    for path in (env_path, json_path):
        path.write_text("old\n")
        path.chmod(0o644)
    config = S3Config.generate(9000)
    config.write(env_path, json_path)
    assert (_mode(env_path), _mode(json_path)) == (0o600, 0o600)
    assert S3Config.read(json_path) == config
    assert f"DSJOBS_S3_SECRET_KEY={config.secret_key}\n" in env_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3.env", "s3.json"]


@pytest.mark.parametrize(
    ("endpoint", "ca", "insecure", "plaintext"),
    [
        ("127.0.0.1:17090", None, False, True),  # a local stack
        ("localhost:9090", None, False, True),
        ("dsjobs.example.com:443", None, False, False),  # TLS with the system's CAs
        ("dsjobs.example.com:443", "/ca.pem", False, False),
        ("dsjobs.example.com:9090", None, True, True),  # asked for
        ("127.0.0.1:17090", "/ca.pem", False, False),
    ],
)
def test_a_remote_endpoint_gets_tls_unless_plaintext_is_asked_for(
    endpoint: str, ca: str | None, insecure: bool, plaintext: bool
) -> None:
    # Without a CA it was plaintext to any host: the token (a cluster credential) in the clear.
    target = resolve_target(
        endpoint=endpoint, token="t", ca_file=ca, environ={}, env_file_text=None, insecure=insecure
    )
    assert target.plaintext == plaintext
    by_env = resolve_target(
        endpoint=endpoint, token="t", ca_file=ca, environ={"DSJOBS_INSECURE": "1"}, env_file_text=None
    )
    assert by_env.plaintext == (ca is None)


def test_our_flags_and_options_are_taken_from_the_front() -> None:
    ours, rest = split_args(["--insecure", "--token-file", "/t", "-l", "DEBUG", "--insecure"])
    assert ours == {"insecure": "1", "token_file": "/t"} and rest == ["-l", "DEBUG", "--insecure"]


def test_a_token_file_is_read_and_read_again(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("tok-one\n")
    target = resolve_target(
        endpoint="h:1", token=None, ca_file=None, environ={"DSJOBS_TOKEN_FILE": str(path)}, env_file_text=None
    )
    assert (target.token, target.current_token()) == ("tok-one", "tok-one")
    path.write_text("tok-two\n")
    assert target.current_token() == "tok-two"
    path.unlink()  # being renewed: the last good one meanwhile
    assert target.current_token() == "tok-two"
    assert "tok-" not in repr(target)
    # A token given as such wins; a missing or empty file is a clear error.
    given = resolve_target(
        endpoint="h:1", token="t", ca_file=None, environ={"DSJOBS_TOKEN_FILE": str(path)}, env_file_text=None
    )
    assert (given.token, given.token_file) == ("t", None)
    with pytest.raises(CliError, match="cannot read the token file"):
        resolve_target(
            endpoint="h:1", token=None, ca_file=None, environ={}, env_file_text=None, token_file=str(path)
        )
    path.write_text("\n")
    with pytest.raises(CliError, match="is empty"):
        resolve_target(
            endpoint="h:1", token=None, ca_file=None, environ={}, env_file_text=None, token_file=str(path)
        )
    # Like a token given as such, it is not sent to a remote endpoint only the env file names.
    path.write_text("mine\n")
    with pytest.raises(CliError, match=r"not sent to evil\.example:443"):
        resolve_target(
            endpoint=None,
            token=None,
            ca_file=None,
            environ={"DSJOBS_TOKEN_FILE": str(path)},
            env_file_text="DSJOBS_ENDPOINT=evil.example:443\n",
        )


def test_the_env_file_puts_the_cluster_s_kubectl_first_on_path(tmp_path: Path) -> None:
    # A machine without kubectl of its own: the README's `kubectl get pj` after `. .dev/env`.
    env_file = tmp_path / "env"
    bin_dir = tmp_path / "k8s bin"
    write_private(env_file, env_file_text({"DSJOBS_TOKEN": "t"}, str(bin_dir)))
    out = subprocess.run(
        ["sh", "-c", f'. {shlex.quote(str(env_file))}; printf "%s" "$PATH"'],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout
    assert out == f"{bin_dir}:/usr/bin:/bin"
    assert parse_env_file(env_file.read_text())["DSJOBS_TOKEN"] == "t"


def test_a_flag_beats_an_environment_variable_and_a_token_beats_a_token_file(tmp_path: Path) -> None:
    # `. .dev/env` sets DSJOBS_TOKEN; `--token-file` given after it must not be ignored for it (the
    # local stack's token went to the endpoint named).
    path = tmp_path / "token"
    path.write_text("from-file\n")
    local = {"DSJOBS_TOKEN": "local-stack-token"}

    def resolved(token: str | None, token_file: str | None, environ: dict[str, str]) -> str:
        return resolve_target(
            endpoint="remote.example:443",
            token=token,
            ca_file=None,
            environ=environ,
            env_file_text=None,
            token_file=token_file,
        ).token

    assert resolved(None, str(path), local) == "from-file"
    assert resolved("flag", str(path), local) == "flag"
    assert resolved(None, None, {**local, "DSJOBS_TOKEN_FILE": str(path)}) == "local-stack-token"
    assert resolved(None, None, {"DSJOBS_TOKEN_FILE": str(path)}) == "from-file"


def test_tls_trusts_the_system_s_cas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # grpc reads its own bundle, not the system's: a company CA installed there was not trusted.
    bundle = tmp_path / "company.pem"
    bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\n...\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert cli.system_roots() == bundle.read_bytes()
    monkeypatch.delenv("SSL_CERT_FILE")
    roots = cli.system_roots()
    assert roots is None or b"BEGIN CERTIFICATE" in roots


def test_the_cli_s_channel_pings_a_server_that_may_vanish() -> None:
    # The official options send no keepalive: a replica gone without a FIN (a lost node) left the
    # CLI's log stream and operation polls hanging for the kernel's ~15 minutes.
    # (datasphere's own options are not imported here: its protos clash with dsjobs.pb's.)
    from dsjobs.api.server import SERVER_OPTIONS
    from dsjobs.cli import channel_options

    official = [("grpc.enable_retries", 1), ("grpc.service_config", '{"methodConfig": []}')]
    options = dict(channel_options(official, "dsjobs/1", direct=False))
    assert all(options[k] == v for k, v in official)  # its retry policy untouched
    # Not more often than the server lets a client ping (else GOAWAY "too many pings").
    assert (
        options["grpc.keepalive_time_ms"]
        >= dict(SERVER_OPTIONS)["grpc.http2.min_ping_interval_without_data_ms"]
    )
    assert options["grpc.http2.max_pings_without_data"] == 0  # an idle log stream sends no data
    assert options["grpc.primary_user_agent"] == "dsjobs/1" and "grpc.enable_http_proxy" not in options
    assert dict(channel_options(official, None, direct=True))["grpc.enable_http_proxy"] == 0


@pytest.mark.parametrize(
    "data",
    [b"tok.en-1\n", b"\xef\xbb\xbftok.en-1\r\n", "tok.en-1\r\n".encode("utf-16")],
    ids=["utf-8", "utf-8 with BOM (PowerShell)", "utf-16 (PowerShell's >)"],
)
def test_token_files_as_windows_writes_them(tmp_path: Path, data: bytes) -> None:
    # A BOM went into the authorization header: "INTERNAL: Invalid metadata", naming no file.
    path = tmp_path / "token"
    path.write_bytes(data)
    assert read_token_file(str(path)) == "tok.en-1"


def test_a_token_file_that_holds_no_token_is_named(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("two words\n")
    with pytest.raises(CliError, match=r"token file .* not a token"):
        read_token_file(str(path))


def test_grpc_gets_the_proxy_the_uppercase_variables_name() -> None:
    # gRPC reads only https_proxy/no_proxy: with HTTPS_PROXY alone its calls went direct while
    # the official CLI's uploads (requests) went through the proxy.
    env = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "localhost", "http_proxy": "http://other:1"}
    assert grpc_proxy_env(env) == {"https_proxy": "http://proxy:3128", "no_proxy": "localhost"}
    assert grpc_proxy_env({"https_proxy": "a", "HTTPS_PROXY": "b"}) == {}


def test_the_official_cli_s_transfers_trust_the_private_ca_and_the_public_ones(tmp_path: Path) -> None:
    ca = tmp_path / "company-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\ncompany\n-----END CERTIFICATE-----\n")
    cache = tmp_path / "cache"
    bundle = requests_ca_bundle(str(ca), {}, cache)
    assert bundle is not None
    text = Path(bundle).read_text()
    assert text.endswith(ca.read_text()) and text.count("BEGIN CERTIFICATE") > 10  # certifi's too
    assert stat.S_IMODE(Path(bundle).stat().st_mode) == 0o600
    assert requests_ca_bundle(str(ca), {}, cache) == bundle  # the same content: the same file
    # The user's own choice stands; no private CA, nothing to do.
    assert requests_ca_bundle(str(ca), {"REQUESTS_CA_BUNDLE": "/mine.pem"}, cache) is None
    assert requests_ca_bundle(None, {}, cache) is None


def test_a_failed_job_is_one_line_not_the_official_clis_traceback() -> None:
    # A subprocess: the official client's descriptors must not share a process with ours.
    script = """
from datasphere.client import OperationError, ProgramError
from datasphere.api import operation_pb2
from google.rpc import code_pb2, status_pb2
from dsjobs.cli import job_error_line
print(job_error_line(ProgramError(3)))
error = status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled by alice")
print(job_error_line(OperationError(operation_pb2.Operation(id="op1", done=True, error=error), None)))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "dsjobs: the job failed: Program returned code 3",
        "dsjobs: the job ended: CANCELLED: cancelled by alice",
    ]


def test_ctrl_c_ends_the_official_cli_in_one_line_not_its_traceback() -> None:
    # "cancel job? y" on a job without graceful-shutdown: the official CLI cancels it, then lets
    # KeyboardInterrupt end it with a traceback (it catches Exception only). A subprocess: the
    # official client's descriptors must not share a process with ours.
    script = """
import sys
import datasphere.main
from dsjobs import cli

def interrupted():
    print("job is canceled", file=sys.stderr)
    raise KeyboardInterrupt

datasphere.main.main = interrupted
sys.exit(cli.run_datasphere(cli.Target(endpoint="127.0.0.1:1", token="t", ca_file=None), ["version"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == cli.INTERRUPTED_EXIT, proc.stderr
    assert proc.stderr.splitlines() == ["job is canceled", cli.INTERRUPTED_LINE]


def test_a_config_the_official_cli_refuses_ends_in_one_line(tmp_path: Path) -> None:
    # Its own check, before any call: it raised ValueError with a 30-line traceback.
    (tmp_path / "config.yaml").write_text("name: x\ncmd: echo hi\ns3-mounts:\n  - bt1rawdata: RAW\n")
    env = {**os.environ, "DSJOBS_ENDPOINT": "127.0.0.1:1", "DSJOBS_TOKEN": "t", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsjobs.cli",
            "datasphere",
            "project",
            "job",
            "execute",
            "-p",
            "p",
            "-c",
            "config.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "dsjobs datasphere: invalid `s3-mounts` entry: `{'bt1rawdata': 'RAW'}`: value is incorrect: "
        "invalid resource ID: bt1rawdata"
    )


def test_the_official_cli_waits_for_its_log_threads_once_the_job_is_over() -> None:
    # Its daemon thread printing the logs died with the process: a chatty job's last lines were lost.
    import types

    import grpc

    printed: list[str] = []

    class OperationError(Exception):
        pass

    class Refused(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

    class Stub:
        def ReadLogs(self, job_id: str) -> Iterator[str]:
            if job_id == "gone":  # a deleted job: the official loop below would retry it for good
                raise Refused(grpc.StatusCode.NOT_FOUND)
            if job_id == "flaky" and "flaky: retried" not in printed:
                printed.append("flaky: retried")
                raise Refused(grpc.StatusCode.UNAVAILABLE)
            time.sleep(0.3)  # behind the job: the stream ends once every record was sent
            yield f"{job_id}: FINAL"

    class Client:
        """The official client's loop: every grpc.RpcError is retried."""

        def __init__(self) -> None:
            self.stub = Stub()

        def _print_logs(self, job_id: str, offset: int) -> None:
            while True:
                try:
                    printed.extend(self.stub.ReadLogs(job_id))
                    return
                except grpc.RpcError:
                    time.sleep(0.05)

        def _poll_operation(self, fail: bool) -> str:
            if fail:
                raise OperationError("CANCELLED")
            return "done"

    module = types.SimpleNamespace(Client=Client, OperationError=OperationError)
    cli._drain_logs_before_the_end(module)
    client = Client()
    client.read_logs("j1")  # type: ignore[attr-defined]
    assert client._poll_operation(False) == "done" and printed == ["j1: FINAL"]
    client.read_logs("flaky", -1)  # type: ignore[attr-defined]
    with pytest.raises(OperationError):
        client._poll_operation(True)
    assert printed == ["j1: FINAL", "flaky: retried", "flaky: FINAL"]
    started = time.monotonic()
    client.read_logs("gone")  # type: ignore[attr-defined]
    assert client._poll_operation(False) == "done"
    assert time.monotonic() - started < 5  # not LOG_DRAIN_SECONDS
