"""The dev cluster's record of an `up`: one that did not finish is never taken for a cluster, and
SIGTERM to `up` stops what it started. Stand-in processes (`sleep`), no Kubernetes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dsjobs.devcluster import ClusterPaths, cluster, procs, status, up
from dsjobs.devcluster.procs import Component, Record

OPERATOR_DIR = Path(cluster.__file__).resolve().parents[2]


@pytest.fixture
def spawned() -> Iterator[list[Component]]:
    """Every stand-in a test starts, killed at the end whatever happened."""
    started: list[Component] = []
    yield started
    for c in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.pgid, signal.SIGKILL)


def sleeper(paths: ClusterPaths, name: str, spawned: list[Component]) -> Component:
    comp = procs.spawn(name, ["sleep", "300"], paths.log(name))
    spawned.append(comp)
    return comp


def recorded(paths: ClusterPaths, names: Sequence[str], spawned: list[Component], **info: Any) -> Record:
    paths.cluster.mkdir(parents=True)
    rec = Record(info={"root": str(paths.root), "nodes": ["cpu-0"], **info})
    rec.components = [sleeper(paths, n, spawned) for n in names]
    rec.save(paths.pids)
    return rec


@pytest.fixture
def fake_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spawned: list[Component]) -> list[str]:
    """`up` without binaries: the start sequence spawns one stand-in."""
    calls: list[str] = []

    def start_all(launch: Any, bin_dir: Path, topology: Sequence[Any], timeout: float) -> None:
        calls.append(str(bin_dir))
        spawned.append(launch.spawn("etcd", ["sleep", "300"], ports={}))

    monkeypatch.setattr(cluster.bins, "ensure_bin_dir", lambda build=True: tmp_path / "bin")
    monkeypatch.setattr(cluster, "_start_all", start_all)
    return calls


HALF = ("s3", "etcd")  # what an `up` killed before the API server had recorded
FULL = ("s3", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-cpu-0")


@pytest.mark.parametrize("mark", [{"complete": False}, {}], ids=["unfinished", "older-record"])
def test_an_interrupted_up_is_torn_down_and_started_again(
    tmp_path: Path, spawned: list[Component], fake_start: list[str], mark: dict[str, Any]
) -> None:
    paths = ClusterPaths.at(tmp_path / "dev")
    old = recorded(paths, HALF, spawned, **mark)
    assert all(procs.is_running(c) for c in old.components)
    assert not status(paths).all_running  # the e2e fixture then runs `up`

    record, started = up(paths, with_nodes=False)

    assert started and fake_start
    assert not any(procs.is_running(c) for c in old.components)
    assert [c.name for c in record.components] == ["etcd"]
    assert Record.load(paths.pids) == record and record.info["complete"] is True
    st = status(paths)
    assert st.complete and st.all_running


@pytest.mark.parametrize("mark", [{"complete": True}, {}], ids=["finished", "older-record"])
def test_a_complete_running_cluster_is_left_alone(
    tmp_path: Path, spawned: list[Component], fake_start: list[str], mark: dict[str, Any]
) -> None:
    paths = ClusterPaths.at(tmp_path / "dev")
    old = recorded(paths, FULL, spawned, **mark)
    assert status(paths).all_running

    record, started = up(paths, with_nodes=False)

    assert not started and not fake_start
    assert record == old and all(procs.is_running(c) for c in old.components)


def test_a_failed_start_sequence_leaves_no_record(
    tmp_path: Path, spawned: list[Component], fake_start: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def start_all(launch: Any, *_: Any) -> None:
        spawned.append(launch.spawn("etcd", ["sleep", "300"], ports={}))
        assert Record.load(launch.paths.pids).info["complete"] is False  # type: ignore[union-attr]
        raise SystemExit(143)  # what the SIGTERM handler raises

    monkeypatch.setattr(cluster, "_start_all", start_all)
    paths = ClusterPaths.at(tmp_path / "dev")
    with pytest.raises(SystemExit):  # not turned into a ClusterError: the exit status stays 143
        up(paths, with_nodes=False)
    assert Record.load(paths.pids) is None
    assert not procs.is_running(spawned[0])


def test_a_sigterm_during_the_teardown_of_a_failed_up_waits_for_its_end(
    tmp_path: Path, spawned: list[Component], fake_start: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def start_all(launch: Any, *_: Any) -> None:
        spawned.append(launch.spawn("etcd", ["sleep", "300"], ports={}))
        spawned.append(launch.spawn("kube-apiserver", ["sleep", "300"], ports={}))
        raise cluster.ClusterError("kube-apiserver not ready")

    real_teardown = cluster._teardown

    def teardown(paths: ClusterPaths, record: Record) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # CI's timeout, right when the teardown begins
        real_teardown(paths, record)

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # as `python -m dsjobs.devcluster` handles it

    monkeypatch.setattr(cluster, "_start_all", start_all)
    monkeypatch.setattr(cluster, "_teardown", teardown)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with pytest.raises(SystemExit):  # delivered, once the teardown is done
            up(ClusterPaths.at(tmp_path / "dev"), with_nodes=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not any(procs.is_running(c) for c in spawned)


def fake_binaries(directory: Path) -> Path:
    directory.mkdir()
    for name in cluster.bins.REQUIRED:
        exe = directory / name
        exe.write_text("#!/bin/sh\nexec sleep 300\n")
        exe.chmod(0o755)
    return directory


def test_sigterm_to_up_stops_what_it_started(tmp_path: Path) -> None:
    """CI's timeout SIGTERMs the job's process group; the cluster's processes, in sessions of
    their own, are not in it. `up` must stop them itself."""
    paths = ClusterPaths.at(tmp_path / "dev")
    env = {
        **os.environ,
        "DSJOBS_K8S_BIN_DIR": str(fake_binaries(tmp_path / "bin")),
        "PYTHONPATH": os.pathsep.join(p for p in (str(OPERATOR_DIR), os.environ.get("PYTHONPATH")) if p),
    }
    argv = [sys.executable, "-m", "dsjobs.devcluster", "--dir", str(paths.root), "up", "--no-nodes"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[Component] = []
    try:
        # The stand-in etcd never answers: `up` waits for it (30 s) with three processes started.
        deadline = time.monotonic() + 30
        while len(seen) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
            with contextlib.suppress(ValueError):  # caught mid-write
                seen = (Record.load(paths.pids) or Record()).components
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 128 + signal.SIGTERM, out
        assert not [c.name for c in seen if procs.is_running(c)], out
        assert Record.load(paths.pids) is None
    finally:
        proc.kill()
        proc.wait()
        for c in seen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pgid, signal.SIGKILL)


def test_a_cluster_whose_processes_all_died_is_torn_down_and_started_again(
    tmp_path: Path, spawned: list[Component], fake_start: list[str]
) -> None:
    # After a reboot or `kill -9` of the whole stack, `up` (and so every e2e run) refused, naming a
    # command that did not parse; only `make down` by hand let the next run start.
    paths = ClusterPaths.at(tmp_path / "dev")
    old = recorded(paths, FULL, spawned)
    for c in old.components:
        os.killpg(c.pgid, signal.SIGKILL)
    for c in old.components:
        poll_gone(c)
    record, started = up(paths, with_nodes=False)
    assert started and fake_start and [c.name for c in record.components] == ["etcd"]


def test_a_cluster_with_some_processes_dead_names_the_way_out(
    tmp_path: Path, spawned: list[Component], fake_start: list[str]
) -> None:
    paths = ClusterPaths.at(tmp_path / "dev")
    old = recorded(paths, FULL, spawned)
    apiserver = old.find("kube-apiserver")
    assert apiserver is not None
    os.killpg(apiserver.pgid, signal.SIGKILL)
    poll_gone(apiserver)
    with pytest.raises(cluster.ClusterError) as err:
        up(paths, with_nodes=False)
    assert "kube-apiserver not running" in str(err.value) and not fake_start
    assert f"run `make down` (python -m dsjobs.devcluster --dir {paths.root} down) first" in str(err.value)


@pytest.mark.parametrize("text", ["", '{"format": 1, "comp'], ids=["empty", "cut-short"])
def test_an_unreadable_record_is_no_record_to_down_and_up(
    tmp_path: Path, fake_start: list[str], text: str
) -> None:
    # A traceback from `status`, `up` and `down` alike: the documented way out failed too.
    paths = ClusterPaths.at(tmp_path / "dev")
    paths.cluster.mkdir(parents=True)
    paths.pids.write_text(text)
    assert Record.load(paths.pids) is None
    assert cluster.down(paths) is None and not paths.cluster.exists()
    paths.cluster.mkdir(parents=True)
    paths.pids.write_text(text)
    _record, started = up(paths, with_nodes=False)
    assert started


def poll_gone(c: Component) -> None:
    deadline = time.monotonic() + 10
    while procs.is_running(c):
        assert time.monotonic() < deadline, f"{c.name} still runs"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("script", "told"), [("exit 3", "exit code 3"), ("kill -SEGV $$", "killed by SIGSEGV")]
)
def test_a_component_that_ends_at_once_is_told_how(
    tmp_path: Path, spawned: list[Component], script: str, told: str
) -> None:
    # A truncated cached etcd segfaulted at once: "etcd /health: the process exited" and an empty
    # log tail were all the user got.
    paths = ClusterPaths.at(tmp_path / "dev")
    comp = procs.spawn("etcd", ["sh", "-c", script], paths.log("etcd"))
    spawned.append(comp)
    launch = cluster._Launch(paths, Record())
    with pytest.raises(cluster.ClusterError) as err:
        launch.wait(comp, "etcd /health", lambda: False, 10)
    assert str(err.value).startswith(f"etcd /health: the process exited ({told}); last lines of "), err.value
