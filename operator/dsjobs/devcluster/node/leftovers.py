"""What a node agent that died without stopping its pods leaves on the host, and ending it.

A SIGKILLed agent cannot stop its containers: their process groups live on, as a dead kubelet's
containers do, and so do their memory cgroups. An agent restarted on the same state directory ends
them (`agent.on_pod`, `_cleanup_orphan_dirs`); the cluster's `down` ends them when none comes back,
so a test run or a demo leaves no process behind. Only groups whose leader is still the process the
agent recorded (pid and start time) are killed: a reused pid is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

from .cgroup import V1_CPUACCT_MOUNT, V1_MEMORY_MOUNT, MemoryCgroups, cgroup_name, node_cgroup_name
from .podspec import Obj
from .runtime import kill_group, proc_start_ticks


def read_state(path: str) -> Obj | None:
    try:
        with open(path) as fh:
            data: Obj = json.load(fh)
            return data
    except (OSError, ValueError):
        return None


def kill_cgroup(path: str) -> int:
    """SIGKILL every process in a container's memory cgroup: the processes that left the
    container's process group (the runner starts the job's program with setsid) too."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as fh:
            pids = fh.read().split()
    except OSError:
        return 0
    killed = 0
    for pid in pids:
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
            killed += 1
    return killed


def kill_recorded_processes(state: Obj | None, cgroups: str | None = None) -> int:
    """Kill what a previous agent's running containers left behind: each process group whose
    leader is still the recorded process, and, given the node's cgroup root, whatever is in the
    container's memory cgroup. Returns the containers that had something to kill."""
    killed = 0
    uid = str((state or {}).get("uid") or "")
    for name, rec in ((state or {}).get("containers") or {}).items():
        pid, ticks = rec.get("pid"), rec.get("start_ticks")
        hit = bool(
            pid
            and ticks is not None
            and proc_start_ticks(int(pid)) == int(ticks)
            and kill_group(int(pid), signal.SIGKILL)
        )
        if cgroups and uid and pid:
            instance = cgroup_name(uid, str(name), int(rec.get("restart_count") or 0))
            hit = kill_cgroup(os.path.join(cgroups, instance)) > 0 or hit
        killed += hit
    return killed


def end_leftovers(
    node: str,
    state_dir: str,
    timeout: float = 10.0,
    mount: str = V1_MEMORY_MOUNT,
    cpu_mount: str = V1_CPUACCT_MOUNT,
) -> int:
    """Kill the container process groups recorded under `state_dir` and every process in the
    node's memory cgroups, then remove those cgroups and their cpuacct companions (they empty
    once the killed processes are reaped). Returns the containers that had something to kill."""
    pods = os.path.join(state_dir, "pods")
    killed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(pods):
            killed += kill_recorded_processes(read_state(os.path.join(entry.path, "state.json")))
    name = node_cgroup_name(node, state_dir)
    root = os.path.join(mount, name)
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False):
                killed += kill_cgroup(entry.path) > 0
    roots = (root, os.path.join(cpu_mount, name))
    cgroups = MemoryCgroups(*roots)
    deadline = time.monotonic() + timeout
    while True:
        cgroups.close()
        if not any(os.path.isdir(r) for r in roots) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return killed
