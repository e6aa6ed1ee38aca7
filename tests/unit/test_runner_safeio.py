"""Files the job could replace are read without following its symlinks (dsjobs.runner.safeio)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from runner_fakes import FileStore, config
from test_runner_ship import all_records, append

from dsjobs.logrecords import log_file_key
from dsjobs.runner import safeio
from dsjobs.runner.config import OutputFile
from dsjobs.runner.safeio import RefusedFile, open_beneath, open_dir_beneath
from dsjobs.runner.ship import LogShipper, read_status_file, upload_log_files, upload_outputs
from dsjobs.runner.syslog import SystemLog

SECRET = b"the-runner's-storage-key"


def _read(root: Path, rel: str) -> bytes:
    with os.fdopen(open_beneath(root, rel), "rb") as f:
        return f.read()


def test_a_regular_file_below_the_root_is_read(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.txt").write_bytes(b"ok")
    assert _read(tmp_path, "a/b/f.txt") == b"ok"
    with pytest.raises(FileNotFoundError):
        open_beneath(tmp_path, "a/nope.txt")


def test_symlinks_special_files_and_odd_paths_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    root = tmp_path / "root"
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "out.log").symlink_to(secret)
    (root / "inner").symlink_to(tmp_path)  # a directory component that is a symlink
    os.mkfifo(root / "fifo")  # would block an open for reading without O_NONBLOCK
    (root / "dir").mkdir()
    (root / "same.txt").write_bytes(b"x")
    (root / "link-inside").symlink_to(root / "same.txt")  # even a link that stays inside
    for rel in (
        "logs/out.log",
        "inner/secret",
        "fifo",
        "dir",
        "link-inside",
        "../secret",
        "/etc/passwd",
        "a//b",
        "",
    ):
        with pytest.raises(RefusedFile):
            open_beneath(root, rel)
    # Every descriptor opened on the way is closed again.
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(RefusedFile):
            open_beneath(root, "inner/secret")
    assert len(os.listdir("/proc/self/fd")) == before


def test_log_files_replaced_by_symlinks_are_neither_shipped_nor_uploaded(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    cfg = config(tmp_path, outputs=[OutputFile(path="out.txt"), OutputFile(path="ok.txt")])
    lay = cfg.layout
    append(lay.stdout, b"mine\n")
    lay.stderr.unlink(missing_ok=True)
    lay.stderr.symlink_to(secret)
    lay.progress.unlink(missing_ok=True)
    lay.progress.symlink_to(secret)
    (cfg.work_dir / "out.txt").symlink_to(secret)
    (cfg.work_dir / "ok.txt").write_bytes(b"result")
    store = FileStore()
    shipper = LogShipper(store, cfg)
    shipper.resume()
    assert shipper.pump(final=True)
    files, errors = upload_log_files(cfg, store)  # type: ignore[arg-type]
    outputs, output_errors = upload_outputs(cfg, store, lambda _: None)  # type: ignore[arg-type]
    assert [c for _, _, c in all_records(store)] == [b"mine\n"]
    assert [f.name for f in files] == ["stdout.txt"]
    assert [(e.log_file_name, e.description) for e in errors] == [
        ("stderr.txt", "not uploaded: stderr.log is a symlink or not a directory")
    ]
    assert store.get_bytes(log_file_key("p", "j", "stderr.txt")) is None
    assert [o.path for o in outputs] == ["ok.txt"]
    assert [e.path for e in output_errors] == ["out.txt"]
    assert all(SECRET not in data for data in store.objects.values())


def test_the_runner_does_not_append_its_system_log_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "ship-file"
    target.write_bytes(b"")
    (tmp_path / "system.log").symlink_to(target)
    SystemLog(tmp_path / "system.log", "ship")("hello")
    assert target.read_bytes() == b""


def test_the_program_status_is_not_read_through_a_symlink(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    forged = tmp_path / "forged"
    forged.write_text("end=1\nphase=run\nrc=0\n")
    cfg.layout.status.parent.mkdir(parents=True, exist_ok=True)
    cfg.layout.status.symlink_to(forged)
    assert read_status_file(cfg.layout.status, cfg.paths.shared_dir) is None
    cfg.layout.status.unlink()
    cfg.layout.status.write_text("end=1\nphase=run\nrc=3\n")
    status = read_status_file(cfg.layout.status, cfg.paths.shared_dir)
    assert status is not None and status.return_code == 3


def test_directories_passed_through_need_search_permission_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A parent the job made 0711: ship's uid may pass through it, not read it (root, running the
    # tests, is not stopped by modes: the kernel's rule is played by the patched open).
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.txt").write_text("f")
    parent = os.path.realpath(tmp_path / "a")
    real_open = os.open

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if not flags & os.O_PATH and os.readlink(f"/proc/self/fd/{fd}") == parent:
            os.close(fd)
            raise PermissionError(13, "Permission denied", parent)
        return fd

    monkeypatch.setattr(os, "open", open_)
    fd = open_dir_beneath(tmp_path, "a/b")
    assert sorted(os.listdir(fd)) == ["f.txt"]
    os.close(fd)
    with os.fdopen(open_beneath(tmp_path, "a/b/f.txt"), "rb") as f:
        assert f.read() == b"f"
    with pytest.raises(PermissionError):
        os.close(open_dir_beneath(tmp_path, "a"))  # reading it is another matter


def test_without_openat2_a_link_is_refused_not_followed_some_other_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older kernel, or a seccomp profile that forbids openat2: links are then not followed at
    all (no userspace resolution a job could race)."""
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "link").symlink_to("a.txt")
    monkeypatch.setattr(safeio, "_SYS_OPENAT2", 1_000_000)  # no such system call: ENOSYS
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(RefusedFile, match="cannot follow a symlink safely") as info:
            safeio.open_file_resolved_beneath(root, "link")
        assert info.value.errno == errno.ENOSYS
    finally:
        os.close(root)
