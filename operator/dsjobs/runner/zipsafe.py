"""Zip extraction that cannot write outside its root, and directory zipping for outputs.

Refused (the whole archive, before anything is written): absolute names, drive letters, any
``..`` component, symlink and other special-file entries, and names that resolve outside the
root through an existing symlink. Extraction streams each member (constant memory) and can cap
the total bytes written: an archive that declares more than the cap is refused before anything is
written, and one whose entries hold more than they declare (a zip bomb lying in its headers) is
stopped at the cap. `declared_size` tells what an archive needs on disk before it is extracted.

Layout convention (the DataSphere CLI's): an archive of directory ``a/b/data`` holds entries
``data/...``, i.e. paths relative to the directory's parent; so it is extracted into the parent.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple

from dsjobs.runner.safeio import FILE_FLAGS, RefusedFile, open_below, open_file_resolved_beneath

_COPY_CHUNK = 1024 * 1024
#: A file is deflated only when deflating its head (this many bytes) saves at least
#: `_MIN_SAVING` of it; otherwise it is stored as is.
COMPRESS_SAMPLE_BYTES = 256 * 1024
_MIN_SAVING = 0.1
#: Deflate level of output directories: they are read once, right after; level 1 is several times
#: faster than zlib's default 6 on text for a few percent more bytes.
_LEVEL = 1


#: A zip entry's date holds 1980..2107 (the DOS date's 7 bits of years).
_ZIP_FIRST: Final = (1980, 1, 1, 0, 0, 0)
_ZIP_LAST: Final = (2107, 12, 31, 23, 59, 58)


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    """`mtime` as a zip entry's local date, held to what one can say: a file the job dated after
    2107 (or absurdly) failed the whole directory output with a struct error naming nothing."""
    try:
        local = time.localtime(mtime)[:6]
    except (OverflowError, OSError, ValueError):
        return _ZIP_LAST if mtime > 0 else _ZIP_FIRST
    return min(max(local, _ZIP_FIRST), _ZIP_LAST)


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


def make_dirs(path: Path, *, private: bool = False) -> None:
    """mkdir -p, leaving the directories it creates world-writable: the job may run as any uid
    and must be able to write into its inputs' directories, as into the other shared ones.
    `private`: as the umask makes them (a user's own download)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        if not private:
            os.chmod(d, 0o777)


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


#: What a damaged or lying archive raises while it is read (a CRC that does not match, an entry
#: whose data ends early or does not inflate).
_BAD_DATA = (zipfile.BadZipFile, zlib.error, EOFError)


def _declared(entries: list[zipfile.ZipInfo]) -> int:
    return sum(info.file_size for info in entries if not info.is_dir())


def entry_count(archive: str | os.PathLike[str]) -> int | None:
    """How many entries ``archive``'s end record says it has (ZIP64's too), read without loading
    its central directory; None when that record cannot be read (the full read will say why)."""
    try:
        with open(archive, "rb") as fp:
            end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]
    except (OSError, AttributeError, zipfile.BadZipFile):
        return None
    if not end:
        return None
    return int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def declared_size(archive: str | os.PathLike[str]) -> int:
    """The bytes ``archive`` says it unpacks to: its entries' sizes in the central directory.
    UnsafeZipError if it is not a zip archive."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return _declared(zf.infolist())
    except zipfile.BadZipFile as exc:
        raise UnsafeZipError(f"not a valid zip archive: {exc}") from exc


def extract_zip(
    archive: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    max_total_bytes: int | None = None,
    private: bool = False,
) -> int:
    """Extract ``archive`` under ``root`` (created if needed). Returns the number of files written.
    The files and directories are the job's shared ones (0666/0777) unless ``private`` (then the
    umask's, executables made executable for those who may read them, and the user's own
    directory links below ``root`` followed: a user's download).

    With ``max_total_bytes``: an archive whose entries declare more is refused before anything is
    written, and no more than that is ever written (UnsafeZipError naming the entry). A damaged
    archive raises UnsafeZipError naming the entry too."""
    root_path = Path(root)
    make_dirs(root_path, private=private)
    root_real = os.path.realpath(root_path)
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise UnsafeZipError(f"not a valid zip archive: {exc}") from exc
    with zf:
        entries = check_zip(zf)
        declared = _declared([info for info, _ in entries])
        if max_total_bytes is not None and declared > max_total_bytes:
            raise UnsafeZipError(f"archive expands to {declared} bytes, beyond the cap of {max_total_bytes}")
        return _extract_entries(zf, entries, root_real, max_total_bytes, private)


def _extract_entries(
    zf: zipfile.ZipFile,
    entries: list[tuple[zipfile.ZipInfo, list[str]]],
    root_real: str,
    max_total_bytes: int | None,
    private: bool = False,
) -> int:
    written = 0
    files = 0
    for info, parts in entries:
        target = Path(root_real, *parts)
        # Parents may already exist (other inputs): they must not lead out of the root. On a
        # user's own download (`private`) the output's own directory may be the user's link
        # (`outputs -> /mnt/big/outputs`), which the official CLI writes through too: the archive
        # cannot make a link (plain names, link entries refused), so that one is the user's. Below
        # it the names are the job's (another project member's), so a link there is not followed:
        # `outputs/cache/x` must not land in the user's `outputs/cache -> ~/.cache`. A file's own
        # link is never written through.
        within = os.path.realpath(Path(root_real, parts[0])) if private and len(parts) > 1 else root_real
        parent_real = os.path.realpath(target.parent if not info.is_dir() else target)
        if not (private and len(parts) == 1) and not _inside(within, parent_real):
            raise UnsafeZipError(f"entry {info.filename!r} resolves outside the root")
        if info.is_dir():
            make_dirs(target, private=private)
            if not private:
                os.chmod(target, 0o777)
            continue
        make_dirs(target.parent, private=private)
        if target.is_symlink():
            raise UnsafeZipError(f"entry {info.filename!r} would write through a symlink")
        try:
            with zf.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    written += len(chunk)
                    # Checked before the write: not a byte past the cap reaches the disk.
                    if max_total_bytes is not None and written > max_total_bytes:
                        raise UnsafeZipError(
                            f"entry {info.filename!r}: archive expands beyond {max_total_bytes} bytes"
                        )
                    dst.write(chunk)
        except _BAD_DATA as exc:
            raise UnsafeZipError(f"entry {info.filename!r}: damaged archive: {exc}") from exc
        mode = (info.external_attr >> 16) & 0o777 if info.create_system == 3 else 0
        if not private:
            os.chmod(target, 0o777 if mode & 0o111 else 0o666)
        elif mode & 0o111:
            now = os.stat(target).st_mode & 0o777
            os.chmod(target, now | (now & 0o444) >> 2)
        files += 1
    return files


#: ``callback(entry, reason)``: an entry of a directory being zipped, named as in the archive.
EntryCallback = Callable[[str, str], None]


def _display(name: str) -> str:
    """A path as text that always encodes: bytes that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    # os.walk gives names that are not UTF-8 as surrogate escapes, which a zip name cannot hold.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Directories nested deeper than this below a zipped output are left out (told to `on_error`):
#: each is opened from the output's root one level at a time, and a bound keeps that cheap.
MAX_ZIP_DEPTH = 256


#: Why a symlink inside a zipped directory was not followed: it leads out of the working directory
#: (a dataset's file, a virtualenv's interpreter). The ship tells the user how many (a file error).
LINK_OUTSIDE: Final = "symlink resolving outside the working directory"


class LinkRoot(NamedTuple):
    """Where symlinks inside a zipped directory may point: the job's working directory, open as
    ``fd``, and the zipped directory's path below it (``src``). ``paths``: the working
    directory's absolute paths as the job sees it (`/job/work`): an absolute link into it
    (``ln -s "$PWD/ckpt/best.pt" out/``) is followed as the relative link it stands for."""

    fd: int
    src: str
    paths: tuple[str, ...] = ()


class _DirectoryZipper:
    """One `zip_directory` call: walks the directory open as ``root_fd``, stores what it can,
    reports what it leaves out.

    Every directory and file is opened relative to an open directory without following a symlink
    (never by a path a job could swap for a symlink between a check and the open: the ship
    container reading a job's outputs also holds the storage credentials), depth first, without
    recursion."""

    def __init__(
        self,
        zf: zipfile.ZipFile,
        root_fd: int,
        base: str,
        on_skip: EntryCallback | None,
        on_error: EntryCallback | None,
        links: LinkRoot | None,
    ) -> None:
        self.zf = zf
        self.root_fd = root_fd
        self.base = base
        self.on_skip = on_skip
        self.on_error = on_error
        self.links = links
        self.count = 0
        self._last_time: tuple[int, int, int, int, int, int] | None = None

    def run(self) -> int:
        pending: list[tuple[str, ...]] = [()]
        while pending:
            parts = pending.pop()
            arc_dir = "/".join((self.base, *parts))
            try:
                fd = open_below(self.root_fd, parts)
            except RefusedFile:
                self._skip(arc_dir, "symlink")  # replaced by one since it was listed
                continue
            except OSError as exc:
                if not parts:
                    raise  # the directory itself: nothing to zip, the whole output fails
                self._fail(arc_dir, f"unreadable directory: {exc.strerror}", exc)
                continue
            try:
                subdirs = self._zip_dir(fd, parts, arc_dir)
            finally:
                os.close(fd)
            pending.extend((*parts, d) for d in reversed(subdirs))
        return self.count

    def _zip_dir(self, fd: int, parts: tuple[str, ...], arc_dir: str) -> list[str]:
        """Store the directory's files; its subdirectories to zip next, in name order."""
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not parts:
                raise
            self._fail(arc_dir, f"unreadable directory: {exc.strerror}", exc)
            return []
        files: list[str] = []
        links: list[str] = []
        subdirs: list[str] = []
        for entry in entries:
            arc = f"{arc_dir}/{entry.name}"
            try:
                if entry.is_symlink() and self.links is None:
                    self._skip(arc, "symlink")
                elif not _is_utf8(entry.name):
                    self._fail(arc, "name is not valid UTF-8", _bad_name(arc))
                elif entry.is_symlink():
                    links.append(entry.name)
                elif entry.is_dir(follow_symlinks=False):
                    if len(parts) + 1 > MAX_ZIP_DEPTH:
                        error = ValueError(f"entry {_display(arc)!r} is nested too deep")
                        self._fail(arc, f"nested deeper than {MAX_ZIP_DEPTH} directories", error)
                    else:
                        subdirs.append(entry.name)
                elif entry.is_file(follow_symlinks=False):
                    files.append(entry.name)
                else:
                    # Not even opened: opening a device can do things.
                    self._skip(arc, "not a regular file")
            except OSError as exc:
                self._fail(arc, f"unreadable: {exc.strerror}", exc)
        # Names only from here: a directory of a million files held a DirEntry for each while its
        # files were zipped (their ZipInfos, which the central directory needs, growing beside).
        del entries
        stored_links = sum(self._add_link(fd, parts, name, f"{arc_dir}/{name}") for name in links)
        if not files and not subdirs and not stored_links:
            self.zf.writestr(zipfile.ZipInfo(arc_dir + "/"), b"")
        for name in files:
            self._add_file(fd, name, f"{arc_dir}/{name}")
        return subdirs

    def _skip(self, arc: str, why: str) -> None:
        if self.on_skip:
            self.on_skip(_display(arc), why)

    def _fail(self, arc: str, why: str, exc: Exception) -> None:
        """An entry the archive lacks: data lost, so it is an error, not a skip."""
        if self.on_error is None:
            raise exc
        self.on_error(_display(arc), why)

    def _add_file(self, dir_fd: int, name: str, arc: str) -> None:
        try:
            # O_NONBLOCK: opening a FIFO put there since the listing would wait for a writer.
            fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._skip(arc, "symlink")
            else:
                self._fail(arc, f"unreadable: {exc.strerror}", exc)
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                self._skip(arc, "not a regular file")
                return
            self._store(f, st, arc)
        self.count += 1

    def _add_link(self, dir_fd: int, parts: tuple[str, ...], name: str, arc: str) -> bool:
        """A symlink stored as the regular file it points to, when that resolves inside the
        working directory (as the output itself may be such a link): a model cache's snapshot
        links to its blobs arrive with their bytes. Anything else it could lead to (the runner's
        own files, the node's) is never opened; a link to a directory is not walked (no cycles).
        An absolute link to a path in the working directory (`LinkRoot.paths`) is looked up as
        that path below it, with the same confinement."""
        assert self.links is not None
        path = "/".join(p for p in (self.links.src, *parts, name) if p not in ("", "."))
        try:
            path = self._absolute_inside(dir_fd, name) or path
            fd = open_file_resolved_beneath(self.links.fd, path)
        except FileNotFoundError:
            self._skip(arc, "dangling symlink")
            return False
        except RefusedFile as exc:
            if exc.errno == errno.EXDEV:
                self._skip(arc, LINK_OUTSIDE)
            elif exc.errno == errno.ELOOP:
                self._skip(arc, "symlink loop or /proc link")
            elif exc.errno == errno.EINVAL:
                self._skip(arc, "symlink to a directory or special file")
            else:
                self._skip(arc, f"symlink not followed: {exc.strerror}")
            return False
        except OSError as exc:
            self._fail(arc, f"unreadable: {exc.strerror}", exc)
            return False
        with os.fdopen(fd, "rb") as f:
            self._store(f, os.fstat(f.fileno()), arc)
        self.count += 1
        return True

    def _absolute_inside(self, dir_fd: int, name: str) -> str | None:
        """The path below the working directory that the link `name` (in the open directory
        `dir_fd`) names absolutely, or None (a relative link, or one naming another place).
        Only the link's own text is read: what it leads to is still looked up by the kernel below
        the working directory (a `..` in it, or an absolute link further on, is refused there)."""
        assert self.links is not None
        if not self.links.paths:
            return None
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            return None  # changed since it was listed: the lookup below tells what it is now
        for root in self.links.paths:
            prefix = root.rstrip("/") + "/"
            if root.startswith("/") and target.startswith(prefix):
                rest = target[len(prefix) :].lstrip("/")
                return rest or None
        return None

    def _store(self, f: BinaryIO, st: os.stat_result, arc: str) -> None:
        # Built from fstat of the opened fd, not from the path (which could change); the bytes
        # stored are those it had then (a file still growing is cut there, not followed: its
        # entry's size, and zip64 or not, are decided by it).
        mtime = _zip_time(st.st_mtime)
        if mtime == self._last_time:
            mtime = self._last_time  # one tuple for the files of one second: ~100 bytes each
        self._last_time = mtime
        info = zipfile.ZipInfo(arc, date_time=mtime)
        info.external_attr = (st.st_mode & 0xFFFF) << 16
        info.file_size = st.st_size
        head = f.read(min(COMPRESS_SAMPLE_BYTES, st.st_size))
        if _deflate_saves(head):
            info.compress_type = zipfile.ZIP_DEFLATED
            # ZipFile.open takes the level from the ZipInfo it is given, not from the archive
            # (3.11 has no public name for it; 3.13's compress_level is the same attribute).
            info._compresslevel = _LEVEL  # type: ignore[attr-defined]
        else:
            # Random or already compressed data (checkpoints, images, archives): deflating it
            # costs ~20 s per GiB here and saves nothing. The CLI stores its own zips' entries.
            info.compress_type = zipfile.ZIP_STORED
        with self.zf.open(info, "w", force_zip64=st.st_size > 2**31) as out:
            out.write(head)
            left = st.st_size - len(head)
            while left > 0:
                chunk = f.read(min(_COPY_CHUNK, left))
                if not chunk:
                    break  # it shrank: the entry holds what there was
                out.write(chunk)
                left -= len(chunk)
        # Only the central directory (`filelist`) needs the entry from now; the index by name
        # is for readers and for warning of duplicates, which a walk of one tree never makes.
        self.zf.NameToInfo.pop(info.filename, None)


def _deflate_saves(head: bytes) -> bool:
    if not head:
        return False
    packer = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15)
    packed = len(packer.compress(head)) + len(packer.flush())
    return packed <= len(head) * (1 - _MIN_SAVING)


def _bad_name(arc: str) -> ValueError:
    return ValueError(f"entry {_display(arc)!r}: name is not valid UTF-8")


def zip_directory(
    src: str | os.PathLike[str] | int,
    dest: str | os.PathLike[str] | BinaryIO,
    *,
    arcname: str | None = None,
    on_skip: EntryCallback | None = None,
    on_error: EntryCallback | None = None,
    links: LinkRoot | None = None,
) -> int:
    """Zip directory ``src`` (a path, or an open directory fd, left open) into ``dest`` (a path,
    or a file that need not be seekable: a pipe) with entries ``<arcname>/...``; returns the files
    stored.

    ``arcname`` defaults to the basename of ``src`` (required with an fd); give the declared name
    when ``src`` is what a symlink resolved to. Special files are skipped, never opened
    (``on_skip`` is told); so are symlinks, never followed, unless ``links`` names the working
    directory: then a symlink to a regular file that resolves inside it (every step: no absolute
    link, no ``..`` above it) is stored as that file, and other links are skipped. A job must not
    be able to make the runner package files from outside its working directory. Entries that cannot be stored (unreadable files or
    subdirectories, names that are not UTF-8, directories nested deeper than MAX_ZIP_DEPTH) are
    left out and told to ``on_error``, the rest is zipped; without ``on_error`` they raise. An
    unreadable ``src`` raises OSError. Callbacks get entry names as printable text.
    """
    if isinstance(src, int):
        if not arcname:
            raise ValueError("zip_directory of a directory fd needs its arcname")
        root_fd, base = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=src), arcname
    else:
        src_path = os.fspath(src)
        base = arcname or os.path.basename(src_path)
        root_fd = os.open(src_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # No archive-wide compression: each entry's ZipInfo carries its own (`_DirectoryZipper._store`).
        with zipfile.ZipFile(dest, "w", allowZip64=True) as zf:
            return _DirectoryZipper(zf, root_fd, base, on_skip, on_error, links).run()
    finally:
        os.close(root_fd)
