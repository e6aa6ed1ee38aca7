"""Settings of the API server: environment variables, overridable by command-line flags.

Every setting, its variable and its default is listed in `SETTINGS` below and in docs/api.md.
Object storage comes from the `DSJOBS_S3_*` variables (see `dsjobs.storage`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from dsjobs.controller.settings import STORAGE_CREDENTIAL_SOURCES, STORAGE_CREDENTIALS_ENV
from dsjobs.models import parse_duration

MAX_URL_TTL = timedelta(hours=1)


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of Settings
    env: str
    default: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "DSJOBS_API_LISTEN", "0.0.0.0:9090", "gRPC address (host:port)"),
    Setting(
        "metrics_listen",
        "DSJOBS_API_METRICS_LISTEN",
        "0.0.0.0:9091",
        "Prometheus /metrics address; empty disables",
    ),
    Setting(
        "tls_cert",
        "DSJOBS_API_TLS_CERT",
        "",
        "PEM certificate chain; with the key enables TLS (both read again when they change)",
    ),
    Setting("tls_key", "DSJOBS_API_TLS_KEY", "", "PEM private key"),
    Setting(
        "kubeconfig", "DSJOBS_API_KUBECONFIG", "", "kubeconfig path(s); default: $KUBECONFIG, then in-cluster"
    ),
    Setting(
        "auth_mode",
        "DSJOBS_API_AUTH",
        "kubernetes",
        "`kubernetes` (TokenReview + SubjectAccessReview) or `static`",
    ),
    Setting(
        "static_tokens",
        "DSJOBS_API_STATIC_TOKENS",
        "",
        "static token file (implies auth=static; development only)",
    ),
    Setting("token_audiences", "DSJOBS_API_TOKEN_AUDIENCES", "", "comma-separated audiences for TokenReview"),
    Setting("auth_cache_ttl", "DSJOBS_API_AUTH_CACHE_TTL", "10s", "how long allow decisions are cached"),
    Setting("auth_negative_ttl", "DSJOBS_API_AUTH_NEGATIVE_TTL", "2s", "how long deny decisions are cached"),
    Setting(
        "page_token_key",
        "DSJOBS_API_PAGE_TOKEN_KEY",
        "",
        "HMAC key for page tokens (the same on all replicas); default: derived from the storage "
        "secret key (DSJOBS_S3_SECRET_KEY), which all replicas share",
    ),
    Setting("page_token_key_file", "DSJOBS_API_PAGE_TOKEN_KEY_FILE", "", "file holding the page token key"),
    Setting(
        "url_ttl",
        "DSJOBS_API_URL_TTL",
        "15m",
        "validity of presigned download/upload URLs (at most 1h); each answer adds the time its files "
        "take at 256 KiB/s (12h in all at most)",
    ),
    Setting("max_message_bytes", "DSJOBS_API_MAX_MESSAGE_BYTES", "4194304", "largest accepted request"),
    Setting(
        "max_response_bytes", "DSJOBS_API_MAX_RESPONSE_BYTES", "262144", "log bytes per ReadLogs response"
    ),
    Setting(
        "log_bytes_in_flight",
        "DSJOBS_API_LOG_BYTES_IN_FLIGHT",
        "33554432",
        "log bytes the replica's log streams hold at once, read and not yet taken by their clients "
        "(memory: about 5 times as much); a quarter of it for one caller's streams; streams wait "
        "their turn",
    ),
    Setting(
        "log_poll_interval", "DSJOBS_API_LOG_POLL", "300ms", "how often a following ReadLogs stream polls"
    ),
    Setting(
        "drain_delay",
        "DSJOBS_API_DRAIN_DELAY",
        "5s",
        "on SIGTERM, how long new calls are still served (health NOT_SERVING, log streams ended) "
        "before the server stops listening: the time load balancers take to stop sending new "
        "connections (0: stop at once)",
    ),
    Setting("drain_timeout", "DSJOBS_API_DRAIN_TIMEOUT", "20s", "then, grace for in-flight calls to finish"),
    Setting(
        "community_id", "DSJOBS_API_COMMUNITY_ID", "dsjobs", "community id reported by ProjectService.Get"
    ),
    Setting("kube_timeout", "DSJOBS_API_KUBE_TIMEOUT", "20s", "timeout of one Kubernetes API call"),
    Setting(
        "max_concurrent_rpcs",
        "DSJOBS_API_MAX_CONCURRENT_RPCS",
        "5000",
        "calls served at once, open log streams included, health checks not (0: no limit); more are "
        "RESOURCE_EXHAUSTED",
    ),
    Setting(
        "max_log_streams",
        "DSJOBS_API_MAX_LOG_STREAMS",
        "",
        "ReadLogs/ReadStdLogs streams followed at once, below DSJOBS_API_MAX_CONCURRENT_RPCS so that other "
        "calls always find room (default: 80% of it, at most 500: a stream whose client stops reading "
        "holds about 1 MiB in gRPC's buffers, which no log budget bounds; 0: no limit of their own); more "
        "are RESOURCE_EXHAUSTED (the CLI reconnects)",
    ),
    Setting(
        "max_log_streams_per_caller",
        "DSJOBS_API_MAX_LOG_STREAMS_PER_CALLER",
        "200",
        "of those, how many one caller (user) may follow at once (0: no limit)",
    ),
    Setting(
        "storage_credentials",
        STORAGE_CREDENTIALS_ENV,
        "operator",
        "the operator's setting of that name (the same ConfigMap): with `project`, input upload URLs "
        "are signed with the project namespace's `dsjobs-project-storage` key pair, as its runners "
        "use it; `operator`: with the bucket-wide DSJOBS_S3_* keys",
    ),
    Setting("log_level", "DSJOBS_API_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Setting("log_format", "DSJOBS_API_LOG_FORMAT", "json", "`json` (one object per line) or `text`"),
)


def derived_page_token_key(storage_secret_key: str) -> bytes:
    """The page-token key of replicas given none: one every replica computes alike from the
    storage secret they share (a List's next page may be asked of another replica), and that
    tells nothing about that secret."""
    return hmac.new(storage_secret_key.encode(), b"dsjobs page tokens", hashlib.sha256).hexdigest().encode()


class SettingsError(ValueError):
    pass


# Log streams one replica follows unless told: each whose client stops reading (a suspended
# laptop) holds about 1 MiB in gRPC's buffers, within the HTTP/2 window its client granted, out of
# reach of the log budget: 500 of them and the budget fit the deployment's 1Gi.
DEFAULT_MAX_LOG_STREAMS = 500


@dataclass(frozen=True)
class Settings:
    listen: str = "0.0.0.0:9090"
    metrics_listen: str = "0.0.0.0:9091"
    tls_cert: str = ""
    tls_key: str = ""
    kubeconfig: str = ""
    auth_mode: str = "kubernetes"
    static_tokens: str = ""
    token_audiences: tuple[str, ...] = ()
    auth_cache_ttl: float = 10.0
    auth_negative_ttl: float = 2.0
    page_token_key: bytes = field(default=b"", repr=False)
    # None given: the server replaces the random one by derived_page_token_key.
    page_token_key_is_random: bool = False
    url_ttl: timedelta = timedelta(minutes=15)
    max_message_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 256 * 1024
    log_bytes_in_flight: int = 32 * 1024 * 1024
    log_poll_interval: float = 0.3
    drain_delay: float = 5.0
    drain_timeout: float = 20.0
    community_id: str = "dsjobs"
    kube_timeout: float = 20.0
    max_concurrent_rpcs: int = 5000
    max_log_streams: int = DEFAULT_MAX_LOG_STREAMS
    max_log_streams_per_caller: int = 200
    log_level: str = "INFO"
    log_format: str = "json"
    storage_credentials: str = "operator"


#: Upper bound of every duration setting (as the operator's).
MAX_SECONDS = 365 * 24 * 3600.0


def _seconds(name: str, text: str) -> float:
    try:
        value = parse_duration(text).total_seconds()
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from exc
    if value < 0:
        raise SettingsError(f"{name}: must not be negative")
    if value > MAX_SECONDS:
        # `infinity` parses: a poll interval or timeout of it would never come round.
        raise SettingsError(f"{name}: must be at most 365d")
    return value


def _int(name: str, text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise SettingsError(f"{name}: not an integer: {text!r}") from exc
    if value < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}: must be at most {maximum}")
    return value


# The official CLI receives at most 4 MiB per message, and a response it refuses is asked for
# again from the same offset, for ever. A response holds up to a record (64 KiB) more than the
# setting, and framing: up to 1000 records, each up to 32 messages when it is not all UTF-8
# (logrecords.utf8_pieces), ~25 bytes per message: under 1 MiB.
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
#: Settings whose empty variable is a value of its own, not the default.
EMPTY_MEANS_OFF = frozenset({"metrics_listen"})


def build(raw: Mapping[str, str]) -> Settings:
    """Settings from raw string values (keyed by attribute name), checked. SettingsError names
    every setting that is wrong, one a line (told one at a time, each mistake cost a rollout)."""
    env = {s.name: s.env for s in SETTINGS}
    value = {s.name: raw.get(s.name, s.default) for s in SETTINGS}
    problems: list[str] = []

    def seconds(name: str) -> float | None:
        try:
            return _seconds(env[name], value[name])
        except SettingsError as exc:
            problems.append(str(exc))
            return None

    def integer(name: str, minimum: int, maximum: int | None = None) -> int:
        try:
            return _int(env[name], value[name], minimum, maximum)
        except SettingsError as exc:
            problems.append(str(exc))
            return minimum

    auth_mode = value["auth_mode"]
    if value["static_tokens"]:
        auth_mode = "static"
    if auth_mode not in ("kubernetes", "static"):
        problems.append(f"{env['auth_mode']}: must be `kubernetes` or `static`, not {auth_mode!r}")
    if auth_mode == "static" and not value["static_tokens"]:
        problems.append(f"static auth needs {env['static_tokens']} (a token file)")
    if bool(value["tls_cert"]) != bool(value["tls_key"]):
        problems.append(f"TLS needs both {env['tls_cert']} and {env['tls_key']}")

    key = value["page_token_key"].encode()
    if value["page_token_key_file"]:
        key = Path(value["page_token_key_file"]).read_bytes().strip()
    random_key = not key
    if random_key:
        key = base64.b64encode(os.urandom(32))
    if len(key) < 16:
        problems.append(f"{env['page_token_key']}: use at least 16 bytes")

    url_ttl_seconds = seconds("url_ttl")
    url_ttl = timedelta(seconds=url_ttl_seconds or 0)
    if url_ttl_seconds is not None and not timedelta(seconds=60) <= url_ttl <= MAX_URL_TTL:
        problems.append(f"{env['url_ttl']}: must be between 1m and 1h")
    if value["storage_credentials"] not in STORAGE_CREDENTIAL_SOURCES:
        problems.append(
            f"{env['storage_credentials']}: must be one of {', '.join(STORAGE_CREDENTIAL_SOURCES)}"
        )
    level = value["log_level"].upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"{env['log_level']}: must be DEBUG, INFO, WARNING or ERROR")
    if value["log_format"] not in ("json", "text"):
        problems.append(f"{env['log_format']}: must be json or text")

    rpcs = integer("max_concurrent_rpcs", 0)
    if value["max_log_streams"].strip():
        streams = integer("max_log_streams", 0)
        if rpcs and streams >= rpcs:
            problems.append(
                f"{env['max_log_streams']}: must be below {env['max_concurrent_rpcs']} ({rpcs}): open log "
                "streams would otherwise leave no room for other calls"
            )
    elif rpcs > 1:
        streams = min(rpcs - max(1, rpcs // 5), DEFAULT_MAX_LOG_STREAMS)
    else:
        streams = DEFAULT_MAX_LOG_STREAMS if rpcs == 0 else 0
    numbers = {
        "max_message_bytes": integer("max_message_bytes", 64 * 1024),
        "max_response_bytes": integer("max_response_bytes", 16 * 1024, MAX_RESPONSE_BYTES),
        "log_bytes_in_flight": integer("log_bytes_in_flight", MAX_RESPONSE_BYTES, 1 << 30),
        "max_log_streams_per_caller": integer("max_log_streams_per_caller", 0),
    }
    durations = {
        name: seconds(name) or 0.0
        for name in (
            "auth_cache_ttl",
            "auth_negative_ttl",
            "log_poll_interval",
            "drain_delay",
            "drain_timeout",
            "kube_timeout",
        )
    }
    if problems:
        raise SettingsError("\n".join(problems))
    return Settings(
        listen=value["listen"],
        metrics_listen=value["metrics_listen"],
        tls_cert=value["tls_cert"],
        tls_key=value["tls_key"],
        kubeconfig=value["kubeconfig"],
        auth_mode=auth_mode,
        static_tokens=value["static_tokens"],
        token_audiences=tuple(a.strip() for a in value["token_audiences"].split(",") if a.strip()),
        auth_cache_ttl=durations["auth_cache_ttl"],
        auth_negative_ttl=durations["auth_negative_ttl"],
        page_token_key=key,
        page_token_key_is_random=random_key,
        url_ttl=url_ttl,
        max_message_bytes=numbers["max_message_bytes"],
        max_response_bytes=numbers["max_response_bytes"],
        log_bytes_in_flight=numbers["log_bytes_in_flight"],
        log_poll_interval=max(0.05, durations["log_poll_interval"]),
        drain_delay=durations["drain_delay"],
        drain_timeout=durations["drain_timeout"],
        community_id=value["community_id"],
        kube_timeout=max(1.0, durations["kube_timeout"]),
        max_concurrent_rpcs=rpcs,
        max_log_streams=streams,
        max_log_streams_per_caller=numbers["max_log_streams_per_caller"],
        log_level=level,
        log_format=value["log_format"],
        storage_credentials=value["storage_credentials"],
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsjobs.api",
        description="dsjobs gRPC API. Every flag has an environment variable; flags win.",
    )
    for s in SETTINGS:
        p.add_argument(
            "--" + s.name.replace("_", "-"),
            dest=s.name,
            default=None,
            help=f"{s.help} (${s.env}, default {s.default!r})".replace("%", "%%"),  # argparse formats it
        )
    return p


def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    ns = parser().parse_args(argv)
    # An empty variable is an unset one, as the operator reads the same ConfigMap (a key kept
    # with "" in an overlay was refused here and ignored there), except where empty means off.
    raw = {
        s.name: environ[s.env]
        for s in SETTINGS
        if s.env in environ and (environ[s.env].strip() or s.name in EMPTY_MEANS_OFF)
    }
    raw.update({s.name: getattr(ns, s.name) for s in SETTINGS if getattr(ns, s.name) is not None})
    return build(raw)
