"""The operator's pod cache (dsjobs.controller.caches) against what a LIST returns."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import REGISTRY

from dsjobs.controller.caches import PodCache
from dsjobs.controller.names import JOB_LABEL

NS = "project-a"


def body(name: str, uid: str, rev: int, job: str = "job-1", phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "resourceVersion": str(rev),
            "labels": {JOB_LABEL: job},
        },
        "status": {"phase": phase},
    }


def test_a_pod_deleted_while_the_watch_was_away_is_dropped_after_a_list() -> None:
    cache = PodCache()
    cache.seeded()
    cache.apply(body("job-1-a1", "u1", 10), deleted=False)
    cache.apply(body("job-2-a1", "u2", 11, job="job-2"), deleted=False)
    before = cache.snapshot()
    # The LIST (no DELETED event came for job-1-a1: the watch resumed with 410 Gone).
    gone = cache.vanished(before, {"u2"})
    assert [(key, view.name, view.gone) for key, view in gone] == [((NS, "job-1"), "job-1-a1", True)]
    assert cache.get((NS, "job-1")) == [] and [p.name for p in cache.get((NS, "job-2"))] == ["job-2-a1"]
    assert cache.vanished(cache.snapshot(), {"u2"}) == []  # told once


def test_what_an_event_changed_during_the_list_is_the_event_s() -> None:
    cache = PodCache()
    cache.seeded()
    cache.apply(body("job-1-a1", "u1", 10), deleted=False)
    before = cache.snapshot()
    # While the LIST ran: the pod was updated (newer than what the LIST could have missed), and
    # a new pod was created after the LIST was served.
    cache.apply(body("job-1-a1", "u1", 12, phase="Succeeded"), deleted=False)
    cache.apply(body("job-3-a1", "u3", 13, job="job-3"), deleted=False)
    assert cache.vanished(before, set()) == []
    assert cache.get((NS, "job-1"))[0].phase == "Succeeded"
    assert [p.name for p in cache.get((NS, "job-3"))] == ["job-3-a1"]


def test_an_invalid_instance_type_is_left_out_saying_why(caplog: Any) -> None:
    # Only pydantic read them: a catalog edit the CRD lets through (requests above limits, a bad
    # label key) made every job of the type fail on a wall of pod fields naming no InstanceType.
    from dsjobs.controller.caches import InstanceTypeCache

    def it(name: str, rev: int, **spec: Any) -> dict[str, Any]:
        base = {"vcpu": 8, "memory": "32Gi", "resources": {"requests": {"cpu": "8"}, "limits": {"cpu": "8"}}}
        return {"metadata": {"name": name, "resourceVersion": str(rev)}, "spec": {**base, **spec}}

    cache = InstanceTypeCache()
    cache.seed([it("c1.4", 1)])
    cache.apply(
        it(
            "c1.8",
            2,
            resources={"requests": {"cpu": "16"}, "limits": {"cpu": "8"}},
            nodeSelector={"bad key!": "x"},
        ),
        deleted=False,
    )
    assert set(cache.catalog()) == {"c1.4"}
    (why,) = cache.invalid().values()
    assert "spec.resources" in why and "spec.nodeSelector" in why and "\n" not in why
    assert [r.getMessage() for r in caplog.records if "InstanceType c1.8 is invalid" in r.getMessage()]
    # Not only in the log: a gauge an alert can watch.
    assert REGISTRY.get_sample_value("dsjobs_instance_types_invalid") == 1
    caplog.set_level(logging.INFO, logger="dsjobs.controller.caches")
    cache.apply(it("c1.8", 3), deleted=False)  # fixed
    assert set(cache.catalog()) == {"c1.4", "c1.8"} and cache.invalid() == {}
    assert REGISTRY.get_sample_value("dsjobs_instance_types_invalid") == 0
    assert "InstanceType c1.8 is valid again" in caplog.text


def test_a_scrape_counts_invalid_instance_types_while_the_event_loop_changes_the_cache() -> None:
    # The gauge is worked out in prometheus_client's thread; the watch adds and removes types on
    # the event loop. A type added in the middle of a scrape (made deterministic here: while the
    # scrape reads an entry) failed the whole scrape (HTTP 500, every series missing).
    from dsjobs.controller.caches import InstanceTypeCache

    spec = {"vcpu": 4, "memory": "16Gi", "resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "4"}}}
    cache = InstanceTypeCache()
    cache.seed([{"metadata": {"name": "c1.4", "resourceVersion": "1"}, "spec": spec}])

    class AddsAType(tuple):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            cache.apply({"metadata": {"name": "g1.1", "resourceVersion": "2"}, "spec": spec}, deleted=False)
            return super().__iter__()

    cache._types["c1.4"] = AddsAType(cache._types["c1.4"])
    assert REGISTRY.get_sample_value("dsjobs_instance_types_invalid") == 0
    assert set(cache.catalog()) == {"c1.4", "g1.1"}


def test_an_instance_type_deleted_while_the_watch_was_away_leaves_the_catalog_after_a_list() -> None:
    from dsjobs.controller.caches import InstanceTypeCache

    def it(name: str, rev: int) -> dict[str, Any]:
        spec = {"vcpu": 4, "memory": "16Gi", "resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "4"}}}
        return {"metadata": {"name": name, "resourceVersion": str(rev)}, "spec": spec}

    cache = InstanceTypeCache()
    cache.seed([it("c1.4", 1), it("c1.8", 2), it("g1.1", 3)])
    assert not cache.apply(it("c1.4", 1), deleted=False)  # the watch's first event: nothing new
    before = cache.snapshot()
    # While the LIST ran: g1.1 was edited (its event is newer than anything the LIST missed), and
    # a type created after the LIST was served arrived by its event.
    assert cache.apply(it("g1.1", 5), deleted=False)
    assert cache.apply(it("g2.1", 6), deleted=False)
    assert cache.drop_vanished(before, ["c1.4"]) == ["c1.8"]
    assert set(cache.catalog()) == {"c1.4", "g1.1", "g2.1"}
    assert cache.drop_vanished(cache.snapshot(), ["c1.4", "g1.1", "g2.1"]) == []


def test_the_jobs_waiting_on_a_type_are_those_whose_pod_no_node_took() -> None:
    # Told when the type goes: a job waiting past its budget on its last type has no timer.
    cache = PodCache()
    cache.seeded()
    waiting = body("job-1-a1", "u1", 10, phase="Pending")
    waiting["metadata"]["labels"]["dsjobs.dev/instance-type"] = "g1.1"
    running = body("job-2-a1", "u2", 11, job="job-2")
    running["metadata"]["labels"]["dsjobs.dev/instance-type"] = "g1.1"
    running["spec"] = {"nodeName": "gpu-0"}
    other = body("job-3-a1", "u3", 12, job="job-3", phase="Pending")
    other["metadata"]["labels"]["dsjobs.dev/instance-type"] = "c1.4"
    for b in (waiting, running, other):
        cache.apply(b, deleted=False)
    assert cache.waiting_on("g1.1") == [(NS, "job-1")]
    assert cache.waiting_on("c1.4") == [(NS, "job-3")]
    assert cache.waiting_on("g2.8") == []
