#!/usr/bin/env bash
# make e2e-kind: the e2e suite (tests/e2e) against dsjobs in real containers on a kind cluster.
#
# Creates the kind cluster `dsjobs` (deploy/overlays/kind/kind-config.yaml) unless it exists, builds the
# dsjobs image, loads it into kind, applies deploy/overlays/kind, waits for it, writes .dev/kind/env
# and runs pytest tests/e2e with DSJOBS_E2E_KUBECONFIG / DSJOBS_E2E_ENV pointing at it.
# Needs kind, a running Docker engine and kubectl. The cluster is kept for the next run; remove it
# with `kind delete cluster --name dsjobs`, or set E2E_KIND_DELETE=1 to delete it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-dsjobs}
IMAGE=${DSJOBS_IMAGE:-dsjobs:dev}
PY=${VENV_PYTHON:-.venv/bin/python} # the venv's python (make passes it)
OVERLAY=deploy/overlays/kind
STATE=.dev/kind
SYSTEM_NS=dsjobs-system
PROJECT_NS=dsjobs-demo
PROJECT_ID=demo
API_ENDPOINT=127.0.0.1:30090 # kind-config.yaml maps the API's NodePort here

log() { printf '[e2e-kind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

missing=()
for tool in kind docker kubectl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  cat >&2 <<MSG
e2e-kind: not run: ${missing[*]} not found.
  The kind path runs dsjobs in real containers: it needs kind (https://kind.sigs.k8s.io), a Docker
  engine and kubectl. Without them, \`make test\` still covers the manifests: every one is validated
  with a server-side dry run against the local cluster's API server (tests/e2e/test_deploy.py).
MSG
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "e2e-kind: not run: the docker CLI is here but no Docker engine answers (docker info failed)" >&2
  exit 2
fi

mkdir -p "$STATE"
KUBECONFIG_FILE=$(pwd)/$STATE/kubeconfig
export KUBECONFIG=$KUBECONFIG_FILE
k() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "kind cluster $CLUSTER exists; reusing it"
else
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --config "$OVERLAY/kind-config.yaml" --wait 180s
fi
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
chmod 600 "$KUBECONFIG_FILE"

log "building $IMAGE"
docker build -t "$IMAGE" .
log "loading $IMAGE into kind"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# The GPU worker: tainted like a real GPU pool, with 8 nvidia.com/gpu advertised as an extended
# resource (there is no device plugin: scheduling and limits are real, the GPUs are not).
gpu_node=$(k get nodes -l dsjobs.dev/node-pool=gpu -o jsonpath='{.items[0].metadata.name}')
k taint node "$gpu_node" nvidia.com/gpu=present:NoSchedule --overwrite
k patch node "$gpu_node" --subresource=status --type=json \
  -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"8"}]'

log "applying the CRDs, then $OVERLAY"
k apply -k crds
k wait --for=condition=Established --timeout=60s crd/projectjobs.dsjobs.dev crd/instancetypes.dsjobs.dev
k apply -k "$OVERLAY"
# A rebuilt image keeps its tag: restart so the pods run what was just loaded.
k -n "$SYSTEM_NS" rollout restart deployment
for d in $(k -n "$SYSTEM_NS" get deployments -o name); do
  k -n "$SYSTEM_NS" rollout status "$d" --timeout=300s
done

token=$(k -n "$PROJECT_NS" create token demo-user --duration=24h)
umask 077
cat >"$STATE/env" <<ENV
# written by hack/e2e-kind.sh
export KUBECONFIG=$KUBECONFIG_FILE
export DSJOBS_ENDPOINT=$API_ENDPOINT
export DSJOBS_TOKEN=$token
export DSJOBS_PROJECT_ID=$PROJECT_ID
ENV
log "dsjobs is up on kind; settings in $STATE/env"

status=0
DSJOBS_E2E_KUBECONFIG=$KUBECONFIG_FILE DSJOBS_E2E_ENV=$(pwd)/$STATE/env \
  "$PY" -m pytest -q tests/e2e "$@" || status=$?

if [[ ${E2E_KIND_DELETE:-0} == 1 ]]; then
  log "deleting kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
else
  log "kind cluster $CLUSTER kept (kind delete cluster --name $CLUSTER removes it)"
fi
exit "$status"
