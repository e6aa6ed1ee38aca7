"""The operator's small pure pieces: settings, merge patches, input cleanup, pod summaries, metrics."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import dataclasses
import logging
import re
import ssl
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dsjobs.controller import metrics
from dsjobs.controller.cleanup import InputRefs, delete_job_data, input_hashes
from dsjobs.controller.kube import TLS_READ_BUFFER, merge_diff, shrink_tls_read_buffers
from dsjobs.controller.podview import PodView
from dsjobs.controller.settings import (
    SETTINGS_DOC,
    OperatorSettings,
    SettingsError,
    settings_from_env,
    settings_table,
)
from dsjobs.models import ProjectJobSpec

A, B, C = "a" * 64, "b" * 64, "c" * 64
#: Storage settings that may work: the operator's start checks them with its own.
STORE_ENV = {
    "DSJOBS_S3_ENDPOINT": "http://s3:9000",
    "DSJOBS_S3_BUCKET": "b",
    "DSJOBS_S3_ACCESS_KEY": "a",
    "DSJOBS_S3_SECRET_KEY": "s",
}


def test_settings_defaults_and_env() -> None:
    assert settings_from_env({}) == OperatorSettings()
    s = settings_from_env(
        {
            "DSJOBS_RUNNER_IMAGE": "r:1",
            "DSJOBS_NAMESPACES": "p1, p2,",
            "DSJOBS_IMAGE_PULL_TIMEOUT": "15",
            "DSJOBS_METRICS_PORT": "0",
            "DSJOBS_PYTHON_IMAGE": "reg/py:{version}",
        }
    )
    assert (s.runner_image, s.namespaces, s.image_pull_timeout_seconds, s.metrics_port) == (
        "r:1",
        ("p1", "p2"),
        15.0,
        0,
    )
    assert s.python_image_for("3.12") == "reg/py:3.12" and s.python_image_for("") == "reg/py:3.11"
    assert s.python_image_for("3.12", gpu=True) == "reg/py:3.12"
    gpu = settings_from_env({"DSJOBS_PYTHON_GPU_IMAGE": "reg/cuda-py:1.0"})
    assert gpu.python_image_for("3.12", gpu=True) == "reg/cuda-py:1.0"
    assert gpu.python_image_for("3.12") == "python:3.12-slim"
    with pytest.raises(SettingsError, match="DSJOBS_PYTHON_GPU_IMAGE='reg/cuda-py': must contain"):
        settings_from_env({"DSJOBS_PYTHON_GPU_IMAGE": "reg/cuda-py"})
    assert settings_from_env({"DSJOBS_OPERATOR_LOG_FORMAT": "text"}).log_format == "text"
    with pytest.raises(SettingsError, match="DSJOBS_OPERATOR_LOG_FORMAT='yaml': must be one of json, text"):
        settings_from_env({"DSJOBS_OPERATOR_LOG_FORMAT": "yaml"})
    with pytest.raises(SettingsError):
        settings_from_env({"DSJOBS_METRICS_PORT": "many"})
    with pytest.raises(SettingsError):
        settings_from_env({"DSJOBS_IMAGE_PULL_TIMEOUT": "-1"})
    assert settings_from_env({"DSJOBS_STORAGE_CREDENTIALS": "project"}).storage_credentials == "project"
    with pytest.raises(
        SettingsError, match="DSJOBS_STORAGE_CREDENTIALS='projects': must be one of operator, project"
    ):
        settings_from_env({"DSJOBS_STORAGE_CREDENTIALS": "projects"})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DSJOBS_FINISHED_POD_RETENTION", "inf", "from 0 to 31536000"),
        ("DSJOBS_FINISHED_POD_RETENTION", "1e12", "from 0 to 31536000"),
        ("DSJOBS_IMAGE_PULL_TIMEOUT", "nan", "from 0 to 31536000"),
        ("DSJOBS_STATUS_WRITE_INTERVAL", "inf", "from 0 to 31536000"),
        ("DSJOBS_MAX_REQUEUE", "0", "must be 1 or more"),
        ("DSJOBS_POD_RESYNC_INTERVAL", "0.5", "must be 1 or more"),
        ("DSJOBS_SHUTDOWN_GRACE_MARGIN", "-5", "from 0 to 3600"),
        ("DSJOBS_KUBE_CONCURRENCY", "0", "must be 1 or more"),
        ("DSJOBS_KUBE_CONCURRENCY", "-5", "must be 1 or more"),
        ("DSJOBS_WATCH_CHUNK_SIZE", "-1", "must be 0 or more"),
        # A pattern served nothing, silently (Kopf drops it with namespace observation off).
        ("DSJOBS_NAMESPACES", "dsjobs-*", r"'dsjobs-\*': not a namespace name"),
        ("DSJOBS_NAMESPACES", "team-a,!kube-system", "'!kube-system': not a namespace name"),
        ("DSJOBS_NAMESPACES", "Team-A", "'Team-A': not a namespace name"),
        ("DSJOBS_METRICS_PORT", "70000", "a port from 0 .off. to 65535"),
        ("DSJOBS_LIVENESS_PORT", "-1", "a port from 0 .off. to 65535"),
    ],
)
def test_settings_that_would_break_every_reconcile_are_refused(name: str, value: str, message: str) -> None:
    """An admin's `inf` (keep finished pods for ever) overflowed the datetime arithmetic of
    every finished job's plan, which then never finalized; 0 requeue woke timers in a loop; a
    Kubernetes concurrency of 0 had every call wait for ever; a port past 65535 failed in Kopf's
    startup, retried each minute, instead of stopping the operator."""
    with pytest.raises(SettingsError, match=f"{name}=.*{message}"):
        settings_from_env({name: value})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DSJOBS_RUNNER_CPU_LIMIT": "half"}, "DSJOBS_RUNNER_CPU_LIMIT='half': not a Kubernetes quantity"),
        ({"DSJOBS_RUNNER_MEMORY_REQUEST": "64MB!"}, "DSJOBS_RUNNER_MEMORY_REQUEST='64MB!': not a Kubernetes"),
        (
            {"DSJOBS_RUNNER_CPU_LIMIT": "10m"},
            r"DSJOBS_RUNNER_CPU_LIMIT='10m': must not be less than DSJOBS_RUNNER_CPU_REQUEST \(50m\)",
        ),
        (
            {"DSJOBS_RUNNER_IMAGE_PULL_POLICY": "always"},
            "DSJOBS_RUNNER_IMAGE_PULL_POLICY='always': must be one of Always, IfNotPresent, Never",
        ),
        (
            {"DSJOBS_RUNNER_IMAGE_PULL_SECRET": "Registry_Key"},
            r"DSJOBS_RUNNER_IMAGE_PULL_SECRET='Registry_Key': not a Secret name \(DNS-1123 subdomain\)",
        ),
        (
            {"DSJOBS_RUNNER_MEMORY_LIMIT": "1Gi", "DSJOBS_RUNNER_MEMORY_REQUEST": "2Gi"},
            r"DSJOBS_RUNNER_MEMORY_LIMIT='1Gi': must not be less than DSJOBS_RUNNER_MEMORY_REQUEST \(2Gi\)",
        ),
    ],
)
def test_runner_resources_are_quantities_a_pod_accepts(env: dict[str, str], message: str) -> None:
    # Checked at start-up: a bad one would make every job's pod Invalid.
    with pytest.raises(SettingsError, match=message):
        settings_from_env(env)


def test_every_wrong_setting_is_named_at_once() -> None:
    # Told one at a time, each mistake cost the admin a crash loop and a rollout.
    env = {
        "DSJOBS_STATUS_WRITE_INTERVAL": "inf",
        "DSJOBS_MAX_REQUEUE": "0.5",
        "DSJOBS_METRICS_PORT": "many",
        "DSJOBS_RUNNER_CPU_REQUEST": "lots",
        "DSJOBS_RUNNER_CPU_LIMIT": "1",
        "DSJOBS_OPERATOR_LOG_LEVEL": "loud",
    }
    with pytest.raises(SettingsError) as caught:
        settings_from_env(env)
    named = sorted(line.split("=", 1)[0] for line in str(caught.value).splitlines())
    assert named == [
        "DSJOBS_MAX_REQUEUE",
        "DSJOBS_METRICS_PORT",
        "DSJOBS_OPERATOR_LOG_LEVEL",
        "DSJOBS_RUNNER_CPU_REQUEST",
        "DSJOBS_STATUS_WRITE_INTERVAL",
    ], str(caught.value)


def test_the_operator_log_level_is_a_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dsjobs.controller import __main__ as main

    assert settings_from_env({}).log_level == "INFO"
    assert settings_from_env({"DSJOBS_OPERATOR_LOG_LEVEL": "warning"}).log_level == "WARNING"
    names = ("dsjobs", "kopf", "aiohttp.access")
    before = {n: logging.getLogger(n).level for n in names}
    try:
        main.set_log_levels("WARNING", verbose=False)
        assert {n: logging.getLevelName(logging.getLogger(n).level) for n in names} == dict.fromkeys(
            names, "WARNING"
        )
        main.set_log_levels("DEBUG", verbose=False)
        assert logging.getLogger("dsjobs").level == logging.DEBUG
        assert logging.getLogger("kopf").level == logging.WARNING  # one line per handler call otherwise
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)
    # A bad setting: one line naming the variable and the rule, exit 2 (was a traceback, exit 1),
    # before anything else (Kopf, the kubernetes client kept out of sys.modules).
    monkeypatch.setenv("DSJOBS_OPERATOR_LOG_LEVEL", "loud")
    for name, value in STORE_ENV.items():
        monkeypatch.setenv(name, value)
    assert main.main([]) == 2
    assert capsys.readouterr().err == (
        "dsjobs.controller: DSJOBS_OPERATOR_LOG_LEVEL='loud': must be one of DEBUG, INFO, WARNING, ERROR\n"
    )
    # In a process of its own: this one has imported Kopf for other tests already.
    probe = "import sys; from dsjobs.controller import __main__ as m; m.main([]); print(sorted({'kopf', 'kubernetes'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "[]", (done.stdout, done.stderr)


def test_every_documented_setting_is_a_field() -> None:
    names = {f.name for f in dataclasses.fields(OperatorSettings)}
    assert {attr for attr, _ in SETTINGS_DOC.values()} <= names
    table = settings_table()
    assert all(f"`{env}`" in table for env in SETTINGS_DOC)


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({}, {"a": 1}, {"a": 1}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1}}, {"a": {"y": None}}),
        ({"l": [1, 2]}, {"l": [1]}, {"l": [1]}),
        ({"a": 1}, {"a": 1}, {}),
        ({"a": {"x": 1}}, {"a": 5}, {"a": 5}),
    ],
)
def test_merge_diff(old: dict[str, Any], new: dict[str, Any], patch: dict[str, Any]) -> None:
    assert merge_diff(old, new) == patch
    assert _apply(old, patch) == new


def _apply(target: Any, patch: Any) -> Any:
    """RFC 7386, to check that the diff really produces `new`."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _apply(result.get(key), value)
    return result


def _job(
    name: str,
    shas: list[str],
    *,
    project: str = "p",
    cleared: bool = False,
    deleting: bool = False,
    modules: list[str] | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "cmd": "x",
        "inputFiles": [{"desc": {"path": f"f{i}"}, "sha256": s} for i, s in enumerate(shas)],
    }
    if modules:
        local = [{"desc": {"path": "m.zip"}, "sha256": s, "compressionType": "ZIP"} for s in modules]
        params["env"] = {"pythonEnv": {"localModules": local}}
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"projectId": project, "jobParameters": params},
        "status": {"dataCleared": cleared},
    }


def test_inputs_are_deleted_only_when_no_live_job_of_the_project_uses_them() -> None:
    mine = _job("me", [A, B, C], modules=[C])
    spec = ProjectJobSpec.model_validate(mine["spec"])
    assert input_hashes(spec) == {A, B, C}
    refs = InputRefs()
    others = [
        mine,
        _job("uses-a", [A]),
        _job("cleared-uses-b", [B], cleared=True),
        _job("deleting-uses-c", [C], deleting=True),
        _job("other-project-uses-b", [B], project="q"),
    ]
    for body in others:
        refs.update(("ns", body["metadata"]["name"]), body)
    assert refs.unused(("ns", "me"), "p", input_hashes(spec)) == [B, C]
    refs.update(("ns", "module-user"), _job("module-user", [], modules=[C]))
    assert refs.unused(("ns", "me"), "p", input_hashes(spec)) == [B]
    # A job that stops using an input (deleted, data cleared) releases it.
    refs.update(("ns", "module-user"), _job("module-user", [], modules=[C], deleting=True))
    refs.discard(("ns", "uses-a"))
    assert refs.unused(("ns", "me"), "p", input_hashes(spec)) == [A, B, C]
    # Updates are idempotent: the same body twice counts once.
    refs.update(("ns", "twice"), _job("twice", [A]))
    refs.update(("ns", "twice"), _job("twice", [A]))
    refs.discard(("ns", "twice"))
    assert refs.unused(("ns", "me"), "p", [A]) == [A]


def test_jobs_cleared_together_do_not_keep_a_shared_input_for_each_other() -> None:
    # DeleteAllData, or two TTLs at once: each job's clear saw the other as a user of A, and once
    # both were cleared nothing referenced A any more to delete it.
    refs = InputRefs()
    for name in ("x", "y"):
        body = _job(name, [A])
        body["spec"]["clearData"] = True
        refs.update(("ns", name), body)
    assert refs.unused(("ns", "x"), "p", [A]) == [A]


def test_a_job_whose_data_deletion_began_uses_nothing_but_a_job_still_to_run_keeps_its_inputs() -> None:
    refs = InputRefs()
    marked = _job("x", [A])
    marked["status"]["conditions"] = [
        {
            "type": "DataCleared",
            "status": "False",
            "reason": "Deleting",
            "message": "stored data being deleted",
        }
    ]
    refs.update(("ns", "x"), marked)
    assert refs.unused(("ns", "me"), "p", [A]) == [A]
    # clearData set with kubectl on a job executed and not ended yet (the API refuses it): the
    # clear waits for its end, and its stage-in needs A meanwhile.
    running = _job("y", [A])
    running["spec"].update(execute=True, clearData=True)
    for status in ({}, {"phase": "PREPARING"}, {"phase": "EXECUTING"}):
        running["status"] = status
        refs.update(("ns", "y"), running)
        assert refs.unused(("ns", "me"), "p", [A]) == []
    running["status"] = {"phase": "SUCCESS"}
    refs.update(("ns", "y"), running)
    assert refs.unused(("ns", "me"), "p", [A]) == [A]


def test_jobs_whose_ttls_run_out_together_do_not_keep_a_shared_input_for_each_other() -> None:
    # Both clears started (after an operator restart, all expired jobs at once) before either's
    # dataCleared came back through the watch: each saw the other as a user of A, and once both
    # were cleared nothing referenced A any more to delete it.
    refs = InputRefs()
    bodies = {name: _job(name, [A]) for name in ("x", "y")}
    for name, body in bodies.items():
        body["metadata"]["uid"] = f"uid-{name}"
        refs.update(("ns", name), body)
    refs.clearing(("ns", "x"), "uid-x")
    refs.clearing(("ns", "y"), "uid-y")
    assert refs.is_clearing(("ns", "x"), "uid-x") and not refs.is_clearing(("ns", "x"), "uid-x2")
    refs.update(("ns", "x"), bodies["x"])  # a watch event from before the clear is not a user
    assert refs.unused(("ns", "x"), "p", [A]) == [A]
    assert refs.unused(("ns", "y"), "p", [A]) == [A]
    # A job made again under the name (another uid) uses its inputs, as does one after a discard.
    again = _job("x", [A])
    again["metadata"]["uid"] = "uid-x2"
    refs.update(("ns", "x"), again)
    assert refs.unused(("ns", "y"), "p", [A]) == []
    refs.discard(("ns", "y"))
    refs.update(("ns", "y"), bodies["y"])
    refs.discard(("ns", "x"))
    assert refs.unused(("ns", "z"), "p", [A]) == []


def test_the_inputs_to_delete_are_decided_once_the_job_s_prefix_is_gone() -> None:
    # Deleting a prefix of thousands of log chunks takes a while (and queues behind other
    # clears): a job seen meanwhile that uses one of the inputs must keep it.
    refs = InputRefs()
    refs.update(("ns", "me"), _job("me", [A, B]))
    deleted: list[str] = []

    class Store:
        def delete_prefix(self, prefix: str) -> int:
            deleted.append(prefix)
            refs.update(("ns", "new"), _job("new", [A]))  # created while the prefix went
            return 3

        def delete(self, key: str) -> None:
            deleted.append(key)

    unused = lambda: refs.unused(("ns", "me"), "p", [A, B])  # noqa: E731
    asyncio.run(delete_job_data(Store(), "p", "me", unused))  # type: ignore[arg-type]
    assert deleted == ["projects/p/jobs/me/", f"projects/p/inputs/{B}"]


def test_deletions_run_in_threads_of_their_own() -> None:
    # A store that stops answering holds each deletion for minutes: in the loop's default
    # executor a batch of them made a forced cancel's word to the runner, a result's read and the
    # storage check wait behind them.
    threads: list[str] = []

    class Store:
        def delete_prefix(self, prefix: str) -> int:
            threads.append(threading.current_thread().name)
            return 0

        def delete(self, key: str) -> None:
            threads.append(threading.current_thread().name)

    refs = InputRefs()
    refs.update(("ns", "me"), _job("me", [A]))
    unused = lambda: refs.unused(("ns", "me"), "p", [A])  # noqa: E731
    asyncio.run(delete_job_data(Store(), "p", "me", unused))  # type: ignore[arg-type]
    assert len(threads) == 2 and all(t.startswith("dsjobs-deletion") for t in threads), threads


def test_each_input_is_asked_about_again_just_before_it_is_deleted() -> None:
    # Deleting a hundred inputs from a slow store takes a while: a job seen meanwhile keeps its.
    refs = InputRefs()
    refs.update(("ns", "me"), _job("me", [A, B, C]))
    deleted: list[str] = []

    class Store:
        def delete_prefix(self, prefix: str) -> int:
            deleted.append(prefix)
            return 0

        def delete(self, key: str) -> None:
            deleted.append(key)
            refs.update(("ns", "new"), _job("new", [C]))  # created while A went

    unused = lambda: refs.unused(("ns", "me"), "p", [A, B, C])  # noqa: E731
    asyncio.run(delete_job_data(Store(), "p", "me", unused))  # type: ignore[arg-type]
    assert deleted == ["projects/p/jobs/me/", f"projects/p/inputs/{A}", f"projects/p/inputs/{B}"]
    # A job whose data was cleared before: only its prefix (its inputs were dealt with then).
    deleted.clear()
    asyncio.run(delete_job_data(Store(), "p", "me", unused, with_inputs=False))  # type: ignore[arg-type]
    assert deleted == ["projects/p/jobs/me/"]


def test_the_start_up_list_never_overrides_what_the_watch_told_since() -> None:
    # The LIST is one snapshot, its pages applied while the watch goes on: a job re-created
    # under its name (using A) or deleted meanwhile keeps what the watch said.
    refs = InputRefs()
    refs.update(("ns", "n"), _job("n", [A]))  # the new job "n"
    refs.discard(("ns", "gone"))  # deleted while the LIST paged
    refs.seed(("ns", "n"), _job("n", [B]))  # the old "n" of the snapshot
    refs.seed(("ns", "gone"), _job("gone", [C]))
    refs.seed(("ns", "listed-only"), _job("listed-only", [B]))
    refs.seeded()
    assert refs.unused(("ns", "me"), "p", [A, B, C]) == [C]
    # After the LIST, the watch alone tells.
    refs.update(("ns", "later"), _job("later", [C]))
    assert refs.unused(("ns", "me"), "p", [A, B, C]) == []


def test_podview_reads_what_the_status_function_needs() -> None:
    view = PodView.from_pod(
        {
            "metadata": {
                "name": "j-a2",
                "uid": "u",
                "creationTimestamp": "2025-06-01T11:00:00Z",
                "labels": {"dsjobs.dev/attempt": "2", "dsjobs.dev/instance-type": "g1.1"},
                "annotations": {"dsjobs.dev/instance-type-index": "1"},
            },
            "spec": {"nodeName": "gpu-0", "containers": [{"name": "job", "image": "img:1"}]},
            "status": {
                "phase": "Running",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [
                    {"name": "job", "state": {"running": {"startedAt": "2025-06-01T11:00:05Z"}}},
                    {"name": "ship", "state": {"terminated": {"exitCode": 0, "message": "{}"}}},
                ],
            },
        }
    )
    assert (view.attempt, view.instance_type, view.instance_type_index, view.node_name) == (
        2,
        "g1.1",
        1,
        "gpu-0",
    )
    assert view.scheduled and not view.terminal and not view.deleting
    job = view.container("job")
    assert job is not None and job.state == "running" and job.started_at is not None
    ship = view.container("ship")
    assert ship is not None and ship.exit_code == 0 and ship.message == "{}"
    assert dict(view.images) == {"job": "img:1"}
    assert PodView.from_pod({"metadata": {"name": "x"}}, gone=True).terminal


def test_a_pod_belongs_to_the_project_job_that_controls_it() -> None:
    def pod(*refs: dict[str, object]) -> PodView:
        return PodView.from_pod({"metadata": {"name": "j-a1", "ownerReferences": list(refs)}})

    ours = pod({"kind": "ProjectJob", "uid": "now", "controller": True})
    assert ours.owner_uid == "now" and ours.owned_by("now")
    # Left by an earlier ProjectJob of the same name: same labels, same pod name, another uid.
    earlier = pod({"kind": "ProjectJob", "uid": "before", "controller": True})
    assert not earlier.owned_by("now")
    # No controller: nobody's but the job's whose labels it carries (orphaned by kubectl).
    assert pod().owned_by("now") and pod({"kind": "ProjectJob", "uid": "before"}).owned_by("now")
    assert earlier.owned_by("")  # a job whose uid is not known takes what it finds


def test_an_orphaned_pod_older_than_the_job_is_not_taken() -> None:
    """`kubectl delete pj --cascade=orphan` strips the pods' owner references; such a pod stuck
    on a lost node outlived its job, and a ProjectJob made again under the name took it as its
    own (even one not executed), then ended ERROR when it went."""
    job_created = datetime(2026, 1, 1, 12, tzinfo=UTC)

    def orphan(created: str) -> PodView:
        return PodView.from_pod({"metadata": {"name": "j-a1", "creationTimestamp": created}})

    assert not orphan("2026-01-01T11:59:59Z").owned_by("now", job_created)
    # Made after the job: its own pod, whose reference somebody stripped (adopted, as Kubernetes'
    # controllers adopt their orphans).
    assert orphan("2026-01-01T12:00:00Z").owned_by("now", job_created)
    assert orphan("2026-01-01T11:59:59Z").owned_by("now")  # the job's creation not known


def test_a_pods_attempt_is_its_names_not_its_label() -> None:
    """A `kubectl label --overwrite dsjobs.dev/attempt=5` on the running pod made it look like a
    newer attempt than the status: the plan adopted "attempt 5", deleted the pod as superseded and
    ran the job again, without a retry policy."""

    def pod(name: str, attempt: str) -> PodView:
        return PodView.from_pod({"metadata": {"name": name, "labels": {"dsjobs.dev/attempt": attempt}}})

    assert pod("job-1-a1", "5").attempt == 1
    assert pod("job-1-a12", "1").attempt == 12
    assert pod("not-ours", "3").attempt == 3  # no attempt in the name: the label's


def test_phase_book_counts() -> None:
    book = metrics.PhaseBook()
    book.set(("ns", "a"), "PREPARING")
    book.set(("ns", "b"), "PREPARING")
    book.set(("ns", "a"), "SUCCESS")
    assert metrics.JOBS.labels(phase="PREPARING")._value.get() == 1
    assert metrics.JOBS.labels(phase="SUCCESS")._value.get() == 1
    book.forget(("ns", "a"))
    assert metrics.JOBS.labels(phase="SUCCESS")._value.get() == 0


DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("page", ["operator.md", "configuration.md"])
def test_docs_list_every_setting_with_its_default(page: str) -> None:
    doc = (DOCS / page).read_text()
    start = doc.index("\n", doc.index("<!-- settings:begin")) + 1
    end = doc.index("<!-- settings:end -->")
    assert doc[start:end].strip() == settings_table(), f"regenerate the table in docs/{page}"


def _documented_defaults(text: str) -> dict[str, str]:
    """`VARIABLE` -> its default cell, of every table row of one variable whose default is a literal
    (in backticks) or empty; rows like `DSJOBS_S3_PUBLIC_ENDPOINT` | `DSJOBS_S3_ENDPOINT` name
    another variable and are not literals."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"`[A-Z0-9_]+`", cells[0]):
            continue
        default = cells[1]
        if default == "" or re.fullmatch(r"`[^`]*`", default):
            found[cells[0].strip("`")] = default.strip("`")
    return found


def test_configuration_reference_gives_the_codes_defaults() -> None:
    from dsjobs.api.settings import SETTINGS as API_SETTINGS
    from dsjobs.storage import ENV_REGION, StorageSettings

    documented = _documented_defaults((DOCS / "configuration.md").read_text())
    api = {s.env: s.default for s in API_SETTINGS}
    assert set(api) <= set(documented), (
        f"API settings missing in docs/configuration.md: {set(api) - set(documented)}"
    )
    wrong = {env: (documented[env], default) for env, default in api.items() if documented[env] != default}
    assert not wrong, f"docs/configuration.md vs dsjobs.api.settings (documented, code): {wrong}"
    defaults = OperatorSettings()
    for env, (attr, _doc) in SETTINGS_DOC.items():
        value = getattr(defaults, attr)
        assert documented.get(env) == (",".join(value) if isinstance(value, tuple) else str(value)), env
    storage = StorageSettings.from_env(STORE_ENV)
    assert documented[ENV_REGION] == storage.region


def test_bind_address_of_metrics_and_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsjobs.controller.__main__ import liveness_endpoint

    assert OperatorSettings().bind_address == "0.0.0.0"
    assert settings_from_env({"DSJOBS_BIND_ADDRESS": "127.0.0.1"}).bind_address == "127.0.0.1"
    assert liveness_endpoint(OperatorSettings()) == "http://0.0.0.0:8080/healthz"
    assert liveness_endpoint(OperatorSettings(bind_address="127.0.0.1", liveness_port=17080)) == (
        "http://127.0.0.1:17080/healthz"
    )
    assert liveness_endpoint(OperatorSettings(bind_address="::")) == "http://[::]:8080/healthz"
    assert liveness_endpoint(OperatorSettings(liveness_port=0)) is None

    bound: list[tuple[int, str]] = []
    monkeypatch.setattr(metrics, "start_http_server", lambda port, addr: bound.append((port, addr)))

    def serve_anew(port: int, *host: str) -> bool:
        monkeypatch.setattr(metrics, "_serving", False)  # as in a fresh process
        return metrics.serve(port, *host)

    assert serve_anew(9090) and bound[-1] == (9090, "0.0.0.0")
    assert serve_anew(17081, "127.0.0.1") and bound[-1] == (17081, "127.0.0.1")
    assert serve_anew(17081, "::1") and bound[-1] == (17081, "::1")
    # Started by a standby, it is not bound again when the replica leads.
    assert metrics.serve(17081, "::1") and len(bound) == 3
    assert not serve_anew(0) and len(bound) == 3

    def refuse(port: int, addr: str) -> None:
        raise OSError("address in use")

    monkeypatch.setattr(metrics, "start_http_server", refuse)
    assert not serve_anew(9090)


def test_only_registry_password_secrets_are_sent_to_a_registry() -> None:
    from functools import partial

    from dsjobs.controller.secrets import registry_password_source_problem

    problem = partial(registry_password_source_problem, by_ref=True, image_url="cr.example.com/t/img:1")
    labels = {"dsjobs.dev/secret-role": "registry-password"}
    hosts = {"dsjobs.dev/registry-hosts": "mirror.example.com, cr.example.com"}
    shared = {"metadata": {"labels": labels, "annotations": hosts}}
    runner = {"metadata": {"labels": {"dsjobs.dev/secret-role": "runner"}}}
    assert problem(shared, job_uid="u1") == ""
    assert "not labelled dsjobs.dev/secret-role=registry-password" in problem(runner, job_uid="u1")
    assert problem({}, job_uid="u1")
    # One no job owns (an admin's, for the project's registry) goes only to the registries it
    # names: with the label alone any member could send it to a registry of theirs.
    unlisted = {"metadata": {"labels": labels}}
    assert problem(unlisted, job_uid="u1") == (
        "is owned by no ProjectJob and has no annotation dsjobs.dev/registry-hosts naming the "
        "registries it may be sent to"
    )
    assert problem(shared, job_uid="u1", image_url="attacker.example.net:5000/x:latest") == (
        "may be sent only to mirror.example.com, cr.example.com (dsjobs.dev/registry-hosts), "
        "not to attacker.example.net:5000"
    )
    assert problem(shared, job_uid="u1", image_url="python:3.11") == (
        "may be sent only to mirror.example.com, cr.example.com (dsjobs.dev/registry-hosts), not to docker.io"
    )
    # The API stores a job's password in a Secret the job owns: it serves that job only (another
    # member of the project could send it to a registry of theirs), to the registry it chose.
    owned = {
        "metadata": {"labels": labels, "ownerReferences": [{"kind": "ProjectJob", "name": "b", "uid": "u2"}]}
    }
    assert problem(owned, job_uid="u2") == ""
    # The API names the registry the user gave the password for: an edit of the job's image (by a
    # member who may update jobs, before it runs) does not take it elsewhere.
    named = {
        "metadata": {**owned["metadata"], "annotations": {"dsjobs.dev/registry-hosts": "cr.example.com"}}
    }
    assert problem(named, job_uid="u2") == ""
    assert problem(named, job_uid="u2", image_url="evil.example/x").endswith("not to evil.example")
    assert problem(owned, job_uid="u1") == (
        "holds the registry password of ProjectJob 'b' (such a Secret serves its own job only)"
    )
    # passwordDsSecretName: a key of the project secrets, which the job's environment gets anyway.
    assert registry_password_source_problem({}, by_ref=False, job_uid="u1", image_url="x/y") == ""
    # One too long for the imagePullSecret (it holds it twice) is refused, not retried for ever.
    from dsjobs.controller.secrets import registry_password_length_problem

    assert registry_password_length_problem("x" * 65536) == ""
    assert registry_password_length_problem("ж" * 40000) == (
        "holds 80000 bytes, more than the 65536 a registry password may have"
    )


def test_tls_connections_get_the_smaller_read_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's RSS figure rests on this: each TLS connection's buffer is the knob's size.
    Fails if a Python upgrade moves the buffer elsewhere (the saving would silently go)."""
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    loop = asyncio.new_event_loop()
    try:
        context = ssl.create_default_context()

        def buffer() -> int:
            proto = asyncio.sslproto.SSLProtocol(
                loop, asyncio.Protocol(), context, None, server_hostname="kubernetes"
            )
            return len(proto._ssl_buffer)

        assert buffer() == 256 * 1024
        shrink_tls_read_buffers()
        assert buffer() == TLS_READ_BUFFER == 64 * 1024
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("image", "skewed"),
    [
        ("ghcr.io/dsjobs/dsjobs:0.1.0", False),
        ("ghcr.io/dsjobs/dsjobs:v0.1.0", False),
        ("ghcr.io/dsjobs/dsjobs:0.0.9", True),
        ("registry.local:5000/dsjobs:0.2.0", True),
        ("registry.local:5000/dsjobs", False),  # the colon is the registry's port
        ("dsjobs:dev", False),
        ("ghcr.io/dsjobs/dsjobs:0.0.9@sha256:" + "0" * 64, False),  # a digest: cannot tell
    ],
)
def test_a_runner_image_of_another_version_is_told(image: str, skewed: bool) -> None:
    from dsjobs import __version__
    from dsjobs.controller.settings import DEFAULT_RUNNER_IMAGE, runner_image_skew

    # The default and the base deployment's runner image go with the release.
    settings_yaml = (Path(__file__).parents[2] / "deploy/base/settings.yaml").read_text()
    deployed = re.search(r'DSJOBS_RUNNER_IMAGE: "([^"]+)"', settings_yaml)
    assert deployed is not None
    for release_image in (DEFAULT_RUNNER_IMAGE, deployed.group(1)):
        assert runner_image_skew(release_image, __version__) is None
    why = runner_image_skew(image, "0.1.0")
    assert (why is not None) == skewed
    if why is not None:
        assert image in why and "DSJOBS_RUNNER_IMAGE" in why


def test_the_operator_stops_when_its_crds_are_not_served() -> None:
    # Started without them (an uninstall whose CRD deletion ended after the reinstall's apply),
    # it stayed up, healthy and idle for good: Kopf resolves its resources once.
    from dsjobs.controller.handlers import served_problem

    both = {"resources": [{"name": "projectjobs"}, {"name": "projectjobs/status"}, {"name": "instancetypes"}]}
    assert served_problem(both) is None
    assert served_problem(None) == (
        "projectjobs.dsjobs.dev and instancetypes.dsjobs.dev: no such CustomResourceDefinition served by "
        "the API server; apply the CRDs (kubectl apply -k crds): the operator exits until they are served"
    )
    problem = served_problem({"resources": [{"name": "instancetypes"}]})
    assert problem is not None and problem.startswith("projectjobs.dsjobs.dev: no such")


def test_the_served_check_outlives_an_api_server_it_cannot_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    # A refused connection (the API server restarting when the minutely check came) is no
    # APIError: it ended the check for good, silently, and a CRD deleted later left the operator up.
    import asyncio
    import types

    import aiohttp

    from dsjobs.controller import handlers

    calls = 0

    class DownOnce:
        async def get(self, resource: str, path: str) -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise aiohttp.ClientConnectionError("Connection refused")
            if calls == 4:
                return {"resources": []}  # the CRDs deleted since
            return {"resources": [{"name": "projectjobs"}, {"name": "instancetypes"}]}

    monkeypatch.setattr(handlers, "SERVED_CHECK_SECONDS", 0.0)
    operator: Any = types.SimpleNamespace(kube=DownOnce(), startup_problem=None, stop_flag=asyncio.Event())
    asyncio.run(asyncio.wait_for(handlers.Operator.check_served(operator), 10))
    assert calls == 4 and operator.stop_flag.is_set()
    assert operator.startup_problem.startswith("projectjobs.dsjobs.dev and instancetypes.dsjobs.dev")
