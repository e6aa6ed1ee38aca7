#!/usr/bin/env bash
# make down: stop everything `make up` started (cluster, S3, node agents and so the dsjobs pods).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m dsjobs.localstack down "$@"
