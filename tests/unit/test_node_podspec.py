"""Pod spec -> process plan: env resolution, volumes, mounts, argv (pure, no Kubernetes)."""

from __future__ import annotations

import base64
import dataclasses
from fractions import Fraction
from typing import Any

import pytest

from dsjobs.devcluster.node import podspec
from dsjobs.devcluster.node.podspec import (
    ConfigError,
    Fetched,
    NodeContext,
    SetupError,
    expand,
    plan_container,
    plan_volumes,
    requirements,
    resolve_env,
)

NODE = NodeContext(
    name="gpu-0",
    host_ip="127.0.0.1",
    allocatable={"cpu": Fraction(32), "memory": Fraction(128 * 2**30), "ephemeral-storage": Fraction(10**12)},
    api_host="127.0.0.1",
    api_port=6443,
    python_bin_dir="/venv/bin",
)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def make_pod(containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u-1",
            "labels": {"app": "demo", "tier": "x"},
            "annotations": {"note": 'say "hi"'},
        },
        "spec": {"nodeName": "gpu-0", "serviceAccountName": "sa", "containers": containers, **spec},
    }


# ------------------------------------------------------------------ $(VAR) expansion


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "a"),
        ("x-$(A)-$(B)", "x-a-b"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("$$", "$"),
        ("a$b", "a$b"),
        ("$", "$"),
        ("$()", "$()"),
        ("$(A)$(A)", "aa"),
    ],
)
def test_expand_like_kubernetes(text: str, expected: str) -> None:
    values = {"A": "a", "B": "b", "": None}
    assert expand(text, values.get) == expected


# ------------------------------------------------------------------ environment


def test_env_from_then_env_with_expansion_and_sources() -> None:
    container = {
        "name": "c",
        "envFrom": [
            {"configMapRef": {"name": "cm"}, "prefix": "CM_"},
            {"secretRef": {"name": "sec"}},
            {"configMapRef": {"name": "nope", "optional": True}},
        ],
        "env": [
            {"name": "GREETING", "value": "hello $(CM_who) on $(KUBERNETES_SERVICE_HOST)"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "level"}}},
            {
                "name": "OPT",
                "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "absent", "optional": True}},
            },
            {"name": "SHARED", "value": "from-env"},
            {"name": "EMPTY"},
        ],
    }
    fetched = Fetched(
        configmaps={"cm": {"data": {"who": "world", "level": "3"}}, "nope": None},
        secrets={"sec": {"data": {"token": b64("s3cr3t"), "SHARED": b64("from-secret")}}},
    )
    env = resolve_env(make_pod([container]), container, fetched, NODE)
    assert env["CM_who"] == "world"
    assert env["GREETING"] == "hello world on 127.0.0.1"
    assert env["TOKEN"] == "s3cr3t"
    assert (env["POD"], env["NS"], env["UID"], env["NODE"], env["IP"]) == (
        "p",
        "ns",
        "u-1",
        "gpu-0",
        "127.0.0.1",
    )
    assert env["APP"] == "demo"
    assert env["NOTE"] == 'say "hi"'
    assert env["LEVEL"] == "3"
    assert "OPT" not in env
    assert env["SHARED"] == "from-env"  # env wins over envFrom
    assert env["EMPTY"] == ""
    assert env["KUBERNETES_SERVICE_PORT"] == "6443"


def test_missing_references_are_config_errors() -> None:
    c1 = {"name": "c", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}]}
    with pytest.raises(ConfigError, match="couldn't find key k in ConfigMap ns/cm"):
        resolve_env(make_pod([c1]), c1, Fetched(configmaps={"cm": {"data": {}}}), NODE)
    c2 = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    with pytest.raises(ConfigError, match='secret "s" not found'):
        resolve_env(make_pod([c2]), c2, Fetched(secrets={"s": None}), NODE)
    c3 = {
        "name": "c",
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k", "optional": True}}}],
    }
    assert "X" not in resolve_env(make_pod([c3]), c3, Fetched(secrets={"s": None}), NODE)


@pytest.mark.parametrize(
    ("resources", "ref", "expected"),
    [
        ({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu"}, "1"),  # rounded up to whole cores
        ({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu", "divisor": "1m"}, "500"),
        ({"limits": {"memory": "1Gi"}}, {"resource": "limits.memory", "divisor": "1Mi"}, "1024"),
        ({"requests": {"memory": "100M"}}, {"resource": "requests.memory"}, "100000000"),
        ({}, {"resource": "limits.cpu"}, "32"),  # defaults to node allocatable
        ({}, {"resource": "limits.memory", "divisor": "1Gi"}, "128"),
        ({}, {"resource": "requests.cpu"}, "0"),
        ({"limits": {"cpu": "2"}}, {"resource": "requests.cpu", "divisor": "1m"}, "2000"),
    ],
)
def test_resource_field_ref(resources: dict[str, Any], ref: dict[str, Any], expected: str) -> None:
    c = {"name": "c", "resources": resources, "env": [{"name": "V", "valueFrom": {"resourceFieldRef": ref}}]}
    assert resolve_env(make_pod([c]), c, Fetched(), NODE)["V"] == expected


# ------------------------------------------------------------------ containers


def _plan(
    container: dict[str, Any], pod: dict[str, Any] | None = None, fetched: Fetched | None = None
) -> podspec.ContainerPlan:
    pod = pod or make_pod([container])
    fetched = fetched or Fetched()
    vols = plan_volumes(pod, fetched, "/state/pods/ns_p_u-1", NODE)
    return plan_container(
        pod, container, fetched, vols, NODE, "/state/pods/ns_p_u-1/termination/" + container["name"]
    )


def test_argv_is_command_plus_args_expanded() -> None:
    c = {
        "name": "c",
        "image": "python:3.11",
        "command": ["python", "-c"],
        "args": ["print('$(MSG)')", "$$(MSG)"],
        "env": [{"name": "MSG", "value": "hi"}],
        "workingDir": "/tmp",
    }
    plan = _plan(c)
    assert plan.argv == ("python", "-c", "print('hi')", "$(MSG)")
    assert plan.start_error is None
    assert plan.working_dir == "/tmp"
    assert plan.image == "python:3.11"
    env = plan.env_dict()
    assert env["PATH"].split(":")[0] == "/venv/bin"
    assert env["HOSTNAME"] == "p"
    assert env["HOME"] == "/root"


def test_args_without_command_and_no_command_at_all() -> None:
    assert _plan({"name": "c", "args": ["sleep", "1"]}).argv == ("sleep", "1")
    plan = _plan({"name": "c"})
    assert plan.argv == ()
    assert plan.start_error and "no command" in plan.start_error


def test_user_path_keeps_interpreter_first() -> None:
    plan = _plan({"name": "c", "command": ["x"], "env": [{"name": "PATH", "value": "/opt/bin"}]})
    assert plan.env_dict()["PATH"] == "/venv/bin:/opt/bin"


def test_gpu_limit_and_kinds() -> None:
    init = {"name": "i", "command": ["true"]}
    side = {"name": "s", "command": ["true"], "restartPolicy": "Always"}
    main = {"name": "m", "command": ["true"], "resources": {"limits": {"nvidia.com/gpu": "2"}}}
    pod = make_pod([main], initContainers=[init, side])
    assert _plan(main, pod).gpus == 2
    assert _plan(main, pod).kind == "main"
    assert _plan(init, pod).kind == "init"
    assert _plan(side, pod).kind == "sidecar"


def test_mounts_sorted_readonly_and_termination_file() -> None:
    c = {
        "name": "c",
        "command": ["true"],
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/data/config"},
            {"name": "scratch", "mountPath": "/data"},
            {"name": "scratch", "mountPath": "/logs", "subPath": "logs", "readOnly": True},
        ],
    }
    pod = make_pod(
        [c],
        volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cm"}}],
    )
    plan = _plan(c, pod, Fetched(configmaps={"cm": {"data": {"a": "1"}}}))
    by_target = {m.target: m for m in plan.mounts}
    assert by_target["/data"].source == "/state/pods/ns_p_u-1/volumes/scratch"
    assert not by_target["/data"].read_only
    assert by_target["/data/config"].read_only  # configMap volumes are always read-only
    assert by_target["/logs"].source == "/state/pods/ns_p_u-1/volumes/scratch/logs"
    assert by_target["/logs"].read_only
    assert by_target["/dev/termination-log"].source == "/state/pods/ns_p_u-1/termination/c"
    targets = [m.target for m in plan.mounts]
    assert targets.index("/data") < targets.index("/data/config")


def test_custom_termination_message_path_and_policy() -> None:
    c = {
        "name": "c",
        "command": ["true"],
        "terminationMessagePath": "/tmp/msg",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    plan = _plan(c)
    assert plan.termination_message_path == "/tmp/msg"
    assert plan.termination_message_policy == "FallbackToLogsOnError"
    assert any(m.target == "/tmp/msg" for m in plan.mounts)


def test_subpath_expr_and_escape() -> None:
    c = {
        "name": "c",
        "command": ["true"],
        "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "volumeMounts": [{"name": "v", "mountPath": "/out", "subPathExpr": "$(POD)"}],
    }
    pod = make_pod([c], volumes=[{"name": "v", "emptyDir": {}}])
    assert _plan(c, pod).mounts[0].source.endswith("/volumes/v/p")
    bad = {
        "name": "c",
        "command": ["true"],
        "volumeMounts": [{"name": "v", "mountPath": "/x", "subPath": "../../etc"}],
    }
    with pytest.raises(ConfigError):
        _plan(bad, make_pod([bad], volumes=[{"name": "v", "emptyDir": {}}]))


def test_run_as_user_recorded_unless_enforced() -> None:
    c = {"name": "c", "command": ["id"], "securityContext": {"runAsGroup": 20}}
    pod = make_pod([c], securityContext={"runAsUser": 1000})
    plain = _plan(c, pod)
    assert (plain.run_as_user, plain.run_as_group) == (None, None)
    assert plain.env_dict()["HOME"] == "/root"
    node = dataclasses.replace(NODE, enforce_run_as_user=True)
    vols = plan_volumes(pod, Fetched(), "/s", node)
    plan = plan_container(pod, c, Fetched(), vols, node, "/s/termination/c")
    assert (plan.run_as_user, plan.run_as_group) == (1000, 20)
    assert plan.env_dict()["HOME"] == "/"


# ------------------------------------------------------------------ volumes


KUBE_API_ACCESS = {
    "name": "kube-api-access-x",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {
                "downwardAPI": {
                    "items": [
                        {
                            "path": "namespace",
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                        }
                    ]
                }
            },
        ],
    },
}


def test_requirements_collects_everything() -> None:
    c = {
        "name": "c",
        "envFrom": [{"secretRef": {"name": "env-secret"}}],
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "env-cm", "key": "k"}}}],
    }
    pod = make_pod(
        [c],
        volumes=[
            KUBE_API_ACCESS,
            {"name": "s", "secret": {"secretName": "vol-secret"}},
            {"name": "d", "persistentVolumeClaim": {"claimName": "data"}},
        ],
    )
    req = requirements(pod)
    assert req.configmaps == {"kube-root-ca.crt", "env-cm"}
    assert req.secrets == {"vol-secret", "env-secret"}
    assert req.pvcs == {"data"}
    assert len(req.tokens) == 1
    tok = req.tokens[0]
    assert (tok.key, tok.service_account, tok.audience, tok.expiration_seconds) == (
        "kube-api-access-x/0",
        "sa",
        None,
        3607,
    )


def test_projected_service_account_volume() -> None:
    pod = make_pod([], volumes=[KUBE_API_ACCESS])
    fetched = Fetched(
        configmaps={"kube-root-ca.crt": {"data": {"ca.crt": "PEM"}}},
        tokens={"kube-api-access-x/0": "jwt"},
    )
    (vol,) = plan_volumes(pod, fetched, "/s", NODE)
    assert vol.read_only
    assert vol.host_path == "/s/volumes/kube-api-access-x"
    files = {f.path: (f.data, f.mode) for f in vol.files or ()}
    assert files == {"token": (b"jwt", 0o644), "ca.crt": (b"PEM", 0o644), "namespace": (b"ns", 0o644)}
    with pytest.raises(SetupError):
        plan_volumes(pod, Fetched(configmaps=fetched.configmaps), "/s", NODE)


def test_configmap_and_secret_volumes() -> None:
    pod = make_pod(
        [],
        volumes=[
            {
                "name": "c",
                "configMap": {"name": "cm", "items": [{"key": "a", "path": "sub/a.txt", "mode": 0o600}]},
            },
            {"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o400}},
            {"name": "o", "configMap": {"name": "gone", "optional": True}},
        ],
    )
    fetched = Fetched(
        configmaps={"cm": {"data": {"a": "A", "b": "B"}, "binaryData": {"bin": b64("\x00")}}, "gone": None},
        secrets={"sec": {"data": {"pw": b64("hunter2")}}},
    )
    c, s, o = plan_volumes(pod, fetched, "/s", NODE)
    assert [(f.path, f.data, f.mode) for f in c.files or ()] == [("sub/a.txt", b"A", 0o600)]
    assert [(f.path, f.data, f.mode) for f in s.files or ()] == [("pw", b"hunter2", 0o400)]
    assert o.files == ()
    missing = make_pod([], volumes=[{"name": "c", "configMap": {"name": "nope"}}])
    with pytest.raises(SetupError, match='configmap "nope" not found'):
        plan_volumes(missing, Fetched(configmaps={"nope": None}), "/s", NODE)


def test_downward_api_volume_formats_maps() -> None:
    pod = make_pod(
        [{"name": "c", "resources": {"limits": {"memory": "64Mi"}}}],
        volumes=[
            {
                "name": "d",
                "downwardAPI": {
                    "items": [
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                        {
                            "path": "mem",
                            "resourceFieldRef": {
                                "containerName": "c",
                                "resource": "limits.memory",
                                "divisor": "1Mi",
                            },
                        },
                    ]
                },
            }
        ],
    )
    (vol,) = plan_volumes(pod, Fetched(), "/s", NODE)
    files = {f.path: f.data.decode() for f in vol.files or ()}
    assert files["labels"] == 'app="demo"\ntier="x"'
    assert files["annotations"] == 'note="say \\"hi\\""'
    assert files["mem"] == "64"


def test_pvc_hostpath_and_unsupported_volumes() -> None:
    pod = make_pod(
        [],
        volumes=[
            {"name": "d", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}},
            {"name": "h", "hostPath": {"path": "/srv/x", "type": "DirectoryOrCreate"}},
        ],
    )
    d, h = plan_volumes(pod, Fetched(pvc_paths={"data": "/disks/pv1"}), "/s", NODE)
    assert (d.host_path, d.read_only) == ("/disks/pv1", True)
    assert (h.host_path, h.host_path_type) == ("/srv/x", "DirectoryOrCreate")
    with pytest.raises(SetupError, match="not bound"):
        plan_volumes(pod, Fetched(), "/s", NODE)
    nfs = make_pod([], volumes=[{"name": "n", "nfs": {"server": "x", "path": "/"}}])
    with pytest.raises(SetupError, match="unsupported volume type"):
        plan_volumes(nfs, Fetched(), "/s", NODE)


EPHEMERAL = {
    "name": "work",
    "ephemeral": {"volumeClaimTemplate": {"spec": {"resources": {"requests": {"storage": "100Gi"}}}}},
}


def test_generic_ephemeral_volume_is_the_claim_named_after_pod_and_volume() -> None:
    pod = make_pod([], volumes=[EPHEMERAL])
    claim = f"{pod['metadata']['name']}-work"
    req = requirements(pod)
    assert (req.pvcs, req.ephemeral_pvcs) == ({claim}, {claim})
    (vol,) = plan_volumes(pod, Fetched(pvc_paths={claim: "/tmp/hostpath_pv/1"}), "/s", NODE)
    assert (vol.name, vol.kind, vol.host_path, vol.read_only) == (
        "work",
        "persistentVolumeClaim",
        "/tmp/hostpath_pv/1",
        False,
    )
    with pytest.raises(
        SetupError, match=f'ephemeral volume "work": persistentvolumeclaim "{claim}" is not bound'
    ):
        plan_volumes(pod, Fetched(), "/s", NODE)


def test_an_ephemeral_volume_claim_must_be_controlled_by_the_pod() -> None:
    def pvc(*refs: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"name": "p-work", "ownerReferences": list(refs)}}

    mine = {"kind": "Pod", "name": "p", "uid": "u1", "controller": True}
    assert podspec.ephemeral_claim_problem(pvc(mine), "ns", "p", "u1") is None
    expected = "PVC ns/p-work was not created for pod ns/p (pod is not owner)"
    assert podspec.ephemeral_claim_problem(pvc(), "ns", "p", "u1") == expected
    # An earlier pod of the same name, or a mere (non-controller) reference, is not this pod.
    assert podspec.ephemeral_claim_problem(pvc({**mine, "uid": "u0"}), "ns", "p", "u1") == expected
    assert podspec.ephemeral_claim_problem(pvc({**mine, "controller": False}), "ns", "p", "u1") == expected


def test_pv_host_path() -> None:
    assert podspec.pv_host_path({"spec": {"local": {"path": "/mnt/a"}}}) == "/mnt/a"
    assert podspec.pv_host_path({"spec": {"hostPath": {"path": "/mnt/b"}}}) == "/mnt/b"
    assert podspec.pv_host_path({"spec": {"csi": {"driver": "x"}}}) is None


def test_termination_grace() -> None:
    pod = make_pod([], terminationGracePeriodSeconds=7)
    assert podspec.termination_grace_seconds(pod) == 7
    pod["metadata"].update(deletionTimestamp="2024-01-01T00:00:00Z", deletionGracePeriodSeconds=2)
    assert podspec.termination_grace_seconds(pod) == 2
    assert podspec.termination_grace_seconds(make_pod([])) == 30


def test_empty_dir_limits_are_the_positive_size_limits_of_disk_backed_ones() -> None:
    # A memory-backed one is a tmpfs of its size under a kubelet: writes past it fail, no eviction.
    pod = {
        "spec": {
            "volumes": [
                {"name": "work", "emptyDir": {"sizeLimit": "20Gi"}},
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                {"name": "shared", "emptyDir": {}},
                {"name": "zero", "emptyDir": {"sizeLimit": "0"}},
                {"name": "conf", "configMap": {"name": "c"}},
            ]
        }
    }
    assert podspec.empty_dir_limits(pod) == {"work": (Fraction(20 << 30), "20Gi")}


@pytest.mark.parametrize(
    ("image", "failure"),
    [
        ("python:3.11", None),
        ("library/python", None),
        ("cr.yandex/org/img:1", None),
        ("localhost:5000/img", None),
        ("invalid/img:1", None),  # a Docker Hub user named "invalid"
        (
            "registry.invalid/nope/img:1",
            'failed to pull and unpack image "registry.invalid/nope/img:1": failed to resolve reference '
            '"registry.invalid/nope/img:1": failed to do request: Head '
            '"https://registry.invalid/v2/nope/img/manifests/1": dial tcp: lookup registry.invalid: no such host',
        ),
        (
            "Reg.INVALID:5000/img",
            'failed to pull and unpack image "Reg.INVALID:5000/img:latest": failed to resolve reference '
            '"Reg.INVALID:5000/img:latest": failed to do request: Head '
            '"https://Reg.INVALID:5000/v2/img/manifests/latest": dial tcp: lookup reg.invalid: no such host',
        ),
        (
            "x.invalid/img@sha256:ab",
            'failed to pull and unpack image "x.invalid/img@sha256:ab": failed to resolve reference '
            '"x.invalid/img@sha256:ab": failed to do request: Head '
            '"https://x.invalid/v2/img/manifests/sha256:ab": dial tcp: lookup x.invalid: no such host',
        ),
    ],
)
def test_only_images_of_registries_that_never_resolve_fail_to_pull(image: str, failure: str | None) -> None:
    assert podspec.pull_failure(image) == failure
