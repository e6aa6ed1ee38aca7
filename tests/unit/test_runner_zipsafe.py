"""Zip extraction cannot write outside its root; output directories zip without following links."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
from runner_fakes import Unseekable, deny, umask

from dsjobs.runner.zipsafe import (
    COMPRESS_SAMPLE_BYTES,
    MAX_ZIP_DEPTH,
    LinkRoot,
    UnsafeZipError,
    declared_size,
    extract_zip,
    zip_directory,
)


def make_zip(path: Path, entries: list[tuple[str, bytes] | zipfile.ZipInfo]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for e in entries:
            if isinstance(e, zipfile.ZipInfo):
                zf.writestr(e, b"/etc/passwd")
            else:
                zf.writestr(e[0], e[1])
    return path


def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def test_regular_archive_extracts_with_directories(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "a.zip", [("data/", b""), ("data/x.txt", b"x"), ("data/sub/y.bin", b"\x00\x01")])
    root = tmp_path / "root"
    assert extract_zip(z, root) == 2
    assert (root / "data" / "x.txt").read_bytes() == b"x"
    assert (root / "data" / "sub" / "y.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize(
    "name",
    [
        "../evil.txt",
        "a/../../evil.txt",
        "/etc/evil",
        "\\evil",
        "C:/evil",
        "a\\..\\..\\evil",
        "..",
        "./../evil.txt",
    ],
)
def test_zip_slip_entries_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    z = make_zip(tmp_path / "bad.zip", [("first.txt", b"1"), (name, b"evil")])
    root = tmp_path / "root"
    with pytest.raises(UnsafeZipError):
        extract_zip(z, root)
    assert not (root / "first.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_entries_are_refused(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "link.zip", [symlink_entry("data/link")])
    with pytest.raises(UnsafeZipError, match="symlink"):
        extract_zip(z, tmp_path / "root")
    assert not (tmp_path / "root" / "data" / "link").exists()


def unix_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize(
    "mode", [stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o660, stat.S_IFSOCK | 0o755]
)
def test_special_file_entries_are_refused_before_anything_is_written(tmp_path: Path, mode: int) -> None:
    z = make_zip(tmp_path / "special.zip", [("first.txt", b"1"), unix_entry("dev/thing", mode)])
    root = tmp_path / "root"
    with pytest.raises(UnsafeZipError, match="special file entry 'dev/thing' refused"):
        extract_zip(z, root)
    assert list(root.iterdir()) == []


def test_file_types_are_read_only_from_archives_made_on_unix(tmp_path: Path) -> None:
    # Other systems put their own attributes there (MS-DOS bits): those are plain files.
    info = unix_entry("w.txt", stat.S_IFIFO | 0o644)
    info.create_system = 0
    root = tmp_path / "root"
    assert extract_zip(make_zip(tmp_path / "w.zip", [info]), root) == 1
    assert (root / "w.txt").read_bytes() == b"/etc/passwd" and (root / "w.txt").is_file()


def test_an_entry_naming_no_file_is_refused_and_one_naming_the_root_dir_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(UnsafeZipError, match=r"entry '\.' names no file"):
        extract_zip(make_zip(tmp_path / "dot.zip", [("a.txt", b"1"), (".", b"x")]), root)
    assert list(root.iterdir()) == []
    assert extract_zip(make_zip(tmp_path / "dotdir.zip", [("./", b""), ("a.txt", b"1")]), root) == 1
    assert [p.name for p in root.iterdir()] == ["a.txt"]


def test_existing_symlinks_under_the_root_cannot_be_used_to_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "sneaky").symlink_to(outside)
    z = make_zip(tmp_path / "a.zip", [("sneaky/x.txt", b"x")])
    with pytest.raises(UnsafeZipError):
        extract_zip(z, root)
    assert not (outside / "x.txt").exists()
    (root / "file-link").symlink_to(outside / "target")
    z2 = make_zip(tmp_path / "b.zip", [("file-link", b"x")])
    with pytest.raises(UnsafeZipError):
        extract_zip(z2, root)
    assert not (outside / "target").exists()


def test_bombs_are_capped_by_bytes_actually_written(tmp_path: Path) -> None:
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big", b"\x00" * 2_000_000)
    with pytest.raises(UnsafeZipError, match="expands"):
        extract_zip(z, tmp_path / "root", max_total_bytes=1_000_000)


def understated_zip(path: Path, name: str, data: bytes, declared: int) -> Path:
    """A zip whose one entry holds ``data`` but declares ``declared`` bytes, in its local header
    and in the central directory (a zip bomb lies in both)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    raw = bytearray(path.read_bytes())
    real, lie = struct.pack("<I", len(data)), struct.pack("<I", declared)
    # The uncompressed size: at offset 22 of the local file header, 24 of the central entry.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.find(signature) + offset
        assert raw[at : at + 4] == real
        raw[at : at + 4] = lie
    path.write_bytes(bytes(raw))
    return path


def test_an_archive_declaring_more_than_the_cap_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/", b"")
        zf.writestr("data/small.txt", b"x" * 1000)
        zf.writestr("data/big.bin", b"\x00" * 2_000_000)
    assert declared_size(z) == 2_001_000
    root = tmp_path / "root"
    with pytest.raises(UnsafeZipError, match="expands to 2001000 bytes, beyond the cap of 1000000"):
        extract_zip(z, root, max_total_bytes=1_000_000)
    assert not (root / "data").exists()
    assert extract_zip(z, tmp_path / "fits", max_total_bytes=2_001_000) == 2


def test_an_archive_holding_more_than_it_declares_writes_no_more_than_it_declares(tmp_path: Path) -> None:
    z = understated_zip(tmp_path / "bomb.zip", "data/zeros.bin", b"\x00" * 3_000_000, 1000)
    assert declared_size(z) == 1000
    root = tmp_path / "root"
    with pytest.raises(UnsafeZipError, match=r"entry 'data/zeros\.bin': damaged archive"):
        extract_zip(z, root, max_total_bytes=1000)
    assert (root / "data" / "zeros.bin").stat().st_size <= 1000


def test_a_file_that_is_not_a_zip_is_refused_as_such(tmp_path: Path) -> None:
    z = tmp_path / "not.zip"
    z.write_bytes(b"plain text, no archive")
    with pytest.raises(UnsafeZipError, match="not a valid zip archive"):
        declared_size(z)
    with pytest.raises(UnsafeZipError, match="not a valid zip archive"):
        extract_zip(z, tmp_path / "root")


def test_files_dated_outside_what_a_zip_holds_are_zipped_with_the_nearest_date(tmp_path: Path) -> None:
    """A file the job dated after 2107 (a zip date's last year) failed the whole directory output
    with a struct error naming neither the file nor why."""
    src = tmp_path / "outdir"
    src.mkdir()
    for name, mtime in (("future.txt", 7_000_000_000), ("old.txt", 0), ("now.txt", 1_700_000_000)):
        (src / name).write_text(name)
        os.utime(src / name, (mtime, mtime))
    dest = tmp_path / "out.zip"
    assert zip_directory(src, dest) == 3
    with zipfile.ZipFile(dest) as zf:
        dates = {i.filename: i.date_time for i in zf.infolist()}
        assert zf.read("outdir/future.txt") == b"future.txt"
    assert dates["outdir/future.txt"] == (2107, 12, 31, 23, 59, 58)
    assert dates["outdir/old.txt"] == (1980, 1, 1, 0, 0, 0)
    assert dates["outdir/now.txt"][0] == 2023


def test_directory_zip_round_trips_and_skips_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "work" / "outdir"
    (src / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "sub" / "b.sh", 0o755)
    secret = tmp_path / "secret"
    secret.write_text("do not ship")
    (src / "leak").symlink_to(secret)
    (src / "leakdir").symlink_to(tmp_path)
    skipped: list[tuple[str, str]] = []
    dest = tmp_path / "out.zip"
    assert zip_directory(src, dest, on_skip=lambda p, why: skipped.append((p, why))) == 2
    with zipfile.ZipFile(dest) as zf:
        names = set(zf.namelist())
        assert names == {"outdir/a.txt", "outdir/sub/b.sh", "outdir/empty/"}
        assert all(b"do not ship" not in zf.read(n) for n in names if not n.endswith("/"))
    assert sorted(p for p, _ in skipped) == ["outdir/leak", "outdir/leakdir"]
    # The archive extracts (the way the CLI does: into the parent) to the same tree.
    back = tmp_path / "back"
    extract_zip(dest, back)
    assert (back / "outdir" / "a.txt").read_text() == "A"
    assert os.access(back / "outdir" / "sub" / "b.sh", os.X_OK)
    assert (back / "outdir" / "empty").is_dir()


def test_links_inside_the_working_dir_are_stored_as_their_files(tmp_path: Path) -> None:
    """A model cache's snapshot links to its blobs (`huggingface_hub`'s layout) arrive with their
    bytes; a link leading out of the working dir, dangling, to a directory or to a FIFO is
    skipped, never opened, and told."""
    work = tmp_path / "work"
    cache = work / "hf"
    snap = cache / "models--m" / "snapshots" / "abc"
    blobs = cache / "models--m" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "1f2e").write_text('{"dim": 8}')
    (work / "elsewhere.txt").write_text("also the job's")
    (snap / "config.json").symlink_to("../../blobs/1f2e")
    (snap / "notes.txt").symlink_to("../../../../elsewhere.txt")  # out of hf/, still in work/
    (snap / "hop").symlink_to("config.json")  # a link to a link
    secret = tmp_path / "secret"
    secret.write_text("do not ship")
    (snap / "leak").symlink_to("../../../../../secret")
    (snap / "abs").symlink_to(blobs / "1f2e")  # absolute: not resolvable below the work dir
    (snap / "proc").symlink_to("/proc/self/environ")
    (snap / "gone").symlink_to("../../blobs/missing")
    (snap / "dirlink").symlink_to("../../blobs")
    os.mkfifo(blobs / "pipe")
    (snap / "fifo").symlink_to("../../blobs/pipe")
    skipped: list[tuple[str, str]] = []
    dest = tmp_path / "out.zip"
    work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        n = zip_directory(
            cache,
            dest,
            links=LinkRoot(work_fd, "hf"),
            on_skip=lambda p, why: skipped.append((p, why)),
        )
    finally:
        os.close(work_fd)
    assert n == 4  # the blob, and three links stored as their files
    with zipfile.ZipFile(dest) as zf:
        got = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
        assert all(not stat.S_ISLNK(i.external_attr >> 16) for i in zf.infolist())
    assert got == {
        "hf/models--m/blobs/1f2e": b'{"dim": 8}',
        "hf/models--m/snapshots/abc/config.json": b'{"dim": 8}',
        "hf/models--m/snapshots/abc/hop": b'{"dim": 8}',
        "hf/models--m/snapshots/abc/notes.txt": b"also the job's",
    }
    assert dict(skipped) == {
        "hf/models--m/blobs/pipe": "not a regular file",
        "hf/models--m/snapshots/abc/abs": "symlink resolving outside the working directory",
        "hf/models--m/snapshots/abc/dirlink": "symlink to a directory or special file",
        "hf/models--m/snapshots/abc/fifo": "symlink to a directory or special file",
        "hf/models--m/snapshots/abc/gone": "dangling symlink",
        "hf/models--m/snapshots/abc/leak": "symlink resolving outside the working directory",
        "hf/models--m/snapshots/abc/proc": "symlink resolving outside the working directory",
    }


def test_absolute_links_into_the_working_dir_are_stored_as_their_files(tmp_path: Path) -> None:
    """`ln -s "$PWD/ckpt/best.pt" outputs/` names a file of the working dir by its absolute path
    (the job's `/job/work`): its bytes arrive, as for the relative link and for a declared output
    that is such a link. An absolute link elsewhere, or one climbing out of the working dir after
    its prefix, is still skipped, never opened."""
    work = tmp_path / "work"
    out = work / "outputs"
    (work / "ckpt").mkdir(parents=True)
    out.mkdir()
    (work / "ckpt" / "best.pt").write_text("weights")
    secret = tmp_path / "secret"
    secret.write_text("do not ship")
    (out / "best.pt").symlink_to(work / "ckpt" / "best.pt")
    (out / "rel.pt").symlink_to("../ckpt/best.pt")
    (out / "climb").symlink_to(f"{work}/../secret")
    (out / "away").symlink_to(secret)
    (out / "root").symlink_to(f"{work}/")
    skipped: list[tuple[str, str]] = []
    dest = tmp_path / "out.zip"
    work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        n = zip_directory(
            out,
            dest,
            links=LinkRoot(work_fd, "outputs", (str(work),)),
            on_skip=lambda p, why: skipped.append((p, why)),
        )
    finally:
        os.close(work_fd)
    assert n == 2
    with zipfile.ZipFile(dest) as zf:
        got = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
    assert got == {"outputs/best.pt": b"weights", "outputs/rel.pt": b"weights"}
    assert dict(skipped) == {
        "outputs/away": "symlink resolving outside the working directory",
        "outputs/climb": "symlink resolving outside the working directory",
        "outputs/root": "symlink resolving outside the working directory",
    }


def test_link_loops_and_links_through_files_are_told_as_such_and_a_dir_of_skipped_links_stays(
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    out = work / "out"
    (out / "only-links").mkdir(parents=True)
    (out / "f").write_text("x")
    (out / "loop1").symlink_to("loop2")
    (out / "loop2").symlink_to("loop1")
    (out / "through-file").symlink_to("f/sub")
    (out / "only-links" / "away").symlink_to("/etc/hostname")
    skipped: list[tuple[str, str]] = []
    errors: list[tuple[str, str]] = []
    work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        dest = tmp_path / "out.zip"
        zip_directory(
            out,
            dest,
            links=LinkRoot(work_fd, "out"),
            on_skip=lambda p, why: skipped.append((p, why)),
            on_error=lambda p, why: errors.append((p, why)),
        )
    finally:
        os.close(work_fd)
    assert errors == []
    assert dict(skipped) == {
        "out/loop1": "symlink loop or /proc link",
        "out/loop2": "symlink loop or /proc link",
        "out/through-file": "dangling symlink",
        "out/only-links/away": "symlink resolving outside the working directory",
    }
    with zipfile.ZipFile(dest) as zf:
        # A directory whose links were all left out is kept, as an empty one is.
        assert sorted(zf.namelist()) == ["out/f", "out/only-links/"]


def test_a_link_followed_is_opened_once_so_a_swap_cannot_leak(tmp_path: Path) -> None:
    """The link's target is found and read through one lookup below the working dir: a job
    re-pointing a link between a check and the read cannot get a file from outside in."""
    work = tmp_path / "work"
    out = work / "out"
    out.mkdir(parents=True)
    (work / "mine.txt").write_text("mine")
    secret = tmp_path / "secret"
    secret.write_text("do not ship")
    stop = threading.Event()

    def swap() -> None:
        link, tmp = out / "data", out / ".data.tmp"
        while not stop.is_set():
            for target in ("../mine.txt", "../../secret"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(target)
                os.replace(tmp, link)

    swapper = threading.Thread(target=swap)
    swapper.start()
    work_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    stored = 0
    try:
        for _ in range(300):
            sink = Unseekable()
            stored += zip_directory(out, sink, links=LinkRoot(work_fd, "out"), on_skip=lambda p, w: None)
            assert b"do not ship" not in sink.data
    finally:
        stop.set()
        swapper.join()
        os.close(work_fd)
    assert stored > 0  # the race was run: some zips held the link's file


def test_data_deflate_cannot_shrink_is_stored_the_rest_deflated_fast(tmp_path: Path) -> None:
    """Deflating random or already compressed data (checkpoints, images) costs ~20 s per GiB and
    saves nothing: each file's head decides. Level 1: the output is read once, soon after."""
    src = tmp_path / "outdir"
    src.mkdir()
    text = b"".join(b"epoch %d loss %.6f\n" % (i, 1 / (i + 1)) for i in range(200_000))
    noise = os.urandom(3 * COMPRESS_SAMPLE_BYTES)
    (src / "metrics.log").write_bytes(text)
    (src / "weights.bin").write_bytes(noise)
    (src / "small-noise.bin").write_bytes(noise[:100])
    (src / "empty").write_bytes(b"")
    sink = Unseekable()  # a pipe into the upload, as the ship zips
    assert zip_directory(src, sink) == 4
    (tmp_path / "cli").mkdir()
    zpath = tmp_path / "cli" / "out.zip"
    zpath.write_bytes(sink.data)
    with zipfile.ZipFile(zpath) as zf:
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
        assert kinds == {
            "outdir/metrics.log": zipfile.ZIP_DEFLATED,
            "outdir/weights.bin": zipfile.ZIP_STORED,
            "outdir/small-noise.bin": zipfile.ZIP_STORED,
            "outdir/empty": zipfile.ZIP_STORED,
        }
        deflated = zf.getinfo("outdir/metrics.log").compress_size
        assert zf.read("outdir/metrics.log") == text and zf.read("outdir/weights.bin") == noise
        assert zf.testzip() is None
    # Level 1, not zlib's default 6 (which Python's ZipFile.open uses for a ZipInfo of our own).
    level1 = zlib.compressobj(1, zlib.DEFLATED, -15)
    assert deflated == len(level1.compress(text) + level1.flush())
    # The CLI's own unpacking (datasphere 0.10.0 files._unzip; importing it here would clash with
    # our generated protobuf modules).
    with zipfile.ZipFile(zpath, "r") as zf:
        zf.extractall(zpath.parent)
    assert (tmp_path / "cli" / "outdir" / "weights.bin").read_bytes() == noise
    assert (tmp_path / "cli" / "outdir" / "metrics.log").read_bytes() == text


def directory(root: Path) -> Path:
    src = root / "outdir"
    (src / "sub").mkdir(parents=True)
    (src / "locked").mkdir()
    (src / "a.txt").write_text("A")
    (src / "secret.txt").write_text("S")
    (src / "sub" / "b.txt").write_text("B")
    (src / "locked" / "c.txt").write_text("C")
    return src


def test_unreadable_entries_are_reported_and_the_rest_is_zipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = directory(tmp_path)
    deny(monkeypatch, src / "locked", src / "secret.txt")
    errors: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    dest = tmp_path / "out.zip"
    n = zip_directory(
        src,
        dest,
        on_skip=lambda p, why: skipped.append((p, why)),
        on_error=lambda p, why: errors.append((p, why)),
    )
    assert n == 2
    with zipfile.ZipFile(dest) as zf:
        assert set(zf.namelist()) == {"outdir/a.txt", "outdir/sub/b.txt"}
    assert sorted(errors) == [
        ("outdir/locked", "unreadable directory: Permission denied"),
        ("outdir/secret.txt", "unreadable: Permission denied"),
    ]
    assert skipped == []


def test_without_an_error_callback_unreadable_entries_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = directory(tmp_path)
    deny(monkeypatch, src / "locked")
    with pytest.raises(PermissionError):
        zip_directory(src, tmp_path / "out.zip")


def test_an_unreadable_directory_is_an_error_not_an_empty_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = directory(tmp_path)
    deny(monkeypatch, src)
    with pytest.raises(PermissionError):
        zip_directory(src, tmp_path / "out.zip", on_error=lambda p, why: None)


def test_entries_are_named_after_arcname(tmp_path: Path) -> None:
    # An output "results" that is a symlink to runs/run-7: zipped from the target, named as declared.
    src = tmp_path / "runs" / "run-7"
    src.mkdir(parents=True)
    (src / "metrics.json").write_text("{}")
    dest = tmp_path / "out.zip"
    assert zip_directory(src, dest, arcname="results") == 1
    with zipfile.ZipFile(dest) as zf:
        assert zf.namelist() == ["results/metrics.json"]


def test_a_name_that_is_not_utf8_is_reported_and_the_rest_is_zipped(tmp_path: Path) -> None:
    src = tmp_path / "outdir"
    src.mkdir()
    (src / "good.txt").write_text("ok")
    raw = os.fsencode(src)
    with open(raw + b"/caf\xe9.txt", "wb") as f:
        f.write(b"latin-1 name")
    os.mkdir(raw + b"/d\xff")
    with open(raw + b"/d\xff/inside.txt", "wb") as f:
        f.write(b"x")
    errors: list[tuple[str, str]] = []
    dest = tmp_path / "out.zip"
    assert zip_directory(src, dest, on_error=lambda p, why: errors.append((p, why))) == 1
    with zipfile.ZipFile(dest) as zf:
        assert zf.namelist() == ["outdir/good.txt"]
    assert sorted(errors) == [
        ("outdir/caf\\xe9.txt", "name is not valid UTF-8"),
        ("outdir/d\\xff", "name is not valid UTF-8"),
    ]
    # The names handed out are printable text (they end up in JSON and the system log).
    assert all(p.encode() for p, _ in errors)


def test_a_fifo_is_skipped_without_waiting_for_a_writer(tmp_path: Path) -> None:
    src = tmp_path / "outdir"
    src.mkdir()
    os.mkfifo(src / "pipe")
    (src / "a.txt").write_text("A")
    skipped: list[tuple[str, str]] = []
    done: list[int] = []
    worker = threading.Thread(
        target=lambda: done.append(
            zip_directory(src, tmp_path / "out.zip", on_skip=lambda p, why: skipped.append((p, why)))
        ),
        daemon=True,  # a regression blocks in open(): do not hold the test run
    )
    worker.start()
    worker.join(10)
    assert done == [1], "zipping blocked on the FIFO"
    assert skipped == [("outdir/pipe", "not a regular file")]


def test_directories_made_by_extraction_are_writable_by_any_uid(tmp_path: Path) -> None:
    # What the DataSphere CLI zips: files only, no directory entries; the job (any uid) writes
    # next to its inputs, e.g. a cache file in data/.
    z = make_zip(tmp_path / "in.zip", [("data/train.csv", b"x\n"), ("data/sub/val.csv", b"y\n"), ("e/", b"")])
    root = tmp_path / "work"
    with umask(0o022):
        assert extract_zip(z, root) == 2
    for d in (root, root / "data", root / "data" / "sub", root / "e"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777, d
    assert stat.S_IMODE((root / "data" / "train.csv").stat().st_mode) == 0o666


def test_nesting_deeper_than_the_bound_is_reported_and_the_rest_zipped(tmp_path: Path) -> None:
    # Walked without recursion; what is nested more than MAX_ZIP_DEPTH deep is left out.
    src = tmp_path / "deep"
    level = src
    for _ in range(MAX_ZIP_DEPTH + 10):
        level = level / "d"
    level.mkdir(parents=True)
    (src.joinpath(*["d"] * MAX_ZIP_DEPTH) / "deepest.txt").write_text("kept")
    (src / "top.txt").write_text("top")
    (src / "d" / "d" / "mid.txt").write_text("mid")
    errors: list[tuple[str, str]] = []
    dest = tmp_path / "out.zip"
    assert zip_directory(src, dest, on_error=lambda p, why: errors.append((p, why))) == 3
    too_deep = "deep/" + "/".join(["d"] * (MAX_ZIP_DEPTH + 1))
    assert errors == [(too_deep, f"nested deeper than {MAX_ZIP_DEPTH} directories")]
    with zipfile.ZipFile(dest) as zf:
        assert zf.read("deep/top.txt") == b"top" and zf.read("deep/d/d/mid.txt") == b"mid"


def test_a_file_growing_while_it_is_zipped_is_stored_as_it_was_when_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "out"
    src.mkdir()
    log = src / "train.log"
    log.write_bytes(b"x" * 1000)
    real_fstat = os.fstat

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        with open(log, "ab") as f:  # the job's leftover writes on after the runner looked
            f.write(b"y" * 500)
        return st

    dest = tmp_path / "out.zip"
    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    assert zip_directory(src, dest) == 1
    monkeypatch.undo()
    with zipfile.ZipFile(dest) as zf:
        assert zf.read("out/train.log") == b"x" * 1000
        assert zf.testzip() is None
