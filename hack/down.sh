#!/usr/bin/env bash
# make down: stop everything `make up` started (cluster, S3, node agents and so the dsjobs pods).
# VENV_PYTHON: the venv's python (make passes it; default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV_PYTHON:-.venv/bin/python}" -m dsjobs.localstack down "$@"
