"""Job ids and operation ids."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsjobs.api import ids
from dsjobs.api.operations import OperationIdError, OpKind, OpRef, decode_op_id

project_ids = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


def test_new_job_ids_are_dns_labels_and_sort_newest_first() -> None:
    older = ids.new_job_id(now_ms=1_700_000_000_000)
    newer = ids.new_job_id(now_ms=1_700_000_000_001)
    assert len(older) == len(newer) == ids.JOB_ID_LENGTH
    assert ids.is_job_id(older) and ids.is_job_id(newer)
    assert newer < older


def test_idempotent_ids_are_deterministic_and_scoped() -> None:
    a = ids.idempotent_job_id("p", "alice", "Create", "k1")
    assert a == ids.idempotent_job_id("p", "alice", "Create", "k1")
    assert len(a) == ids.JOB_ID_LENGTH and ids.is_job_id(a) and a.startswith("z")
    others = {
        ids.idempotent_job_id("q", "alice", "Create", "k1"),
        ids.idempotent_job_id("p", "bob", "Create", "k1"),
        ids.idempotent_job_id("p", "alice", "Clone", "k1"),
        ids.idempotent_job_id("p", "alice", "Create", "k2"),
    }
    assert a not in others and len(others) == 4


@given(st.sampled_from(OpKind), project_ids, project_ids, st.uuids().map(str))
def test_operation_id_round_trip(kind: OpKind, project: str, job: str, uid: str) -> None:
    ref = OpRef(kind, project, job, uid)
    text = ref.encode()
    assert text.startswith("op1") and "|" not in text
    assert decode_op_id(text) == ref


def test_project_wide_operation_has_no_job() -> None:
    ref = OpRef(OpKind.DELETE_ALL_DATA, "p1")
    assert decode_op_id(ref.encode()) == ref


@pytest.mark.parametrize(
    "text",
    [
        "",
        "op1",
        "op1!!!!",
        "xyz" + OpRef(OpKind.EXECUTE, "p", "j", "u").encode()[3:],
        "op1" + "aGVsbG8",  # "hello": not four fields
        "op1" + "Ym9ndXN8cHxqfHU",  # "bogus|p|j|u": unknown kind
        "op1" + "ZXhlY3V0ZXxwfHx1",  # "execute|p||u": a job operation without a job
        "op1" + "A" * 2000,
    ],
)
def test_foreign_operation_ids_are_rejected(text: str) -> None:
    with pytest.raises(OperationIdError):
        decode_op_id(text)
