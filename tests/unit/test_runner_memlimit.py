"""The runner's reading of its container's memory limit (cgroup v1 and v2, with and without the
host's hierarchy in view)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsjobs.runner.memlimit import memory_limit


def _fs(tmp: Path, files: dict[str, str], proc: str) -> tuple[str, str]:
    for rel, text in files.items():
        path = tmp / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp / "proc").write_text(proc)
    return str(tmp / "proc"), str(tmp / "cg")


@pytest.mark.parametrize(
    ("files", "proc", "expected"),
    [
        # v2 with a cgroup namespace: the container's cgroup is the mount's root.
        ({"memory.max": "536870912\n"}, "0::/\n", 512 * 2**20),
        ({"memory.max": "max\n"}, "0::/\n", None),
        # v2, the host's hierarchy in view (a process-based node): the cgroup's own file wins.
        (
            {"kubepods/pod1/c1/memory.max": "1073741824\n", "memory.max": "max\n"},
            "0::/kubepods/pod1/c1\n",
            2**30,
        ),
        # v1 (and a hybrid's empty v2 line after it).
        (
            {"memory/dsjobs-c1/memory.limit_in_bytes": "268435456\n"},
            "4:memory:/dsjobs-c1\n0::/\n",
            256 * 2**20,
        ),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, "4:memory:/x\n", None),  # v1 "none"
        ({}, "0::/\n", None),  # nothing readable
    ],
)
def test_memory_limit(tmp_path: Path, files: dict[str, str], proc: str, expected: int | None) -> None:
    proc_path, fs = _fs(tmp_path, files, proc)
    assert memory_limit(proc_path, fs) == expected


def test_no_proc_file_means_no_limit_known(tmp_path: Path) -> None:
    assert memory_limit(str(tmp_path / "missing"), str(tmp_path)) is None
