"""Memory limits enforced by the kernel: one memory cgroup per container instance.

A kubelet puts each container in a cgroup whose memory limit is the container's
`resources.limits.memory`; the kernel's OOM killer ends a container that outgrows it and the
runtime reports the container as terminated with reason `OOMKilled`. The node agent does the same
where the cgroup v1 memory controller is mounted and writable (as root on a host with v1 or
hybrid cgroups): `<mount>/dsjobs-node-<node>-<id>/<pod uid>-<container>-<restart count>` with
`memory.limit_in_bytes`, and the cgroup's OOM kill count read from `memory.oom_control` when the
container exits. Elsewhere (cgroup v2 only, no root) limits stay recorded only, as before
(docs/local-cluster.md).

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
    """This node's parent cgroup; one child per running container instance."""

    root: str

    @classmethod
    def discover(cls, node: str, state_dir: str, mount: str = V1_MEMORY_MOUNT) -> MemoryCgroups | None:
        """The node's parent cgroup when this host lets the agent make memory cgroups, else None.

        Named after the node and its state directory: two clusters on one machine (a CI clone
        beside a working copy) both have a node `cpu-0`, and must not clean up each other's.
        """
        if not os.path.isfile(os.path.join(mount, "memory.limit_in_bytes")):
            return None
        root = os.path.join(mount, node_cgroup_name(node, state_dir))
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            log.info("memory limits are recorded only: cannot create %s: %s", root, exc)
            return None
        cgroups = cls(root)
        cgroups.remove_stale()
        return cgroups

    def create(self, name: str, limit_bytes: int) -> str | None:
        """A fresh cgroup limited to `limit_bytes`; its `cgroup.procs` path, or None on failure."""
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
        return os.path.join(path, "cgroup.procs")

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
        """Remove a container's cgroup (it must hold no process any more). True when gone."""
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
        """At the agent's exit: its parent cgroup, when its containers' are gone."""
        self.remove_stale()
        self.remove(self.root)

    def remove_stale(self) -> None:
        """Empty cgroups left by an agent that was killed (busy ones belong to live processes)."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.is_dir(follow_symlinks=False):
                    self.remove(entry.path)
