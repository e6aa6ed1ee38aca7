"""The memory limit of the cgroup this process runs in (its container's), as far as it can be read."""

from __future__ import annotations

from pathlib import Path

#: A limit this high means none (cgroup v1 writes 2**63 rounded to pages; v2 writes `max`).
_UNLIMITED = 1 << 60


def memory_limit(proc_cgroup: str = "/proc/self/cgroup", cgroup_fs: str = "/sys/fs/cgroup") -> int | None:
    """Bytes, or None when there is no limit or it cannot be read. The cgroup's own file where the
    host's hierarchy is visible (a process-based node), else the mount's root (a container with its
    own cgroup namespace sees its cgroup there)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    fs = Path(cgroup_fs)
    candidates: list[Path] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        path = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # v2
            candidates += [fs / path / "memory.max", fs / "memory.max"]
        elif "memory" in controllers.split(","):  # v1
            candidates += [
                fs / "memory" / path / "memory.limit_in_bytes",
                fs / "memory" / "memory.limit_in_bytes",
            ]
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= _UNLIMITED else value
    return None
