#!/usr/bin/env bash
# make up: local cluster + S3 + dsjobs (deploy/overlays/local); writes .dev/env. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m dsjobs.localstack up "$@"
