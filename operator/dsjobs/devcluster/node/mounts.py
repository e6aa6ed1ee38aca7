"""How a container's filesystem view is made: a private mount namespace with bind mounts.

Each container process is started as

    unshare --mount --propagation private -- /bin/sh -c <script> dsjobs-container <argv...>

where the script bind-mounts every volume at its mountPath (through a private tmpfs when a
target would hide a source), remounts the read-only ones,
changes to the working directory and `exec`s the argv. The mounts exist only in the
container's namespace, so two containers can mount different things at the same path
(e.g. their own `/dev/termination-log`), and nothing leaks to the host's mount table.

Caveat, documented in docs/local-cluster.md: a mount needs an existing target, and the
namespace shares the host's filesystem, so missing targets (e.g.
`/var/run/secrets/kubernetes.io/serviceaccount` or an emptyDir's mountPath) are created on
the host as empty directories/files and stay there.

`render_launch_script` is pure; `materialize_volume` and `check_host_path` touch the disk.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from .podspec import ContainerPlan, Mount, SetupError, VolumePlan


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the host tools a container launch needs."""

    unshare: str
    sh: str
    mount: str
    mkdir: str
    setpriv: str | None

    @classmethod
    def discover(cls) -> Tools:
        def need(name: str) -> str:
            found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", ""))
            if not found:
                raise RuntimeError(f"the node agent needs {name!r} (util-linux/coreutils) on PATH")
            return found

        return cls(
            unshare=need("unshare"),
            sh=need("sh"),
            mount=need("mount"),
            mkdir=need("mkdir"),
            setpriv=shutil.which("setpriv"),
        )

    def check_mount_namespaces(self) -> None:
        _check(self)


def _check(tools: Tools) -> None:
    """Fail early and clearly where containers could not start: mounts need root."""
    probe = subprocess.run(
        [tools.unshare, "--mount", "--propagation", "private", "--", tools.sh, "-c", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise RuntimeError(
            "the node agent must run as root: each container gets a private mount namespace "
            f"with bind mounts ({tools.unshare} --mount failed: {probe.stderr.strip() or probe.returncode})"
        )


STAGE_CANDIDATES = ("/run/dsjobs-stage", "/var/lib/dsjobs-stage", "/mnt/dsjobs-stage", "/.dsjobs-stage")


def _covers(target: str, path: str) -> bool:
    return target == "/" or path == target or path.startswith(target.rstrip("/") + "/")


def stage_dir(mounts: tuple[Mount, ...]) -> str:
    """A staging directory that no target covers, so staged sources stay reachable."""
    for candidate in STAGE_CANDIDATES:
        if not any(_covers(m.target, candidate) for m in mounts):
            return candidate
    raise ValueError("every staging directory candidate is covered by a volume mount")


def render_launch_script(
    mounts: tuple[Mount, ...],
    working_dir: str | None,
    tools: Tools,
    run_as: tuple[int, int] | None,
    cgroup_procs: Sequence[str] = (),
) -> str:
    """The /bin/sh program run inside the new mount namespace before exec'ing the container's argv.

    Each source is bound onto its target, in order. When a target covers a source (an emptyDir at
    /tmp hides a node state dir under /tmp, and with it the termination-log file), every source is
    first bound into a private tmpfs and the staged copies are then bound onto their targets.
    Directory or file target is decided at run time by what the source is. Targets usually exist
    already (they stay on the host as placeholders), so they are made only when missing: every
    process started here is CPU that each container start pays.

    With `cgroup_procs` (the `cgroup.procs` files of the container's memory cgroup and its cpuacct
    companion) the shell moves itself into those cgroups first, so everything the container runs is
    under its memory limit and counted as its CPU time.
    """
    q = shlex.quote
    lines = ["set -e"]
    for procs in cgroup_procs:
        lines.append(f"echo $$ > {q(procs)}")
    staged = any(_covers(t.target, m.source) for t in mounts for m in mounts)
    sources = [m.source for m in mounts]
    if staged:
        stage = stage_dir(mounts)
        lines.append(f"{tools.mkdir} -p {q(stage)}")
        lines.append(f"{tools.mount} -t tmpfs -o mode=0700,size=1m dsjobs-stage {q(stage)}")
        for i, m in enumerate(mounts):
            src, copy = q(m.source), q(f"{stage}/{i}")
            lines.append(f"if [ -d {src} ]; then {tools.mkdir} {copy}; else : > {copy}; fi")
            lines.append(f"{tools.mount} --rbind {src} {copy}")
        sources = [f"{stage}/{i}" for i in range(len(mounts))]
    for source, m in zip(sources, mounts, strict=True):
        src, dst = q(source), q(m.target)
        parent = q(posixpath.dirname(m.target) or "/")
        lines.append(
            f"if [ -d {src} ]; then [ -d {dst} ] || {tools.mkdir} -p {dst}; "
            f"elif [ ! -e {dst} ]; then {tools.mkdir} -p {parent}; : > {dst}; fi"
        )
        lines.append(f"{tools.mount} --rbind {src} {dst}")
    # Read-only remounts last: a read-only parent must not stop the creation of a child's target.
    for m in mounts:
        if m.read_only:
            lines.append(f"{tools.mount} -o remount,bind,ro {q(m.target)}")
    if working_dir:
        lines.append(f"[ -d {q(working_dir)} ] || {tools.mkdir} -p {q(working_dir)}")
        lines.append(f"cd {q(working_dir)}")
    if run_as is not None and tools.setpriv:
        uid, gid = run_as
        lines.append(f'exec {tools.setpriv} --reuid={uid} --regid={gid} --clear-groups -- "$@"')
    else:
        lines.append('exec "$@"')
    return "\n".join(lines) + "\n"


def launch_argv(plan: ContainerPlan, tools: Tools, cgroup_procs: Sequence[str] = ()) -> list[str]:
    run_as: tuple[int, int] | None = None
    if plan.run_as_user is not None:
        run_as = (plan.run_as_user, plan.run_as_group if plan.run_as_group is not None else plan.run_as_user)
    script = render_launch_script(plan.mounts, plan.working_dir, tools, run_as, cgroup_procs)
    return [
        tools.unshare,
        "--mount",
        "--propagation",
        "private",
        "--",
        tools.sh,
        "-c",
        script,
        "dsjobs-container",
        *plan.argv,
    ]


def resolve_executable(argv0: str, path_env: str) -> str | None:
    """PATH lookup like execvp, to report a missing binary as a start error (as containerd does)."""
    if "/" in argv0:
        return argv0
    for d in path_env.split(":"):
        candidate = os.path.join(d or ".", argv0)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# ---------------------------------------------------------------------------
# volume content on disk


def check_host_path(path: str, kind: str) -> None:
    """hostPath `type` semantics; creates for DirectoryOrCreate/FileOrCreate."""
    if kind == "DirectoryOrCreate":
        os.makedirs(path, mode=0o755, exist_ok=True)
        return
    if kind == "FileOrCreate":
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        if not os.path.exists(path):
            with open(path, "a"):
                pass
        return
    if not kind:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise SetupError("FailedMount", f"hostPath type check failed: {path} does not exist") from exc
    checks = {
        "Directory": stat.S_ISDIR,
        "File": stat.S_ISREG,
        "Socket": stat.S_ISSOCK,
        "CharDevice": stat.S_ISCHR,
        "BlockDevice": stat.S_ISBLK,
    }
    check = checks.get(kind)
    if check is not None and not check(st.st_mode):
        raise SetupError("FailedMount", f"hostPath type check failed: {path} is not a {kind}")


def materialize_volume(vol: VolumePlan) -> None:
    """Create the volume's host directory and (re)write generated files."""
    if vol.kind == "hostPath":
        check_host_path(vol.host_path, vol.host_path_type or "")
        return
    if vol.kind == "persistentVolumeClaim":
        if not os.path.isdir(vol.host_path):
            # A local PV's directory must exist on the node; a hostPath PV's is created as the
            # hostpath provisioner would.
            os.makedirs(vol.host_path, exist_ok=True)
        return
    os.makedirs(vol.host_path, exist_ok=True)
    if vol.kind == "emptyDir":
        # As the kubelet does: world-writable so non-root containers can use it.
        os.chmod(vol.host_path, 0o777)
        return
    if vol.files is None:
        return
    wanted = set()
    for f in vol.files:
        target = os.path.join(vol.host_path, f.path)
        wanted.add(os.path.normpath(target))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".dsjobs-tmp"
        with open(tmp, "wb") as fh:
            fh.write(f.data)
        os.chmod(tmp, f.mode & 0o7777)
        os.replace(tmp, target)
    # Files that disappeared from the source (a rewrite after a token refresh never
    # removes any, but an optional object that vanished does).
    for root, _dirs, names in os.walk(vol.host_path):
        for n in names:
            p = os.path.normpath(os.path.join(root, n))
            if p not in wanted:
                os.unlink(p)
