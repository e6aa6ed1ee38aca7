"""`dsjobs download-files`'s transfer: streamed, checked against the job's record, never half-placed."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsjobs.download import CallRefused, DownloadError, destination, download_each, fetch, place
from dsjobs.pb.yandex.cloud.datasphere.v2.jobs import jobs_pb2

BODY = b"weights " * 100_000  # 800 KB: several reads


@contextlib.contextmanager
def _serving(body: bytes, name: str) -> Iterator[str]:
    """The URL of `body` on a local HTTP server, while in the block."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{name}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with _serving(BODY, "model.bin") as u:
        yield u


def test_a_file_is_streamed_into_place_and_checked(url: str, tmp_path: Path) -> None:
    dest = tmp_path / "a" / "model.bin"
    fetch(url, dest, len(BODY), hashlib.sha256(BODY).hexdigest())
    assert dest.read_bytes() == BODY
    assert [p.name for p in dest.parent.iterdir()] == ["model.bin"]


def test_a_file_named_near_the_name_limit_is_downloaded(url: str, tmp_path: Path) -> None:
    # Its partial file's name must fit too (it was ".<name>.<pid>.download": 255 + 15 bytes).
    dest = tmp_path / ("m" * 251 + ".bin")
    fetch(url, dest, len(BODY), hashlib.sha256(BODY).hexdigest())
    assert dest.read_bytes() == BODY and [p.name for p in tmp_path.iterdir()] == [dest.name]


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_a_file_that_is_not_what_the_job_recorded_is_not_placed(url: str, tmp_path: Path, wrong: str) -> None:
    dest = tmp_path / "model.bin"
    size, sha = len(BODY), hashlib.sha256(BODY).hexdigest()
    with pytest.raises(DownloadError, match="the job's record says"):
        fetch(url, dest, size + 1 if wrong == "size" else size, "0" * 64 if wrong == "sha256" else sha)
    assert not list(tmp_path.iterdir())  # neither the file nor its .download


def test_an_unreachable_url_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"model\.bin"):
        fetch("http://127.0.0.1:9/model.bin", tmp_path / "model.bin", 1, "")
    assert not list(tmp_path.iterdir())


def _file(path: str) -> jobs_pb2.File:
    return jobs_pb2.File(desc=jobs_pb2.FileDesc(path=path), size_bytes=1)


def test_each_file_s_url_is_asked_for_just_before_its_transfer(capsys: pytest.CaptureFixture[str]) -> None:
    # One answer's URLs for all files live at most 12 hours and serve them one after another:
    # past ~10 GiB the last files were refused (403) when their turn came.
    calls: list[str] = []

    def ask(f: jobs_pb2.File) -> jobs_pb2.StorageFile:
        calls.append(f"ask {f.desc.path}")
        return jobs_pb2.StorageFile(file=f, url=f"https://store/{f.desc.path}")

    def place_one(sf: jobs_pb2.StorageFile) -> str:
        calls.append(f"get {sf.url}")
        if sf.file.desc.path == "b":
            raise DownloadError("b: HTTP Error 500")
        return sf.file.desc.path

    assert download_each([_file("a"), _file("b"), _file("c")], ask, place_one) == 1
    assert calls == [
        "ask a", "get https://store/a", "ask b", "get https://store/b", "ask c", "get https://store/c",
    ]  # fmt: skip
    out = capsys.readouterr()
    assert out.out == "downloaded a\ndownloaded c\n"
    assert out.err == "dsjobs: cannot download b: HTTP Error 500\n"


def test_a_refused_call_for_a_url_ends_the_download(capsys: pytest.CaptureFixture[str]) -> None:
    # No access or the job's data cleared: every next file would be refused alike.
    def ask(f: jobs_pb2.File) -> jobs_pb2.StorageFile:
        if f.desc.path == "b":
            raise CallRefused("dsjobs: FAILED_PRECONDITION: job x's data was cleared")
        return jobs_pb2.StorageFile(file=f, url="https://store/a")

    placed: list[str] = []
    failed = download_each(
        [_file("a"), _file("b"), _file("c")], ask, lambda sf: placed.append(sf.url) or sf.file.desc.path
    )
    assert (failed, placed) == (2, ["https://store/a"])
    assert capsys.readouterr().err == "dsjobs: FAILED_PRECONDITION: job x's data was cleared (asking for b)\n"


def test_a_file_already_in_place_is_not_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run again after a failure half-way (an expired token, the API restarting): only the rest.
    monkeypatch.chdir(tmp_path)
    f = jobs_pb2.File(desc=jobs_pb2.FileDesc(path="model.bin"), size_bytes=len(BODY))
    f.sha256 = hashlib.sha256(BODY).hexdigest()
    unreachable = jobs_pb2.StorageFile(file=f, url="http://127.0.0.1:9/model.bin")
    (tmp_path / "model.bin").write_bytes(BODY)
    assert place(unreachable, None) == f"model.bin ({len(BODY)} bytes, already there)"
    (tmp_path / "model.bin").write_bytes(BODY[:-1] + b"x")  # the same size, other bytes: fetched
    with pytest.raises(DownloadError, match=r"model\.bin"):
        place(unreachable, None)


def test_files_go_where_the_official_cli_puts_them() -> None:
    assert destination("results/model.bin", None) == Path("results/model.bin")
    assert destination("results/model.bin", "dl") == Path("dl/model.bin")
    assert destination("/abs/model.bin", "dl") == Path("dl/model.bin")


@pytest.mark.parametrize(
    ("path", "output_dir"),
    [("/etc/cron.d/x", None), ("../x", None), ("a/../../x", None), ("", None), ("a/..", "dl")],
)
def test_a_path_out_of_the_current_or_output_directory_is_refused(path: str, output_dir: str | None) -> None:
    # The server names the paths: whatever it says, nothing is written outside.
    with pytest.raises(DownloadError):
        destination(path, output_dir)


def test_an_unfinished_body_a_directory_in_the_way_or_an_odd_url_leave_nothing_behind(
    url: str, tmp_path: Path
) -> None:
    size, sha = len(BODY), hashlib.sha256(BODY).hexdigest()
    (tmp_path / "model.bin").mkdir()  # a directory where the file goes
    with pytest.raises(DownloadError):
        fetch(url, tmp_path / "model.bin", size, sha)
    with pytest.raises(DownloadError, match="not an http"):
        fetch("file:///dev/zero", tmp_path / "zero", 10, "")
    with pytest.raises(DownloadError, match="more than the 10 bytes"):
        fetch(url, tmp_path / "short", 10, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # no partial file


def test_a_directory_output_is_extracted_as_the_user_s_own_files(tmp_path: Path) -> None:
    # The runner's extractor leaves the shared volume's files world-writable; a download must not.
    import io
    import zipfile

    from dsjobs.runner.zipsafe import extract_zip

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("res/sub/f.txt", b"x")
        run = zipfile.ZipInfo("res/run.sh")
        run.create_system, run.external_attr = 3, 0o755 << 16
        zf.writestr(run, b"#!/bin/sh\n")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    old = os.umask(0o022)
    try:
        extract_zip(archive, tmp_path / "dl", private=True)
    finally:
        os.umask(old)
    for p in (tmp_path / "dl" / "res", tmp_path / "dl" / "res" / "sub"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, p
    assert stat.S_IMODE((tmp_path / "dl" / "res" / "sub" / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "dl" / "res" / "run.sh").stat().st_mode) == 0o755


def test_a_directory_output_goes_through_the_user_s_own_link_to_another_disk(tmp_path: Path) -> None:
    """`outputs -> /mnt/big/outputs` in the user's directory: the official CLI extracts a
    directory output through it, as a plain file output is written through it; it was refused
    ("entry ... resolves outside the root"). A file's own link is still not written through."""
    import io
    import zipfile

    from dsjobs.runner.zipsafe import UnsafeZipError, extract_zip

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("res/sub/f.txt", b"x")
        zf.writestr("res/g.txt", b"y")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    big, here = tmp_path / "big" / "res", tmp_path / "here"
    big.mkdir(parents=True)
    here.mkdir()
    (here / "res").symlink_to(big)
    assert extract_zip(archive, here, private=True) == 2
    assert (big / "sub" / "f.txt").read_bytes() == b"x"
    assert (big / "g.txt").read_bytes() == b"y"
    # A file's own link: not written through, on a download either.
    (big / "g.txt").unlink()
    (big / "g.txt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeZipError, match="through a symlink"):
        extract_zip(archive, here, private=True)
    assert not (tmp_path / "elsewhere").exists()
    # The job's shared volume (stage-in): a link out of the root is refused as before.
    with pytest.raises(UnsafeZipError, match="resolves outside the root"):
        extract_zip(archive, here)


def test_a_directory_output_is_not_extracted_through_a_link_inside_it(tmp_path: Path) -> None:
    """The names below the output's directory are the job's (another project member's job,
    maybe): a directory link the user keeps inside it (`res/cache -> ~/.cache`) is not written
    through, also when the output's directory itself is the user's link."""
    import io
    import zipfile

    from dsjobs.runner.zipsafe import UnsafeZipError, extract_zip

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("res/ok.txt", b"fine")
        zf.writestr("res/cache/.bashrc", b"evil")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    home = tmp_path / "home"
    home.mkdir()
    for linked in (False, True):
        here = tmp_path / f"here-{linked}"
        here.mkdir()
        res = here / "res"
        if linked:
            big = tmp_path / "big" / "res"
            big.mkdir(parents=True)
            res.symlink_to(big)
        else:
            res.mkdir()
        (res / "cache").symlink_to(home)
        with pytest.raises(UnsafeZipError, match=r"'res/cache/\.bashrc' resolves outside the root"):
            extract_zip(archive, here, private=True)
        assert list(home.iterdir()) == []


def test_a_directory_output_named_near_the_name_limit_is_downloaded(tmp_path: Path) -> None:
    # Its archive's name beside it must fit too (it was ".<name>.<pid>.zip": 255 + 11 bytes).
    import io
    import zipfile

    name = "r" * 255
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{name}/f.txt", b"x")
    body = buf.getvalue()
    f = jobs_pb2.File(
        desc=jobs_pb2.FileDesc(path=f"out/{name}"),
        size_bytes=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        compression_type=jobs_pb2.ZIP,
    )
    with _serving(body, "a.zip") as url:
        place(jobs_pb2.StorageFile(file=f, url=url), str(tmp_path))
    assert (tmp_path / name / "f.txt").read_bytes() == b"x"
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize(
    "missing",
    [("O_PATH",), ("O_PATH", "O_DIRECTORY", "O_NOFOLLOW", "O_CLOEXEC", "O_NONBLOCK")],
    ids=["macos", "windows"],
)
def test_the_command_imports_where_os_lacks_linux_s_open_flags(missing: tuple[str, ...]) -> None:
    # The runner's safe-open module used O_PATH at import: `dsjobs download-files` died with an
    # AttributeError on every Mac and Windows laptop.
    code = f"import os\nfor n in {missing!r}:\n    delattr(os, n)\nimport dsjobs.download\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr


def test_the_client_needs_none_of_the_server_extra() -> None:
    # pyproject: the base install is the client (grpcio, protobuf, googleapis-common-protos); the
    # operator's and API's libraries are the `server` extra.
    server = [
        "kopf", "kubernetes", "pydantic", "boto3", "botocore", "aiohttp", "cryptography",
        "orjson", "yaml", "prometheus_client", "grpc_health", "grpc_reflection",
    ]  # fmt: skip
    code = (
        "import sys\n"
        f"for name in {server!r}:\n"
        "    sys.modules[name] = None\n"
        "import dsjobs.cli, dsjobs.download\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr


def _python310() -> str | None:
    """A Python 3.10 of this machine (pyenv's, or on PATH; a pyenv shim alone may not run it)."""
    pyenv = sorted(
        Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser().glob("versions/3.10*/bin/python")
    )
    for candidate in [*map(str, pyenv), shutil.which("python3.10")]:
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


def test_the_server_parts_say_which_python_they_need() -> None:
    from dsjobs.serverpython import require_server_python

    with pytest.raises(
        ImportError, match=r"need Python 3\.11 or newer, this is 3\.10: .*dsjobs download-files"
    ):
        require_server_python((3, 10, 12))
    require_server_python((3, 11, 0))


@pytest.mark.skipif(_python310() is None, reason="no Python 3.10 on this machine")
def test_the_client_s_own_modules_run_on_python_3_10() -> None:
    # A laptop's Python 3.10 (Ubuntu 22.04) was refused by the package's floor; the client's
    # modules compile there and the stdlib ones load, and a server package says what it needs.
    operator = Path(__file__).resolve().parents[2] / "operator"
    client = [
        "cli.py",
        "download.py",
        "runner/zipsafe.py",
        "runner/safeio.py",
        "__init__.py",
        "runner/__init__.py",
    ]
    code = (
        f"for f in {client!r}:\n"
        f"    path = {str(operator / 'dsjobs')!r} + '/' + f\n"
        "    compile(open(path, encoding='utf-8').read(), path, 'exec')\n"
        "import dsjobs.runner.zipsafe, dsjobs.runner.safeio\n"
        "try:\n"
        "    import dsjobs.models\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    python = _python310()
    assert python is not None
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(operator)}
    )
    assert out.returncode == 0, out.stderr
    assert "need Python 3.11 or newer, this is 3.10" in out.stdout, out.stdout
