"""dsjobs.storage, the log format and stage-in against a real S3 server (see runner_s3.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from runner_s3 import S3Target, put_input, runner_s3, zip_like_cli  # noqa: F401

from dsjobs import storage as storage_module
from dsjobs.logrecords import SYSTEM_LOG_PATH, Stream, read_final, read_records
from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.result import RunnerStatus, load_result, parse_termination_message
from dsjobs.runner.ship import LogShipper
from dsjobs.runner.stagein import run_stage_in
from dsjobs.storage import (
    IntegrityError,
    ObjectNotFoundError,
    PreconditionFailedError,
    input_key,
    output_key,
)

pytestmark = pytest.mark.e2e


def test_streaming_upload_and_verified_download(runner_s3: S3Target, tmp_path: Path) -> None:  # noqa: F811
    st = runner_s3.storage
    for size in (0, 5, 20 * 1024 * 1024 + 7):  # the last one goes multipart
        data = os.urandom(size)
        src = tmp_path / f"src-{size}"
        src.write_bytes(data)
        key = output_key(runner_s3.project, runner_s3.job, f"f/{size}.bin")
        up = st.upload_file(src, key)
        assert up.size == size and up.sha256 == hashlib.sha256(data).hexdigest()
        assert st.exists(key, size=size) and not st.exists(key, size=size + 1)
        dest = tmp_path / f"dest-{size}"
        down = st.download_file(key, dest, expected_size=size, expected_sha256=up.sha256)
        assert down.sha256 == up.sha256 and dest.read_bytes() == data
    # A wrong digest leaves nothing behind; a missing key says so.
    with pytest.raises(IntegrityError):
        st.download_file(key, tmp_path / "bad", expected_sha256="0" * 64)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    with pytest.raises(ObjectNotFoundError):
        st.download_file(key + "-nope", tmp_path / "nope")


def test_access_problem_names_what_keeps_the_bucket_out_of_reach(runner_s3: S3Target) -> None:  # noqa: F811
    # The API's and the operator's start-up check: one LIST, its refusal or silence named.
    def problem(**changes: str) -> str | None:
        env = {**runner_s3.env, **changes}
        store = storage_module.Storage.from_env(env).with_timeout(3).with_attempts(1)
        return store.access_problem()

    endpoint, bucket = runner_s3.env["DSJOBS_S3_ENDPOINT"], runner_s3.env["DSJOBS_S3_BUCKET"]
    assert problem() is None
    assert problem(DSJOBS_S3_SECRET_KEY="not-the-key") == (
        f"the object store {endpoint.rstrip('/')} (bucket {bucket}) refuses the bucket's listing: "
        "SignatureDoesNotMatch (HTTP 403): check DSJOBS_S3_ACCESS_KEY and DSJOBS_S3_SECRET_KEY"
    )
    assert problem(DSJOBS_S3_BUCKET="no-such-bucket") == (
        f"the object store {endpoint.rstrip('/')} (bucket no-such-bucket) refuses the bucket's "
        "listing: NoSuchBucket (HTTP 404): check DSJOBS_S3_BUCKET"
    )
    closed = _closed_port()
    silent = problem(DSJOBS_S3_ENDPOINT=f"http://127.0.0.1:{closed}")
    assert silent is not None and silent.startswith(
        f"the object store http://127.0.0.1:{closed} (bucket {bucket}) does not answer: ConnectionRefusedError"
    )


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _FailingRaw(io.RawIOBase):
    """A file whose read fails after `limit` bytes, as a disk error would."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.left <= 0:
            raise OSError(5, "Input/output error")
        n = min(len(b), self.left)
        b[:n] = b"x" * n
        self.left -= n
        return n


def test_failed_multipart_upload_is_aborted_and_leaves_nothing(runner_s3: S3Target) -> None:  # noqa: F811
    st = runner_s3.storage
    key = output_key(runner_s3.project, runner_s3.job, "f/broken.bin")
    size = 40 * 1024 * 1024
    with pytest.raises(OSError, match="Input/output error"):
        st._multipart_upload(io.BufferedReader(_FailingRaw(size // 2)), key, "application/octet-stream", size)
    assert not st.exists(key)
    pending = st._client.list_multipart_uploads(Bucket=st.bucket, Prefix=key).get("Uploads", [])
    assert [u for u in pending if u.get("Key") == key] == []


def test_presigned_put_and_get_work_with_plain_http(runner_s3: S3Target) -> None:  # noqa: F811
    st = runner_s3.storage
    data = b"uploaded by a client"
    key = input_key(runner_s3.project, hashlib.sha256(data).hexdigest())
    url = st.presign_put(key)
    req = urllib.request.Request(url, data=data, method="PUT")  # like requests.put(url, data=f)
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    assert st.exists(key, size=len(data))
    with urllib.request.urlopen(st.presign_get(key, expires=timedelta(minutes=1)), timeout=30) as resp:
        assert resp.read() == data
    # With its size signed, the URL takes a body of that size only.
    sized = st.presign_put(key, size=len(data))
    for body, status in ((data + b" and more", 403), (data[:-1], 403), (data, 200)):
        req = urllib.request.Request(sized, data=body, method="PUT")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                got = resp.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        assert got == status, body
    assert st.exists(key, size=len(data))


def test_an_upload_url_cannot_be_turned_into_a_copy_of_another_object(runner_s3: S3Target) -> None:  # noqa: F811
    # An unsigned x-amz-copy-source on an input's upload URL made a CopyObject, with the signing
    # key's rights: another project's outputs copied into the caller's inputs, then run as its
    # job's input. A store dsjobs runs on must refuse it, as S3 does (docs/admin.md, Storage).
    st = runner_s3.storage
    secret = output_key(f"{runner_s3.project}-other", runner_s3.job, "model.bin")
    st.put_bytes(secret, b"another project's weights")
    data = b"x" * 25
    key = input_key(runner_s3.project, hashlib.sha256(data).hexdigest())
    url = st.presign_put(key, size=len(data))
    req = urllib.request.Request(url, data=data, method="PUT")
    req.add_header("x-amz-copy-source", f"/{st.bucket}/{secret}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert refused.value.code == 403
    assert "not signed: x-amz-copy-source" in refused.value.read().decode()
    assert not st.exists(key)
    st.delete(secret)


def test_conditional_writes_and_delete_prefix(runner_s3: S3Target) -> None:  # noqa: F811
    st = runner_s3.storage
    p = f"projects/{runner_s3.project}/jobs/{runner_s3.job}/"
    st.put_bytes(p + "a", b"1", if_none_match=True)
    st.put_bytes(p + "a", b"1", if_none_match=True)  # a retried write of the same bytes is fine
    with pytest.raises(PreconditionFailedError):
        st.put_bytes(p + "a", b"2", if_none_match=True)
    st.put_bytes(p + "b/c", b"2")
    other = f"projects/{runner_s3.project}/jobs/{runner_s3.job}x/keep"
    st.put_bytes(other, b"3")
    assert st.delete_prefix(p) == 2
    assert st.get_bytes(p + "a") is None and st.get_bytes(other) == b"3"
    with pytest.raises(ValueError):
        st.delete_prefix(f"projects/{runner_s3.project}")


def test_unfinished_uploads_are_aborted_page_by_page(
    runner_s3: S3Target,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    st = runner_s3.storage
    p = f"projects/{runner_s3.project}/jobs/{runner_s3.job}/"
    other = f"projects/{runner_s3.project}/jobs/{runner_s3.job}x/keep"
    for key in (p + "a", p + "a", p + "b", p + "c/d", p + "e", other):
        st._client.create_multipart_upload(Bucket=st.bucket, Key=key)
    monkeypatch.setattr(storage_module, "UPLOADS_PAGE", 2)
    listed = [u.key for u in st.iter_uploads(p)]
    assert listed == [p + "a", p + "a", p + "b", p + "c/d", p + "e"]
    # Of one key only: what an orphaned input's deletion aborts.
    assert st.abort_uploads(p, key=p + "b") == 1
    assert st.delete_prefix(p) == 0
    assert list(st.iter_uploads(p)) == []
    assert [u.key for u in st.iter_uploads(other)] == [other]
    assert st.abort_uploads(other) == 1


def _config(t: S3Target, tmp: Path, **kw: object) -> RunnerConfig:
    return RunnerConfig(
        project_id=t.project,
        job_id=t.job,
        cmd="true",
        paths={"work_dir": str(tmp / "work"), "shared_dir": str(tmp / "shared")},
        **kw,  # type: ignore[arg-type]
    )


def test_log_chunks_on_real_storage(runner_s3: S3Target, tmp_path: Path) -> None:  # noqa: F811
    cfg = _config(runner_s3, tmp_path)
    cfg.layout.create()
    shipper = LogShipper(runner_s3.storage, cfg)
    shipper.resume()
    expected = b""
    for i in range(5):
        chunk = b"line %d\n" % i * (i + 1)
        expected += chunk
        with open(cfg.layout.stdout, "ab") as f:
            f.write(chunk)
        assert shipper.pump()
    assert shipper.pump(final=True) and shipper.finalize("done")
    got = b""
    offset = 0
    while True:
        res = read_records(runner_s3.storage, runner_s3.project, runner_s3.job, offset, max_records=2)
        got += b"".join(r.content for r in res.records if r.stream == Stream.OUT)
        offset = res.next_offset
        if res.complete:
            break
    assert got == expected


def test_stage_in_places_inputs_zips_and_local_modules(runner_s3: S3Target, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "client"
    (src / "data" / "sub").mkdir(parents=True)
    (src / "data" / "a.csv").write_text("1,2\n")
    (src / "data" / "sub" / "b.txt").write_text("b")
    (src / "helpers").mkdir()
    (src / "helpers" / "__init__.py").write_text("X = 1\n")
    main_sha, main_size = put_input(runner_s3, b"print('hi')\n")
    zip_sha, zip_size = put_input(runner_s3, zip_like_cli(src / "data"))
    mod_sha, mod_size = put_input(runner_s3, zip_like_cli(src / "helpers"))
    cfg = _config(
        runner_s3,
        tmp_path,
        inputs=[
            {"path": "main.py", "var": "MAIN", "sha256": main_sha, "size_bytes": main_size},
            {"path": "inputs/data", "sha256": zip_sha, "size_bytes": zip_size, "compression": "ZIP"},
        ],
        local_modules=[
            {"path": "/tmp/tmpx.zip", "var": "_LOCAL_MODULE_0", "sha256": mod_sha, "size_bytes": mod_size}
        ],
        outputs=[{"path": ".dsjobs-vars/OUT/result.txt", "var": "OUT"}],
        python_env={"requirements": ["tinypkg==0.1"]},
    )
    term = tmp_path / "termination-log"
    assert run_stage_in(cfg, runner_s3.storage, termination_log=str(term))
    work = cfg.work_dir
    assert (work / "main.py").read_text() == "print('hi')\n"
    assert (work / "inputs" / "data" / "a.csv").read_text() == "1,2\n"
    assert (work / "inputs" / "data" / "sub" / "b.txt").read_text() == "b"
    assert (cfg.layout.module_dir(0) / "helpers" / "__init__.py").exists()
    assert (work / ".dsjobs-vars" / "OUT").is_dir()  # outputs' parents exist
    assert cfg.layout.requirements.read_text() == "tinypkg==0.1\n"
    assert cfg.layout.entry_script.read_text().startswith("#!/bin/sh")
    assert not term.exists()
    res = read_records(runner_s3.storage, runner_s3.project, runner_s3.job, 0)
    assert [r.file_path for r in res.records] == [SYSTEM_LOG_PATH] and not res.complete


@pytest.mark.parametrize("problem", ["missing", "corrupt", "zip-slip"])
def test_stage_in_failure_is_reported_everywhere(
    runner_s3: S3Target,  # noqa: F811
    tmp_path: Path,
    problem: str,
) -> None:
    import io
    import zipfile

    if problem == "missing":
        sha, size, compression = "f" * 64, 10, "NONE"
    elif problem == "corrupt":
        sha = hashlib.sha256(b"the real content").hexdigest()
        runner_s3.storage.put_bytes(input_key(runner_s3.project, sha), b"something else!")
        size, compression = 16, "NONE"
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("../../escape.txt", b"x")
        sha, size = put_input(runner_s3, buf.getvalue())
        compression = "ZIP"
    cfg = _config(
        runner_s3,
        tmp_path,
        inputs=[{"path": "in.bin", "sha256": sha, "size_bytes": size, "compression": compression}],
    )
    term = tmp_path / "termination-log"
    assert not run_stage_in(cfg, runner_s3.storage, termination_log=str(term))
    msg = parse_termination_message(term.read_text())
    assert msg.status == RunnerStatus.STAGE_IN_FAILED
    expected = {"missing": "not in storage", "corrupt": "corrupt", "zip-slip": "archive refused"}[problem]
    assert expected in msg.reason
    stored = load_result(runner_s3.storage, runner_s3.project, runner_s3.job)
    assert stored is not None and stored.reason == msg.reason and stored.logs_complete
    res = read_records(runner_s3.storage, runner_s3.project, runner_s3.job, 0)
    assert res.complete
    assert expected in b"".join(r.content for r in res.records).decode()
    assert read_final(runner_s3.storage, runner_s3.project, runner_s3.job) is not None
    assert not (tmp_path / "escape.txt").exists()
    json.loads(term.read_text())
