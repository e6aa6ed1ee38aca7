"""The `dsjobs` console script.

`dsjobs datasphere ...` runs the unmodified official DataSphere CLI with only its transport pointed at
a dsjobs endpoint. The official CLI hard-codes Yandex Cloud endpoints and builds every channel through
`datasphere.channel._get_channel(endpoint, user_agent)`, so replacing that one function is enough.

This module must never import `dsjobs.pb`: the official client registers the same protobuf full names
(`yandex.cloud...`) in the default descriptor pool, and the two sets cannot share a process.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ENV_ENDPOINT = "DSJOBS_ENDPOINT"
ENV_TOKEN = "DSJOBS_TOKEN"
ENV_CA = "DSJOBS_CA"
ENV_FILE = "DSJOBS_ENV_FILE"
ENV_TOKEN_FILE = "DSJOBS_TOKEN_FILE"
ENV_INSECURE = "DSJOBS_INSECURE"


class CliError(Exception):
    """A usage problem the user can fix; printed without a traceback."""


@dataclass(frozen=True)
class Target:
    endpoint: str
    token: str = field(repr=False)
    ca_file: str | None
    # Read again for every call: a long job outlives a short-lived token (OIDC, `kubectl create
    # token`), and whatever renews the file keeps the CLI's polls and log stream going.
    token_file: str | None = None
    insecure: bool = False  # plaintext to an endpoint that is not this machine, asked for
    # The last token read from the file (one item; the dataclass is frozen, the token is not).
    _last_read: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def plaintext(self) -> bool:
        """No TLS: asked for, or a local stack's loopback endpoint without a CA."""
        return self.ca_file is None and (self.insecure or is_loopback(self.endpoint))

    def current_token(self) -> str:
        """The token to send now: the token file's content when there is one (the last good
        token while the file cannot be read, as a renewal rewrites it)."""
        if self.token_file is None:
            return self.token
        try:
            token = read_token_file(self.token_file)
        except CliError:
            return self._last_read[0] if self._last_read else self.token
        self._last_read[:] = [token]
        return token


def read_token_file(path: str) -> str:
    """The token in `path`: UTF-8 (with or without the BOM Windows PowerShell writes) or UTF-16
    with its BOM (PowerShell's `>`); a token must be printable ASCII, as a gRPC header value
    ("INTERNAL: Invalid metadata" said nothing of the file)."""
    try:
        data = Path(path).read_bytes()
        encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
        token = data.decode(encoding).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the token file {path}: {exc}") from exc
    if not token:
        raise CliError(f"the token file {path} is empty")
    if not all(" " < c < "\x7f" for c in token):
        raise CliError(
            f"the token file {path} holds spaces or characters other than printable ASCII: not a token"
        )
    return token


def grpc_proxy_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The lowercase proxy variables gRPC reads, from the uppercase ones when only those are set:
    gRPC reads `https_proxy`/`http_proxy`/`no_proxy` only, while the official CLI's uploads
    (requests) honour both; a user with only HTTPS_PROXY had its calls go direct and its files
    through the proxy."""
    return {
        lower: environ[lower.upper()]
        for lower in ("https_proxy", "http_proxy", "no_proxy")
        if lower not in environ and environ.get(lower.upper())
    }


def parse_env_file(text: str) -> dict[str, str]:
    """Reads `export KEY=value` / `KEY=value` lines as written by `make up` into `.dev/env`."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def resolve_target(
    *,
    endpoint: str | None,
    token: str | None,
    ca_file: str | None,
    environ: dict[str, str],
    env_file_text: str | None,
    token_file: str | None = None,
    insecure: bool = False,
) -> Target:
    """The endpoint: the flag, else the environment variable, else the `.dev/env` file of a local stack.

    The token and CA come from the same place as the endpoint. Given explicitly (flag, else
    environment variable) they go with any endpoint; the file's token and CA go only with the file's
    own endpoint, so a local stack's token is never sent to an endpoint named elsewhere. A token is
    required: without one the official CLI would run its own Yandex Cloud auth chain and send the
    user's real credentials to our endpoint.
    """
    file_values = parse_env_file(env_file_text) if env_file_text else {}
    explicit = endpoint or environ.get(ENV_ENDPOINT)
    resolved = explicit or file_values.get(ENV_ENDPOINT)
    if not resolved:
        raise CliError(
            f"no dsjobs endpoint: pass --endpoint HOST:PORT or set {ENV_ENDPOINT} "
            "(`make up` writes it to .dev/env)"
        )
    # Given again by hand (`export DSJOBS_ENDPOINT=...` copied from it), the file's endpoint is
    # still the one its token goes with.
    source = file_values if resolved == file_values.get(ENV_ENDPOINT) else {}

    def pick(flag: str | None, name: str) -> str | None:
        return flag or environ.get(name) or source.get(name) or None

    # A flag beats an environment variable, a token beats a token file of the same rank.
    resolved_token_file = None if token else token_file
    if not token and not token_file and not environ.get(ENV_TOKEN):
        resolved_token_file = environ.get(ENV_TOKEN_FILE)
    resolved_token = pick(token, ENV_TOKEN)
    if resolved_token_file:
        resolved_token = read_token_file(resolved_token_file)
    explicit_token = token or environ.get(ENV_TOKEN) or resolved_token_file
    if not explicit and explicit_token and not is_loopback(resolved):
        # The file is read from the current directory: one in a checkout of someone else's must
        # not send the user's own token to a host it names.
        raise CliError(
            f"the token from --token, {ENV_TOKEN} or a token file is not sent to {resolved}, which "
            f"only the env file names ({environ.get(ENV_FILE, '.dev/env')}): pass --endpoint "
            f"HOST:PORT or set {ENV_ENDPOINT} too"
        )
    if not resolved_token:
        hint = ""
        if explicit and file_values.get(ENV_TOKEN):
            hint = (
                f"; the token in the env file goes only with the endpoint there"
                f" ({file_values.get(ENV_ENDPOINT) or 'none'})"
            )
        raise CliError(
            f"no dsjobs token for {resolved}: pass --token TOKEN or set {ENV_TOKEN} (or "
            f"--token-file / {ENV_TOKEN_FILE}){hint} (the official CLI's own Yandex Cloud "
            "credentials are never sent to dsjobs)"
        )
    asked_insecure = insecure or environ.get(ENV_INSECURE, "").lower() in ("1", "true", "yes")
    return Target(
        endpoint=resolved,
        token=resolved_token,
        ca_file=pick(ca_file, ENV_CA),
        token_file=resolved_token_file or None,
        insecure=asked_insecure,
    )


def is_loopback(endpoint: str) -> bool:
    """Whether HOST:PORT names this machine (a local stack's endpoint, as `make up` writes it)."""
    host = endpoint.rsplit(":", 1)[0].strip("[]") if ":" in endpoint else endpoint
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_env_file(environ: dict[str, str]) -> str | None:
    path = Path(environ.get(ENV_FILE, ".dev/env"))
    try:
        return path.read_text()
    except OSError:
        return None


# What the official CLI consults besides YC_IAM_TOKEN to get credentials (datasphere/auth.py,
# datasphere/main.py): OAuth tokens it exchanges at the real IAM, the order of its auth methods (the
# metadata server, `yc` and its profile come after them), and SERVER_ENV, which picks other
# endpoints, other protos and, for DEV, no authorization at all.
NEUTRALIZED_ENV = ("YC_TOKEN", "YC_OAUTH_TOKEN", "YC_AUTH", "SERVER_ENV")


def system_roots() -> bytes | None:
    """The operating system's trusted CAs (PEM), as OpenSSL finds them (SSL_CERT_FILE too); None:
    grpc's own bundle. grpc does not read the system's store by itself, so a company CA installed
    there would not be trusted."""
    paths = ssl.get_default_verify_paths()
    candidates = [
        os.environ.get("SSL_CERT_FILE"),
        paths.cafile,
        paths.openssl_cafile,
        "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
        "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            with contextlib.suppress(OSError):
                return Path(candidate).read_bytes()
    return None


def _pin_credentials(token: str) -> None:
    """Makes the official CLI send `token` and nothing else: never a Yandex Cloud credential."""
    for name in NEUTRALIZED_ENV:
        os.environ.pop(name, None)
    # The official CLI uses YC_IAM_TOKEN as the bearer token as is, before any other auth method.
    os.environ["YC_IAM_TOKEN"] = token


#: Keepalive pings on the CLI's channel while a call is open (the official options leave them
#: out): a server that vanishes without a FIN (its node lost, a partition) ends the log stream and
#: the operation polls with UNAVAILABLE after a minute or so, which the CLI retries from its offset,
#: instead of hanging until the kernel's TCP timeout (about 15 minutes). Not under 10 s: the API
#: answers more frequent pings with GOAWAY (too many pings); and as many as needed without data (an
#: idle log stream sends none).
KEEPALIVE_OPTIONS: Final = (("grpc.keepalive_time_ms", 30_000), ("grpc.http2.max_pings_without_data", 0))


def channel_options(
    official: Sequence[tuple[str, Any]], user_agent: str | None, *, direct: bool
) -> list[tuple[str, Any]]:
    """The channel options for the official CLI: its own (they carry the retry policy for
    UNAVAILABLE/CANCELLED; kept as they are), keepalive, the user agent; `direct`: never through
    an HTTP proxy (a plaintext loopback endpoint: http_proxy set for the outside world would see
    the token in the clear)."""
    options = [*official, *KEEPALIVE_OPTIONS]
    if user_agent:
        options.append(("grpc.primary_user_agent", user_agent))
    if direct:
        options.append(("grpc.enable_http_proxy", 0))
    return options


def secure_credentials(target: Target) -> Any:
    """The channel credentials for `target` (grpc.ChannelCredentials), None for plaintext."""
    import grpc

    if target.ca_file:
        try:
            return grpc.ssl_channel_credentials(Path(target.ca_file).read_bytes())
        except OSError as exc:
            raise CliError(f"cannot read the CA bundle {target.ca_file} (--ca / {ENV_CA}): {exc}") from exc
    if not target.plaintext:
        return grpc.ssl_channel_credentials(system_roots())
    return None


def warn_plaintext(target: Target) -> None:
    if target.plaintext and not is_loopback(target.endpoint):
        print(
            f"dsjobs: WARNING: {target.endpoint} without TLS: the token and everything sent can be "
            "read on the way",
            file=sys.stderr,
        )


def requests_ca_bundle(ca_file: str | None, environ: Mapping[str, str], cache_dir: Path) -> str | None:
    """A CA bundle for the official CLI's file transfers (requests): the public CAs (certifi's)
    plus `ca_file`, where a private CA is given and the user has not chosen a bundle of their own.
    With --ca alone its uploads to an object store behind the same company CA failed with an
    SSLError; REQUESTS_CA_BUNDLE set to the CA alone would have lost the public ones (a cloud's
    store). Written under `cache_dir` (the user's own, 0600), named by its content."""
    if not ca_file or environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE"):
        return None
    try:
        import certifi

        public = Path(certifi.where()).read_bytes()
    except (ImportError, OSError):
        public = b""
    try:
        private = Path(ca_file).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the CA bundle {ca_file} (--ca / {ENV_CA}): {exc}") from exc
    data = public.rstrip(b"\n") + b"\n" + private
    bundle = cache_dir / f"ca-bundle-{hashlib.sha256(data).hexdigest()[:16]}.pem"
    if not bundle.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".ca-bundle.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, bundle)
    return str(bundle)


def run_datasphere(target: Target, argv: Sequence[str]) -> int:
    """Runs the official CLI in this process against `target`. Returns its exit status."""
    bundle = requests_ca_bundle(target.ca_file, os.environ, Path.home() / ".cache" / "dsjobs")
    if bundle is not None:
        os.environ["REQUESTS_CA_BUNDLE"] = bundle
    _pin_credentials(target.token)  # before the import: datasphere.api reads SERVER_ENV
    import grpc
    from datasphere import auth as ds_auth
    from datasphere import channel as ds_channel
    from datasphere import client as ds_client
    from datasphere import main as ds_main

    creds = secure_credentials(target)
    warn_plaintext(target)

    def _get_channel(endpoint: str, user_agent: str | None) -> grpc.Channel:
        direct = creds is None and is_loopback(target.endpoint)
        options = channel_options(ds_channel.CHANNEL_OPTIONS, user_agent, direct=direct)
        if creds is not None:
            return grpc.secure_channel(target.endpoint, creds, options=options)
        return grpc.insecure_channel(target.endpoint, options=options)

    def _create_iam_token(oauth_token: str | None, yc_profile: str | None = None) -> object:
        # The one source of the `authorization` header (auth.get_md): our token, whatever `-t`,
        # `--profile` or the environment say. 0 s: asked again on every call, nothing cached.
        return ds_auth.IssuedIamToken(value=target.current_token(), expires_after_seconds=0)

    ds_channel._get_channel = _get_channel
    ds_auth.create_iam_token = _create_iam_token
    _drain_logs_before_the_end(ds_client)
    ds_auth.iam_token_expires_at = None
    if hasattr(ds_main, "check_package_version"):
        # It asks pypi.org for a newer CLI after every command, without a timeout: on a cluster
        # without internet access a job that succeeded exited 1 (or hung). Not ours to ask.
        ds_main.check_package_version = lambda *args, **kwargs: None
    sys.argv = ["datasphere", *argv]
    try:
        ds_main.main()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except grpc.RpcError as exc:
        # The official CLI lets a failed call end it with a 40-line traceback.
        print(rpc_error_line(exc.code(), exc.details() or "", target), file=sys.stderr)
        return 1
    except (ds_client.OperationError, ds_client.ProgramError) as exc:
        # A job that failed, too: its error (or return code) in one line, not a traceback.
        print(job_error_line(exc), file=sys.stderr)
        return 1
    except ValueError as exc:
        # What the official CLI refuses in a config.yaml or its arguments (an invalid resource id,
        # a plain-text password): it logs the traceback to its log file (named above, once it got
        # that far), then lets it end it with the same traceback on the terminal.
        print(f"dsjobs datasphere: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: the official CLI, once it has cancelled the job as asked ("cancel job? y" on a
        # job without graceful-shutdown, or the second time), or at its question, ends with a
        # traceback (it catches Exception only).
        print(INTERRUPTED_LINE, file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0


#: What `dsjobs datasphere` says and exits with when Ctrl-C ends the official CLI (128 + SIGINT,
#: as a shell reports a command Ctrl-C ended).
INTERRUPTED_LINE: Final = (
    "dsjobs: interrupted (a job already started goes on unless the CLI said 'job is canceled': "
    "project job cancel --id <job id>)"
)
INTERRUPTED_EXIT: Final = 130


#: How long `dsjobs datasphere` waits, once the job is over, for its log streams to end.
LOG_DRAIN_SECONDS: Final = 60.0


#: Log stream answers no retry can change: the official CLI retries them for good, so a thread
#: waited for would hold the CLI LOG_DRAIN_SECONDS (a deleted job, or its deleted data).
_FINAL_LOG_ERRORS: Final = frozenset(
    {"NOT_FOUND", "FAILED_PRECONDITION", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT"}
)


class _LogStreamOver(BaseException):
    """Ends the official CLI's log thread (its loop retries every grpc.RpcError, not this)."""


def _drain_logs_before_the_end(ds_client: Any) -> None:
    """The official CLI prints a job's logs from a daemon thread and ends once the operation is
    done: the last lines of a chatty job (a burst of 200000 short lines at the end, or any behind
    the live view) went with the process, its FINAL line too. The server ends a log stream once the
    job has ended and every record was sent: its threads are waited for, LOG_DRAIN_SECONDS at most,
    before the outputs are fetched and the CLI ends. A stream refused for good ends its thread; a
    Ctrl-C ends the wait (the job's own error, if any, is still told in one line)."""
    import threading

    import grpc

    threads: list[threading.Thread] = []

    def ending_on_final_errors(read: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from read(*args, **kwargs)
            except grpc.RpcError as exc:
                if exc.code().name in _FINAL_LOG_ERRORS:
                    raise _LogStreamOver from exc
                raise

        call.dsjobs_wrapped = True  # type: ignore[attr-defined]
        return call

    def print_logs(client: Any, job_id: str, offset: int) -> None:
        with contextlib.suppress(_LogStreamOver):
            client._print_logs(job_id, offset)

    def read_logs(self: Any, job_id: str, offset: int = 0) -> None:
        if not getattr(self.stub.ReadLogs, "dsjobs_wrapped", False):
            self.stub.ReadLogs = ending_on_final_errors(self.stub.ReadLogs)
        thread = threading.Thread(target=print_logs, args=[self, job_id, offset], daemon=True)
        thread.start()
        threads.append(thread)

    def drain() -> None:
        deadline = time.monotonic() + LOG_DRAIN_SECONDS
        try:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            return

    poll = ds_client.Client._poll_operation

    def poll_operation(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            op = poll(self, *args, **kwargs)
        except ds_client.OperationError:
            drain()
            raise
        drain()
        return op

    ds_client.Client.read_logs = read_logs
    ds_client.Client._poll_operation = poll_operation


def job_error_line(exc: Exception) -> str:
    """One line for the official CLI's OperationError (the job's operation ended with an error)
    or ProgramError (the job's program returned non-zero)."""
    code = getattr(exc, "return_code", None)
    if isinstance(code, int):
        return f"dsjobs: the job failed: Program returned code {code}"
    from google.rpc import code_pb2  # type: ignore[import-untyped]

    error = getattr(getattr(exc, "op", None), "error", None)
    number = getattr(error, "code", code_pb2.UNKNOWN)
    try:
        name = code_pb2.Code.Name(number)
    except ValueError:
        name = str(number)
    return f"dsjobs: the job ended: {name}: {getattr(error, 'message', '') or str(exc)}"


#: What a user can do about a call's failure, by its status code.
_RPC_HINTS: Final = {
    "UNAUTHENTICATED": "the token was refused: renew it ({token})",
    "PERMISSION_DENIED": "the token's identity may not do this in the project: ask your admin",
    "UNAVAILABLE": "is {endpoint} the dsjobs API and reachable from here (proxy, TLS: --ca/{ca}, --insecure)?",
    "DEADLINE_EXCEEDED": "is {endpoint} the dsjobs API and reachable from here (proxy, TLS: --ca/{ca}, --insecure)?",
}


def rpc_error_line(code: Any, details: str, target: Target) -> str:
    """One line for a failed call: its status, the server's words and what to do."""
    name = getattr(code, "name", str(code))
    hint = _RPC_HINTS.get(name, "").format(
        token=ENV_TOKEN_FILE if target.token_file else ENV_TOKEN, endpoint=target.endpoint, ca=ENV_CA
    )
    return f"dsjobs: {name}: {details}" + (f" ({hint})" if hint else "")


OUR_OPTIONS = {
    "--endpoint": "endpoint",
    "--token": "token",
    "--token-file": "token_file",
    "--ca": "ca_file",
}
OUR_FLAGS = {"--insecure": "insecure"}
USAGE = f"""usage: dsjobs datasphere [--endpoint HOST:PORT] [--token TOKEN | --token-file FILE] [--ca FILE]
                         [--insecure] ARGS...

Runs the official `datasphere` CLI with its transport pointed at dsjobs. Our options come first;
everything after them, including the official CLI's own global options (-t, -l, --log-dir, ...),
is passed to it unchanged.

  --endpoint    host:port of the dsjobs gRPC API (default ${ENV_ENDPOINT}, then .dev/env)
  --token       bearer token (default ${ENV_TOKEN}; this or a token file is required)
  --token-file  file holding the token, read again for every call (default ${ENV_TOKEN_FILE}):
                for jobs that outlive a short-lived token, renewed in the file meanwhile
  --ca          CA bundle for TLS with a private CA (default ${ENV_CA})
  --insecure    plaintext (default ${ENV_INSECURE}=1); without it an endpoint that is not this
                machine is reached with TLS and the system's trusted CAs (SSL_CERT_FILE too).
                A loopback endpoint without a CA (a local stack's) is plaintext.

A flag beats its environment variable; a token beats a token file given the same way.

The token and CA of .dev/env are used only with the endpoint of .dev/env. The official CLI's own
credentials (YC_IAM_TOKEN, YC_TOKEN, -t, --profile, yc, the metadata server) are never used.
"""


def split_args(argv: Sequence[str], *, anywhere: bool = False) -> tuple[dict[str, str], list[str]]:
    """Takes our leading options (`anywhere`: wherever they are); the rest belongs to the official
    CLI (or to download-files, whose own options never take a value starting with `-`).

    argparse cannot do this: its REMAINDER refuses to start with an option such as `-l DEBUG`,
    which is how the official CLI's global options are written.
    """
    ours: dict[str, str] = {}
    rest = list(argv)
    skipped: list[str] = []
    while rest:
        head = rest[0]
        if head in OUR_FLAGS:
            ours[OUR_FLAGS[head]] = "1"
            rest = rest[1:]
            continue
        name, eq, value = head.partition("=")
        if name not in OUR_OPTIONS:
            if not anywhere:
                break
            skipped.append(head)
            rest = rest[1:]
            continue
        if eq:
            rest = rest[1:]
        elif len(rest) >= 2:
            value, rest = rest[1], rest[2:]
        else:
            raise CliError(f"option {name} needs a value")
        ours[OUR_OPTIONS[name]] = value
    return ours, skipped + rest


COMMANDS: Final = ("datasphere", "download-files")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: dsjobs datasphere ...       (run `dsjobs datasphere --help`)\n"
            "       dsjobs download-files ...   (run `dsjobs download-files --help`)"
        )
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"dsjobs: unknown command {args[0]!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if args[0] == "download-files" and (args[1:2] in (["-h"], ["--help"]) or len(args) == 1):
        from dsjobs.download import parse_args

        parse_args(args[1:])  # the usage: with --help, or naming what is missing (exit 2)
    if args[0] == "datasphere" and (args[1:2] in (["-h"], ["--help"]) or len(args) == 1):
        print(USAGE)
        return 0 if len(args) > 1 else 2
    environ = dict(os.environ)
    os.environ.update(grpc_proxy_env(environ))
    try:
        # download-files is all ours: `--id J --endpoint H` said "no dsjobs endpoint".
        ours, rest = split_args(args[1:], anywhere=args[0] == "download-files")
        target = resolve_target(
            endpoint=ours.get("endpoint"),
            token=ours.get("token"),
            ca_file=ours.get("ca_file"),
            environ=environ,
            env_file_text=_read_env_file(environ),
            token_file=ours.get("token_file"),
            insecure="insecure" in ours,
        )
    except CliError as exc:
        print(f"dsjobs: {exc}", file=sys.stderr)
        return 2
    try:
        if args[0] == "download-files":
            # Its own process's protobuf stubs: never in one process with the official CLI's.
            from dsjobs.download import run_download

            return run_download(target, rest)
        return run_datasphere(target, rest)
    except CliError as exc:
        print(f"dsjobs: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
