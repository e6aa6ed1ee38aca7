"""The deploy manifests and the Dockerfile, checked without Docker.

- every manifest of both overlays passes `kubectl apply --dry-run=server` against the dev cluster's
  real API server (admission, schema and CRD validation; Pod Security warnings count as failures);
- our own pods have probes, resource requests and a restricted securityContext;
- the development overlays' InstanceTypes are the catalog's `local` profile;
- the settings ConfigMaps only hold variables the operator or the API read;
- the Dockerfile is multi-stage, pins its base images and Python distributions, downloads nothing by
  hand, runs as non-root.

The kind path (`make e2e-kind`) is what builds the image and runs these manifests in real containers.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_fixtures import REPO_ROOT, ClusterHandle

from dsjobs import localstack
from dsjobs.api.settings import SETTINGS as API_SETTINGS
from dsjobs.controller.settings import DEFAULT_RUNNER_IMAGE
from dsjobs.controller.settings import SETTINGS_DOC as OPERATOR_SETTINGS
from dsjobs.instancetypes import CATALOG, instance_type_spec

OVERLAYS = {name: REPO_ROOT / "deploy" / "overlays" / name for name in ("local", "kind")}
DOCKERFILE = REPO_ROOT / "Dockerfile"
SYSTEM_NAMESPACE = "dsjobs-system"


def kubectl_binary() -> str:
    return localstack.find_kubectl()


def render(overlay: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [kubectl_binary(), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [o for o in yaml.safe_load_all(proc.stdout) if o]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    name = str(request.param)
    return name, render(OVERLAYS[name])


# ------------------------------------------------------------------ against the API server


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(OVERLAYS))
def test_overlay_passes_server_side_dry_run(dev_cluster: ClusterHandle, name: str) -> None:
    kubectl = localstack.Kubectl(kubectl_binary(), dev_cluster.kubeconfig)
    objects = render(OVERLAYS[name])
    # A server-side dry run checks objects against what exists: the CRDs must be established and
    # the namespaces must exist for real (both are exactly what the overlay itself would create).
    crds = of_kind(objects, "CustomResourceDefinition")
    kubectl.apply(crds)
    kubectl.run(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *[f"crd/{c['metadata']['name']}" for c in crds],
    )
    kubectl.apply(of_kind(objects, "Namespace"))

    proc = subprocess.run(
        kubectl.argv("apply", "--dry-run=server", "-k", str(OVERLAYS[name])),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"dry run of deploy/overlays/{name} failed:\n{proc.stderr}"
    # Pod Security admission warns about Deployments whose pods the namespace would reject.
    assert "would violate PodSecurity" not in proc.stderr, proc.stderr
    applied = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(objects), proc.stdout


ADMISSION = REPO_ROOT / "deploy" / "base" / "admission.yaml"
GOLDEN_PODS = REPO_ROOT / "tests" / "unit" / "golden" / "pods"


@dataclass(frozen=True)
class Admission:
    kubectl: localstack.Kubectl
    project: str  # a namespace labelled dsjobs.dev/project-id
    plain: str  # one that is not

    def as_sa(self, name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """kubectl as ServiceAccount `name` (of some namespace), authorized as an admin: what
        RBAC lets it do is not the question here, only what the policy lets through."""
        user = f"system:serviceaccount:{self.plain}:{name}"
        return subprocess.run(
            self.kubectl.argv(f"--as={user}", "--as-group=system:masters", *args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def create(self, name: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.as_sa(name, "create", "--dry-run=server", "-f", "-", stdin=json.dumps(obj))


def _secret(namespace: str, secret_type: str = "Opaque", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s1", "namespace": namespace, "annotations": annotations},
        "type": secret_type,
        "stringData": {"k": "v"},
    }


def _golden_pod(name: str, namespace: str) -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load((GOLDEN_PODS / name).read_text())
    pod["metadata"]["namespace"] = namespace
    pod["metadata"].pop("ownerReferences", None)  # the golden job does not exist here
    pod["spec"].pop("priorityClassName", None)  # nor the catalog's PriorityClasses
    return pod


@pytest.fixture(scope="module")
def admission(dev_cluster: ClusterHandle) -> Iterator[Admission]:
    kubectl = localstack.Kubectl(kubectl_binary(), dev_cluster.kubeconfig)
    kubectl.apply([d for d in yaml.safe_load_all(ADMISSION.read_text()) if d])
    suffix = secrets.token_hex(3)
    env = Admission(kubectl, f"admission-{suffix}-p", f"admission-{suffix}-x")
    kubectl.apply(
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": env.plain}},
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": env.project, "labels": {"dsjobs.dev/project-id": env.project}},
            },
        ]
    )
    # The API server takes a policy in a moment after it was written.
    deadline = time.monotonic() + 60
    while env.create("dsjobs-api", _secret(env.plain)).returncode == 0:
        assert time.monotonic() < deadline, "the policy never took effect"
        time.sleep(0.5)
    try:
        yield env
    finally:
        kubectl.run("delete", "namespace", env.plain, env.project, "--wait=false", check=False)


@pytest.mark.e2e
def test_dsjobs_accounts_make_only_their_own_kinds_of_secrets(admission: Admission) -> None:
    for sa in ("dsjobs-api", "dsjobs-operator"):
        for kind in ("Opaque", "kubernetes.io/dockerconfigjson"):
            body = _secret(admission.project, kind)
            if kind != "Opaque":
                body["stringData"] = {".dockerconfigjson": '{"auths": {}}'}
            proc = admission.create(sa, body)
            assert proc.returncode == 0, proc.stderr
        token = _secret(admission.project, "kubernetes.io/service-account-token")
        token["metadata"]["annotations"] = {"kubernetes.io/service-account.name": "default"}
        proc = admission.create(sa, token)
        assert proc.returncode != 0
        assert "creates Secrets of type Opaque or kubernetes.io/dockerconfigjson only" in proc.stderr
        proc = admission.create(sa, _secret(admission.plain))
        assert proc.returncode != 0
        assert f"{admission.plain} is not one" in proc.stderr and "only in project namespaces" in proc.stderr
    # Other identities are not this policy's business (an admin here).
    admin = admission.kubectl.run(
        "create", "--dry-run=server", "-f", "-", stdin=json.dumps(_secret(admission.plain)), check=False
    )
    assert "created (server dry run)" in admin


@pytest.mark.e2e
def test_every_rendered_job_pod_passes_and_host_access_does_not(admission: Admission) -> None:
    goldens = sorted(p.name for p in GOLDEN_PODS.glob("*.yaml"))
    assert len(goldens) >= 10
    for name in goldens:
        proc = admission.create("dsjobs-operator", _golden_pod(name, admission.project))
        assert proc.returncode == 0, f"{name}: {proc.stderr}"

    def refused(change: Callable[[dict[str, Any]], None], namespace: str = admission.project) -> str:
        pod = _golden_pod("basic_cpu.yaml", namespace)
        change(pod["spec"])
        proc = admission.create("dsjobs-operator", pod)
        assert proc.returncode != 0, pod["spec"]
        return proc.stderr

    assert "only in project namespaces" in refused(lambda s: None, admission.plain)
    token = "automountServiceAccountToken: false and no hostPath or serviceAccountToken volume"
    assert token in refused(lambda s: s.pop("automountServiceAccountToken"))
    assert token in refused(lambda s: s.update(automountServiceAccountToken=True))
    assert token in refused(lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}))
    projected = {"sources": [{"serviceAccountToken": {"path": "t"}}]}
    assert token in refused(lambda s: s["volumes"].append({"name": "t", "projected": projected}))
    host = "must not use the host's network, PID or IPC namespace or ports, privileged containers"
    assert host in refused(lambda s: s.update(hostPID=True))
    assert host in refused(lambda s: s["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]))
    assert host in refused(lambda s: s.update(securityContext={"seLinuxOptions": {"type": "spc_t"}}))
    assert host in refused(lambda s: s.update(securityContext={"seLinuxOptions": {"user": "system_u"}}))
    spc = {"seLinuxOptions": {"type": "spc_t"}}
    assert host in refused(lambda s: s["initContainers"][0].update(securityContext=spc))
    # What the baseline Pod Security Standard allows, and OpenShift's admission sets on every pod.
    selinux = {"seLinuxOptions": {"level": "s0:c26,c5", "type": "container_t"}}
    for where in ("pod", "container"):
        pod = _golden_pod("basic_cpu.yaml", admission.project)
        target = pod["spec"] if where == "pod" else pod["spec"]["containers"][0]
        target["securityContext"] = {**target.get("securityContext", {}), **selinux}
        proc = admission.create("dsjobs-operator", pod)
        assert proc.returncode == 0, f"{where}: {proc.stderr}"
    assert host in refused(lambda s: s.update(hostNetwork=True))
    assert host in refused(lambda s: s["containers"][0].update(securityContext={"privileged": True}))
    add = {"capabilities": {"add": ["SYS_ADMIN"]}}
    assert host in refused(lambda s: s["initContainers"][0].update(securityContext=add))


@pytest.mark.e2e
def test_dsjobs_accounts_delete_only_in_project_namespaces(admission: Admission) -> None:
    for ns in (admission.plain, admission.project):
        admission.kubectl.apply([_secret(ns)])
    proc = admission.as_sa(
        "dsjobs-operator", "-n", admission.plain, "delete", "--dry-run=server", "secret", "s1"
    )
    assert proc.returncode != 0 and "only in project namespaces" in proc.stderr, proc.stderr
    proc = admission.as_sa(
        "dsjobs-operator", "-n", admission.project, "delete", "--dry-run=server", "secret", "s1"
    )
    assert proc.returncode == 0, proc.stderr
    # What a job made stays deletable in a namespace no longer a project (retired before its jobs).
    labelled = _secret(admission.plain)
    labelled["metadata"].update(name="s2", labels={"dsjobs.dev/job-id": "j1"})
    admission.kubectl.apply([labelled])
    proc = admission.as_sa(
        "dsjobs-operator", "-n", admission.plain, "delete", "--dry-run=server", "secret", "s2"
    )
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ static checks


def our_workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in of_kind(objects, "Deployment") if o["metadata"].get("namespace") == SYSTEM_NAMESPACE]


def serves(dep: dict[str, Any], objects: list[dict[str, Any]]) -> bool:
    """Whether a Service selects the Deployment's pods (then readiness decides its endpoints)."""
    labels = dep["spec"]["template"]["metadata"].get("labels") or {}
    for svc in of_kind(objects, "Service"):
        selector = svc["spec"].get("selector") or {}
        same_ns = svc["metadata"].get("namespace") == dep["metadata"].get("namespace")
        if same_ns and selector and all(labels.get(k) == v for k, v in selector.items()):
            return True
    return False


def test_the_alerts_component_renders_with_the_base(tmp_path: Path) -> None:
    # The PrometheusRule an overlay adds with `components:` (deploy/components/prometheus-rules).
    deploy = REPO_ROOT / "deploy"
    (tmp_path / "kustomization.yaml").write_text(
        f"resources:\n  - {os.path.relpath(deploy / 'base', tmp_path)}\n"
        f"components:\n  - {os.path.relpath(deploy / 'components' / 'prometheus-rules', tmp_path)}\n"
    )
    (rules,) = of_kind(render(tmp_path), "PrometheusRule")
    assert rules["metadata"]["namespace"] == SYSTEM_NAMESPACE
    assert {g["name"] for g in rules["spec"]["groups"]} == {"dsjobs-operator", "dsjobs-api"}


def test_our_pods_have_probes_requests_and_restricted_security(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = overlay
    workloads = our_workloads(objects)
    assert len(workloads) >= 2, f"{name}: expected the operator and the API Deployments"
    problems: list[str] = []
    for dep in workloads:
        where = f"{name}: deployment/{dep['metadata']['name']}"
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext") or {}
        for c in pod["containers"]:
            csc = c.get("securityContext") or {}
            cw = f"{where} container {c['name']}"
            if "livenessProbe" not in c:
                problems.append(f"{cw}: no livenessProbe")
            if serves(dep, objects) and "readinessProbe" not in c:
                problems.append(f"{cw}: backs a Service but has no readinessProbe")
            requests = (c.get("resources") or {}).get("requests") or {}
            if not {"cpu", "memory"} <= set(requests):
                problems.append(f"{cw}: resources.requests needs cpu and memory, has {requests}")
            if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                problems.append(f"{cw}: runAsNonRoot is not true")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{cw}: capabilities do not drop ALL")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                problems.append(f"{cw}: seccompProfile is {seccomp!r}, not RuntimeDefault")
    assert not problems, "\n".join(problems)


def test_development_instance_types_are_the_local_profile(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    rendered = {o["metadata"]["name"]: o["spec"] for o in of_kind(objects, "InstanceType")}
    expected = {e.name: instance_type_spec(e, "local").to_cr() for e in CATALOG}
    assert sorted(rendered) == sorted(expected)
    for it, spec in expected.items():
        assert yaml.safe_load(yaml.safe_dump(rendered[it])) == yaml.safe_load(yaml.safe_dump(spec)), (
            f"{name}: InstanceType {it} differs from `python -m dsjobs.instancetypes --profile local`; "
            "regenerate deploy/components/dev-instancetypes/instancetypes-requests.yaml"
        )


def test_settings_hold_only_known_variables(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    known = {s.env for s in API_SETTINGS} | set(OPERATOR_SETTINGS)
    (settings,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "dsjobs-settings"]
    unknown = sorted(set(settings.get("data") or {}) - known)
    assert not unknown, f"{name}: dsjobs-settings holds variables nobody reads: {unknown}"


def test_disruption_budgets_let_every_overlay_drain_a_node(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    # `kubectl drain` evicts through the PDBs: one that keeps as many pods as the overlay runs
    # blocks the drain for ever (the local overlay runs one API replica).
    name, objects = overlay
    workloads = {d["metadata"]["name"]: d for d in our_workloads(objects)}
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert budgets, f"deploy/overlays/{name} has no PodDisruptionBudget"
    for pdb in budgets:
        selected = [
            d
            for d in workloads.values()
            if pdb["spec"]["selector"]["matchLabels"].items()
            <= (d["spec"]["template"]["metadata"].get("labels") or {}).items()
        ]
        assert selected, pdb
        for dep in selected:
            replicas = dep["spec"].get("replicas", 1)
            spec = pdb["spec"]
            if "minAvailable" in spec:
                allowed = replicas - int(spec["minAvailable"])
            else:
                allowed = int(spec["maxUnavailable"])
            assert allowed >= 1, (name, pdb["metadata"]["name"], replicas, spec)


def test_local_overlay_facts() -> None:
    facts = localstack.overlay_facts(render(OVERLAYS["local"]))
    host, _, port = facts.api_endpoint.partition(":")
    assert host == "127.0.0.1" and port.isdigit()
    assert (facts.project_id, facts.project_namespace) == ("demo", "dsjobs-demo")
    objects = render(OVERLAYS["local"])
    # The template Secret is left out: `make up` makes the real one from .dev/s3.env.
    assert not of_kind(objects, "Secret")
    for dep in our_workloads(objects):
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    # Host network: the operator's metrics and liveness endpoints on loopback, like the API's.
    (settings,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "dsjobs-settings"]
    assert settings["data"]["DSJOBS_BIND_ADDRESS"] == "127.0.0.1"


def test_local_overlay_ports_all_move_together() -> None:
    """`make up` gives a second stack on the machine other ports: nothing may keep an old one."""
    objects = render(OVERLAYS["local"])
    facts = localstack.overlay_facts(objects)
    old = localstack.overlay_ports(facts.settings)
    assert set(old) == set(localstack.PORT_SETTINGS)
    new = {name: 40000 + i for i, name in enumerate(sorted(old))}
    moved = localstack.with_ports(objects, new)
    ours = [o for o in moved if o["metadata"].get("namespace") == facts.system_namespace]
    text = yaml.safe_dump_all(ours)
    assert not [p for p in old.values() if re.search(rf"\b{p}\b", text)], text
    moved_facts = localstack.overlay_facts(moved)
    assert moved_facts.api_endpoint == f"127.0.0.1:{new['DSJOBS_API_LISTEN']}"
    assert localstack.overlay_ports(moved_facts.settings) == new


def test_base_uses_one_image_reference() -> None:
    objects = render(REPO_ROOT / "deploy" / "base")
    images = {
        c["image"]
        for d in of_kind(objects, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    (settings,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "dsjobs-settings"]
    assert images == {settings["data"]["DSJOBS_RUNNER_IMAGE"]} == {DEFAULT_RUNNER_IMAGE}, images


def test_the_admin_guide_s_overlay_runs_the_operator_s_image_as_the_runner(tmp_path: Path) -> None:
    """docs/admin.md's overlay: one image for the operator, the API and the job runner, the
    runner's following the operator's (kustomize's `images` does not rewrite settings)."""
    guide = (REPO_ROOT / "docs" / "admin.md").read_text()
    block = re.search(r"```yaml\n(\s*# my-dsjobs/kustomization.yaml\n.*?)```", guide, re.S)
    assert block is not None, "docs/admin.md lost its overlay example"
    overlay = yaml.safe_load(textwrap.dedent(block.group(1)))
    overlay["resources"] = [os.path.relpath(REPO_ROOT / "deploy" / "base", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    objects = render(tmp_path)
    images = {
        c["image"]
        for d in of_kind(objects, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    (settings,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "dsjobs-settings"]
    assert images == {settings["data"]["DSJOBS_RUNNER_IMAGE"]} == {"registry.example.com/dsjobs:0.1.0"}


def test_base_rbac_grants_what_the_code_needs() -> None:
    objects = render(REPO_ROOT / "deploy" / "base")
    roles = {o["metadata"]["name"]: o["rules"] for o in of_kind(objects, "ClusterRole")}

    def verbs(role: str, resource: str) -> set[str]:
        return {v for r in roles[role] if resource in r["resources"] for v in r["verbs"]}

    # The API only lists namespaces (projects) and InstanceTypes (validation): no `get`.
    assert verbs("dsjobs-api", "namespaces") == {"list"}
    assert verbs("dsjobs-api", "instancetypes") == {"list"}
    # The job's pods and Secrets do not block their owner's deletion, so no finalizers right.
    assert verbs("dsjobs-operator", "projectjobs/finalizers") == set()
    assert verbs("dsjobs-operator", "instancetypes") == {"get", "list", "watch"}
    # Cluster-scoped: checked for a job with working storage before its pod.
    assert verbs("dsjobs-operator", "storageclasses") == {"list"}
    # Only the project's docker image resources.
    (cm,) = [r for r in roles["dsjobs-operator"] if "configmaps" in r["resources"]]
    assert cm["resourceNames"] == ["dsjobs-docker-images"] and cm["verbs"] == ["get"]
    # delete: one attempt's Secrets when its pod is refused; deletecollection: all, once it ended.
    assert verbs("dsjobs-operator", "secrets") == {"get", "create", "delete", "deletecollection"}
    # A job's namespace: its project label, checked before the job's first pod; the namespaces
    # carrying that label (the oldest holds the project).
    assert verbs("dsjobs-operator", "namespaces") == {"get", "list"}
    # Events: posted about jobs; a waiting pod's Warning ones listed (claims, mounts).
    assert verbs("dsjobs-operator", "events") == {"create", "list"}
    # Claims: found by label (mounts), made and published (output datasets), unpublished ones
    # deleted by label; never a single get or delete of somebody's claim.
    assert verbs("dsjobs-operator", "persistentvolumeclaims") == {
        "list",
        "create",
        "patch",
        "deletecollection",
    }
    # Leader election: the settings' Lease, and only it may be read and renewed.
    (settings,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "dsjobs-settings"]
    namespace, lease = settings["data"]["DSJOBS_LEADER_LEASE"].split("/")
    (role,) = [o for o in of_kind(objects, "Role") if o["metadata"]["name"] == "dsjobs-operator-leader"]
    assert role["metadata"]["namespace"] == namespace
    assert [(r["resources"], r.get("resourceNames"), sorted(r["verbs"])) for r in role["rules"]] == [
        (["leases"], [lease], ["get", "update"]),
        (["leases"], None, ["create"]),
    ]
    (binding,) = [
        o for o in of_kind(objects, "RoleBinding") if o["roleRef"]["name"] == "dsjobs-operator-leader"
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dsjobs-operator", "namespace": namespace}
    ]
    # Users of a project read their jobs' Events (`kubectl describe pj`), and everybody the catalog.
    for role in ("dsjobs-project-user", "dsjobs-project-viewer"):
        assert verbs(role, "events") == {"get", "list", "watch"}
    assert verbs("dsjobs-instancetype-reader", "instancetypes") == {"get", "list", "watch"}
    (catalog,) = [
        o
        for o in of_kind(objects, "ClusterRoleBinding")
        if o["roleRef"]["name"] == "dsjobs-instancetype-reader"
    ]
    assert catalog["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}
    ]


def test_kind_overlay_runs_the_loaded_image() -> None:
    objects = render(OVERLAYS["kind"])
    images = {
        c["image"]
        for d in of_kind(objects, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"dsjobs:dev"}, images
    (settings,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "dsjobs-settings"]
    assert settings["data"]["DSJOBS_RUNNER_IMAGE"] == "dsjobs:dev"
    (secret,) = of_kind(objects, "Secret")
    assert secret["stringData"]["DSJOBS_S3_PUBLIC_ENDPOINT"] == "http://127.0.0.1:30900"
    kind_config = yaml.safe_load((OVERLAYS["kind"] / "kind-config.yaml").read_text())
    mapped = {m["containerPort"] for n in kind_config["nodes"] for m in n.get("extraPortMappings", [])}
    node_ports = {
        p["nodePort"] for s in of_kind(objects, "Service") for p in s["spec"]["ports"] if "nodePort" in p
    }
    assert node_ports <= mapped and 30900 in node_ports, (node_ports, mapped)


# ------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile_pins_bases_downloads_nothing_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    args = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    stages = [rest for instr, rest in instructions if instr == "FROM"]
    assert len(stages) >= 2, "expected a multi-stage build"
    stage_names = set()
    for stage in stages:
        image, *alias = stage.split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if alias:
            stage_names.add(alias[-1])
        if image in stage_names:
            continue
        pinned = "@sha256:" in image or re.search(r":\d+\.\d+\.\d+[\w.-]*$", image)
        assert pinned, f"base image {image} is not pinned to a digest or an exact version"
    for instr, rest in instructions:
        if instr == "RUN":
            assert not re.search(r"\b(curl|wget)\b", rest), f"RUN downloads by hand: {rest}"
        if instr == "ADD":
            assert not re.search(r"https?://", rest), f"ADD from a URL: {rest}"
    final_stage = [i for i, (instr, _) in enumerate(instructions) if instr == "FROM"][-1]
    users = [rest for instr, rest in instructions[final_stage:] if instr == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, ".dockerignore should start from nothing and allow what the build needs"
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for instr, rest in dockerfile_instructions():
        if instr != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            matches = list(REPO_ROOT.glob(src.rstrip("/")))
            assert matches, f"COPY {src}: nothing in the repository matches"
            for match in matches:
                path = match.relative_to(REPO_ROOT).as_posix()
                let_in = any(path == a or path.startswith(a + "/") for a in allowed)
                assert let_in, f"COPY {src}: .dockerignore leaves {path} out of the build context"


def test_dockerfile_installs_the_locked_versions() -> None:
    installs = [rest for instr, rest in dockerfile_instructions() if instr == "RUN" and "pip install" in rest]
    assert installs, "the Dockerfile installs nothing with pip"
    for rest in installs:
        assert "-c constraints.txt" in rest, f"RUN {rest}: install with -c constraints.txt (make lock)"


def test_configuration_reference_lists_every_variable() -> None:
    from dsjobs.storage import STORAGE_ENV_VARS

    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    variables = {s.env for s in API_SETTINGS} | set(OPERATOR_SETTINGS) | set(STORAGE_ENV_VARS)
    missing = sorted(v for v in variables if f"`{v}`" not in text)
    assert not missing, f"docs/configuration.md does not document {missing}"
