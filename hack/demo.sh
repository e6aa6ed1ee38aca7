#!/usr/bin/env bash
# make demo: `make up`, then examples/demo through the official datasphere CLI (dsjobs datasphere ...).
# VENV_PYTHON: the venv's python (make passes it; default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV_PYTHON:-.venv/bin/python}" -m dsjobs.localstack demo "$@"
