"""CLI: python -m dsjobs.devcluster up|down|status [--dir .dev]."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from dsjobs.devcluster import bins
from dsjobs.devcluster.cluster import ClusterError, ClusterState, down, restart, status, up
from dsjobs.devcluster.paths import ClusterPaths
from dsjobs.devcluster.topology import TopologyError, load_topology

# Exit codes of `status`, after systemctl/LSB: 0 healthy, 1 degraded, 3 not running.
EXIT_DEGRADED = 1
EXIT_NOT_RUNNING = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsjobs.devcluster", description=__doc__)
    p.add_argument("--dir", default=".dev", help="cluster directory (default: .dev)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start the cluster (no-op when it is running)")
    u.add_argument("--topology", help="YAML/JSON node topology file (default: cpu-0 + gpu-0)")
    u.add_argument("--no-nodes", action="store_true", help="start no node agents")
    u.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each component")
    u.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    d = sub.add_parser("down", help="stop the cluster and delete its data (logs go to <dir>/last-logs)")
    d.add_argument("--timeout", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
    sub.add_parser("status", help="show components and node readiness")
    r = sub.add_parser(
        "restart", help="stop one control-plane process or the S3 server and start it again (an outage)"
    )
    r.add_argument("component", help="e.g. kube-apiserver, etcd, kube-scheduler, s3")
    b = sub.add_parser("bin-dir", help="print the directory of the binaries (builds missing ones)")
    b.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    return p


def unwind_on_sigterm(*, finish: bool = False) -> None:
    """Let SIGTERM (a CI job's timeout, `kill`) unwind like Ctrl-C, so that `up` stops what it
    started: the cluster's processes run in sessions of their own, which a kill of our process
    group does not reach. With `finish` (for `down`), SIGTERM does not cut the teardown short.
    A further SIGTERM while unwinding is ignored for the same reason (SIGKILL still ends us)."""
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if finish or fired:
            logging.getLogger(__name__).warning("SIGTERM: finishing the teardown first")
            return
        fired = True
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _print_status(paths: ClusterPaths, st: ClusterState) -> int:
    if not st.recorded:
        print(f"no cluster in {paths.root}")
        return EXIT_NOT_RUNNING
    api = st.info.get("apiserver", "?")
    print(f"cluster   {paths.root}")
    if not st.complete:
        print("INCOMPLETE: `up` is still starting it, or was killed (the next `up` starts it anew)")
    print(f"apiserver {api}  {'ready' if st.apiserver_ready else 'NOT READY'}  {st.version}")
    print(f"kubeconfig {paths.kubeconfig}")
    print(f"s3        {st.info.get('s3', '?')}  (settings: {paths.s3_env})")
    print()
    print(f"{'COMPONENT':<28} {'PID':>8}  {'STATE':<8} PORTS")
    for c in st.components:
        ports = " ".join(f"{k}={v}" for k, v in c.ports.items())
        print(f"{c.name:<28} {c.pid:>8}  {'running' if c.running else 'DEAD':<8} {ports}")
    expected = st.info.get("nodes", [])
    if expected or st.nodes:
        print()
        print(f"{'NODE':<28} {'READY':<8} REASON")
        seen = {n.name: n for n in st.nodes}
        for name in sorted(set(expected) | set(seen)):
            n = seen.get(name)
            print(
                f"{name:<28} {('yes' if n.ready else 'no') if n else '?':<8} {n.reason if n else 'not registered'}"
            )
    return 0 if st.healthy else EXIT_DEGRADED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="devcluster: %(message)s", stream=sys.stderr)
    paths = ClusterPaths.at(args.dir)
    unwind_on_sigterm(finish=args.command == "down")
    try:
        if args.command == "up":
            nodes = load_topology(args.topology) if args.topology else None
            record, started = up(
                paths,
                nodes=nodes,
                with_nodes=not args.no_nodes,
                timeout=args.timeout,
                build=not args.no_build,
            )
            if not started:
                print(f"cluster in {paths.root} is already running; nothing to do")
            print(f"export KUBECONFIG={paths.kubeconfig}")
            print(f"# kubectl: {record.info.get('bin_dir')}/kubectl   S3 settings: {paths.s3_env}")
            return 0
        if args.command == "down":
            stopped = down(paths, timeout=args.timeout)
            if stopped is None:
                print(f"no cluster in {paths.root}; nothing to stop")
            else:
                print(f"stopped {len(stopped)} processes; data removed (logs in {paths.last_logs})")
            return 0
        if args.command == "status":
            return _print_status(paths, status(paths))
        if args.command == "restart":
            comp = restart(paths, args.component)
            ready = "S3" if comp.kind == "s3" else "the API server"
            print(f"restarted {comp.name} (pid {comp.pid}); {ready} is ready")
            return 0
        if args.command == "bin-dir":
            print(bins.ensure_bin_dir(build=not args.no_build))
            return 0
    except (ClusterError, TopologyError, bins.BinariesError) as e:
        print(f"devcluster: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("devcluster: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
