"""Memory limits enforced by the kernel: one memory cgroup per container instance (and a cpuacct
cgroup beside it, for its CPU time).

A kubelet puts each container in a cgroup whose memory limit is the container's
`resources.limits.memory`; the kernel's OOM killer ends a container that outgrows it and the
runtime reports the container as terminated with reason `OOMKilled`. The node agent does the same
where the cgroup v1 memory controller is mounted and writable (as root on a host with v1 or
hybrid cgroups): `<mount>/dsjobs-node-<node>-<id>/<pod uid>-<container>-<restart count>` with
`memory.limit_in_bytes`, and the cgroup's OOM kill count read from `memory.oom_control` when the
container exits. Elsewhere (cgroup v2 only, no root) limits stay recorded only, as before
(docs/local-cluster.md). Where the v1 cpuacct controller is writable too, the container also gets
a cgroup of the same name there: a container's own CPU time, as a kubelet's container has it (the
job's entry script reads it for docker_stats.tsv); nothing is limited by it.

`parse_oom_kills`, `memory_limit_bytes`, `node_cgroup_name` and `cgroup_name` are pure;
`MemoryCgroups` touches the cgroup filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .quantity import QuantityError, parse_quantity

log = logging.getLogger(__name__)

V1_MEMORY_MOUNT: Final = "/sys/fs/cgroup/memory"
V1_CPUACCT_MOUNT: Final = "/sys/fs/cgroup/cpuacct"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def memory_limit_bytes(resources: Mapping[str, Any]) -> int | None:
    """`limits.memory` in bytes (rounded up, as the kubelet does), or None without a limit."""
    value = (resources.get("limits") or {}).get("memory")
    if value is None:
        return None
    try:
        limit = math.ceil(parse_quantity(str(value)))
    except QuantityError:
        return None
    return limit if limit > 0 else None


def parse_oom_kills(oom_control: str) -> int:
    """The `oom_kill` counter of a v1 `memory.oom_control` file (0 when the kernel has none)."""
    for line in oom_control.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def node_cgroup_name(node: str, state_dir: str) -> str:
    """The parent cgroup of one node agent's containers."""
    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:10]
    return f"dsjobs-node-{_UNSAFE.sub('_', node)}-{digest}"


def cgroup_name(pod_uid: str, container: str, instance: int) -> str:
    """One directory per instance of a container (a restarted one must not inherit the previous
    instance's OOM kill count, nor wait for its cgroup to empty)."""
    return _UNSAFE.sub("_", f"{pod_uid}-{container}-{instance}")


@dataclass(frozen=True)
class MemoryCgroups:
    """This node's parent cgroup; one child per running container instance. With `cpu_root`, a
    child of the same name under the cpuacct controller too (accounting only)."""

    root: str
    cpu_root: str | None = None

    @classmethod
    def discover(
        cls,
        node: str,
        state_dir: str,
        mount: str = V1_MEMORY_MOUNT,
        cpu_mount: str = V1_CPUACCT_MOUNT,
    ) -> MemoryCgroups | None:
        """The node's parent cgroup when this host lets the agent make memory cgroups, else None.

        Named after the node and its state directory: two clusters on one machine (a CI clone
        beside a working copy) both have a node `cpu-0`, and must not clean up each other's.
        """
        if not os.path.isfile(os.path.join(mount, "memory.limit_in_bytes")):
            return None
        name = node_cgroup_name(node, state_dir)
        root = os.path.join(mount, name)
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            log.info("memory limits are recorded only: cannot create %s: %s", root, exc)
            return None
        cpu_root: str | None = None
        if os.path.isfile(os.path.join(cpu_mount, "cpuacct.usage")):
            wanted = os.path.join(cpu_mount, name)
            try:
                os.makedirs(wanted, exist_ok=True)
                cpu_root = wanted
            except OSError as exc:
                log.info("no CPU accounting per container: cannot create %s: %s", wanted, exc)
        cgroups = cls(root, cpu_root)
        cgroups.remove_stale()
        return cgroups

    def create(self, name: str, limit_bytes: int) -> str | None:
        """A fresh cgroup limited to `limit_bytes`; its `cgroup.procs` path, or None on failure.
        Its cpuacct companion (`companions`) is made too where the node has `cpu_root`."""
        path = os.path.join(self.root, name)
        self.remove(path)  # a previous instance of the same container
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "memory.limit_in_bytes"), "w") as fh:
                fh.write(str(limit_bytes))
        except OSError as exc:
            log.warning("no memory cgroup for %s: %s (its limit is not enforced)", name, exc)
            self.remove(path)
            return None
        if self.cpu_root is not None:
            cpu = os.path.join(self.cpu_root, name)
            self.remove(cpu)
            try:
                os.makedirs(cpu, exist_ok=True)
            except OSError as exc:
                log.info("no CPU accounting for %s: %s", name, exc)
        return os.path.join(path, "cgroup.procs")

    def companions(self, procs: str) -> list[str]:
        """The `cgroup.procs` files a container joins: its memory cgroup's, and its cpuacct one's
        where that exists."""
        cpu = self._cpu_companion(procs)
        return [procs, os.path.join(cpu, "cgroup.procs")] if cpu and os.path.isdir(cpu) else [procs]

    def remove_instance(self, procs: str) -> bool:
        """Remove a container's cgroups (they must hold no process any more). True when gone."""
        gone = self.remove(procs)
        cpu = self._cpu_companion(procs)
        if cpu is not None:
            gone = self.remove(cpu) and gone  # both, whatever the first gave
        return gone

    def _cpu_companion(self, procs: str) -> str | None:
        """The cpuacct cgroup of the container whose memory cgroup holds `procs` (None: no cpuacct)."""
        if self.cpu_root is None:
            return None
        return os.path.join(self.cpu_root, os.path.basename(os.path.dirname(procs)))

    @staticmethod
    def oom_killed(procs: str) -> bool:
        """True when the kernel's OOM killer killed a process of this cgroup."""
        try:
            with open(os.path.join(os.path.dirname(procs), "memory.oom_control")) as fh:
                return parse_oom_kills(fh.read()) > 0
        except OSError:
            return False

    @staticmethod
    def remove(path_or_procs: str) -> bool:
        """Remove one cgroup directory (it must hold no process any more). True when gone."""
        path = path_or_procs
        if os.path.basename(path) == "cgroup.procs":
            path = os.path.dirname(path)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def close(self) -> None:
        """At the agent's exit: its parent cgroups, when its containers' are gone."""
        self.remove_stale()
        self.remove(self.root)
        if self.cpu_root is not None:
            self.remove(self.cpu_root)

    def remove_stale(self) -> None:
        """Empty cgroups left by an agent that was killed (busy ones belong to live processes)."""
        for root in (self.root, self.cpu_root):
            if root is None:
                continue
            with contextlib.suppress(OSError):
                for entry in os.scandir(root):
                    if entry.is_dir(follow_symlinks=False):
                        self.remove(entry.path)
