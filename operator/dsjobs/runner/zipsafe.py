"""Zip extraction that cannot write outside its root, and directory zipping for outputs.

Refused (the whole archive, before anything is written): absolute names, drive letters, any
``..`` component, symlink and other special-file entries, and names that resolve outside the
root through an existing symlink. Extraction streams each member (constant memory) and can cap
the total bytes actually written (zip bombs lie about sizes in their headers).

Layout convention (the DataSphere CLI's): an archive of directory ``a/b/data`` holds entries
``data/...``, i.e. paths relative to the directory's parent; so it is extracted into the parent.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

_COPY_CHUNK = 1024 * 1024


class UnsafeZipError(ValueError):
    """The archive (or one of its entries) is refused."""


def _entry_parts(name: str) -> list[str]:
    if not name or "\x00" in name:
        raise UnsafeZipError(f"invalid entry name {name!r}")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeZipError(f"absolute entry {name!r}")
    parts = [p for p in re.split(r"[/\\]", name) if p not in {"", "."}]
    if any(p == ".." for p in parts):
        raise UnsafeZipError(f"entry {name!r} escapes the root")
    return parts


def _entry_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    # Only archives made on Unix carry a file type; others are plain files or directories.
    if info.create_system == 3 and mode:
        fmt = stat.S_IFMT(mode)
        if fmt == stat.S_IFLNK:
            return "symlink"
        if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
            return "special"
    return "dir" if info.is_dir() else "file"


def _inside(root_real: str, path: str) -> bool:
    return path == root_real or path.startswith(root_real + os.sep)


def check_zip(zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Validate every entry; return (entry, path parts) pairs in archive order."""
    checked = []
    for info in zf.infolist():
        parts = _entry_parts(info.filename)
        kind = _entry_kind(info)
        if kind == "symlink":
            raise UnsafeZipError(f"symlink entry {info.filename!r} refused")
        if kind == "special":
            raise UnsafeZipError(f"special file entry {info.filename!r} refused")
        if not parts:
            if info.is_dir():
                continue
            raise UnsafeZipError(f"entry {info.filename!r} names no file")
        checked.append((info, parts))
    return checked


def extract_zip(
    archive: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    max_total_bytes: int | None = None,
) -> int:
    """Extract ``archive`` under ``root`` (created if needed). Returns the number of files written."""
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    root_real = os.path.realpath(root_path)
    written = 0
    files = 0
    with zipfile.ZipFile(archive) as zf:
        entries = check_zip(zf)
        for info, parts in entries:
            target = Path(root_real, *parts)
            # Parents may already exist (other inputs): they must not lead out of the root.
            parent_real = os.path.realpath(target.parent if not info.is_dir() else target)
            if not _inside(root_real, parent_real):
                raise UnsafeZipError(f"entry {info.filename!r} resolves outside the root")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                os.chmod(target, 0o777)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():
                raise UnsafeZipError(f"entry {info.filename!r} would write through a symlink")
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    written += len(chunk)
                    if max_total_bytes is not None and written > max_total_bytes:
                        raise UnsafeZipError(f"archive expands beyond {max_total_bytes} bytes")
                    dst.write(chunk)
            mode = (info.external_attr >> 16) & 0o777 if info.create_system == 3 else 0
            os.chmod(target, 0o777 if mode & 0o111 else 0o666)
            files += 1
    return files


def zip_directory(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    on_skip: Callable[[str, str], None] | None = None,
) -> int:
    """Zip directory ``src`` into ``dest`` with entries ``<basename(src)>/...``.

    Symlinks are skipped, never followed (``on_skip(relpath, reason)`` is told): a job must not be
    able to make the runner package files from outside its working directory. Returns the number
    of files stored.
    """
    src_path = Path(src)
    base = src_path.name
    count = 0
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True) as zf:
        for dirpath, dirnames, filenames in os.walk(src_path, followlinks=False):
            rel_dir = os.path.relpath(dirpath, src_path)
            arc_dir = base if rel_dir == "." else f"{base}/{rel_dir.replace(os.sep, '/')}"
            for d in list(dirnames):
                if os.path.islink(os.path.join(dirpath, d)):
                    dirnames.remove(d)
                    if on_skip:
                        on_skip(f"{arc_dir}/{d}", "symlink")
            if not filenames and not dirnames:
                zf.writestr(zipfile.ZipInfo(arc_dir + "/"), b"")
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                arc = f"{arc_dir}/{name}"
                try:
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError as exc:
                    if on_skip:
                        on_skip(arc, "symlink" if os.path.islink(full) else f"unreadable: {exc.strerror}")
                    continue
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        if on_skip:
                            on_skip(arc, "not a regular file")
                        continue
                    # Built from fstat of the opened fd, not from the path (which could change).
                    mtime = time.localtime(max(st.st_mtime, 315532800))[:6]  # zip dates start in 1980
                    info = zipfile.ZipInfo(arc, date_time=mtime)
                    info.external_attr = (st.st_mode & 0xFFFF) << 16
                    info.file_size = st.st_size
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with zf.open(info, "w", force_zip64=st.st_size > 2**31) as out:
                        shutil.copyfileobj(f, out, _COPY_CHUNK)
                count += 1
    return count
