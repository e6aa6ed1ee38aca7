"""Stage-in's storage-free part: directories, requirements file, entry script; no storage without inputs."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import stat
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from runner_fakes import FileStore, MemoryStore, config, umask
from test_runner_zipsafe import understated_zip

from dsjobs.logrecords import LogChunk, LogRecord, Stream, read_chunk, write_chunk
from dsjobs.runner import stagein
from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.result import RunnerStatus, parse_termination_message
from dsjobs.runner.ship import human_size, upload_outputs
from dsjobs.runner.stagein import prepare, run_stage_in
from dsjobs.s3http import EMPTY_SHA256, S3HttpError
from dsjobs.storage import ObjectInfo, ObjectNotFoundError, TransferResult, TransferStopped, input_key


def test_prepare_lays_out_the_shared_volume(tmp_path: Path) -> None:
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="python main.py",
        outputs=[{"path": ".dsjobs-vars/OUT/model.pt", "var": "OUT"}, {"path": "plain.txt"}],
        python_env={"requirements": ["a==1", "b>=2"]},
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    prepare(cfg)
    lay = cfg.layout
    assert lay.requirements.read_text() == "a==1\nb>=2\n"
    script = lay.entry_script
    assert script.read_text().startswith("#!/bin/sh\n")
    assert os.access(script, os.X_OK)
    # The job may run as any uid: everything it writes to must be world-writable.
    for d in (
        lay.logs_dir,
        lay.run_dir,
        lay.site_dir,
        lay.tmp_dir,
        cfg.work_dir,
        cfg.work_dir / ".dsjobs-vars" / "OUT",
    ):
        assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o777, d
    prepare(cfg)  # idempotent (a restarted init container)


def test_prepare_makes_the_system_log_appendable_by_the_job_s_uid(tmp_path: Path) -> None:
    # Stage-in, the entry script and ship append to it as different uids: whoever came first used
    # to make it 0644 and lock the others out.
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="true",
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    with umask(0o022):
        prepare(cfg)
    assert stat.S_IMODE(cfg.layout.system_log.stat().st_mode) == 0o666
    cfg.layout.system_log.write_text("earlier lines\n")
    prepare(cfg)  # a restarted init container keeps what is there
    assert cfg.layout.system_log.read_text() == "earlier lines\n"


def test_a_job_without_inputs_stages_in_without_any_storage_request(tmp_path: Path) -> None:
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="echo ok",
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    store = MemoryStore()
    assert run_stage_in(cfg, store)  # type: ignore[arg-type]
    assert store.requests == 0 and cfg.layout.entry_script.is_file()


def test_an_input_rewritten_in_place_is_staged_then_collected_as_the_output(tmp_path: Path) -> None:
    old = b"weights v1"
    sha = hashlib.sha256(old).hexdigest()
    store = FileStore()
    store.objects[input_key("p", sha)] = old
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="python train.py --resume model.pt",
        inputs=[{"path": "ckpt/model.pt", "sha256": sha, "size_bytes": len(old)}],
        outputs=[{"path": "ckpt/model.pt"}],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert run_stage_in(cfg, store, termination_log=str(tmp_path / "term"))  # type: ignore[arg-type]
    model = cfg.work_dir / "ckpt" / "model.pt"
    assert model.read_bytes() == old
    # The job (any uid) may replace it: the file is 0666, its directory 0777.
    assert stat.S_IMODE(model.stat().st_mode) == 0o666
    assert stat.S_IMODE(model.parent.stat().st_mode) == 0o777
    model.write_bytes(b"weights v2")
    outputs, errors = upload_outputs(cfg, store, lambda m: None)  # type: ignore[arg-type]
    assert errors == [] and [o.path for o in outputs] == ["ckpt/model.pt"]
    assert store.objects[outputs[0].key] == b"weights v2"


def test_the_empty_file_is_created_not_fetched(tmp_path: Path) -> None:
    # Never stored (storage.is_stored_input): Create does not ask the client to upload it.
    data = b"x"
    store = FileStore()
    store.objects[input_key("p", hashlib.sha256(data).hexdigest())] = data
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="python main.py",
        inputs=[
            {"path": "data/empty.csv", "sha256": EMPTY_SHA256, "size_bytes": 0},
            {"path": "x.txt", "var": "X", "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": 1},
        ],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert run_stage_in(cfg, store, termination_log=str(tmp_path / "term"))  # type: ignore[arg-type]
    empty = cfg.work_dir / "data" / "empty.csv"
    assert empty.read_bytes() == b"" and stat.S_IMODE(empty.stat().st_mode) == 0o666
    assert (cfg.work_dir / "x.txt").read_bytes() == data
    assert input_key("p", EMPTY_SHA256) not in store.objects


class CheckingStore(FileStore):
    """FileStore (downloads verified as Storage.download_file does) whose next `damaged` reads have
    their first byte flipped on the way."""

    damaged = 0

    def _read(self, key: str) -> bytes | None:
        data = super()._read(key)
        with self._lock:
            if data is not None and self.damaged:
                self.damaged -= 1
                data = bytes([data[0] ^ 1]) + data[1:]
        return data


GOOD = b"id,value\n1,10\n"
EDITED = b"id,value\n1,99\n"  # the same size: Create's check by size lets it pass


def _stage_one_input(tmp_path: Path, store: CheckingStore, name: str) -> tuple[bool, str]:
    cfg = RunnerConfig(
        project_id="p",
        job_id=name,
        cmd="python main.py",
        inputs=[
            {"path": "data/table.csv", "sha256": hashlib.sha256(GOOD).hexdigest(), "size_bytes": len(GOOD)}
        ],
        paths={"work_dir": str(tmp_path / name / "work"), "shared_dir": str(tmp_path / name / "shared")},
    )
    term = tmp_path / name / "term"
    ok = run_stage_in(cfg, store, termination_log=str(term))  # type: ignore[arg-type]
    return ok, term.read_text() if term.exists() else ""


def test_an_input_stored_with_other_bytes_than_its_hash_is_deleted_so_it_is_uploaded_again(
    tmp_path: Path,
) -> None:
    # The CLI hashed the file, the user edited it in place, the CLI uploaded the edit: the key says
    # GOOD, the bytes are EDITED. Kept, it failed every later job (Create asks for no upload).
    key = input_key("p", hashlib.sha256(GOOD).hexdigest())
    store = CheckingStore()
    store.objects[key] = EDITED
    ok, term = _stage_one_input(tmp_path, store, "j1")
    assert not ok
    assert "data/table.csv" in term and "corrupt" in term and "uploads it again" in term
    assert key not in store.objects
    # The next job's Create finds no input, asks for the upload, and the job stages it.
    store.objects[key] = GOOD
    assert _stage_one_input(tmp_path, store, "j2")[0]
    assert (tmp_path / "j2" / "work" / "data" / "table.csv").read_bytes() == GOOD


def test_an_input_is_kept_and_staged_when_only_the_read_was_damaged(tmp_path: Path) -> None:
    # The check's read finds the object right: it is read once more and the job runs (failing
    # it was permanent: no retry policy retries a stage-in failure).
    key = input_key("p", hashlib.sha256(GOOD).hexdigest())
    store = CheckingStore()
    store.objects[key] = GOOD
    store.damaged = 1  # stage-in's read is damaged on the way; the check's read is fine
    ok, term = _stage_one_input(tmp_path, store, "j1")
    assert ok, term
    assert store.objects[key] == GOOD
    assert (tmp_path / "j1" / "work" / "data" / "table.csv").read_bytes() == GOOD
    # Damaged again on the read after the check: it fails, keeping the object (the check found
    # it right).

    class TwiceDamaged(CheckingStore):
        reads = 0

        def _read(self, key: str) -> bytes | None:
            self.reads += 1
            self.damaged = 1 if self.reads in (1, 3) else 0
            return super()._read(key)

    twice = TwiceDamaged()
    twice.objects[key] = GOOD
    ok, term = _stage_one_input(tmp_path, twice, "j2")
    assert not ok and "read twice, damaged twice" in term and "uploads it again" not in term
    assert twice.objects[key] == GOOD


def test_an_input_stored_with_another_size_is_deleted_without_being_read_again(tmp_path: Path) -> None:
    # The check read the whole object onto the job's disk, of any size (the first read stops at
    # the declared size): the size alone says it is not the input.
    key = input_key("p", hashlib.sha256(GOOD).hexdigest())
    store = CheckingStore()
    store.objects[key] = GOOD * 1000
    reads: list[Any] = []
    download = store.download_file

    def counted(k: str, dest: Any, **kw: Any) -> Any:
        reads.append(kw.get("expected_size"))
        return download(k, dest, **kw)

    store.download_file = counted  # type: ignore[method-assign]
    ok, term = _stage_one_input(tmp_path, store, "j1")
    assert not ok and "uploads it again" in term
    assert key not in store.objects and reads == [len(GOOD)]


class ReplacedWhileChecked(CheckingStore):
    """A correct upload of the input lands between the check's two HEADs."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.input_heads = 0

    def head(self, key: str) -> ObjectInfo | None:
        if key == self.key:
            self.input_heads += 1
            if self.input_heads == 2:
                self.objects[key] = GOOD
        info = super().head(key)
        # S3's ETag of a single-part object is the MD5 of its bytes (MemoryStore has none).
        return info and ObjectInfo(info.key, info.size, hashlib.md5(self.objects[key]).hexdigest())


def test_an_input_replaced_while_it_is_checked_is_kept(tmp_path: Path) -> None:
    key = input_key("p", hashlib.sha256(GOOD).hexdigest())
    store = ReplacedWhileChecked(key)
    store.objects[key] = EDITED
    ok, term = _stage_one_input(tmp_path, store, "j1")
    assert not ok and "corrupt" in term and "uploads it again" not in term
    assert store.objects[key] == GOOD and store.input_heads == 2


class FullDiskStore(FileStore):
    """FileStore whose downloads find the disk full."""

    def download_file(self, key: str, dest: str | os.PathLike[str], **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))


def test_inputs_that_do_not_fit_on_the_job_s_disk_say_so_and_what_gives_more_room(tmp_path: Path) -> None:
    big = 60 * 2**20
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="python main.py",
        inputs=[{"path": "data/big.bin", "var": "BIG", "sha256": "a" * 64, "size_bytes": big}],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    term = tmp_path / "term"
    assert not run_stage_in(cfg, FullDiskStore(), termination_log=str(term))  # type: ignore[arg-type]
    result = parse_termination_message(term.read_text())
    assert result.status == RunnerStatus.STAGE_IN_FAILED
    assert result.reason == (
        "no space left on the job's disk for its inputs (60.0 MiB in all; full while staging input "
        "data/big.bin): declare working-storage, or a larger one, for more room"
    )


def _zip_input(tmp_path: Path, data: bytes) -> tuple[RunnerConfig, FileStore]:
    """A job whose one input is the zipped directory ``data`` (``data.zip`` as the CLI names it)."""
    sha = hashlib.sha256(data).hexdigest()
    store = FileStore()
    store.objects[input_key("p", sha)] = data
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="python main.py",
        inputs=[{"path": "data.zip", "sha256": sha, "size_bytes": len(data), "compression": "ZIP"}],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    return cfg, store


def test_a_zip_input_that_unpacks_beyond_the_free_space_is_refused_before_it_is_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An emptyDir's sizeLimit is enforced by eviction, later: 8 KiB of zip unpacking to 8 MiB must
    # be measured against the room first, as a plain input's size is by the disk itself.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/zeros.bin", b"\x00" * 8 * 2**20)
    cfg, store = _zip_input(tmp_path, buf.getvalue())
    rooms: list[Path] = []

    def one_mib_free(path: Path) -> int:
        rooms.append(path)
        return 2**20

    monkeypatch.setattr(stagein, "free_bytes", one_mib_free)
    term = tmp_path / "term"
    assert not run_stage_in(cfg, store, termination_log=str(term))  # type: ignore[arg-type]
    assert rooms == [cfg.work_dir]  # where it unpacks: the parent of its path
    result = parse_termination_message(term.read_text())
    assert result.status == RunnerStatus.STAGE_IN_FAILED
    assert result.reason == (
        f"no space left on the job's disk for its inputs ({human_size(len(buf.getvalue()))} in all; input "
        "data.zip unpacks to 8.0 MiB, 1.0 MiB free): declare working-storage, or a larger one, for more room"
    )
    assert not (cfg.work_dir / "data").exists()


def test_a_zip_input_of_more_files_than_the_runner_s_memory_can_unpack_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 500k small files (7.6 GiB, within the CLI's 10 GiB) had the stage-in container OOM-killed:
    # "staging inputs failed: OOMKilled", naming neither the input nor the limit.
    entries = stagein.MANY_ENTRIES + 1
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(entries):
            zf.writestr(f"data/{i}.txt", b"")
    cfg, store = _zip_input(tmp_path, buf.getvalue())
    assert stagein.entry_count(tmp_path / "none.zip") is None
    limit = stagein.STAGE_IN_BASE_BYTES + entries * stagein.ZIP_ENTRY_BYTES - 1
    monkeypatch.setattr(stagein, "memory_limit", lambda: limit)
    term = tmp_path / "term"
    assert not run_stage_in(cfg, store, termination_log=str(term))  # type: ignore[arg-type]
    result = parse_termination_message(term.read_text())
    assert result.status == RunnerStatus.STAGE_IN_FAILED
    assert result.reason.startswith(
        f"input data.zip: {entries} files in its archive: unpacking them takes about "
    )
    assert f"about {entries - 1} files fit; the admin's DSJOBS_RUNNER_MEMORY_LIMIT" in result.reason
    assert not (cfg.work_dir / "data").exists()
    # One more byte of memory: it fits, and is unpacked.
    monkeypatch.setattr(stagein, "memory_limit", lambda: limit + 1)
    assert run_stage_in(cfg, store, termination_log=str(term))  # type: ignore[arg-type]
    assert len(list((cfg.work_dir / "data").iterdir())) == entries
    # Few entries, or no limit known: never asked.
    assert stagein.entries_problem(stagein.MANY_ENTRIES, 1) is None
    assert stagein.entries_problem(10**9, None) is None


def test_a_zip_input_holding_more_than_it_declares_stops_there_and_is_named(tmp_path: Path) -> None:
    bomb = understated_zip(tmp_path / "bomb.zip", "data/zeros.bin", b"\x00" * 3_000_000, 1000)
    cfg, store = _zip_input(tmp_path, bomb.read_bytes())
    term = tmp_path / "term"
    assert not run_stage_in(cfg, store, termination_log=str(term))  # type: ignore[arg-type]
    result = parse_termination_message(term.read_text())
    assert result.status == RunnerStatus.STAGE_IN_FAILED
    assert result.reason.startswith(
        "input data.zip: archive refused: entry 'data/zeros.bin': damaged archive: "
    ), result.reason
    assert (cfg.work_dir / "data" / "zeros.bin").stat().st_size <= 1000


def test_the_free_space_is_what_an_unprivileged_writer_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fixed answer: two readings of a shared disk differ by whatever others wrote between them.
    # (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)
    answer = os.statvfs_result((4096, 1024, 1000, 300, 200, 0, 0, 0, 0, 255))
    asked: list[Path] = []
    monkeypatch.setattr(stagein.os, "statvfs", lambda path: asked.append(path) or answer)
    assert stagein.free_bytes(tmp_path) == 200 * 1024  # f_bavail in fragments, not root's f_bfree
    assert asked == [tmp_path]


def test_an_object_store_that_keeps_failing_is_told_as_such_not_as_the_inputs_fault(tmp_path: Path) -> None:
    # Past the retries' patience the store still refuses connections: the job's inputs are not to
    # blame, and the operator retries it as an infrastructure failure (StorageUnavailable).
    class DownStore(CheckingStore):
        def _read(self, key: str) -> bytes | None:
            raise ConnectionRefusedError(111, "Connection refused")

    key = input_key("p", hashlib.sha256(GOOD).hexdigest())
    store = DownStore()
    store.objects[key] = GOOD
    ok, term = _stage_one_input(tmp_path, store, "j1")
    assert not ok
    result = parse_termination_message(term)
    assert result.status == RunnerStatus.STAGE_IN_FAILED and result.storage_unavailable
    assert "the object store kept failing while the inputs were staged" in result.reason
    # An input that is not stored is the inputs' fault: no such flag.
    ok, term = _stage_one_input(tmp_path, CheckingStore(), "j2")
    result = parse_termination_message(term)
    assert not ok and not result.storage_unavailable and "not in storage" in result.reason


def test_a_stage_in_failure_of_the_inputs_is_logged_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A missing, corrupt or refused input is the job's to fix, told in its result and system log:
    # 30 lines of chained traceback at ERROR said nothing more.
    with caplog.at_level(logging.ERROR, logger="dsjobs.runner"):
        ok, _ = _stage_one_input(tmp_path, CheckingStore(), "j1")
    assert not ok
    [record] = [r for r in caplog.records if r.name.startswith("dsjobs.runner")]
    assert "not in storage" in record.getMessage() and record.exc_info is None


def test_a_stage_in_whose_log_could_not_be_resumed_still_reports(tmp_path: Path) -> None:
    # The store failed the reads that find where the job's log goes on (twice) and its input:
    # the failure path wrote chunk 0 without a resume, met attempt 1's chunk 0 there (412, other
    # bytes) and raised: no result, no termination message, "staging inputs failed: Error".
    class Flaky(CheckingStore):
        heads_failing = 2

        def head(self, key: str) -> ObjectInfo | None:
            if self.heads_failing:
                self.heads_failing -= 1
                raise S3HttpError(503, "ServiceUnavailable", "injected", key)
            return super().head(key)

    store = Flaky()
    write_chunk(
        store,  # type: ignore[arg-type]
        "p",
        "j1",
        LogChunk(seq=0, records=(LogRecord(Stream.OUT, b"attempt 1\n", 1, None),), attempt=1, resume={}),
    )
    cfg = RunnerConfig(
        project_id="p",
        job_id="j1",
        cmd="python main.py",
        attempt=2,
        inputs=[{"path": "t.csv", "sha256": hashlib.sha256(GOOD).hexdigest(), "size_bytes": len(GOOD)}],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    term = tmp_path / "term"
    assert not run_stage_in(cfg, store, termination_log=str(term))  # type: ignore[arg-type]
    result = parse_termination_message(term.read_text())
    assert result.status == RunnerStatus.STAGE_IN_FAILED
    assert read_chunk(store, "p", "j1", 0).attempt == 1  # type: ignore[arg-type, union-attr]
    assert read_chunk(store, "p", "j1", 1).attempt == 2  # type: ignore[arg-type, union-attr]


def test_every_missing_input_is_named_at_once(tmp_path: Path) -> None:
    """A kubectl-applied job's inputs are checked by nobody before its stage-in: naming only the
    first missing one made the user fix them one failed run at a time."""
    files = {f"f{i}.csv": f"content {i}\n".encode() for i in range(14)}
    store = CheckingStore()
    store.objects[input_key("p", hashlib.sha256(files["f0.csv"]).hexdigest())] = files["f0.csv"]
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="true",
        inputs=[
            {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
            for name, data in files.items()
        ],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert not run_stage_in(cfg, store, termination_log=str(tmp_path / "term"))  # type: ignore[arg-type]
    reason = parse_termination_message((tmp_path / "term").read_text()).reason
    assert reason.startswith("13 inputs are not in storage: input f")
    assert reason.endswith(" and 3 more; were they uploaded?")
    assert "input f0.csv" not in reason  # that one is stored


class BigThenMissing(FileStore):
    """The first input is a big download, on its way until told to stop; the second is missing."""

    def __init__(self) -> None:
        super().__init__()
        self.big_download: list[str] = []

    def download_file(
        self, key: str, dest: str | os.PathLike[str], *, stop: threading.Event | None = None, **kw: Any
    ) -> Any:
        if key.endswith("a" * 64):
            assert stop is not None
            if stop.wait(30):  # a chunk at a time, each time asking whether to go on
                self.big_download.append("stopped")
                raise TransferStopped(f"{key}: stopped")
            self.big_download.append("finished")
            Path(dest).write_bytes(b"x" * 10)
            return TransferResult(key, 10, "a" * 64)
        raise ObjectNotFoundError(key)


def test_a_failed_input_stops_the_downloads_on_their_way(tmp_path: Path) -> None:
    # A missing input after a big one was told only once the big one had arrived (a checkpoint
    # of many GiB: minutes of stage-in and a full disk for a job that could not run).
    store = BigThenMissing()
    store.objects[input_key("p", "a" * 64)] = b"x" * 10
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="true",
        inputs=[
            {"path": "big.bin", "sha256": "a" * 64, "size_bytes": 10},
            {"path": "small.txt", "sha256": "b" * 64, "size_bytes": 10},
        ],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert not run_stage_in(cfg, store, termination_log=str(tmp_path / "term"))  # type: ignore[arg-type]
    reason = parse_termination_message((tmp_path / "term").read_text()).reason
    assert "small.txt" in reason and "big.bin" not in reason, reason
    assert store.big_download == ["stopped"]
    assert not (tmp_path / "work" / "big.bin").exists()


def test_a_directory_input_zipped_empty_is_an_empty_directory(tmp_path: Path) -> None:
    # The CLI zips an empty directory to an archive without entries; `${DATA}` must name a directory.
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w"):
        pass
    empty_zip = buf.getvalue()
    store = CheckingStore()
    store.objects[input_key("p", hashlib.sha256(empty_zip).hexdigest())] = empty_zip
    sha = hashlib.sha256(empty_zip).hexdigest()
    zipped = {
        "path": "in/data",
        "var": "DATA",
        "sha256": sha,
        "size_bytes": len(empty_zip),
        "compression": "ZIP",
    }
    cfg = config(tmp_path, "ls ${DATA}", inputs=[zipped])
    assert run_stage_in(cfg, store, termination_log=str(tmp_path / "term"))  # type: ignore[arg-type]
    data = cfg.work_dir / "in" / "data"
    assert data.is_dir() and list(data.iterdir()) == []


def test_a_node_disk_full_before_the_job_is_told_as_such_not_as_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Only inputs that did not fit were told in words; the few files of the job's own layout on a
    # disk already full ended as "stage-in failed: OSError: [Errno 28]" with a traceback.
    cfg = config(tmp_path)
    cfg.layout.create()
    cfg.layout.entry_script.with_suffix(".tmp").symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(stagein.StageInError, match="no space left on the node's disk for the job's working"):
        prepare(cfg)
    store = MemoryStore()
    term = tmp_path / "term"
    with caplog.at_level(logging.ERROR):
        assert not run_stage_in(cfg, store, termination_log=str(term))  # type: ignore[arg-type]
    result = parse_termination_message(term.read_text())
    assert result.status == RunnerStatus.STAGE_IN_FAILED and not result.storage_unavailable
    assert result.reason.startswith("no space left on the node's disk for the job's working files")
    assert not any(r.exc_info for r in caplog.records)  # told, not a bug to trace
