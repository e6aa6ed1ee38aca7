#!/usr/bin/env bash
# make bench: run the benchmarks in bench/ on a dev cluster of their own and record the figures.
#
#   hack/bench.sh                          # all: cluster storage controller api runner (~12-20 min)
#   hack/bench.sh cluster storage          # a subset
#   hack/bench.sh --quick                  # small counts: checks the harness, writes no docs
#   hack/bench.sh --no-docs --keep-cluster # print only; leave the bench cluster running
#
# Each benchmark prints a markdown table and replaces its own section of docs/benchmarks.md
# (between `<!-- bench:<name>:begin/end -->` markers); benchmarks whose code is missing say
# `skipped: <module> missing`. The cluster lives in $DSJOBS_BENCH_DIR (default /tmp/dsjobs-bench-<hash of the checkout's path>),
# never in .dev, so a developer's cluster is left alone. Knobs: BENCH_OPERATOR_JOBS (500),
# BENCH_STORAGE_REPS (2), BENCH_RUNNER_REPS (2). Timings are never asserted: see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${BENCH_PYTHON:-${VENV_PYTHON:-.venv/bin/python}}" # VENV_PYTHON: what `make bench` passes
# The control-plane binaries are built once (minutes when cold); that is no part of any figure.
bash "${DSJOBS_K8S_BINS_SCRIPT:-hack/k8s-bins.sh}" >&2
exec "$PY" bench/run.py "$@"
