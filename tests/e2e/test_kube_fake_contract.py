"""FakeKube (tests/shared/kube_fake.py) answers as the real API server does.

The unit tests of the API's races and lost answers (tests/unit/test_api_servicer.py) run against
FakeKube: a real API server cannot lose an answer or let another writer in between two calls on
demand. What they prove holds only as far as FakeKube behaves like Kubernetes, so each sequence of
REST calls below runs twice, on a fresh FakeKube and on the local cluster's API server through the
API's own client (`dsjobs.api.kube.Kube`), and both must give the outcome the table states: the
status code and reason of an error (KubeError's fields), and for a success what matters of the
answer (the spec, labels, data written; whether the resourceVersion changed; whether the object is
being deleted).

On the cluster the operator also acts on ProjectJobs (labels, its status, its finalizer when the
job is deleted). A `SETTLE` step waits until it is done before calls that depend on the current
resourceVersion; outcomes name only the labels and finalizers the table writes. The job carries a
finalizer of this test's own as well, so that it stays while being deleted until the table's
PATCH removes the finalizers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from api_fixtures import apply_crds
from cluster_fixtures import ClusterHandle
from kube_fake import FakeKube

from dsjobs.api.errors import KubeError
from dsjobs.api.kube import MERGE_PATCH, Kube, jobs_path, namespaces_path, secrets_path
from dsjobs.controller.names import FINALIZER, JOB_LABEL, PROJECT_LABEL
from dsjobs.kubeconfig import load_config

HOLD = "contract.dsjobs.dev/hold"  # ours: the job stays while being deleted until a patch drops it
OPERATOR = "/apis/apps/v1/namespaces/dsjobs-system/deployments/dsjobs-operator"
SETTLE_TIMEOUT_S = 60
MARK = "written through the main resource"
# Placeholders in a step's body: the resourceVersion last seen, the one before it, the uid.
CURRENT, STALE, UID = "<current resourceVersion>", "<stale resourceVersion>", "<uid>"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Kind:
    name: str
    collection: Callable[[str], str]
    body: Callable[[str, str], dict[str, Any]]  # (namespace, name) -> the object to create


JOB = Kind(
    "ProjectJob",
    jobs_path,
    lambda ns, name: {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"a": "1", "b": "2"},
            "finalizers": [FINALIZER, HOLD],  # the operator's (the API's Create writes it) and ours
        },
        "spec": {"projectId": ns, "desc": "d0", "jobParameters": {"cmd": "true"}},
        "status": {"statusDetails": MARK},
    },
)
SECRET = Kind(
    "Secret",
    secrets_path,
    lambda ns, name: {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": {"a": "1", "b": "2"}},
        "type": "Opaque",
        "data": {"k": b64("x")},
        "stringData": {"s": "plain"},
    },
)


def view(obj: Mapping[str, Any], last_rv: str | None) -> dict[str, Any]:
    """What a successful answer is compared by (the table names the keys that matter)."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = obj.get("status")
    status = status if isinstance(status, dict) else {}  # a Status object's is "Success"
    return {
        "namespaced": bool(meta.get("namespace")),
        "spec": obj.get("spec"),
        "labels": {k: labels[k] for k in ("a", "b", "c") if k in labels},
        "data": obj.get("data"),
        "stringData": obj.get("stringData"),
        "rv_changed": meta.get("resourceVersion") != last_rv,
        "deleting": bool(meta.get("deletionTimestamp")),
        "held": HOLD in (meta.get("finalizers") or []),
        "status_marked": status.get("statusDetails") == MARK,
    }


@dataclass
class State:
    uid: str | None = None
    rv: str | None = None  # the resourceVersion last seen
    stale: str | None = None  # the one before it


@dataclass
class Step:
    method: str  # POST, GET, PATCH, DELETE, or SETTLE (wait for the operator; no outcome)
    body: Any = None  # of PATCH and DELETE; the values CURRENT, STALE and UID are filled in
    expect: str | dict[str, Any] = field(default_factory=dict)  # "409 Conflict", or the view's keys
    other_namespace: bool = False  # POST: the body names another namespace than the path


SETTLE = Step("SETTLE")


def fill(value: Any, state: State) -> Any:
    if isinstance(value, dict):
        return {k: fill(v, state) for k, v in value.items()}
    if value == CURRENT:
        return state.rv
    if value == STALE:
        assert state.stale is not None, "no earlier resourceVersion yet"
        return state.stale
    if value == UID:
        return state.uid
    return value


def rv(version: str) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": version}}


def precondition(**values: Any) -> dict[str, Any]:
    return {"preconditions": values, "propagationPolicy": "Background"}


NOT_FOUND = "404 NotFound"
CONFLICT = "409 Conflict"
OK: dict[str, Any] = {}

JOB_SEQUENCE = [
    Step(
        "POST",
        expect={
            "namespaced": True,
            "spec": {"projectId": "<ns>", "desc": "d0", "jobParameters": {"cmd": "true"}},
            "labels": {"a": "1", "b": "2"},
            "held": True,
            "deleting": False,
            "status_marked": False,  # status is the status subresource's: dropped on create
        },
    ),
    Step("POST", expect="409 AlreadyExists"),
    Step("POST", other_namespace=True, expect="400 BadRequest"),
    SETTLE,
    Step("GET", expect={"spec": {"projectId": "<ns>", "desc": "d0", "jobParameters": {"cmd": "true"}}}),
    Step(
        "PATCH", {"spec": {"desc": "d1"}, **rv(CURRENT)}, {"rv_changed": True, "labels": {"a": "1", "b": "2"}}
    ),
    SETTLE,
    Step("PATCH", {"spec": {"desc": "d2"}, **rv(STALE)}, CONFLICT),
    Step("GET", expect={"spec": {"projectId": "<ns>", "desc": "d1", "jobParameters": {"cmd": "true"}}}),
    # A patch that changes nothing writes nothing: the same resourceVersion.
    Step(
        "PATCH",
        {"spec": {"desc": "d1"}, "metadata": {"labels": {"a": "1"}, "resourceVersion": CURRENT}},
        {"rv_changed": False},
    ),
    Step("PATCH", {"spec": {"desc": "d1"}, **rv(STALE)}, CONFLICT),
    # null removes a key; a map merges key by key.
    Step(
        "PATCH",
        {"spec": {"desc": None}, "metadata": {"labels": {"a": None, "c": "3"}}},
        {
            "rv_changed": True,
            "labels": {"b": "2", "c": "3"},
            "spec": {"projectId": "<ns>", "jobParameters": {"cmd": "true"}},
        },
    ),
    SETTLE,
    # Through the main resource a status is not written.
    Step("PATCH", {"status": {"statusDetails": MARK}}, {"rv_changed": False, "status_marked": False}),
    Step("DELETE", precondition(uid="not-its-uid"), CONFLICT),
    Step("DELETE", precondition(uid=UID, resourceVersion=STALE), CONFLICT),
    Step("GET", expect={"deleting": False}),
    # With finalizers a DELETE only marks the job; it stays until they are removed.
    Step("DELETE", precondition(uid=UID, resourceVersion=CURRENT), {"deleting": True, "held": True}),
    Step("GET", expect={"deleting": True, "held": True}),
    Step("DELETE", precondition(uid=UID), {"deleting": True}),
    Step("PATCH", {"metadata": {"finalizers": None}}, {"deleting": True, "held": False}),
    Step("GET", expect=NOT_FOUND),
    Step("DELETE", precondition(uid=UID), NOT_FOUND),
    Step("DELETE", None, NOT_FOUND),
    Step("PATCH", {"metadata": {"labels": {"a": "1"}}}, NOT_FOUND),
]

SECRET_DATA = {"k": b64("x"), "s": b64("plain")}
SECRET_SEQUENCE = [
    # stringData is stored base64-encoded into data.
    Step(
        "POST",
        expect={"namespaced": True, "data": SECRET_DATA, "stringData": None, "labels": {"a": "1", "b": "2"}},
    ),
    Step("POST", expect="409 AlreadyExists"),
    Step("POST", other_namespace=True, expect="400 BadRequest"),
    Step("GET", expect={"data": SECRET_DATA, "rv_changed": False}),
    Step(
        "PATCH",
        {"data": {"k2": b64("y")}, **rv(CURRENT)},
        {"rv_changed": True, "data": {**SECRET_DATA, "k2": b64("y")}},
    ),
    Step("PATCH", {"data": {"k3": b64("z")}, **rv(STALE)}, CONFLICT),
    Step(
        "PATCH",
        {"data": {"k2": b64("y")}, "metadata": {"labels": {"b": "2"}, "resourceVersion": CURRENT}},
        {"rv_changed": False},
    ),
    Step(
        "PATCH",
        {"data": {"k": None}, "stringData": {"t": "y"}, "metadata": {"labels": {"a": None}}},
        {
            "rv_changed": True,
            "data": {"s": b64("plain"), "k2": b64("y"), "t": b64("y")},
            "stringData": None,
            "labels": {"b": "2"},
        },
    ),
    Step("DELETE", precondition(uid="not-its-uid"), CONFLICT),
    Step("DELETE", precondition(resourceVersion=STALE), CONFLICT),
    Step("GET", expect={"rv_changed": False}),
    # null preconditions are none: no finalizers, so gone at once.
    Step("DELETE", precondition(uid=None, resourceVersion=CURRENT), OK),
    Step("GET", expect=NOT_FOUND),
    Step("DELETE", precondition(uid=UID), NOT_FOUND),
    Step("DELETE", None, NOT_FOUND),
    Step("PATCH", {"data": {"k": b64("x")}}, NOT_FOUND),
]

SEQUENCES = [(JOB, JOB_SEQUENCE), (SECRET, SECRET_SEQUENCE)]


# --- running a sequence -----------------------------------------------------------------------


Settle = Callable[[Any, str, State], Any]


async def run(
    kube: Any, kind: Kind, namespace: str, name: str, steps: list[Step], settle: Settle
) -> list[Any]:
    """Each step's outcome: "<status> <reason>" for an error, else the view's keys the step names."""
    path = f"{kind.collection(namespace)}/{name}"
    state = State()
    outcomes: list[Any] = []
    for step in steps:
        if step.method == "SETTLE":
            await settle(kube, path, state)
            continue
        try:
            if step.method == "POST":
                body = kind.body(namespace, name)
                if step.other_namespace:
                    body["metadata"] = {**body["metadata"], "name": f"{name}-x", "namespace": "kube-public"}
                answer = await kube.request("POST", kind.collection(namespace), body=body)
            elif step.method == "PATCH":
                answer = await kube.request(
                    "PATCH", path, body=fill(step.body, state), content_type=MERGE_PATCH
                )
            else:
                body = fill(step.body, state)
                answer = await kube.request(step.method, path, **({"body": body} if body is not None else {}))
        except KubeError as exc:
            outcomes.append(f"{exc.status} {exc.reason}")
            continue
        seen = view(answer, state.rv)
        outcomes.append({k: seen[k] for k in step.expect} if isinstance(step.expect, dict) else seen)
        meta = answer.get("metadata") or {}
        if answer.get("kind") != "Status" and meta.get("resourceVersion"):
            if meta["resourceVersion"] != state.rv:
                state.stale, state.rv = state.rv, meta["resourceVersion"]
            state.uid = meta.get("uid", state.uid)
    return outcomes


async def settle_fake(kube: FakeKube, path: str, state: State) -> None:
    """Nothing acts on FakeKube's objects but the test."""


async def settle_real(kube: Kube, path: str, state: State) -> None:
    """Wait until the operator (when one runs) has acted on the job: labelled it, observed its
    current generation, and the resourceVersion stays put for a moment. Then take that as seen."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        obj = await kube.request("GET", path)
        operator_runs = await _operator_ready(kube)
        meta, status = obj["metadata"], obj.get("status") or {}
        observed = not operator_runs or (
            JOB_LABEL in (meta.get("labels") or {})
            and status.get("observedGeneration") == meta.get("generation")
        )
        if observed:
            # Still for 1.5 s: on a loaded machine the operator's writes can be farther apart than
            # 0.5 s, and a later one made the next PATCH of the version seen here a real 409.
            await asyncio.sleep(1.5)
            again = await kube.request("GET", path)
            if again["metadata"]["resourceVersion"] == meta["resourceVersion"]:
                if meta["resourceVersion"] != state.rv:
                    state.stale, state.rv = state.rv, meta["resourceVersion"]
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not settle in {SETTLE_TIMEOUT_S}s: {obj}")
        await asyncio.sleep(0.2)


async def _operator_ready(kube: Kube) -> bool:
    try:
        deployment = await kube.request("GET", OPERATOR)
    except KubeError as exc:
        if exc.status == 404:
            return False
        raise
    return bool((deployment.get("status") or {}).get("readyReplicas"))


# --- fixtures and the test --------------------------------------------------------------------


@dataclass
class Cluster:
    kubeconfig: str
    namespace: str

    async def client(self) -> Kube:
        cfg, refresh = load_config(self.kubeconfig)
        kube = Kube(cfg, refresh, timeout=30)
        await kube.start()
        return kube


@pytest.fixture(scope="module")
def cluster(dev_cluster: ClusterHandle) -> Iterator[Cluster]:
    """A project namespace of its own (the admission policy wants spec.projectId to name it)."""
    namespace = f"kube-contract-{secrets.token_hex(3)}"
    here = Cluster(str(dev_cluster.kubeconfig), namespace)
    # The CRDs as the repository has them (idempotent): without them the ProjectJob sequences
    # would have nothing to compare, whichever modules ran before.
    apply_crds(dev_cluster.api_client)

    async def setup() -> None:
        kube = await here.client()
        try:
            ns = {"metadata": {"name": namespace, "labels": {PROJECT_LABEL: namespace}}}
            await kube.request("POST", namespaces_path(), body=ns)
        finally:
            await kube.close()

    async def teardown() -> None:
        kube = await here.client()
        try:
            # A failed sequence may leave a job held by our finalizer.
            listed = await kube.request("GET", jobs_path(namespace))
            for obj in listed.get("items") or []:
                path = jobs_path(namespace, obj["metadata"]["name"])
                patch = {"metadata": {"finalizers": None}}
                await kube.request("PATCH", path, body=patch, content_type=MERGE_PATCH)
            await kube.request("DELETE", namespaces_path(namespace))
        finally:
            await kube.close()

    asyncio.run(setup())
    try:
        yield here
    finally:
        asyncio.run(teardown())


def expected(step: Step, namespace: str) -> Any:
    def named(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: named(v) for k, v in value.items()}
        return namespace if value == "<ns>" else value

    return named(step.expect)


@pytest.mark.parametrize(("kind", "steps"), SEQUENCES, ids=[k.name for k, _ in SEQUENCES])
def test_fake_kube_answers_as_the_api_server(cluster: Cluster, kind: Kind, steps: list[Step]) -> None:
    name = f"c-{secrets.token_hex(3)}"

    async def real() -> list[Any]:
        kube = await cluster.client()
        try:
            return await run(kube, kind, cluster.namespace, name, steps, settle_real)
        finally:
            await kube.close()

    real_outcomes = asyncio.run(real())
    fake_outcomes = asyncio.run(run(FakeKube(), kind, cluster.namespace, name, steps, settle_fake))
    calls = [s for s in steps if s.method != "SETTLE"]
    rows = []
    for i, (step, want, got_real, got_fake) in enumerate(
        zip(calls, [expected(s, cluster.namespace) for s in calls], real_outcomes, fake_outcomes, strict=True)
    ):
        if not (got_real == got_fake == want):
            rows.append(
                f"#{i} {step.method} {step.body}\n  table: {want}\n  real:  {got_real}\n  fake:  {got_fake}"
            )
    assert not rows, f"{kind.name}: {len(rows)} step(s) differ:\n" + "\n".join(rows)


def test_the_cluster_wide_lists_the_project_fakes_stand_for(cluster: Cluster) -> None:
    # tests/unit/test_api_projects.py's FakeKube answers the API's two cluster-wide lists
    # (api/cluster.py) as if the API server applied their selectors: a job found by id in any
    # namespace (fieldSelector metadata.name), project namespaces by their label.
    other = f"{cluster.namespace}-b"
    plain = f"{cluster.namespace}-plain"
    name, decoy = f"c-{secrets.token_hex(3)}", f"c-{secrets.token_hex(3)}"

    def job(ns: str, job_name: str) -> dict[str, Any]:
        body = JOB.body(ns, job_name)
        body["metadata"]["finalizers"] = []
        return body

    async def check() -> tuple[list[tuple[str, str]], dict[str, str]]:
        kube = await cluster.client()
        try:
            await kube.request(
                "POST",
                namespaces_path(),
                body={"metadata": {"name": other, "labels": {PROJECT_LABEL: other}}},
            )
            await kube.request("POST", namespaces_path(), body={"metadata": {"name": plain}})
            for ns, job_name in ((cluster.namespace, name), (other, name), (other, decoy)):
                await kube.request("POST", jobs_path(ns), body=job(ns, job_name))
            found = await kube.request(
                "GET", jobs_path(), params={"fieldSelector": f"metadata.name={name}", "limit": 10}
            )
            projects = await kube.request("GET", namespaces_path(), params={"labelSelector": PROJECT_LABEL})
            return (
                sorted((o["metadata"]["namespace"], o["metadata"]["name"]) for o in found["items"]),
                {
                    o["metadata"]["name"]: o["metadata"]["labels"][PROJECT_LABEL]
                    for o in projects["items"]
                    if o["metadata"]["name"] in (cluster.namespace, other, plain)
                },
            )
        finally:
            for ns, job_name in ((cluster.namespace, name), (other, name), (other, decoy)):
                with contextlib.suppress(KubeError):
                    await kube.request("DELETE", jobs_path(ns, job_name))
            for ns in (other, plain):
                with contextlib.suppress(KubeError):
                    await kube.request("DELETE", namespaces_path(ns))
            await kube.close()

    jobs, labelled = asyncio.run(check())
    assert jobs == sorted([(cluster.namespace, name), (other, name)])
    assert labelled == {cluster.namespace: cluster.namespace, other: other}
