#!/usr/bin/env bash
# make demo: `make up`, then examples/demo through the official datasphere CLI (dsjobs datasphere ...).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m dsjobs.localstack demo "$@"
