"""`python -m dsjobs.controller`: run the operator.

    python -m dsjobs.controller [--namespace NS ...] [--verbose] [--log-format text|json]

Settings come from `DSJOBS_*` environment variables (docs/operator.md); credentials from the
in-cluster service account or $KUBECONFIG (Kopf's own loaders).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Final

LEADER_LOG = logging.getLogger("dsjobs.controller.leader")
#: Seconds a replica that lost the leadership gives its queued Events before it exits: it must be
#: gone well before a standby may take over (a third of the Lease's 15 s after the renew deadline).
LOST_LEADERSHIP_DRAIN: Final = 1.5
#: What the Event poster takes beyond the drain to stop (dsjobs.controller.events).
EVENTS_STOP_SECONDS: Final = 0.25


def lost_leadership_drain(lease_seconds: float) -> float:
    """The drain for a Lease of `lease_seconds`: the process gone (the renew deadline, 2/3 of the
    Lease, plus the drain and the poster's stop) half a second before a standby may take over,
    so a short Lease does not have two replicas acting at once."""
    return max(0.0, min(LOST_LEADERSHIP_DRAIN, lease_seconds / 3 - EVENTS_STOP_SECONDS - 0.5))


if TYPE_CHECKING:
    from dsjobs.controller.handlers import Operator
    from dsjobs.controller.leader import LeaderElector
    from dsjobs.controller.settings import OperatorSettings


def _keep_kubernetes_client_out() -> None:
    """Make `import kubernetes` fail in this process before Kopf is imported.

    Kopf imports the `kubernetes` package at import time when it is installed (it is, for the API
    and tests) only to recognise its model classes and to borrow its credentials. The operator uses
    neither, and the package's generated models cost ~40 MB of RSS, a quarter of the memory budget
    at 10k jobs. Logins go through dsjobs.kubeconfig (handlers.login_info), which lets the package
    in only for a kubeconfig whose user runs an exec or auth-provider plugin.
    """
    for name in ("kubernetes", "kubernetes_asyncio", "pykube"):
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def liveness_endpoint(settings: OperatorSettings) -> str | None:
    """Kopf's liveness URL: /healthz on DSJOBS_BIND_ADDRESS:DSJOBS_LIVENESS_PORT (None: disabled)."""
    if not settings.liveness_port:
        return None
    host = settings.bind_address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL
    return f"http://{host}:{settings.liveness_port}/healthz"


def set_log_levels(level: str, *, verbose: bool) -> None:
    """The operator's own loggers at `level` (DSJOBS_OPERATOR_LOG_LEVEL); Kopf's and aiohttp's
    at WARNING. `--verbose` leaves them all at Kopf's DEBUG."""
    if verbose:
        return
    logging.getLogger("dsjobs").setLevel(level)
    # Kopf logs every handler call at INFO ("Handler ... succeeded"): per event, per job.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    # One line per liveness probe otherwise.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsjobs.controller", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="serve only this namespace (repeatable); default: DSJOBS_NAMESPACES or the whole cluster",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="default: DSJOBS_OPERATOR_LOG_FORMAT or json",
    )
    args = parser.parse_args(argv)

    from dsjobs.controller.settings import (
        SettingsError,
        namespace_problems,
        runner_image_skew,
        settings_from_env,
    )
    from dsjobs.storage import STORAGE_ENV_VARS, settings_problems

    problems: list[str] = []
    try:
        settings = settings_from_env()
    except SettingsError as exc:
        problems = str(exc).splitlines()
    # Without a store its runners could stage nothing and its data deletions delete nothing. The
    # variables the operator uses (Operator.storage_env), not a DSJOBS_S3_FILES_DIR it never reads.
    problems += settings_problems({k: v for k in STORAGE_ENV_VARS if (v := os.environ.get(k, ""))})
    problems += namespace_problems(tuple(args.namespace), "--namespace")
    if problems:
        # A line per wrong variable, all at once, as the API says them, not a traceback.
        for line in problems:
            print(f"dsjobs.controller: {line}", file=sys.stderr)
        return 2
    _keep_kubernetes_client_out()
    import kopf

    from dsjobs import __version__
    from dsjobs.controller.handlers import Operator, register

    namespaces = tuple(args.namespace) or settings.namespaces
    log_format = args.log_format or settings.log_format
    # The operator's own LISTs (start-up caches, input references) follow the same scope as Kopf.
    settings = dataclasses.replace(settings, namespaces=namespaces)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL,
    )
    from dsjobs.controller.kube import RetriedAttemptsAreWarnings
    from dsjobs.logformat import JsonFormatter, TextFormatter

    # The API server's line format, not Kopf's: one parser for both in a log pipeline.
    formatter = (
        JsonFormatter()
        if log_format == "json"
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RetriedAttemptsAreWarnings())
        handler.setFormatter(formatter)
    set_log_levels(settings.log_level, verbose=args.verbose)
    skew = runner_image_skew(settings.runner_image, __version__)
    if skew is not None:
        logging.getLogger("dsjobs.controller").warning("%s", skew)
    registry = kopf.OperatorRegistry()
    operator = Operator(settings)
    register(registry, operator)
    if settings.leader_lease:
        # Until Kopf installs its own handler, SIGTERM (a rollout) must still end in the release
        # below, not in the default instant death that leaves the Lease to expire.
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    elector = _elector(settings) if settings.leader_lease else None
    try:
        if elector is not None:
            _lead(elector, settings, operator)
        # Only now: a standby's zeros would read as an empty cluster.
        operator.phases.publish()
        kopf.run(
            registry=registry,
            standalone=True,  # our own Lease elects the one replica that runs Kopf: no peering
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            liveness_endpoint=liveness_endpoint(settings),
            stop_flag=operator.stop_flag,
        )
        if operator.startup_problem is not None:
            return 2
    finally:
        if elector is not None:
            elector.release()
    return 0


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _elector(settings: OperatorSettings) -> LeaderElector:
    import kopf

    from dsjobs.controller.handlers import login_info
    from dsjobs.controller.leader import (
        LeaderElector,
        LeaseClient,
        connection_from,
        identity,
        parse_lease_ref,
    )

    namespace, name = parse_lease_ref(settings.leader_lease)
    kopf_settings = kopf.OperatorSettings()

    def login() -> Any:
        return connection_from(login_info({"settings": kopf_settings, "logger": LEADER_LOG}))

    client = LeaseClient(login, namespace, name, timeout=max(settings.leader_lease_seconds / 5, 1.0))
    return LeaderElector(client, identity(), settings.leader_lease_seconds)


def _lead(elector: LeaderElector, settings: OperatorSettings, operator: Operator | None = None) -> None:
    """Wait until this replica holds the Lease (serving /healthz meanwhile), then keep it in a
    thread that ends the process the moment it cannot (`stand_down`)."""
    from dsjobs.controller import metrics
    from dsjobs.controller.leader import StandbyLiveness

    # A standby is scraped too (the pods are annotated for it): its metrics say it stands by.
    metrics.LEADER.set(0)
    metrics.serve(settings.metrics_port, settings.bind_address)
    standby = (
        StandbyLiveness(settings.bind_address, settings.liveness_port) if settings.liveness_port else None
    )
    try:
        elector.acquire()
    finally:
        if standby is not None:
            standby.close()

    drain = lost_leadership_drain(settings.leader_lease_seconds)
    elector.keep(lambda why: stand_down(why, operator, drain))


def stand_down(why: str, operator: Operator | None, drain_seconds: float = LOST_LEADERSHIP_DRAIN) -> None:
    """End the process on a lost leadership (from the lease's watchdog thread).

    Another replica may take the Lease soon: no reconcile starts any more and the process exits
    without a graceful shutdown. The Events already queued (a phase change just written, a
    failure) get a bounded moment to be posted first: they are the users' story of the job, and
    the next leader does not tell them again."""
    if operator is not None:
        operator.standing_down = True  # first: the log line below may block on its stream
    LEADER_LOG.error("lost the leadership: %s; exiting", why)
    try:
        events = operator.events if operator is not None else None
        if events is not None and not events.drain_from_thread(drain_seconds):
            LEADER_LOG.warning("events still queued at the exit are not posted")
    finally:
        logging.shutdown()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
