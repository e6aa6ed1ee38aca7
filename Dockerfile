# syntax=docker/dockerfile:1
# The dsjobs image: operator, API and runner (python -m dsjobs.controller | dsjobs.api | dsjobs.runner),
# plus the S3 stand-in (dsjobs-s3server, gofakes3) that the kind overlay runs in-cluster.
#
#   docker build -t dsjobs:dev .        (hack/e2e-kind.sh builds it and loads it into kind)
#
# Base images are pinned to exact versions; bump them deliberately. Nothing is downloaded except
# through the language package managers (pip from PyPI, Go modules from the module proxy).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG GO_IMAGE=golang:1.26.8-bookworm

# ---- the S3 stand-in (hack/s3server)
FROM ${GO_IMAGE} AS s3server
WORKDIR /src
COPY hack/s3server/go.mod hack/s3server/go.sum ./
RUN go mod download
COPY hack/s3server/*.go ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/dsjobs-s3server .

# ---- dsjobs and its pinned dependencies in a virtualenv
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/dsjobs
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY operator/ operator/
RUN /opt/dsjobs/bin/pip install -c constraints.txt '.[server]' \
 && /opt/dsjobs/bin/python -m compileall -q /opt/dsjobs/lib

# ---- runtime: same base as the build stage (the venv points at its interpreter), non-root
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="dsjobs" \
      org.opencontainers.image.description="DataSphere-style project jobs on Kubernetes: operator, API, runner" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/dsjobs /opt/dsjobs
COPY --from=s3server /out/dsjobs-s3server /usr/local/bin/dsjobs-s3server
# Byte code is compiled at build time: the root filesystem is read-only at run time.
ENV PATH=/opt/dsjobs/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
# A numeric user, so that Kubernetes can verify runAsNonRoot without a passwd lookup.
USER 10001:10001
WORKDIR /tmp
CMD ["python", "-m", "dsjobs.api"]
