"""The node agent's memory cgroups: the pure parts (the kernel's part runs in tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsjobs.devcluster.node.cgroup import (
    MemoryCgroups,
    cgroup_name,
    memory_limit_bytes,
    node_cgroup_name,
    parse_oom_kills,
)


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"limits": {"memory": "64Mi"}}, 64 * 2**20),
        ({"limits": {"memory": "1G"}}, 10**9),
        ({"limits": {"memory": "1.5Ki"}}, 1536),
        ({"limits": {"memory": "100m"}}, 1),  # a fraction of a byte rounds up, as the kubelet does
        ({"limits": {"cpu": "1"}, "requests": {"memory": "1Gi"}}, None),  # a request limits nothing
        ({}, None),
        ({"limits": {"memory": "0"}}, None),
        ({"limits": {"memory": "lots"}}, None),
    ],
)
def test_memory_limit_bytes(resources: dict[str, dict[str, str]], expected: int | None) -> None:
    assert memory_limit_bytes(resources) == expected


def test_parse_oom_kills() -> None:
    assert parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n") == 2
    assert parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n") == 0
    # Kernels before 4.13 have no counter: no OOM kill can be told.
    assert parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n") == 0
    assert parse_oom_kills("") == 0


def test_names() -> None:
    assert cgroup_name("3f0c-11", "job", 0) == "3f0c-11-job-0"
    assert cgroup_name("3f0c-11", "job", 1) == "3f0c-11-job-1"  # a restarted instance: a new cgroup
    assert cgroup_name("u/1", "a b", 0) == "u_1-a_b-0"
    a, b = (
        node_cgroup_name("cpu-0", "/work/main/.dev/nodes/cpu-0"),
        node_cgroup_name("cpu-0", "/tmp/ci/.dev/nodes/cpu-0"),
    )
    # Two clusters on one machine both have a node cpu-0: their parents differ.
    assert a.startswith("dsjobs-node-cpu-0-") and b.startswith("dsjobs-node-cpu-0-") and a != b
    assert node_cgroup_name("cpu-0", "/work/main/.dev/nodes/cpu-0") == a


def _fake_mounts(tmp: Path) -> tuple[Path, Path]:
    """Directories standing in for the v1 memory and cpuacct mounts (rmdir of an empty directory
    is what the kernel's cgroupfs does with an empty cgroup)."""
    memory, cpu = tmp / "memory", tmp / "cpuacct"
    memory.mkdir()
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    cpu.mkdir()
    (cpu / "cpuacct.usage").write_text("0\n")
    return memory, cpu


def test_a_container_gets_a_cpuacct_cgroup_beside_its_memory_cgroup(tmp_path: Path) -> None:
    memory, cpu = _fake_mounts(tmp_path)
    cgroups = MemoryCgroups.discover("cpu-0", "/state", mount=str(memory), cpu_mount=str(cpu))
    assert cgroups is not None and cgroups.cpu_root == str(cpu / node_cgroup_name("cpu-0", "/state"))
    procs = cgroups.create("u1-job-0", 2**30)
    assert procs == str(memory / node_cgroup_name("cpu-0", "/state") / "u1-job-0" / "cgroup.procs")
    assert (Path(procs).parent / "memory.limit_in_bytes").read_text() == str(2**30)
    joins = cgroups.companions(procs)
    assert joins == [procs, str(Path(cgroups.cpu_root) / "u1-job-0" / "cgroup.procs")]
    # The kernel's cgroupfs removes a cgroup with its files; a plain directory needs them gone.
    (Path(procs).parent / "memory.limit_in_bytes").unlink()
    assert cgroups.remove_instance(procs)
    assert not Path(procs).parent.exists() and not (Path(cgroups.cpu_root) / "u1-job-0").exists()
    cgroups.close()
    assert list(memory.iterdir()) == [memory / "memory.limit_in_bytes"]
    assert list(cpu.iterdir()) == [cpu / "cpuacct.usage"]


def test_without_cpuacct_a_container_joins_its_memory_cgroup_only(tmp_path: Path) -> None:
    memory, _ = _fake_mounts(tmp_path)
    cgroups = MemoryCgroups.discover("cpu-0", "/state", mount=str(memory), cpu_mount=str(tmp_path / "none"))
    assert cgroups is not None and cgroups.cpu_root is None
    procs = cgroups.create("u1-job-0", 2**30)
    assert procs is not None and cgroups.companions(procs) == [procs]
    (Path(procs).parent / "memory.limit_in_bytes").unlink()
    assert cgroups.remove_instance(procs)
