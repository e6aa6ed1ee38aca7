#!/usr/bin/env bash
# make up: local cluster + S3 + dsjobs (deploy/overlays/local); writes .dev/env. Idempotent.
# VENV_PYTHON: the venv's python (make passes it; default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV_PYTHON:-.venv/bin/python}" -m dsjobs.localstack up "$@"
