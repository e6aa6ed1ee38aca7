#!/usr/bin/env bash
# Build (once) the binaries the local dev cluster runs:
#   kube-apiserver kube-controller-manager kube-scheduler kubectl  (k8s.io/kubernetes)
#   etcd                                                           (go.etcd.io/etcd/server/v3)
#   dsjobs-s3server                                                (hack/s3server, gofakes3)
# from the Go module proxy, into a cache directory keyed by what they are built from:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/dsjobs/k8s/<k8s>-etcd<etcd>-<key>/
#     bin/              Kubernetes and etcd
#     s3-<stamp>/bin/   the bin dir a cluster runs: links to those, and dsjobs-s3server
# <key> hashes the versions, hack/{k8s,etcd}/go.{mod,sum}, the build flags and `go env`;
# <stamp> hashes the sources of hack/s3server. A run that finds every binary already there
# does nothing and says so.
#
# Usage: hack/k8s-bins.sh [--print-dir | --dir-only | --check]
#   (none)       build what is missing
#   --print-dir  build what is missing, then print the bin dir as the last line of stdout
#   --dir-only   print the bin dir that would be used; build nothing
#   --check      exit 0 when every binary is present, 1 otherwise; build nothing
#
# DSJOBS_K8S_BIN_DIR: a directory holding the binaries a cluster runs: used as it is, nothing built.
#
# KUBEBUILDER_ASSETS: when it names a directory holding kube-apiserver and etcd,
# those are used (symlinked into a separate bin dir) and only the binaries it
# lacks are built.
#
# Progress goes to stderr so that stdout stays machine-readable.
set -euo pipefail

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd dsjobs-s3server)

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/dsjobs/k8s"
# Build flags (part of the cache key below; the build date stamped into Kubernetes is not).
CGO=0 # static binaries, no C toolchain needed
GOBUILD=(go build -trimpath -buildvcs=false)
STRIP_LDFLAGS="-s -w"
K8S_VERSION_PKGS=(k8s.io/component-base/version k8s.io/client-go/pkg/version)

mode=build
case "${1:-}" in
  "") ;;
  --print-dir) mode=print ;;
  --dir-only) mode=dironly ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "k8s-bins: unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

log() { printf 'k8s-bins: %s\n' "$*" >&2; }
die() { printf 'k8s-bins: error: %s\n' "$*" >&2; exit 1; }

# Binaries someone built or downloaded (DSJOBS_K8S_BIN_DIR, as dsjobs.devcluster reads it): used
# as they are, nothing built. The set a cluster runs (kubectl is optional there).
if [[ -n "${DSJOBS_K8S_BIN_DIR:-}" ]]; then
  missing=()
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler dsjobs-s3server; do
    [[ -x "$DSJOBS_K8S_BIN_DIR/$b" ]] || missing+=("$b")
  done
  if ((${#missing[@]})); then
    [[ $mode == check ]] && exit 1
    die "DSJOBS_K8S_BIN_DIR=$DSJOBS_K8S_BIN_DIR lacks ${missing[*]}"
  fi
  [[ $mode == build || $mode == check ]] && log "using DSJOBS_K8S_BIN_DIR=$DSJOBS_K8S_BIN_DIR; nothing built"
  [[ $mode == print || $mode == dironly ]] && echo "$DSJOBS_K8S_BIN_DIR"
  exit 0
fi

# The Go that builds: the one on PATH if new enough, else a pinned one fetched once from the Go
# module proxy. Found before the cache key, which names it. Modes that build nothing fetch nothing.
no_fetch=()
[[ $mode == build ]] || no_fetch=(--no-fetch)
if go_bin="$(bash "$HACK_DIR/go-toolchain.sh" "${no_fetch[@]}")"; then
  PATH="$go_bin:$PATH"
fi

# Checkouts share the cache, and their binaries are built from more than the two versions: a
# branch that changes a go.mod/go.sum (a require or replace line), a build flag or the Go toolchain
# must get binaries of its own rather than use, or overwrite, main's.
build_key() {
  {
    printf '%s\n' "$K8S_VERSION" "$ETCD_VERSION" "CGO_ENABLED=$CGO" "${GOBUILD[*]}" "$STRIP_LDFLAGS" \
      "${K8S_VERSION_PKGS[*]}"
    if command -v go >/dev/null 2>&1; then
      (cd "$HACK_DIR/k8s" && go env GOVERSION GOOS GOARCH GOFLAGS GOEXPERIMENT) || echo "go env failed"
    else
      echo "no go" # the build then stops at the preflight; the key only has to be stable
    fi
    for f in k8s/go.mod k8s/go.sum etcd/go.mod etcd/go.sum; do
      printf '== %s\n' "$f"
      cat "$HACK_DIR/$f" 2>/dev/null || echo "missing"
    done
  } | sha256sum | cut -c1-12
}

# The s3server is our own code and changes between checkouts: each version of its sources gets
# a bin dir of its own, so a checkout's rebuild never replaces the binary another one's cluster
# runs (or restarts).
s3_stamp() {
  (cd "$HACK_DIR/s3server" && cat go.mod go.sum ./*.go 2>/dev/null || true) | sha256sum | cut -c1-16
}

VERSION_DIR="$CACHE_ROOT/${K8S_VERSION}-etcd${ETCD_VERSION}-$(build_key)"
BUILD_BIN="$VERSION_DIR/bin"
VIEW="s3-$(s3_stamp)"
ASSETS=""
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if [[ -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]]; then
    ASSETS="$(cd "$KUBEBUILDER_ASSETS" && pwd -P)"
    VIEW="assets-$(printf '%s' "$ASSETS" | sha256sum | cut -c1-12)-$VIEW"
  else
    log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver or etcd; ignoring it"
  fi
fi
# What the cluster runs: links to the binaries of BUILD_BIN (or KUBEBUILDER_ASSETS), and the
# s3server itself.
BIN_DIR="$VERSION_DIR/$VIEW/bin"

present() { # name -> 0 when BIN_DIR has a usable copy
  [[ -x "$BIN_DIR/$1" ]]
}

missing=()
for b in "${BINARIES[@]}"; do present "$b" || missing+=("$b"); done

if [[ $mode == dironly ]]; then echo "$BIN_DIR"; exit 0; fi
if [[ $mode == check ]]; then
  if ((${#missing[@]})); then log "missing in $BIN_DIR: ${missing[*]}"; exit 1; fi
  exit 0
fi

finish() {
  if [[ $mode == print ]]; then echo "$BIN_DIR"; fi
  exit 0
}

if ((${#missing[@]} == 0)); then
  log "all binaries present in $BIN_DIR; nothing to do"
  finish
fi

# ---- preflight ------------------------------------------------------------
command -v go >/dev/null 2>&1 || die "cannot build ${missing[*]}: no Go toolchain (hack/go-toolchain.sh could not fetch one, above).
  Install Go >= 1.26 (https://go.dev/dl/; distribution packages are often older) and put its bin dir on PATH,
  or set KUBEBUILDER_ASSETS to a directory holding prebuilt kube-apiserver and etcd (the rest still needs Go)."
go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
if [[ "$go_minor" =~ ^[0-9]+$ ]] && ((go_minor < 26)); then
  die "$(go env GOVERSION) is too old: k8s.io/kubernetes $K8S_VERSION needs go >= 1.26"
fi
command -v flock >/dev/null 2>&1 || die "flock is missing (apt-get install util-linux)"

mkdir -p "$CACHE_ROOT" "$BUILD_BIN" "$BIN_DIR" 2>/dev/null && [[ -w "$CACHE_ROOT" ]] \
  || die "cannot build ${missing[*]} into $CACHE_ROOT: it is not writable (set XDG_CACHE_HOME to a writable directory)"
# One build at a time per cache: two concurrent `make cluster-up`s must not
# both spend 30 minutes compiling the same thing.
exec 9>"$CACHE_ROOT/.build.lock"
if ! flock -n 9; then
  log "another build holds $CACHE_ROOT/.build.lock; waiting for it"
  flock 9
fi
# Work directories of builds killed before their EXIT trap ran: no build runs now but ours.
rm -rf "$CACHE_ROOT"/.tmp-build.*
# Re-evaluate after the wait: the other build may have made everything.
missing=()
for b in "${BINARIES[@]}"; do present "$b" || missing+=("$b"); done
if ((${#missing[@]} == 0)); then
  log "all binaries present in $BIN_DIR; nothing to do"
  finish
fi

TMP="$(mktemp -d "$CACHE_ROOT/.tmp-build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Link KUBEBUILDER_ASSETS binaries first, then those built before; only what is still absent
# is built.
need_build=()
for b in "${missing[@]}"; do
  if [[ $b == dsjobs-s3server ]]; then
    need_build+=("$b")
  elif [[ -n $ASSETS && -x "$ASSETS/$b" ]]; then
    ln -sfn "$ASSETS/$b" "$BIN_DIR/$b"
    log "using $ASSETS/$b"
  elif [[ -x "$BUILD_BIN/$b" ]]; then
    ln -sfn "$BUILD_BIN/$b" "$BIN_DIR/$b"
  else
    need_build+=("$b")
  fi
done
want() { local x; for x in "${need_build[@]}"; do [[ $x == "$1" ]] && return 0; done; return 1; }

export CGO_ENABLED=$CGO

# install_bin name [dir]: move a freshly built binary into place atomically
# (rename within one filesystem), so a reader never sees half a file.
install_bin() {
  local dir=${2:-$BUILD_BIN}
  mv -f "$TMP/$1" "$dir/$1"
  if [[ $dir != "$BIN_DIR" ]]; then ln -sfn "$dir/$1" "$BIN_DIR/$1"; fi
}

elapsed() { echo "$(($(date +%s) - $1))s"; }
total_start=$(date +%s)

k8s_pkgs=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  want "$b" && k8s_pkgs+=("k8s.io/kubernetes/cmd/$b")
done
if ((${#k8s_pkgs[@]})); then
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  ldflags="$STRIP_LDFLAGS"
  # Same stamping as upstream hack/lib/version.sh, for both version packages
  # (kubectl's client half reads client-go's, servers read component-base's).
  for pkg in "${K8S_VERSION_PKGS[@]}"; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=archive -X $pkg.buildDate=$build_date"
  done
  log "building ${k8s_pkgs[*]##*/} $K8S_VERSION (cold: ~10 min and ~5.5 GiB of Go caches on 2 cores; warm: ~15 s)"
  t=$(date +%s)
  (cd "$HACK_DIR/k8s" && "${GOBUILD[@]}" -ldflags "$ldflags" -o "$TMP/" "${k8s_pkgs[@]}") \
    || die "building Kubernetes $K8S_VERSION failed (see the go output above). It needs network access to the Go module proxy on the first run, ~6 GiB in the Go build cache and go >= 1.26."
  for p in "${k8s_pkgs[@]}"; do install_bin "${p##*/}"; done
  log "built ${k8s_pkgs[*]##*/} in $(elapsed "$t")"
fi

if want etcd; then
  log "building etcd $ETCD_VERSION"
  t=$(date +%s)
  (cd "$HACK_DIR/etcd" && "${GOBUILD[@]}" -ldflags "$STRIP_LDFLAGS" -o "$TMP/etcd" .) \
    || die "building etcd $ETCD_VERSION failed (see the go output above)"
  install_bin etcd
  log "built etcd in $(elapsed "$t")"
fi

if want dsjobs-s3server; then
  log "building dsjobs-s3server (gofakes3)"
  t=$(date +%s)
  (cd "$HACK_DIR/s3server" && "${GOBUILD[@]}" -ldflags "$STRIP_LDFLAGS" -o "$TMP/dsjobs-s3server" .) \
    || die "building hack/s3server failed (see the go output above)"
  install_bin dsjobs-s3server "$BIN_DIR"
  log "built dsjobs-s3server in $(elapsed "$t")"
fi

log "done in $(elapsed "$total_start"): $BIN_DIR"
finish
