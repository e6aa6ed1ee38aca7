"""Node, Node status and Lease objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dsjobs.devcluster.node.nodeobj import (
    NodeSpec,
    Taint,
    label_allowed_for_node,
    lease_object,
    node_conditions,
    node_object,
    node_status,
    parse_label,
    parse_taint,
    ready_condition_status,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def spec(**kw: object) -> NodeSpec:
    base = dict(
        name="gpu-0",
        cpu="32",
        memory="128Gi",
        pods=110,
        gpus=8,
        ephemeral_storage="100Gi",
        port=10250,
        address="127.0.0.1",
        labels={"dsjobs.dev/node-pool": "gpu"},
        taints=[parse_taint("nvidia.com/gpu=present:NoSchedule")],
    )
    base.update(kw)
    return NodeSpec(**base)  # type: ignore[arg-type]


def test_parse_taint_and_label() -> None:
    assert parse_taint("a=b:NoExecute") == Taint("a", "b", "NoExecute")
    assert parse_taint("a:NoSchedule") == Taint("a", "", "NoSchedule")
    assert parse_taint("example.com/x=y:z:PreferNoSchedule") == Taint(
        "example.com/x", "y:z", "PreferNoSchedule"
    )
    for bad in ("a=b", "a=b:Never", ":NoSchedule"):
        with pytest.raises(ValueError):
            parse_taint(bad)
    assert parse_label("k=v=w") == ("k", "v=w")
    with pytest.raises(ValueError):
        parse_label("novalue")


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("dsjobs.dev/node-pool", True),
        ("nvidia.com/gpu.product", True),
        ("plain", True),
        ("kubernetes.io/hostname", True),
        ("topology.kubernetes.io/zone", True),
        ("node.kubernetes.io/instance-type", True),
        ("kubelet.kubernetes.io/anything", True),
        ("node-role.kubernetes.io/worker", False),
        ("node-restriction.kubernetes.io/x", False),
        ("example.k8s.io/x", False),
    ],
)
def test_label_allowed_for_node(key: str, allowed: bool) -> None:
    assert label_allowed_for_node(key) is allowed


def test_node_object_and_status() -> None:
    s = spec()
    node = node_object(s)
    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == "gpu-0"
    assert labels["kubernetes.io/os"] == "linux"
    assert labels["dsjobs.dev/node-pool"] == "gpu"
    assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    st = node_status(s, {"kubeletVersion": "v1.37.2"}, True, T0, [])
    assert st["capacity"]["nvidia.com/gpu"] == "8"
    assert st["allocatable"] == st["capacity"]
    assert st["capacity"]["pods"] == "110"
    assert st["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"}]
    assert st["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "KubeletReady")
    assert "nvidia.com/gpu" not in node_status(spec(gpus=0), {}, True, T0, [])["capacity"]
    assert "taints" not in node_object(spec(taints=[]))["spec"]


def test_node_conditions_keep_transition_times() -> None:
    first = node_conditions(True, T0, [])
    later = node_conditions(True, T0 + timedelta(minutes=1), first)
    ready = next(c for c in later if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert ready["lastHeartbeatTime"] == "2026-01-02T03:05:05Z"
    down = node_conditions(False, T0 + timedelta(minutes=2), later, "stopped")
    ready = next(c for c in down if c["type"] == "Ready")
    assert (ready["status"], ready["message"], ready["lastTransitionTime"]) == (
        "False",
        "stopped",
        "2026-01-02T03:06:05Z",
    )


def test_ready_condition_status_tells_when_the_node_controller_took_over() -> None:
    ours = {"status": {"conditions": node_conditions(True, T0, [])}}
    assert ready_condition_status(ours) == "True"
    # What the node lifecycle controller writes when the heartbeats stopped coming.
    unknown = {
        "status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}
    }
    assert ready_condition_status(unknown) == "Unknown"
    assert ready_condition_status({"status": {}}) is None
    assert ready_condition_status({}) is None


def test_lease_object() -> None:
    lease = lease_object("gpu-0", "uid-1", 40, T0)
    assert lease["metadata"]["namespace"] == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "gpu-0", "uid": "uid-1"}
    ]
    assert lease["spec"] == {
        "holderIdentity": "gpu-0",
        "leaseDurationSeconds": 40,
        "renewTime": "2026-01-02T03:04:05.678901Z",
    }
    assert "ownerReferences" not in lease_object("gpu-0", None, 40, T0)["metadata"]
