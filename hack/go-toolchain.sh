#!/usr/bin/env bash
# Prints the bin directory of a Go toolchain that can build the local cluster (go >= GO_MIN):
# the `go` on PATH when it is new enough, else a pinned Go fetched once into
# ${XDG_CACHE_HOME:-~/.cache}/dsjobs/go/go<version>-linux-<arch>/.
#
# The pinned Go comes from the Go module proxy as the module golang.org/toolchain (what `go`
# itself downloads for GOTOOLCHAIN switches): a fresh machine may reach package registries only,
# and Debian's golang-go is too old to switch toolchains on its own. Its sha256 is pinned here
# rather than checked against sum.golang.org, which such a machine may not reach.
#
# Usage: PATH="$(bash hack/go-toolchain.sh [--no-fetch]):$PATH"
#   --no-fetch  only a Go already here (on PATH, or fetched before); exit 1 without one
set -euo pipefail
fetch=1
[[ "${1:-}" == --no-fetch ]] && fetch=0

GO_MIN_MINOR=26
GO_VERSION=1.26.8
declare -A ZIP_SHA256=(
  [amd64]=30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7
  [arm64]=02b36b6787b3ac767668f630e2998df45a3b1f9ffee08d1bf3ef6487cd658d99
)

log() { echo "go-toolchain: $*" >&2; }
die() { log "$*"; exit 1; }

if command -v go >/dev/null 2>&1; then
  minor="$(GOTOOLCHAIN=local go env GOVERSION 2>/dev/null | head -n1 | sed -E 's/^go1\.([0-9]+).*/\1/')"
  if [[ "$minor" =~ ^[0-9]+$ ]] && ((minor >= GO_MIN_MINOR)); then
    dirname "$(command -v go)"
    exit 0
  fi
  log "$(GOTOOLCHAIN=local go env GOVERSION 2>/dev/null | head -n1 || echo "this go") is older than go1.$GO_MIN_MINOR: using go$GO_VERSION"
fi

case "$(uname -m)" in
  x86_64 | amd64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) die "no pinned Go for $(uname -m): install Go >= 1.$GO_MIN_MINOR (https://go.dev/dl/) and put it on PATH" ;;
esac
[[ "$(uname -s)" == Linux ]] || die "no pinned Go for $(uname -s): install Go >= 1.$GO_MIN_MINOR and put it on PATH"

name="go$GO_VERSION-linux-$arch"
root="${XDG_CACHE_HOME:-$HOME/.cache}/dsjobs/go"
dest="$root/$name"
if [[ -x "$dest/bin/go" ]]; then
  echo "$dest/bin"
  exit 0
fi

((fetch)) || exit 1
command -v python3 >/dev/null 2>&1 || die "python3 is needed to unpack Go (apt-get install python3)"
mkdir -p "$root"
# Two checkouts fetching at once: one fetches, the other finds it done.
exec 9>"$root/.lock"
flock 9
if [[ ! -x "$dest/bin/go" ]]; then
  module="golang.org/toolchain/@v/v0.0.1-go$GO_VERSION.linux-$arch.zip"
  proxy="${GOPROXY:-https://proxy.golang.org}"
  proxy="${proxy%%,*}"
  [[ "$proxy" == direct || "$proxy" == off ]] && proxy=https://proxy.golang.org
  tmp="$(mktemp -d "$root/.tmp.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  log "fetching go$GO_VERSION ($arch) from $proxy"
  python3 - "$proxy/$module" "$tmp/go.zip" <<'EOF' || die "cannot fetch Go from the module proxy"
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=300) as r, open(sys.argv[2], "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
EOF
  got="$(sha256sum "$tmp/go.zip" | cut -d' ' -f1)"
  [[ "$got" == "${ZIP_SHA256[$arch]}" ]] || die "go$GO_VERSION ($arch) has sha256 $got, not the pinned ${ZIP_SHA256[$arch]}"
  python3 - "$tmp/go.zip" "$tmp/go" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        # Every entry is below golang.org/toolchain@<version>/ (a module zip).
        parts = info.filename.split("/", 2)
        rel = parts[2] if len(parts) == 3 else ""
        if not rel or info.is_dir() or ".." in rel.split("/"):
            continue
        path = os.path.join(sys.argv[2], rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with z.open(info) as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        # A module zip keeps no modes: the toolchain's programs are bin/* and pkg/tool/*/*.
        parts = rel.split("/")
        executable = parts[0] == "bin" or (parts[:2] == ["pkg", "tool"] and len(parts) == 4)
        os.chmod(path, 0o755 if executable else 0o644)
EOF
  "$tmp/go/bin/go" version >/dev/null || die "the fetched Go does not run"
  mv "$tmp/go" "$dest"
  log "go$GO_VERSION in $dest"
fi
echo "$dest/bin"
