"""The `dsjobs` console script.

`dsjobs datasphere ...` runs the unmodified official DataSphere CLI with only its transport pointed at
a dsjobs endpoint. The official CLI hard-codes Yandex Cloud endpoints and builds every channel through
`datasphere.channel._get_channel(endpoint, user_agent)`, so replacing that one function is enough.

This module must never import `dsjobs.pb`: the official client registers the same protobuf full names
(`yandex.cloud...`) in the default descriptor pool, and the two sets cannot share a process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_ENDPOINT = "DSJOBS_ENDPOINT"
ENV_TOKEN = "DSJOBS_TOKEN"
ENV_CA = "DSJOBS_CA"
ENV_FILE = "DSJOBS_ENV_FILE"


class CliError(Exception):
    """A usage problem the user can fix; printed without a traceback."""


@dataclass(frozen=True)
class Target:
    endpoint: str
    token: str | None
    ca_file: str | None


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
) -> Target:
    """Flags win over environment variables, which win over the `.dev/env` file of a local stack."""
    file_values = parse_env_file(env_file_text) if env_file_text else {}

    def pick(flag: str | None, name: str) -> str | None:
        return flag or environ.get(name) or file_values.get(name) or None

    resolved = pick(endpoint, ENV_ENDPOINT)
    if not resolved:
        raise CliError(
            f"no dsjobs endpoint: pass --endpoint HOST:PORT or set {ENV_ENDPOINT} "
            "(`make up` writes it to .dev/env)"
        )
    return Target(endpoint=resolved, token=pick(token, ENV_TOKEN), ca_file=pick(ca_file, ENV_CA))


def _read_env_file(environ: dict[str, str]) -> str | None:
    path = Path(environ.get(ENV_FILE, ".dev/env"))
    try:
        return path.read_text()
    except OSError:
        return None


def run_datasphere(target: Target, argv: Sequence[str]) -> int:
    """Runs the official CLI in this process against `target`. Returns its exit status."""
    import grpc
    from datasphere import channel as ds_channel
    from datasphere import main as ds_main

    creds: grpc.ChannelCredentials | None = None
    if target.ca_file:
        creds = grpc.ssl_channel_credentials(Path(target.ca_file).read_bytes())

    def _get_channel(endpoint: str, user_agent: str | None) -> grpc.Channel:
        # The official options carry the retry policy for UNAVAILABLE/CANCELLED; keep them as they are.
        options = list(ds_channel.CHANNEL_OPTIONS)
        if user_agent:
            options.append(("grpc.primary_user_agent", user_agent))
        if creds is not None:
            return grpc.secure_channel(target.endpoint, creds, options=options)
        return grpc.insecure_channel(target.endpoint, options=options)

    ds_channel._get_channel = _get_channel
    if target.token:
        # The official CLI uses YC_IAM_TOKEN as the bearer token as is.
        os.environ["YC_IAM_TOKEN"] = target.token
    sys.argv = ["datasphere", *argv]
    try:
        ds_main.main()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsjobs", description="dsjobs command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ds = sub.add_parser(
        "datasphere",
        help="run the official DataSphere CLI against a dsjobs endpoint",
        description="Runs the official `datasphere` CLI with its transport pointed at dsjobs. "
        "Everything after the options is passed to it unchanged.",
    )
    ds.add_argument("--endpoint", help=f"host:port of the dsjobs gRPC API (default ${ENV_ENDPOINT})")
    ds.add_argument("--token", help=f"bearer token (default ${ENV_TOKEN})")
    ds.add_argument("--ca", dest="ca_file", help=f"CA bundle for TLS (default ${ENV_CA}; none = plaintext)")
    ds.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the official CLI")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    environ = dict(os.environ)
    try:
        target = resolve_target(
            endpoint=ns.endpoint,
            token=ns.token,
            ca_file=ns.ca_file,
            environ=environ,
            env_file_text=_read_env_file(environ),
        )
    except CliError as exc:
        print(f"dsjobs: {exc}", file=sys.stderr)
        return 2
    return run_datasphere(target, ns.args)


if __name__ == "__main__":
    sys.exit(main())
