"""What `python -m dsjobs.orphans` takes for data nobody owns (the pure part)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dsjobs.orphans import (
    MAX_GRACE,
    Orphan,
    Owners,
    StoredObject,
    _parse_args,
    delete_all,
    describe,
    find_orphans,
    owners_of,
    still_orphaned,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=2)
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def body(project: str, name: str, *shas: str, cleared: bool = False, modules: tuple[str, ...] = ()) -> Any:
    return {
        "metadata": {"name": name},
        "spec": {
            "projectId": project,
            "jobParameters": {
                "inputFiles": [{"desc": {"path": f"f{i}"}, "sha256": s} for i, s in enumerate(shas)],
                "env": {
                    "pythonEnv": {"localModules": [{"desc": {"path": "m"}, "sha256": m} for m in modules]}
                },
            },
        },
        "status": {"dataCleared": True} if cleared else {},
    }


def obj(key: str, size: int = 10, when: datetime = OLD) -> StoredObject:
    return StoredObject(key, size, when)


def test_owners_are_every_job_and_the_inputs_of_jobs_with_data() -> None:
    owners = owners_of(
        [
            body("p", "one", SHA_A, modules=(SHA_C,)),
            body("p", "gone", SHA_B, cleared=True),  # cleared: its inputs are nobody's through it
            body("q", "one", SHA_B),
            {"metadata": {"name": "no-spec"}},
        ]
    )
    # A cleared job's prefix is nobody's: what lies there came after the clear (a pod on a node
    # that stopped reporting, which the operator no longer waited for, went on writing).
    assert owners.jobs == {("p", "one"), ("q", "one")}
    assert owners.inputs == {("p", SHA_A), ("p", SHA_C), ("q", SHA_B)}


def test_unowned_job_prefixes_and_inputs_are_orphans_grouped_and_in_key_order() -> None:
    owners = owners_of([body("p", "live", SHA_A)])
    objects = [
        obj("projects/p/jobs/live/result.json"),
        obj("projects/p/jobs/dead/logs/chunks/000000000000", 100),
        obj("projects/p/jobs/dead/outputs/out.txt", 5, OLD + timedelta(hours=1)),
        obj(f"projects/p/inputs/{SHA_A}"),
        obj(f"projects/p/inputs/{SHA_B}", 7),
        obj(f"projects/q/inputs/{SHA_A}", 3),  # owned in p, not in q
    ]
    assert find_orphans(objects, owners, now=NOW, grace=timedelta(days=1)) == [
        Orphan("input", "p", f"projects/p/inputs/{SHA_B}", 1, 7, OLD),
        Orphan("job", "p", "projects/p/jobs/dead/", 2, 105, OLD + timedelta(hours=1)),
        Orphan("input", "q", f"projects/q/inputs/{SHA_A}", 1, 3, OLD),
    ]


def test_data_written_within_the_grace_is_left_alone() -> None:
    # One recent object keeps the whole prefix: the job may be writing to it.
    objects = [
        obj("projects/p/jobs/dead/logs/chunks/000000000000"),
        obj("projects/p/jobs/dead/outputs/out.txt", when=NOW - timedelta(minutes=5)),
        obj(f"projects/p/inputs/{SHA_B}", when=NOW - timedelta(hours=23)),
    ]
    assert find_orphans(objects, Owners(), now=NOW, grace=timedelta(days=1)) == []
    assert [o.key for o in find_orphans(objects, Owners(), now=NOW, grace=timedelta(0))] == [
        f"projects/p/inputs/{SHA_B}",
        "projects/p/jobs/dead/",
    ]


@pytest.mark.parametrize(
    "key",
    [
        "health/check",
        "projects/p/other/thing",
        "projects/p/jobs/dead",  # not under a job's prefix
        "projects/p/jobs//x",
        "projects//jobs/x/y",
        f"projects/p/inputs/{SHA_A}/nested",
        "projects/p/inputs/",
        "projects/p/inputs/README.txt",  # no sha256
        "projects/p/jobs/not a job id/x",
        "projects/../jobs/x/y",
    ],
)
def test_keys_outside_dsjobs_layout_are_never_touched(key: str) -> None:
    assert find_orphans([obj(key)], Owners(), now=NOW, grace=timedelta(0)) == []


def test_projects_limit_the_search() -> None:
    objects = [obj("projects/p/jobs/a/x"), obj("projects/q/jobs/b/x")]
    found = find_orphans(objects, Owners(), now=NOW, grace=timedelta(0), projects=frozenset({"q"}))
    assert [o.key for o in found] == ["projects/q/jobs/b/"]


def test_what_a_job_created_since_owns_is_kept() -> None:
    found = find_orphans(
        [obj("projects/p/jobs/dead/x"), obj("projects/p/jobs/new/x"), obj(f"projects/p/inputs/{SHA_A}")],
        Owners(),
        now=NOW,
        grace=timedelta(0),
    )
    fresh = owners_of([body("p", "new", SHA_A)])
    assert [o.key for o in still_orphaned(found, fresh)] == ["projects/p/jobs/dead/"]


def test_the_listing_says_why() -> None:
    orphan = Orphan("job", "p", "projects/p/jobs/dead/", 2, 3 * 1024 * 1024, OLD)
    assert describe(orphan, frozenset({"p"})) == (
        "job    projects/p/jobs/dead/  2 objects, 3.0 MiB, last written 2026-11-28T12:00:00Z (no ProjectJob, or its data was cleared)"
    )
    lone = Orphan("input", "gone", f"projects/gone/inputs/{SHA_A}", 1, 12, OLD)
    assert describe(lone, frozenset({"p"})).endswith(
        "1 object, 12 B, last written 2026-11-28T12:00:00Z "
        "(no ProjectJob uses it; no namespace is labelled dsjobs.dev/project-id=gone)"
    )
    assert describe(lone, None).endswith("(no ProjectJob uses it)")  # namespaces not listable


def test_unfinished_uploads_are_data_too() -> None:
    # A runner killed mid-upload leaves an invisible multipart upload whose parts take space.
    objects = [
        StoredObject("projects/p/jobs/ghost/outputs/big.bin", 0, OLD, upload=True),
        obj("projects/p/jobs/dead/outputs/out.txt", 5),
        StoredObject("projects/p/jobs/dead/outputs/big.bin", 0, OLD + timedelta(hours=1), upload=True),
        StoredObject("projects/p/jobs/busy/outputs/big.bin", 0, NOW - timedelta(minutes=1), upload=True),
    ]
    found = find_orphans(objects, Owners(), now=NOW, grace=timedelta(days=1))
    assert found == [
        Orphan("job", "p", "projects/p/jobs/dead/", 2, 5, OLD + timedelta(hours=1), uploads=1),
        Orphan("job", "p", "projects/p/jobs/ghost/", 1, 0, OLD, uploads=1),
    ]
    assert "  1 object and 1 unfinished upload, 5 B, " in describe(found[0], None)
    assert "  0 objects and 1 unfinished upload, 0 B, " in describe(found[1], None)


class _Store:
    """What `delete_all` asks of the object store, recorded; each call takes 40 s."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, datetime | None]] = []
        self.now = 0.0

    def delete_prefix(
        self, prefix: str, *, written_until: datetime | None = None, uploads: bool = True
    ) -> int:
        self.calls.append(("prefix", prefix, written_until))
        self.now += 40
        return 2

    def delete(self, key: str) -> None:
        self.calls.append(("key", key, None))
        self.now += 40

    def abort_uploads(
        self, prefix: str, *, started_until: datetime | None = None, key: str | None = None
    ) -> int:
        self.calls.append(("uploads", key or prefix, started_until))
        return 1 if "with-upload" in prefix else 0


def test_deleting_re_lists_the_owners_as_it_goes_and_keeps_what_was_written_since() -> None:
    found = find_orphans(
        [obj("projects/p/jobs/dead/x"), obj(f"projects/p/inputs/{SHA_A}"), obj(f"projects/p/inputs/{SHA_B}")],
        Owners(),
        now=NOW,
        grace=timedelta(0),
    )
    # A job reusing SHA_B (no upload: its LastModified stays old) is created while A goes.
    listings = [Owners(), owners_of([body("p", "new", SHA_B)])]
    store = _Store()
    deleted = delete_all(store, found, lambda: listings.pop(0), clock=lambda: store.now)  # type: ignore[arg-type]
    # The job prefix only up to what was judged: a job of that name created since writes newer.
    assert store.calls == [
        ("uploads", f"projects/p/inputs/{SHA_A}", OLD),
        ("key", f"projects/p/inputs/{SHA_A}", None),
        ("uploads", "projects/p/jobs/dead/", OLD),
        ("prefix", "projects/p/jobs/dead/", OLD),
    ]
    assert deleted == (3, 2)


def test_an_orphan_of_unfinished_uploads_only_is_aborted_not_deleted() -> None:
    store = _Store()
    key = f"projects/with-upload/inputs/{SHA_A}"
    found = find_orphans([StoredObject(key, 0, OLD, upload=True)], Owners(), now=NOW, grace=timedelta(0))
    assert delete_all(store, found, Owners, clock=lambda: store.now) == (1, 1)  # type: ignore[arg-type]
    assert store.calls == [("uploads", key, OLD)]


@pytest.mark.parametrize("grace", ["99999999999d", "36501d", "-1s", "infinity"])
def test_a_grace_out_of_range_is_an_argument_error(grace: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 1000000d was taken, and after listing the whole bucket `now - grace` raised OverflowError.
    with pytest.raises(SystemExit) as exit_:
        _parse_args([f"--grace={grace}"])
    assert exit_.value.code == 2
    assert "--grace: must be a duration from 0s to 36500d" in capsys.readouterr().err
    assert _parse_args(["--grace", "36500d"]).grace == MAX_GRACE
