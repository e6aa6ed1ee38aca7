"""The result JSON and the 4 KiB termination message."""

from __future__ import annotations

import pytest
from runner_fakes import MemoryStore

from dsjobs.runner.config import Compression
from dsjobs.runner.result import (
    TERMINATION_MESSAGE_LIMIT,
    FileError,
    FileErrorType,
    OutputResult,
    ResultPointer,
    RunnerResult,
    RunnerStatus,
    load_result,
    parse_termination_message,
    settled,
    store_result,
    termination_message,
)


def result(n_outputs: int, reason: str = "") -> RunnerResult:
    return RunnerResult(
        project_id="proj",
        job_id="job",
        status=RunnerStatus.EXITED,
        return_code=3,
        reason=reason,
        outputs=[
            OutputResult(
                path=f"out/file-{i}.bin",
                var=f"V{i}",
                index=i,
                key=f"projects/proj/jobs/job/outputs/out/file-{i}.bin",
                sha256="f" * 64,
                size_bytes=i,
                compression=Compression.NONE,
            )
            for i in range(n_outputs)
        ],
        file_errors=[
            FileError(type=FileErrorType.NOT_FOUND, description="missing", path="x", index=n_outputs)
        ],
    )


def test_small_results_travel_whole() -> None:
    r = result(3)
    msg = termination_message(r)
    assert len(msg.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert parse_termination_message(msg) == r


@pytest.mark.parametrize("n", [10, 11, 12, 13, 14, 15, 20, 100])
def test_large_results_become_a_pointer_that_fits(n: int) -> None:
    r = result(n, reason="r" * 10_000)
    full = r.to_json()
    msg = termination_message(r)
    assert len(msg.encode()) <= TERMINATION_MESSAGE_LIMIT
    parsed = parse_termination_message(msg)
    if len(full.encode()) <= TERMINATION_MESSAGE_LIMIT:
        assert parsed == r
    else:
        assert isinstance(parsed, ResultPointer)
        assert parsed.result_key == "projects/proj/jobs/job/result.json"
        assert parsed.return_code == 3 and parsed.status == RunnerStatus.EXITED
        assert parsed.outputs_count == n and parsed.file_errors_count == 1


def test_the_limit_is_exact() -> None:
    # Grow the reason one byte at a time across the limit: whole up to 4096 bytes, pointer after.
    base = result(0)
    room = TERMINATION_MESSAGE_LIMIT - len(base.to_json().encode())
    fits = base.replace(reason="x" * room)
    assert len(fits.to_json().encode()) == TERMINATION_MESSAGE_LIMIT
    assert parse_termination_message(termination_message(fits)) == fits
    over = base.replace(reason="x" * (room + 1))
    assert isinstance(parse_termination_message(termination_message(over)), ResultPointer)


def test_garbage_is_not_a_result() -> None:
    for text in ["", "not json", "[]", '{"v": 2}', "Error: exec failed"]:
        with pytest.raises(ValueError):
            parse_termination_message(text)


def test_stored_result_round_trips() -> None:
    store = MemoryStore()
    r = result(50)
    store_result(store, r)  # type: ignore[arg-type]
    assert load_result(store, "proj", "job") == r  # type: ignore[arg-type]
    assert load_result(store, "proj", "other") is None  # type: ignore[arg-type]


def _pointer(r: RunnerResult) -> ResultPointer:
    p = parse_termination_message(termination_message(r))
    assert isinstance(p, ResultPointer)
    return p


def test_a_final_pointer_over_a_provisional_result_tells_what_the_final_one_lost() -> None:
    """Ship stored its provisional result (outputs recorded, before the raw logs), then the store
    failed at the very end: the final pointer's storage failure and the raw logs' fate must not
    be lost to the provisional result.json found in its place."""
    early = result(200).replace(provisional=True)
    final = result(200).replace(storage_unavailable=True)
    got = settled(_pointer(final), early)
    assert isinstance(got, RunnerResult) and not got.provisional and got.storage_unavailable
    assert got.outputs == early.outputs
    assert [e.log_file_name for e in got.file_errors[-3:]] == ["stdout.txt", "stderr.txt", "system.log"]
    assert "result.json) could not be stored" in got.file_errors[-1].description
    # No message at all (ship died writing it) over a provisional result: the same.
    lost = settled(None, early)
    assert isinstance(lost, RunnerResult) and len(lost.file_errors) == len(early.file_errors) + 3


def test_a_stored_result_that_is_final_or_matches_is_taken_as_is() -> None:
    final = result(200)
    assert settled(_pointer(final), final) == final
    early = result(200).replace(provisional=True)
    assert settled(_pointer(early), early) == early  # killed after the provisional message
    assert settled(_pointer(final), None) == _pointer(final)
    assert settled(None, None) is None
