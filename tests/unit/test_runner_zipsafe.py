"""Zip extraction cannot write outside its root; output directories zip without following links."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from dsjobs.runner.zipsafe import UnsafeZipError, extract_zip, zip_directory


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
