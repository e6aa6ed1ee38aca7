"""The container launch: mount script rendering (pure) and, where possible, running it."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from dsjobs.devcluster.node.mounts import (
    Tools,
    check_host_path,
    launch_argv,
    materialize_volume,
    render_launch_script,
    resolve_executable,
    stage_dir,
)
from dsjobs.devcluster.node.podspec import ContainerPlan, FileContent, Mount, SetupError, VolumePlan

TOOLS = Tools(
    unshare="/usr/bin/unshare",
    sh="/bin/sh",
    mount="/bin/mount",
    mkdir="/bin/mkdir",
    setpriv="/usr/bin/setpriv",
)


def plan(mounts: tuple[Mount, ...], argv: tuple[str, ...] = ("cat", "/x"), **kw: object) -> ContainerPlan:
    base: dict[str, object] = dict(
        name="c",
        kind="main",
        image="img",
        argv=argv,
        env=(),
        working_dir=None,
        mounts=mounts,
        gpus=0,
        termination_message_path="/dev/termination-log",
        termination_message_policy="File",
        run_as_user=None,
        run_as_group=None,
        resources={},
    )
    base.update(kw)
    return ContainerPlan(**base)  # type: ignore[arg-type]


def test_script_binds_then_remounts_readonly_then_execs() -> None:
    mounts = (Mount("/s/a b", "/data", True), Mount("/s/cfg", "/data/cfg", False))
    script = render_launch_script(mounts, "/data/work", TOOLS, None)
    lines = script.splitlines()
    assert lines[0] == "set -e"
    binds = [i for i, line in enumerate(lines) if "--rbind" in line]
    remount = next(i for i, line in enumerate(lines) if "remount,bind,ro" in line)
    assert binds == sorted(binds) and remount > max(binds)
    # No target covers a source: each source is bound straight onto its target, in order.
    assert "dsjobs-stage" not in script
    assert "/bin/mount --rbind '/s/a b' /data" in script
    assert "/bin/mount --rbind /s/cfg /data/cfg" in script
    assert "/bin/mount -o remount,bind,ro /data" in script
    # Targets are made only when missing (the checks are shell builtins, not processes).
    assert "if [ -d '/s/a b' ]; then [ -d /data ] || /bin/mkdir -p /data; " in script
    assert "[ -d /data/work ] || /bin/mkdir -p /data/work" in lines
    assert "cd /data/work" in lines
    assert lines[-1] == 'exec "$@"'


def test_script_stages_the_sources_when_a_target_covers_one() -> None:
    mounts = (
        Mount("/node/state/empty", "/node", False),
        Mount("/node/state/term", "/dev/termination-log", False),
    )
    script = render_launch_script(mounts, None, TOOLS, None)
    assert "/bin/mount -t tmpfs -o mode=0700,size=1m dsjobs-stage /run/dsjobs-stage" in script
    assert "/bin/mount --rbind /node/state/term /run/dsjobs-stage/1" in script
    assert "/bin/mount --rbind /run/dsjobs-stage/1 /dev/termination-log" in script
    # Every source is staged before the first target is bound.
    lines = script.splitlines()
    staged = [
        i for i, line in enumerate(lines) if line.endswith(("/run/dsjobs-stage/0", "/run/dsjobs-stage/1"))
    ]
    first_target = next(
        i for i, line in enumerate(lines) if line.endswith("--rbind /run/dsjobs-stage/0 /node")
    )
    assert max(staged) < first_target


def test_script_run_as_user() -> None:
    script = render_launch_script((), None, TOOLS, (1000, 1000))
    assert script.splitlines()[-1] == 'exec /usr/bin/setpriv --reuid=1000 --regid=1000 --clear-groups -- "$@"'


def test_script_joins_its_cgroups_before_anything_else_runs() -> None:
    # The mounts, the chdir and the program all run under the container's limit and count as its
    # CPU time; the joins come before setpriv drops root (writing cgroup.procs needs it).
    procs = "/sys/fs/cgroup/memory/dsjobs-node-x/u1-main/cgroup.procs"
    cpu = "/sys/fs/cgroup/cpuacct/dsjobs-node-x/u1-main/cgroup.procs"
    lines = render_launch_script(
        (Mount("/s", "/d", True),), "/d", TOOLS, (1000, 1000), [procs, cpu]
    ).splitlines()
    assert lines[:3] == ["set -e", f"echo $$ > {procs}", f"echo $$ > {cpu}"]
    assert lines[-1].startswith("exec /usr/bin/setpriv")
    assert "cgroup.procs" not in render_launch_script((), None, TOOLS, None)


def test_launch_argv_shape() -> None:
    argv = launch_argv(plan((), ("python", "-c", "print(1)"), run_as_user=5), TOOLS)
    assert argv[:5] == ["/usr/bin/unshare", "--mount", "--propagation", "private", "--"]
    assert argv[5:7] == ["/bin/sh", "-c"]
    assert "--reuid=5 --regid=5" in argv[7]
    assert argv[8:] == ["dsjobs-container", "python", "-c", "print(1)"]


def test_resolve_executable(tmp_path: Path) -> None:
    exe = tmp_path / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "plain").write_text("")
    path = f"/nonexistent:{tmp_path}"
    assert resolve_executable("tool", path) == str(exe)
    assert resolve_executable("plain", path) is None
    assert resolve_executable("missing", path) is None
    assert resolve_executable("/abs/anything", path) == "/abs/anything"


def test_materialize_generated_volume(tmp_path: Path) -> None:
    vdir = tmp_path / "vol"
    vol = VolumePlan(
        "v", "configMap", str(vdir), True, (FileContent("a", b"1", 0o644), FileContent("sub/b", b"2", 0o600))
    )
    materialize_volume(vol)
    assert (vdir / "a").read_bytes() == b"1"
    assert stat.S_IMODE((vdir / "sub" / "b").stat().st_mode) == 0o600
    # A rewrite removes files no longer present.
    materialize_volume(VolumePlan("v", "configMap", str(vdir), True, (FileContent("a", b"3", 0o644),)))
    assert sorted(p.name for p in vdir.rglob("*") if p.is_file()) == ["a"]
    empty = tmp_path / "empty"
    materialize_volume(VolumePlan("e", "emptyDir", str(empty)))
    assert stat.S_IMODE(empty.stat().st_mode) == 0o777


def test_host_path_types(tmp_path: Path) -> None:
    check_host_path(str(tmp_path / "new" / "dir"), "DirectoryOrCreate")
    assert (tmp_path / "new" / "dir").is_dir()
    check_host_path(str(tmp_path / "f" / "file"), "FileOrCreate")
    assert (tmp_path / "f" / "file").is_file()
    check_host_path(str(tmp_path / "f" / "file"), "File")
    check_host_path(str(tmp_path / "whatever"), "")
    with pytest.raises(SetupError, match="does not exist"):
        check_host_path(str(tmp_path / "nope"), "Directory")
    with pytest.raises(SetupError, match="is not a Directory"):
        check_host_path(str(tmp_path / "f" / "file"), "Directory")


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return (
        subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], check=False).returncode
        == 0
    )


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare(CLONE_NEWNS)")
def test_launch_really_mounts_privately(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("from the volume\n")
    term = tmp_path / "term"
    term.write_text("")
    target = tmp_path / "target" / "deep"  # created by the script
    msg_target = tmp_path / "msgdir" / "termination-log"
    mounts = (Mount(str(src), str(target), True), Mount(str(term), str(msg_target), False))
    q = shlex.quote
    script_cmd = (
        f"cat {q(str(target / 'hello'))}; echo written > {q(str(msg_target))}; "
        f"touch {q(str(target / 'nope'))} 2>/dev/null || echo read-only"
    )
    argv = launch_argv(plan(mounts, ("sh", "-c", script_cmd)), Tools.discover())
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["from the volume", "read-only"]
    assert term.read_text() == "written\n"  # the per-container file behind the in-container path
    # Nothing leaked into the host's mount table; the targets stay as empty placeholders.
    assert list(target.iterdir()) == []
    assert msg_target.read_text() == ""


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare(CLONE_NEWNS)")
def test_a_target_covering_a_later_source_does_not_hide_it(tmp_path: Path) -> None:
    # An emptyDir mounted over the directory that holds the node's state (e.g. /tmp) must not hide
    # the sources of the container's other mounts, such as its termination-log file.
    state = tmp_path / "state"
    (state / "empty").mkdir(parents=True)
    term = state / "term"
    term.write_text("")
    covering = Mount(str(state / "empty"), str(tmp_path), False)
    msg_target = tmp_path.parent / f"{tmp_path.name}-termination-log"
    msg = Mount(str(term), str(msg_target), False)
    script_cmd = f"echo done > {shlex.quote(str(msg_target))}"
    argv = launch_argv(plan((covering, msg), ("sh", "-c", script_cmd)), Tools.discover())
    subprocess.run(argv, capture_output=True, text=True, check=True)
    assert term.read_text() == "done\n"


def test_staging_directory_avoids_every_target() -> None:
    assert stage_dir((Mount("/a", "/tmp", False),)) == "/run/dsjobs-stage"
    assert stage_dir((Mount("/a", "/run", False),)) == "/var/lib/dsjobs-stage"
    with pytest.raises(ValueError, match="covered"):
        stage_dir((Mount("/a", "/", False),))
