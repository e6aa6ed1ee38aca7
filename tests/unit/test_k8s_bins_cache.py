"""hack/k8s-bins.sh's cache layout: checkouts that build different binaries never share (or
overwrite) them. A stand-in `go` on PATH makes each "build" a one-line script, so nothing is
compiled and no real cache is touched."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_GO = r"""#!/usr/bin/env bash
if [[ $1 == env ]]; then
  printf '%s\n' go1.26.8 linux amd64 "${GOFLAGS:-}" ""
  exit 0
fi
[[ $1 == build ]] || exit 3
echo "$PWD" >>"$GO_BUILDS"
out=""; pkgs=()
shift
while (($#)); do
  case $1 in -o) out=$2; shift 2 ;; -ldflags) shift 2 ;; -*) shift ;; *) pkgs+=("$1"); shift ;; esac
done
if [[ $out == */ ]]; then
  for p in "${pkgs[@]}"; do printf '#!/bin/sh\necho %s\n' "$PWD" >"$out${p##*/}"; chmod +x "$out${p##*/}"; done
else
  printf '#!/bin/sh\necho %s\n' "$PWD" >"$out"; chmod +x "$out"
fi
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if shutil.which("flock") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs flock and sha256sum (util-linux, coreutils)")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "go").write_text(FAKE_GO)
    (stub / "go").chmod(0o755)
    return {
        "PATH": f"{stub}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "GO_BUILDS": str(tmp_path / "builds.log"),
    }


def checkout(tmp_path: Path, name: str) -> Path:
    """The part of a checkout the script reads."""
    hack = tmp_path / name / "hack"
    hack.mkdir(parents=True)
    shutil.copy(REPO / "hack" / "k8s-bins.sh", hack)
    for module in ("k8s", "etcd", "s3server"):
        shutil.copytree(REPO / "hack" / module, hack / module)
    return hack


def bins(hack: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(hack / "k8s-bins.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def bin_dir(hack: Path, env: dict[str, str]) -> Path:
    return Path(bins(hack, env, "--dir-only").stdout.strip())


def test_the_dir_is_keyed_on_module_files_build_flags_and_toolchain(
    tmp_path: Path, env: dict[str, str]
) -> None:
    main, same = checkout(tmp_path, "main"), checkout(tmp_path, "same")
    assert bin_dir(main, env) == bin_dir(same, env)
    branch = checkout(tmp_path, "branch")
    with open(branch / "k8s" / "go.mod", "a") as f:
        f.write("replace golang.org/x/net => golang.org/x/net v0.99.0\n")
    etcd = checkout(tmp_path, "etcd")
    (etcd / "etcd" / "go.sum").write_text(
        (etcd / "etcd" / "go.sum").read_text() + "example.com/x v1.0.0 h1:x=\n"
    )
    dirs = {bin_dir(h, env).parents[1] for h in (main, branch, etcd)}
    dirs.add(bin_dir(main, {**env, "GOFLAGS": "-mod=mod"}).parents[1])
    assert len(dirs) == 4, dirs


def test_an_s3server_of_other_sources_never_replaces_one_in_use(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = checkout(tmp_path, "a"), checkout(tmp_path, "b")
    with open(b / "s3server" / "main.go", "a") as f:
        f.write("// a local change\n")
    built_a = bins(a, env, "--print-dir")
    assert built_a.returncode == 0, built_a.stderr
    dir_a = Path(built_a.stdout.splitlines()[-1])
    s3_a = (dir_a / "dsjobs-s3server").read_text()

    built_b = bins(b, env, "--print-dir")
    assert built_b.returncode == 0, built_b.stderr
    dir_b = Path(built_b.stdout.splitlines()[-1])

    assert dir_b != dir_a and dir_b.parents[1] == dir_a.parents[1]  # same Kubernetes, own s3server
    assert (dir_a / "dsjobs-s3server").read_text() == s3_a
    assert bins(a, env, "--check").returncode == 0  # A's cluster finds its binaries as they were
    assert bins(b, env, "--check").returncode == 0
    builds = Path(env["GO_BUILDS"]).read_text().splitlines()
    # Kubernetes and etcd once; each checkout's s3server once
    assert sorted(Path(b).name for b in builds) == ["etcd", "k8s", "s3server", "s3server"]
    assert os.path.realpath(dir_b / "kube-apiserver") == os.path.realpath(dir_a / "kube-apiserver")


def go_toolchain(
    tmp_path: Path, go_version: str, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """hack/go-toolchain.sh with a stand-in `go` of `go_version` on PATH and a scratch cache."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    (bindir / "go").write_text(f"#!/bin/sh\necho {go_version}\n")
    (bindir / "go").chmod(0o755)
    env = {
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PATH": f"{bindir}:/usr/bin:/bin",
        **(extra or {}),
    }
    return subprocess.run(
        ["bash", str(REPO / "hack/go-toolchain.sh"), *args], env=env, capture_output=True, text=True
    )


def test_a_new_enough_go_on_path_is_used_as_it_is(tmp_path: Path) -> None:
    out = go_toolchain(tmp_path, "go1.27.1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "bin") and not (tmp_path / "cache").exists()


def test_an_old_go_gets_the_pinned_one_and_a_download_with_another_sha256_is_refused(tmp_path: Path) -> None:
    # A proxy answering with other bytes than the pinned toolchain zip (a local HTTP server).
    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"not the toolchain"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proxy = f"http://127.0.0.1:{server.server_address[1]},direct"
        out = go_toolchain(tmp_path, "go1.19.8", extra={"GOPROXY": proxy})
    finally:
        server.shutdown()
    assert out.returncode == 1, out.stderr
    assert "go1.19.8 is older than go1.26" in out.stderr and "not the pinned" in out.stderr
    assert os.listdir(tmp_path / "cache/dsjobs/go") == [".lock"]  # nothing half-unpacked is kept


def test_no_fetch_takes_only_a_go_already_here(tmp_path: Path) -> None:
    # k8s-bins.sh --dir-only/--check build nothing, so they must fetch nothing either.
    out = go_toolchain(tmp_path, "go1.19.8", "--no-fetch")
    assert out.returncode == 1 and out.stdout == "" and not (tmp_path / "cache").exists()


def test_binaries_given_in_dsjobs_k8s_bin_dir_are_used_and_nothing_is_built(
    tmp_path: Path, env: dict[str, str]
) -> None:
    hack = checkout(tmp_path, "main")
    given = tmp_path / "given"
    given.mkdir()
    with_dir = {**env, "DSJOBS_K8S_BIN_DIR": str(given)}
    lacking = bins(hack, with_dir)
    assert lacking.returncode == 1 and "lacks etcd kube-apiserver" in lacking.stderr
    assert bins(hack, with_dir, "--check").returncode == 1
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "dsjobs-s3server"):
        (given / name).write_text("#!/bin/sh\n")
        (given / name).chmod(0o755)
    for args in ((), ("--print-dir",), ("--dir-only",), ("--check",)):
        done = bins(hack, with_dir, *args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == ("" if args in ((), ("--check",)) else str(given))
    assert not Path(env["GO_BUILDS"]).exists()  # the fake go was never asked to build


def test_a_killed_build_s_work_dir_goes_with_the_next_build(tmp_path: Path, env: dict[str, str]) -> None:
    # kill -9 before the EXIT trap: its .tmp-build.* stayed in the cache for good.
    hack = checkout(tmp_path, "main")
    left = Path(env["XDG_CACHE_HOME"]) / "dsjobs" / "k8s" / ".tmp-build.abc123"
    left.mkdir(parents=True)
    (left / "etcd").write_text("half a binary")
    built = bins(hack, env, "--print-dir")
    assert built.returncode == 0, built.stderr
    assert not left.exists()


def test_a_cache_that_cannot_be_written_is_named(tmp_path: Path, env: dict[str, str]) -> None:
    hack = checkout(tmp_path, "main")
    (tmp_path / "file").write_text("")
    built = bins(hack, {**env, "XDG_CACHE_HOME": str(tmp_path / "file")})
    assert built.returncode == 1
    assert "k8s-bins: error: cannot build" in built.stderr and "is not writable" in built.stderr, built.stderr
