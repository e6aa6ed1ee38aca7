"""`python -m dsjobs.devcluster.node`: run the process-based node agent until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from .agent import Agent, AgentConfig
from .logfmt import setup_logging
from .nodeobj import parse_label, parse_taint


def parse_args(argv: Sequence[str] | None = None) -> AgentConfig:
    p = argparse.ArgumentParser(prog="python -m dsjobs.devcluster.node", description=__doc__)
    p.add_argument(
        "--kubeconfig", required=True, help="node credentials (CN=system:node:<name>, O=system:nodes)"
    )
    p.add_argument("--name", required=True, help="the Node's name")
    p.add_argument("--state-dir", required=True, help="pod directories, logs, volumes, state")
    p.add_argument("--port", type=int, required=True, help="port of the kubelet-style HTTPS endpoint")
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    p.add_argument("--cpu", default="16")
    p.add_argument("--memory", default="64Gi")
    p.add_argument("--pods", type=int, default=110)
    p.add_argument("--gpus", type=int, default=0, help="fake nvidia.com/gpu devices")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("--taint", action="append", default=[], metavar="K=V:EFFECT")
    p.add_argument(
        "--address", default="127.0.0.1", help="the node's InternalIP and the endpoint's bind address"
    )
    p.add_argument(
        "--client-ca",
        default=None,
        help="CA that endpoint clients' certificates must be signed by (default: the kubeconfig's CA; 'none': no check)",
    )
    p.add_argument(
        "--ephemeral-storage",
        default=None,
        help="capacity to report (default: size of the state dir's filesystem)",
    )
    p.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        help="first crash-loop back-off in seconds (kubelet: 10)",
    )
    p.add_argument(
        "--max-restart-backoff", type=float, default=300.0, help="crash-loop back-off cap (kubelet: 300)"
    )
    p.add_argument(
        "--shutdown-grace", type=float, default=5.0, help="seconds pods get to stop when the agent stops"
    )
    p.add_argument("--no-events", action="store_true", help="do not create Events")
    p.add_argument(
        "--enforce-run-as-user",
        action="store_true",
        help="apply securityContext runAsUser/runAsGroup with setpriv (default: recorded only)",
    )
    p.add_argument(
        "--no-memory-limits",
        action="store_true",
        help="record limits.memory only (default: a memory cgroup per container where the host allows)",
    )
    p.add_argument("--log-level", default="INFO")
    ns = p.parse_args(argv)
    try:
        labels = dict(parse_label(x) for x in ns.label)
        for t in ns.taint:
            parse_taint(t)
    except ValueError as exc:
        p.error(str(exc))
    setup_logging(ns.log_level, ns.name)
    return AgentConfig(
        kubeconfig=ns.kubeconfig,
        name=ns.name,
        state_dir=ns.state_dir,
        port=ns.port,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        cpu=ns.cpu,
        memory=ns.memory,
        pods=ns.pods,
        gpus=ns.gpus,
        labels=labels,
        taints=list(ns.taint),
        address=ns.address,
        client_ca=ns.client_ca,
        ephemeral_storage=ns.ephemeral_storage,
        restart_backoff=ns.restart_backoff,
        max_restart_backoff=ns.max_restart_backoff,
        shutdown_grace=ns.shutdown_grace,
        events=not ns.no_events,
        enforce_run_as_user=ns.enforce_run_as_user,
        memory_limits=not ns.no_memory_limits,
    )


async def _main(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    return await agent.run()


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        return asyncio.run(_main(cfg))
    except (ValueError, RuntimeError, OSError) as exc:
        logging.getLogger("dsjobs.node").error("node agent failed: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
