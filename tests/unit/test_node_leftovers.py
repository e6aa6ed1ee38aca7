"""`down` ends what a killed node agent left: its containers' process groups and memory cgroups.

Real processes; a plain directory stands in for the cgroup mount (an empty cgroup is removed with
rmdir, a busy one refuses it as a non-empty directory does)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dsjobs.devcluster.node.cgroup import node_cgroup_name
from dsjobs.devcluster.node.leftovers import end_leftovers
from dsjobs.devcluster.node.runtime import proc_start_ticks


def _container(state_dir: Path, pod: str, **records: dict[str, object]) -> None:
    d = state_dir / "pods" / pod
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"containers": records}))


def _group_of_two() -> subprocess.Popen[bytes]:
    # A leader and a child of it: the whole group goes, as a container's does.
    return subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)


def test_recorded_groups_are_killed_and_a_reused_pid_is_spared(tmp_path: Path) -> None:
    state = tmp_path / "nodes" / "cpu-0"
    left, reused = _group_of_two(), _group_of_two()
    try:
        ticks = proc_start_ticks(left.pid)
        _container(state, "ns_job-1_uid1", job={"pid": left.pid, "start_ticks": ticks, "state": "running"})
        # Same pid number, another start time: not the process the agent started.
        _container(state, "ns_job-2_uid2", job={"pid": reused.pid, "start_ticks": 1, "state": "running"})
        _container(state, "ns_job-3_uid3", job={"state": "waiting"})  # never started
        (state / "pods" / "broken_uid4").mkdir()  # no state.json

        assert end_leftovers("cpu-0", str(state), mount=str(tmp_path / "no-cgroups")) == 1
        assert left.wait(timeout=10) == -9
        assert reused.poll() is None
    finally:
        for p in (left, reused):
            p.kill()
            p.wait()


def test_the_node_memory_cgroups_go_once_empty(tmp_path: Path) -> None:
    state = tmp_path / "nodes" / "gpu-0"
    state.mkdir(parents=True)
    mount = tmp_path / "memory"
    root = mount / node_cgroup_name("gpu-0", str(state))
    (root / "uid1-job-0").mkdir(parents=True)
    (root / "uid2-job-0").mkdir()
    other = mount / node_cgroup_name("gpu-0", str(tmp_path / "another-clone"))
    other.mkdir()  # the same node name of another cluster on this machine: not ours

    end_leftovers("gpu-0", str(state), mount=str(mount))
    assert not root.exists()
    assert other.is_dir()


def test_a_cgroup_that_stays_busy_is_left_after_the_timeout(tmp_path: Path) -> None:
    state = tmp_path / "nodes" / "cpu-1"
    state.mkdir(parents=True)
    mount = tmp_path / "memory"
    busy = mount / node_cgroup_name("cpu-1", str(state)) / "uid1-job-0"
    busy.mkdir(parents=True)
    (busy / "cgroup.procs").write_text("4242\n")  # a process that escaped its group

    end_leftovers("cpu-1", str(state), timeout=0.3, mount=str(mount))
    assert busy.is_dir()
