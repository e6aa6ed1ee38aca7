"""`down` ends what a killed node agent left: its containers' process groups and memory cgroups.

Real processes; a plain directory stands in for the cgroup mount (an empty cgroup is removed with
rmdir, a busy one refuses it as a non-empty directory does)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

from dsjobs.devcluster.node.cgroup import cgroup_name, node_cgroup_name
from dsjobs.devcluster.node.leftovers import end_leftovers, kill_recorded_processes
from dsjobs.devcluster.node.runtime import proc_start_ticks


def _container(state_dir: Path, pod: str, uid: str = "", **records: dict[str, object]) -> Path:
    d = state_dir / "pods" / pod
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"uid": uid, "containers": records}))
    return d / "state.json"


def _group_of_two() -> subprocess.Popen[bytes]:
    # A leader and a child of it: the whole group goes, as a container's does.
    return subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)


def _end(p: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # each test process leads its own group
    p.wait()


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
            _end(p)


def _node(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A node's state directory, the stand-in cgroup mount and the node's cgroup root in it."""
    state = tmp_path / "nodes" / name
    state.mkdir(parents=True)
    mount = tmp_path / "memory"
    return state, mount, mount / node_cgroup_name(name, str(state))


def _escapee() -> subprocess.Popen[bytes]:
    # In a session of its own, as the runner starts the job's program: no group kill reaches it.
    return subprocess.Popen(["sleep", "600"], start_new_session=True)


def test_a_program_that_left_the_group_is_found_in_the_container_cgroup(tmp_path: Path) -> None:
    state, mount, root = _node(tmp_path, "gpu-0")
    leader, program, other = _group_of_two(), _escapee(), _escapee()
    try:
        record = {"pid": leader.pid, "start_ticks": proc_start_ticks(leader.pid), "restart_count": 1}
        state_json = json.loads(_container(state, "ns_job-1_uid1", "uid1", job=record).read_text())
        instance = root / cgroup_name("uid1", "job", 1)
        instance.mkdir(parents=True)
        (instance / "cgroup.procs").write_text(f"{leader.pid}\n{program.pid}\n")

        # Without the cgroup root only the group goes (a host without memory cgroups).
        assert kill_recorded_processes(state_json) == 1
        assert leader.wait(timeout=10) == -9 and program.poll() is None
        # With it, the program too (the leader is gone: its pid is not trusted any more).
        assert kill_recorded_processes(state_json, str(root)) == 1
        assert program.wait(timeout=10) == -9
        assert other.poll() is None  # in no cgroup of this node

        (instance / "cgroup.procs").unlink()  # the kernel empties it once the processes are reaped
        end_leftovers("gpu-0", str(state), mount=str(mount))
        assert not root.exists()
    finally:
        for p in (leader, program, other):
            _end(p)


def test_down_kills_whatever_is_in_the_node_cgroups(tmp_path: Path) -> None:
    state, mount, root = _node(tmp_path, "cpu-0")
    instance = root / "uid9-job-0"
    instance.mkdir(parents=True)
    program = _escapee()
    try:
        (instance / "cgroup.procs").write_text(f"{program.pid}\n")
        assert end_leftovers("cpu-0", str(state), timeout=0.2, mount=str(mount)) == 1  # no state.json
        assert program.wait(timeout=10) == -9
    finally:
        _end(program)


def test_the_node_memory_cgroups_go_once_empty(tmp_path: Path) -> None:
    state, mount, root = _node(tmp_path, "gpu-0")
    (root / "uid1-job-0").mkdir(parents=True)
    (root / "uid2-job-0").mkdir()
    other = mount / node_cgroup_name("gpu-0", str(tmp_path / "another-clone"))
    other.mkdir()  # the same node name of another cluster on this machine: not ours

    end_leftovers("gpu-0", str(state), mount=str(mount))
    assert not root.exists()
    assert other.is_dir()


def test_a_cgroup_that_stays_busy_is_left_after_the_timeout(tmp_path: Path) -> None:
    state, mount, root = _node(tmp_path, "cpu-1")
    busy = root / "uid1-job-0"
    busy.mkdir(parents=True)
    (busy / "tasks").write_text("")  # rmdir fails, as on a cgroup whose process cannot be killed

    end_leftovers("cpu-1", str(state), timeout=0.3, mount=str(mount))
    assert busy.is_dir()
