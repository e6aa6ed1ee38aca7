"""The local stack's loopback ports: kept when free, moved when taken, rewritten everywhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsjobs.devcluster import ClusterPaths
from dsjobs.devcluster.procs import Component, Record, reserve_ports, start_time
from dsjobs.localstack import (
    PORT_SETTINGS,
    PORTS_REGISTRY,
    StackError,
    any_loopback_port,
    choose_ports,
    loopback_port_free,
    overlay_ports,
    stack_ports,
    with_ports,
)

WANTED = {"DSJOBS_API_LISTEN": 17090, "DSJOBS_METRICS_PORT": 17081}


def handed_out(*ports: int) -> Iterator[int]:
    yield from ports


def no_port() -> int:
    raise AssertionError("no port should have been asked for")


def test_free_wanted_ports_are_kept() -> None:
    assert choose_ports(WANTED, None, lambda p: True, no_port) == WANTED


def test_a_taken_port_is_replaced_by_one_nobody_wants() -> None:
    system = handed_out(17081, 17090, 40001)  # the system may hand out a wanted port: skipped
    chosen = choose_ports(WANTED, None, lambda p: p != 17090, lambda: next(system))
    assert chosen == {"DSJOBS_API_LISTEN": 40001, "DSJOBS_METRICS_PORT": 17081}


def test_recorded_ports_win_while_the_cluster_lives() -> None:
    recorded = {"DSJOBS_API_LISTEN": 40001, "DSJOBS_METRICS_PORT": 40002}
    # Our own stack holds them now: that must not move them (no rollout on a second `up`).
    assert choose_ports(WANTED, recorded, lambda p: False, no_port) == recorded
    # A record of other settings (an older overlay) is chosen afresh.
    assert choose_ports(WANTED, {"X": 1}, lambda p: True, no_port) == WANTED


def test_ports_another_live_cluster_holds_are_never_chosen() -> None:
    # Free now (their pods have not bound them yet), but another stack chose them.
    system = handed_out(17090, 40001, 40002)
    chosen = choose_ports(WANTED, None, lambda p: True, lambda: next(system), held={17090, 40001})
    assert chosen == {"DSJOBS_API_LISTEN": 40002, "DSJOBS_METRICS_PORT": 17081}
    # Our own record gives way for a held port only; the rest stays put (no rollout for them).
    recorded = {"DSJOBS_API_LISTEN": 40001, "DSJOBS_METRICS_PORT": 40002}
    chosen = choose_ports(WANTED, recorded, lambda p: p != 17090, lambda: 40003, held={40001})
    assert chosen == {"DSJOBS_API_LISTEN": 40003, "DSJOBS_METRICS_PORT": 40002}


def cluster(root: Path, *, alive: bool = True) -> ClusterPaths:
    """A dev cluster whose one recorded process is this test (or a process that is gone)."""
    paths = ClusterPaths.at(root)
    pid = os.getpid()
    started = start_time(pid) if alive else -1
    assert started is not None
    Record([Component("etcd", pid, pid, started, ["etcd"], str(paths.log("etcd")))]).save(paths.pids)
    return paths


@pytest.fixture
def settings() -> dict[str, str]:
    """The overlay's four port settings, on ports free on this machine."""
    with reserve_ports(len(PORT_SETTINGS)) as ports:
        return {name: f"127.0.0.1:{port}" for name, port in zip(PORT_SETTINGS, ports, strict=True)}


def test_two_live_clusters_never_share_a_port(tmp_path: Path, settings: dict[str, str]) -> None:
    registry = tmp_path / "cache"
    a, b = cluster(tmp_path / "a"), cluster(tmp_path / "b")
    ports_a = stack_ports(a, settings, registry)  # A's pods bind them only minutes later
    ports_b = stack_ports(b, settings, registry)
    assert ports_a == overlay_ports(settings)
    assert not set(ports_a.values()) & set(ports_b.values())
    assert stack_ports(a, settings, registry) == ports_a  # kept on A's next `up`
    assert json.loads((registry / PORTS_REGISTRY).read_text()) == sorted(
        os.path.realpath(p.root) for p in (a, b)
    )


def test_a_saved_port_another_live_cluster_holds_is_chosen_again(
    tmp_path: Path, settings: dict[str, str]
) -> None:
    registry = tmp_path / "cache"
    a, b = cluster(tmp_path / "a"), cluster(tmp_path / "b")
    ports_a = stack_ports(a, settings, registry)
    b.stack_ports.write_text(json.dumps(ports_a))  # saved while A's choice was not visible
    ports_b = stack_ports(b, settings, registry)
    assert not set(ports_a.values()) & set(ports_b.values())
    assert json.loads(b.stack_ports.read_text()) == ports_b


@pytest.mark.parametrize("gone", ["down", "crashed", "deleted"])
def test_a_cluster_that_is_gone_holds_no_ports(tmp_path: Path, settings: dict[str, str], gone: str) -> None:
    registry = tmp_path / "cache"
    a = cluster(tmp_path / "a")
    stack_ports(a, settings, registry)
    if gone == "down":
        shutil.rmtree(a.cluster)
    elif gone == "crashed":  # its processes died with it; the directory stays
        cluster(a.root, alive=False)
    else:
        shutil.rmtree(a.root)
    c = cluster(tmp_path / "c")
    assert stack_ports(c, settings, registry) == overlay_ports(settings)
    assert json.loads((registry / PORTS_REGISTRY).read_text()) == [os.path.realpath(c.root)]


def test_port_probe_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not loopback_port_free(port)
    assert loopback_port_free(any_loopback_port())


def overlay() -> list[dict[str, Any]]:
    return [
        {
            "kind": "ConfigMap",
            "metadata": {"name": "dsjobs-settings", "namespace": "dsjobs-system"},
            "data": {
                "DSJOBS_API_LISTEN": "127.0.0.1:17090",
                "DSJOBS_API_METRICS_LISTEN": "127.0.0.1:17091",
                "DSJOBS_METRICS_PORT": "17081",
                "DSJOBS_LIVENESS_PORT": "17080",
                "DSJOBS_BIND_ADDRESS": "127.0.0.1",
            },
        },
        {
            "kind": "Deployment",
            "metadata": {"name": "dsjobs-api", "namespace": "dsjobs-system"},
            "spec": {
                "template": {
                    "metadata": {"annotations": {"prometheus.io/port": "17091"}},
                    "spec": {
                        "containers": [
                            {
                                "ports": [{"name": "grpc", "containerPort": 17090}],
                                "readinessProbe": {"grpc": {"port": 17090}},
                                "livenessProbe": {"httpGet": {"port": "health"}},
                            }
                        ]
                    },
                }
            },
        },
        # Not ours to move: another namespace's Deployment, a Service.
        {
            "kind": "Deployment",
            "metadata": {"name": "x", "namespace": "other"},
            "spec": {"containerPort": 17090},
        },
        {"kind": "Service", "metadata": {"name": "s", "namespace": "dsjobs-system"}, "spec": {"port": 17090}},
    ]


def test_with_ports_rewrites_settings_ports_probes_and_annotations() -> None:
    objects = overlay()
    before = json.dumps(objects)
    ports = {"DSJOBS_API_LISTEN": 40090, "DSJOBS_API_METRICS_LISTEN": 40091, "DSJOBS_METRICS_PORT": 40081}
    cm, api, other, service = with_ports(objects, ports)
    assert json.dumps(objects) == before  # pure
    assert cm["data"] == {
        "DSJOBS_API_LISTEN": "127.0.0.1:40090",
        "DSJOBS_API_METRICS_LISTEN": "127.0.0.1:40091",
        "DSJOBS_METRICS_PORT": "40081",
        "DSJOBS_LIVENESS_PORT": "17080",  # not asked to move
        "DSJOBS_BIND_ADDRESS": "127.0.0.1",
    }
    template = api["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "40091"
    (container,) = template["spec"]["containers"]
    assert container["ports"][0]["containerPort"] == 40090
    assert container["readinessProbe"]["grpc"]["port"] == 40090
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert (other, service) == (objects[2], objects[3])
    assert overlay_ports(cm["data"]) == {**ports, "DSJOBS_LIVENESS_PORT": 17080}
    assert set(overlay_ports(cm["data"])) == set(PORT_SETTINGS)


def test_a_port_setting_that_is_not_a_port_is_refused() -> None:
    with pytest.raises(StackError, match=re.escape("'127.0.0.1:http' is not a port or host:port")):
        overlay_ports({"DSJOBS_API_LISTEN": "127.0.0.1:http"})


def test_reserved_ports_are_below_the_ephemeral_range() -> None:
    # Where binding port 0 picks, an outgoing connection may hold the port as its own when a
    # restarted process binds it again: the review's restarted API failed for half a minute.
    from dsjobs.devcluster.procs import RESERVED_PORTS_FROM, ephemeral_ports

    low = ephemeral_ports()[0]
    with reserve_ports(8) as ports:
        assert len(set(ports)) == 8
        if low > RESERVED_PORTS_FROM + 1000:
            assert all(RESERVED_PORTS_FROM <= p < low for p in ports), (ports, low)


def test_a_registry_that_cannot_be_written_is_told_not_a_traceback(
    tmp_path: Path, settings: dict[str, str]
) -> None:
    # A read-only ~/.cache: `make up` ended in "OSError: [Errno 30] Read-only file system" with a
    # traceback, its cluster left running.
    (tmp_path / "not-a-dir").write_text("")
    registry = tmp_path / "not-a-dir" / "dsjobs"
    with pytest.raises(StackError, match=r"cannot use the stacks' port registry in .*XDG_CACHE_HOME"):
        stack_ports(cluster(tmp_path / "a"), settings, registry)
