"""Run the benchmarks: `make bench`, or `hack/bench.sh [name ...]`.

    .venv/bin/python bench/run.py [cluster storage controller api runner] [--dir DIR] [--quick]
                                  [--no-docs] [--keep-cluster]

Every benchmark whose prerequisites exist runs (the others print `skipped: <why>`), each prints a
markdown table, and docs/benchmarks.md gets that table between its `bench:<name>` markers (a rerun
replaces the figures instead of piling them up). One dev cluster in `--dir` (default
/tmp/dsjobs-bench-<hash of the checkout's path>, never the `.dev` other sessions use) serves them all; it is taken down at the end
unless --keep-cluster.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from common import (
    DEFAULT_DIR,
    DOC_PATH,
    BenchCluster,
    Context,
    Section,
    has_section,
    machine_info,
    machine_line,
    update_doc,
    wait_quiet,
)

#: Order of the sections in docs/benchmarks.md, and of the runs.
BENCHMARKS = ("cluster", "storage", "controller", "api", "runner")
ALIASES = {"operator": "controller", "s3": "storage"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
    p.add_argument(
        "--quick", action="store_true", help="small counts, to check the harness; implies --no-docs"
    )
    p.add_argument("--no-docs", action="store_true", help=f"print only; leave {DOC_PATH.name} alone")
    p.add_argument("--keep-cluster", action="store_true", help="leave the bench cluster running")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C: operators, API and cluster get stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [ALIASES.get(n, n) for n in args.names] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    names = [n for n in BENCHMARKS if n in names]
    write_docs = not (args.no_docs or args.quick)

    machine = machine_info()
    print(f"# dsjobs benchmarks: {', '.join(names)}\n\n{machine_line(machine)}\n", flush=True)
    cluster = BenchCluster(args.dir)
    was_running = cluster.running()
    work = args.dir.absolute().parent / f"{args.dir.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = Context(cluster, work, quick=args.quick)
    failed = 0
    t_all = time.monotonic()
    try:
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            mod = importlib.import_module(name)
            t0 = time.monotonic()
            try:
                if name != "cluster":  # the cluster benchmark times its own up/down
                    cluster.ensure_up()
                    waited, idle = wait_quiet()  # not the tail of the previous benchmark's work
                    print(f"   machine {idle:.0%} idle after {waited:.0f} s", file=sys.stderr, flush=True)
                sec: Section = mod.run(ctx)
            except Exception as e:
                traceback.print_exc()
                failed += 1
                sec = Section(name, getattr(mod, "TITLE", name))
                sec.skipped.append(
                    f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                )
            sec.seconds = time.monotonic() - t0
            print(sec.markdown(machine), flush=True)
            # Written as each one finishes, so a later crash keeps the earlier figures; a benchmark
            # that produced nothing leaves earlier figures in place (its skip line goes in only
            # when there were none).
            if write_docs and (sec.figures or not has_section(name)):
                update_doc([sec], machine, BENCHMARKS)
    finally:
        for cleanup in reversed(ctx.cleanups):
            try:
                cleanup()
            except Exception:
                traceback.print_exc()
        keep = args.keep_cluster or (was_running and "cluster" not in names)
        if not keep and cluster.running():
            cluster.down()
        shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - t_all
    print(
        f"total {total:.0f} s"
        + (f"; {DOC_PATH.relative_to(DOC_PATH.parents[1])} updated" if write_docs else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
