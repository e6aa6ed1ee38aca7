"""Storage's retries and resumed downloads against a local HTTP server answering as S3 would."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.server
import os
import socket
import ssl
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.exceptions import ClientError
from runner_fakes import config

from dsjobs import storage
from dsjobs.devcluster.pki import CertificateAuthority
from dsjobs.runner.ship import LogShipper
from dsjobs.s3http import Proxy, S3HttpError, proxy_for
from dsjobs.storage import IntegrityError, Storage, StorageSettings

MiB = 1024 * 1024


class Request(http.server.BaseHTTPRequestHandler):
    """One request: the fake's `answer` replies with `reply`."""

    protocol_version = "HTTP/1.1"
    body: bytes

    def log_message(self, *args: object) -> None:
        pass

    def reply(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, cut: int | None = None
    ) -> None:
        """Answer; ``cut``: send only that many body bytes, then drop the connection."""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def error(self, status: int, code: str) -> None:
        self.reply(status, f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode())

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(n) if n else b""
        fake: FakeS3 = self.server.fake  # type: ignore[attr-defined]
        with fake.lock:
            fake.seen.append((self.command, self.path, self.headers.get("Range"), len(self.body)))
        fake.answer(self)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle


@dataclass
class FakeS3:
    url: str
    answer: Callable[[Request], None] = lambda r: r.error(500, "NotScripted")
    seen: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str, contains: str = "") -> int:
        with self.lock:
            return sum(1 for m, p, _, _ in self.seen if m == method and contains in p)

    def part_puts(self, number: int) -> int:
        with self.lock:
            return sum(1 for m, p, _, _ in self.seen if m == "PUT" and _part(p) == number)

    def store(self, **kwargs: int) -> Storage:
        return Storage(
            StorageSettings(endpoint=self.url, bucket="b", access_key="AK", secret_key="SK"),
            **kwargs,
        )


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeS3]:
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # backoff without waiting
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Request)
    fake = FakeS3(f"http://127.0.0.1:{srv.server_address[1]}")
    srv.fake = fake  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield fake
    srv.shutdown()
    srv.server_close()


# -- one retry layer ---------------------------------------------------------------------------


def test_a_throttling_server_gets_attempts_requests_per_call_not_attempts_squared(s3: FakeS3) -> None:
    # botocore retried inside our retry(): 4 x 3 = 12 listings here (30 with the default 5).
    s3.answer = lambda r: r.error(503, "SlowDown")
    store = s3.store(attempts=3)
    with pytest.raises(ClientError):
        list(store.iter_objects("projects/p/"))
    assert s3.count("GET") == 3
    s3.seen.clear()
    with pytest.raises(ClientError):
        store.delete_prefix("projects/p/")
    assert s3.count("GET") == 3
    s3.seen.clear()
    with pytest.raises(S3HttpError):
        store.head("projects/p/k")
    assert s3.count("HEAD") == 3


LISTED = (
    b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><KeyCount>1</KeyCount>'
    b"<IsTruncated>false</IsTruncated><Contents><Key>projects/p/jobs/j/a</Key><Size>1</Size>"
    b"<LastModified>2025-01-01T00:00:00.000Z</LastModified></Contents></ListBucketResult>"
)


def test_batch_deletes_carry_a_content_md5(s3: FakeS3) -> None:
    # botocore sends a CRC32 only; servers such as older MinIO refuse that with MissingContentMD5.
    seen: list[tuple[str | None, str]] = []

    def answer(r: Request) -> None:
        if r.command == "GET":
            r.reply(200, LISTED)
            return
        if r.command == "POST":
            md5 = base64.b64encode(hashlib.md5(r.body).digest()).decode()
            seen.append((r.headers.get("Content-MD5"), md5))
            r.reply(200, b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult></DeleteResult>')
            return
        r.reply(200, b"<ListMultipartUploadsResult></ListMultipartUploadsResult>")

    s3.answer = answer
    s3.store().delete_prefix("projects/p/jobs/j/")
    assert len(seen) == 1 and seen[0][0] == seen[0][1]


def test_unfinished_uploads_are_listed_past_a_page_without_markers(s3: FakeS3) -> None:
    """A store that leaves NextKeyMarker out of a truncated page: listing stopped at its end, and
    the uploads after it were never aborted."""

    def upload(key: str, uid: str) -> bytes:
        return f"<Upload><Key>{key}</Key><UploadId>{uid}</UploadId></Upload>".encode()

    def answer(r: Request) -> None:
        if "key-marker=projects%2Fp%2Fjobs%2Fj%2Fb" in r.path:
            body = b"<IsTruncated>false</IsTruncated>" + upload("projects/p/jobs/j/c", "u3")
        else:
            body = (
                b"<IsTruncated>true</IsTruncated>"
                + upload("projects/p/jobs/j/a", "u1")
                + upload("projects/p/jobs/j/b", "u2")
            )
        r.reply(200, b"<ListMultipartUploadsResult>" + body + b"</ListMultipartUploadsResult>")

    s3.answer = answer
    listed = [(u.key, u.upload_id) for u in s3.store().iter_uploads("projects/p/jobs/j/")]
    assert listed == [
        ("projects/p/jobs/j/a", "u1"),
        ("projects/p/jobs/j/b", "u2"),
        ("projects/p/jobs/j/c", "u3"),
    ]


def test_clock_skew_is_not_retried(s3: FakeS3) -> None:
    # A retry is signed with the same wrong clock: refused the same way.
    s3.answer = lambda r: r.error(403, "RequestTimeTooSkewed")
    with pytest.raises(S3HttpError, match="RequestTimeTooSkewed"):
        s3.store(attempts=3).put_bytes("projects/p/jobs/j/result.json", b"{}")
    assert s3.count("PUT") == 1


def test_a_conditional_put_refused_as_existing_but_read_as_missing_is_tried_again(s3: FakeS3) -> None:
    # The PUT landed, its answer was lost; the retry got 412, the read of it 404 (a store whose
    # reads lag its writes): taken for another writer's content, the ship ended RunnerFailed
    # before uploading any output.
    answers = iter([(412, "PreconditionFailed"), (404, "NoSuchKey"), (412, "PreconditionFailed")])

    def answer(r: Request) -> None:
        step = next(answers, None)
        if step is not None:
            r.error(*step)
        else:
            r.reply(200, b"chunk")

    s3.answer = answer
    s3.store(attempts=3).put_bytes("projects/p/jobs/j/logs/chunks/0", b"chunk", if_none_match=True)
    assert [m for m, *_ in s3.seen] == ["PUT", "GET", "PUT", "GET"]
    # Other bytes there: another writer's, not tried again.
    s3.seen.clear()
    answers = iter([(412, "PreconditionFailed")])
    s3.answer = lambda r: answer(r) if r.command == "PUT" else r.reply(200, b"theirs")
    with pytest.raises(storage.PreconditionFailedError):
        s3.store(attempts=3).put_bytes("projects/p/jobs/j/logs/chunks/0", b"chunk", if_none_match=True)
    assert [m for m, *_ in s3.seen] == ["PUT", "GET"]


def test_the_log_shipper_is_the_one_retry_layer_of_its_writes(s3: FakeS3, tmp_path: Path) -> None:
    # The shipper backs off between its own tries; were each try also Storage's 5 attempts, a
    # "due now" pump while the program runs would block for seconds on a storage outage, and the
    # waits would multiply.
    s3.answer = lambda r: r.error(503, "SlowDown")
    cfg = config(tmp_path)
    cfg.layout.stdout.write_bytes(b"line\n")
    now = [1000.0]
    shipper = LogShipper(s3.store(attempts=5), cfg, clock=lambda: now[0], sleep=lambda s: None)
    assert not shipper.pump(deadline=now[0])
    assert s3.count("PUT") == 1
    assert not shipper.finalize("done")
    assert s3.count("PUT") == 1  # still backing off: not even one more try
    # The final marker is a single try too, once the backoff has passed.
    now[0] += 60
    assert not shipper.finalize("done")
    assert s3.count("PUT") == 2
    # Reads keep Storage's retries: nothing else retries them.
    with pytest.raises(S3HttpError):
        shipper.resume()
    assert s3.count("HEAD") == 5


def test_a_patient_store_waits_out_an_outage_in_requests_and_downloads(
    s3: FakeS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a job's runner uses (STORAGE_PATIENCE_SECONDS): a storage outage of minutes is waited
    # out instead of failing the job's staging or costing it an output.
    now = [0.0]
    fake_time = types.SimpleNamespace(
        **{
            **{n: getattr(time, n) for n in dir(time) if not n.startswith("_")},
            "monotonic": lambda: now[0],
            "sleep": lambda seconds: now.__setitem__(0, now[0] + seconds),
        }
    )
    monkeypatch.setattr(storage, "time", fake_time)
    body = b"input bytes"

    def answer(r: Request) -> None:
        if now[0] < 90:  # down for 90 s
            r.error(503, "ServiceUnavailable")
        elif r.command == "HEAD":
            r.reply(200, headers={"ETag": '"e"', "Content-Length": str(len(body))})
        else:
            r.reply(200, body, {"ETag": '"e"'})

    s3.answer = answer
    with pytest.raises(S3HttpError):
        s3.store(attempts=3).get_bytes("projects/p/k")
    assert now[0] < 90
    assert s3.store(attempts=3, patience=300).get_bytes("projects/p/k") == body
    now[0] = 0.0
    with pytest.raises(S3HttpError):
        s3.store(attempts=3).download_file("projects/p/k", tmp_path / "a")
    now[0] = 0.0
    got = s3.store(attempts=3, patience=300).download_file("projects/p/k", tmp_path / "b")
    assert got.size == len(body) and (tmp_path / "b").read_bytes() == body
    # A caller with its own retry loop gets one try, without the patience.
    now[0] = 0.0
    once = storage.single_try(s3.store(attempts=3, patience=300))
    s3.seen.clear()
    with pytest.raises(S3HttpError):
        once.get_bytes("projects/p/k")
    assert s3.count("GET") == 1


def test_the_runner_uses_a_patient_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dsjobs.runner import __main__ as runner_main

    assert runner_main.STORAGE_PATIENCE_SECONDS >= 60
    made: list[Storage] = []
    monkeypatch.setattr(runner_main.RunnerConfig, "load", staticmethod(lambda: config(tmp_path)))
    monkeypatch.setattr(
        "dsjobs.runner.stagein.run_stage_in", lambda config, store: made.append(store) or True
    )
    monkeypatch.setenv("DSJOBS_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("DSJOBS_S3_BUCKET", "b")
    monkeypatch.setenv("DSJOBS_S3_ACCESS_KEY", "AK")
    monkeypatch.setenv("DSJOBS_S3_SECRET_KEY", "SK")
    assert runner_main.main(["stage-in"]) == 0
    (store,) = made
    assert store.patience == runner_main.STORAGE_PATIENCE_SECONDS


#: CreateMultipartUpload's answer in these fakes: upload id u1.
INITIATED = b"<InitiateMultipartUploadResult><UploadId>u1</UploadId></InitiateMultipartUploadResult>"


def _part(path: str) -> int | None:
    numbers = parse_qs(urlsplit(path).query).get("partNumber")
    return int(numbers[0]) if numbers else None


def _multipart(fail_part: int, failures: int) -> Callable[[Request], None]:
    """S3's multipart calls; part `fail_part` answers 503 its first `failures` times."""
    left = {"n": failures}

    def answer(r: Request) -> None:
        if r.command == "POST" and r.path.endswith("?uploads"):
            r.reply(200, INITIATED)
        elif r.command == "PUT" and "partNumber=" in r.path:
            if _part(r.path) == fail_part and left["n"] > 0:
                left["n"] -= 1
                r.error(503, "SlowDown")
            else:
                r.reply(200, headers={"ETag": '"p"'})
        elif r.command == "POST" and "uploadId=u1" in r.path:
            r.reply(200, b'<CompleteMultipartUploadResult><ETag>"x"</ETag></CompleteMultipartUploadResult>')
        elif r.command == "DELETE":
            r.reply(204)
        else:
            r.error(400, "Unexpected")

    return answer


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (16 * MiB + 1))  # multipart: 5 + 5 + 5 + 1 MiB parts
    return path


def test_a_failing_part_is_retried_by_itself(s3: FakeS3, big_file: Path) -> None:
    s3.answer = _multipart(fail_part=2, failures=2)
    res = s3.store(attempts=3, part_size=5 * MiB).upload_file(big_file, "projects/p/jobs/j/outputs/big.bin")
    assert res.size == big_file.stat().st_size
    assert s3.count("POST", "?uploads") == 1
    assert [s3.part_puts(n) for n in (1, 2, 3, 4)] == [1, 3, 1, 1]
    sent = sum(n for m, p, _, n in s3.seen if m == "PUT")
    assert sent == res.size + 2 * 5 * MiB  # the file once, plus part 2 twice more


def test_a_part_that_keeps_failing_aborts_the_upload_without_starting_over(
    s3: FakeS3, big_file: Path
) -> None:
    # It used to restart the whole upload `attempts` times, each with botocore's retries of the part.
    s3.answer = _multipart(fail_part=2, failures=1000)
    with pytest.raises(ClientError, match="SlowDown"):
        s3.store(attempts=3, part_size=5 * MiB).upload_file(big_file, "projects/p/jobs/j/outputs/big.bin")
    assert s3.count("POST", "?uploads") == 1
    assert s3.part_puts(2) == 3
    assert s3.count("DELETE", "uploadId=u1") == 1


@pytest.mark.parametrize("ours", [True, False])
def test_a_completed_upload_whose_answer_was_lost_is_told_by_its_etag(
    s3: FakeS3, big_file: Path, ours: bool
) -> None:
    # The store completed the object, the answer was lost; the retry finds the upload gone
    # (NoSuchUpload). Only an object made of exactly these parts counts as this upload.
    size = big_file.stat().st_size
    digests = [hashlib.md5(bytes([n]) * 7).hexdigest() for n in range(1, 5)]
    made = hashlib.md5(b"".join(bytes.fromhex(d) for d in digests)).hexdigest() + "-4"
    state = {"completed": False}

    def answer(r: Request) -> None:
        if r.command == "POST" and r.path.endswith("?uploads"):
            r.reply(200, INITIATED)
        elif r.command == "PUT" and "partNumber=" in r.path:
            number = _part(r.path)
            assert number is not None
            r.reply(200, headers={"ETag": f'"{digests[number - 1]}"'})
        elif r.command == "POST" and "uploadId=u1" in r.path:
            if state["completed"]:
                r.error(404, "NoSuchUpload")
            else:
                state["completed"] = True
                r.close_connection = True
                r.connection.shutdown(socket.SHUT_RDWR)
        elif r.command == "HEAD":
            etag = made if ours else "0" * 32 + "-4"  # another upload's object of that key and size
            r.send_response(200)  # not `reply`: its Content-Length is the (empty) body's
            r.send_header("ETag", f'"{etag}"')
            r.send_header("Content-Length", str(size))
            r.end_headers()
        elif r.command == "DELETE":
            r.error(404, "NoSuchUpload")
        else:
            r.error(400, "Unexpected")

    s3.answer = answer
    store = s3.store(attempts=3, part_size=5 * MiB)
    if ours:
        assert store.upload_file(big_file, "projects/p/jobs/j/outputs/big.bin").size == size
    else:
        with pytest.raises(ClientError, match="NoSuchUpload"):
            store.upload_file(big_file, "projects/p/jobs/j/outputs/big.bin")
    assert state["completed"]


# -- streamed uploads --------------------------------------------------------------------------


def _stream_answer(got: dict[str, Any], fail_part: int | None = None) -> Callable[[Request], None]:
    """S3 for `upload_stream`: keeps a plain PUT's body and the assembled parts of a multipart one."""
    parts: dict[int, bytes] = {}

    def answer(r: Request) -> None:
        if r.command == "POST" and r.path.endswith("?uploads"):
            r.reply(200, INITIATED)
        elif r.command == "PUT" and "partNumber=" in r.path:
            number = _part(r.path)
            assert number is not None
            if number == fail_part:
                r.error(503, "SlowDown")
                return
            parts[number] = r.body
            r.reply(200, headers={"ETag": f'"p{number}"'})
        elif r.command == "PUT":
            got["put"] = r.body
            r.reply(200)
        elif r.command == "POST" and "uploadId=u1" in r.path:
            got["multipart"] = b"".join(parts[n] for n in sorted(parts))
            got["part_sizes"] = [len(parts[n]) for n in sorted(parts)]
            r.reply(200, b'<CompleteMultipartUploadResult><ETag>"x"</ETag></CompleteMultipartUploadResult>')
        elif r.command == "DELETE":
            got["aborted"] = True
            r.reply(204)
        else:
            r.error(400, "Unexpected")

    return answer


def _writer(data: bytes, piece: int = 100_000, fail_after: bool = False) -> Callable[[BinaryIO], None]:
    def produce(out: BinaryIO) -> None:
        for i in range(0, len(data), piece):
            out.write(data[i : i + piece])
        if fail_after:
            raise ValueError("the producer failed")

    return produce


def test_a_small_stream_is_one_put(s3: FakeS3) -> None:
    got: dict[str, Any] = {}
    s3.answer = _stream_answer(got)
    data = bytes(range(256)) * 40
    res = s3.store().upload_stream("projects/p/o.zip", _writer(data, piece=1000), size_hint=len(data))
    assert got == {"put": data}
    assert (res.size, res.sha256) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("hinted", [True, False])  # False: read ahead, then it turns out big
def test_a_big_stream_goes_multipart_in_full_parts(s3: FakeS3, hinted: bool) -> None:
    got: dict[str, Any] = {}
    s3.answer = _stream_answer(got)
    data = hashlib.sha256(b"seed").digest() * (17 * MiB // 32 + 5)
    hint = len(data) if hinted else 0
    res = s3.store(part_size=5 * MiB).upload_stream("projects/p/o.zip", _writer(data), size_hint=hint)
    assert got["multipart"] == data and "put" not in got and "aborted" not in got
    assert got["part_sizes"] == [5 * MiB, 5 * MiB, 5 * MiB, len(data) - 15 * MiB]  # S3: >= 5 MiB but the last
    assert (res.size, res.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_parts_beyond_the_buffer_budget_are_sent_one_at_a_time(
    s3: FakeS3, big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object over 78 GiB has parts over 8 MiB (10,000 parts at most): (concurrency + 1) of
    them, 158 MiB each for a 1.5 TiB checkpoint, did not fit the runner's 512 MiB."""
    got: dict[str, Any] = {}
    s3.answer = _stream_answer(got)
    data = big_file.read_bytes()

    def most_at_once(store: Storage, hold: float) -> int:
        """Runs the upload; how many parts were in flight at once at most. Until two have been,
        each part waits up to `hold` seconds for another to be in flight with it."""
        client = store._client
        real, cond, now, most = client.upload_part, threading.Condition(), [0], [0]

        def upload_part(**kw: Any) -> Any:
            with cond:
                now[0] += 1
                most[0] = max(most[0], now[0])
                cond.notify_all()
                cond.wait_for(lambda: most[0] >= 2, hold)  # once two were, none waits
            try:
                return real(**kw)
            finally:
                with cond:
                    now[0] -= 1

        client.upload_part = upload_part  # type: ignore[method-assign]
        store.upload_file(big_file, "projects/p/jobs/j/outputs/big.bin")
        return most[0]

    # The usual concurrency: the second part is sent while the first is (`hold` a hang guard).
    assert most_at_once(s3.store(part_size=5 * MiB), hold=30) == 2
    monkeypatch.setattr(storage, "PART_BUFFERS_BYTES", 5 * MiB)  # one 5 MiB part at a time
    # Each part gives another a moment to join it: none does.
    assert most_at_once(s3.store(part_size=5 * MiB), hold=0.2) == 1
    res = s3.store(part_size=5 * MiB).upload_file(big_file, "projects/p/jobs/j/outputs/big.bin")
    assert got["multipart"] == data
    assert got["part_sizes"] == [5 * MiB, 5 * MiB, 5 * MiB, 1 * MiB + 1]
    assert (res.size, res.sha256) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("size", [1000, 20 * MiB])
def test_a_failing_producer_stores_nothing(s3: FakeS3, size: int) -> None:
    # A zip that failed halfway must not become an output that looks whole.
    got: dict[str, Any] = {}
    s3.answer = _stream_answer(got)
    with pytest.raises(ValueError, match="the producer failed"):
        s3.store(part_size=5 * MiB).upload_stream("projects/p/o.zip", _writer(b"z" * size, fail_after=True))
    assert "put" not in got and "multipart" not in got
    assert got.get("aborted", False) == (size > 16 * MiB)


def test_a_failed_upload_stops_the_producer(s3: FakeS3) -> None:
    got: dict[str, Any] = {}
    s3.answer = _stream_answer(got, fail_part=2)
    ended: list[BaseException | None] = []

    def endless(out: BinaryIO) -> None:
        try:
            for _ in range(4096):  # 4 GiB: far more than the upload takes before it fails
                out.write(b"y" * MiB)
        except BaseException as exc:
            ended.append(exc)
            raise
        ended.append(None)

    with pytest.raises(ClientError, match="SlowDown"):
        s3.store(attempts=2, part_size=5 * MiB).upload_stream("projects/p/o.zip", endless)
    assert got.get("aborted") is True
    assert len(ended) == 1 and isinstance(ended[0], BrokenPipeError)  # not left writing into nothing


# -- resumed downloads -------------------------------------------------------------------------

V1 = bytes(range(256)) * 16  # 4096 bytes
V2 = b"B" * 3000


def _download(store: Storage, tmp_path: Path) -> bytes:
    res = store.download_file("k", tmp_path / "out")
    data = (tmp_path / "out").read_bytes()
    assert res.size == len(data) and res.sha256 == hashlib.sha256(data).hexdigest()
    return data


def _ranged(obj: bytes, etag: str, r: Request) -> None:
    start = int((r.headers["Range"] or "").removeprefix("bytes=").rstrip("-"))
    if start >= len(obj):
        r.reply(416, b"<Error><Code>InvalidRange</Code></Error>", {"ETag": etag})
    else:
        r.reply(206, obj[start:], {"ETag": etag, "Content-Range": f"bytes {start}-{len(obj) - 1}/{len(obj)}"})


def test_a_download_stops_at_the_declared_size(s3: FakeS3, tmp_path: Path) -> None:
    # An input overwritten after Execute by a larger upload (a stale presigned PUT): stage-in must
    # not stream it all onto the job's disk before finding out.
    body = b"y" * (4 * MiB)
    s3.answer = lambda r: r.reply(200, body, {"ETag": '"e"'})
    with pytest.raises(IntegrityError, match="more than the expected 1000 bytes"):
        s3.store().download_file("projects/p/inputs/x", tmp_path / "x", expected_size=1000)
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_download_ends_at_its_next_chunk_and_leaves_nothing(s3: FakeS3, tmp_path: Path) -> None:
    # Stage-in stops the downloads on their way once another input failed.
    stop = threading.Event()
    body = b"y" * (8 * MiB)
    s3.answer = lambda r: r.reply(200, body, {"ETag": '"e"'})
    stop.set()
    with pytest.raises(storage.TransferStopped, match="stopped at 0 bytes"):
        s3.store().download_file("projects/p/inputs/x", tmp_path / "x", expected_size=len(body), stop=stop)
    assert list(tmp_path.iterdir()) == []
    # And in a wait between tries: the outage is not waited out.
    s3.answer = lambda r: r.error(503, "SlowDown")
    with pytest.raises(storage.TransferStopped):
        s3.store().download_file("projects/p/inputs/x", tmp_path / "x", stop=stop)
    assert s3.count("GET") == 2 and list(tmp_path.iterdir()) == []


def test_a_file_name_near_name_max_downloads(s3: FakeS3, tmp_path: Path) -> None:
    # The temporary name was the file's with 16 bytes added: past 255 bytes, ENAMETOOLONG.
    s3.answer = lambda r: r.reply(200, b"data", {"ETag": '"e"'})
    dest = tmp_path / ("a" * 250 + ".csv")
    s3.store().download_file("projects/p/inputs/x", dest, expected_size=4)
    assert dest.read_bytes() == b"data" and list(tmp_path.iterdir()) == [dest]


def test_a_resumed_download_continues_where_it_stopped(s3: FakeS3, tmp_path: Path) -> None:
    def answer(r: Request) -> None:
        if "Range" in r.headers:
            _ranged(V1, '"v1"', r)
        else:
            r.reply(200, V1, {"ETag": '"v1"'}, cut=1000)

    s3.answer = answer
    assert _download(s3.store(attempts=3), tmp_path) == V1
    assert [rng for m, _, rng, _ in s3.seen if m == "GET"] == [None, "bytes=1000-"]


def test_a_server_ignoring_range_is_not_appended(s3: FakeS3, tmp_path: Path) -> None:
    # The 200's full body was appended to the first 1000 bytes: 5096 bytes came out.
    def answer(r: Request) -> None:
        r.reply(200, V1, {"ETag": '"v1"'}, cut=None if "Range" in r.headers else 1000)

    s3.answer = answer
    assert _download(s3.store(attempts=3), tmp_path) == V1


def test_a_range_answer_starting_elsewhere_is_not_appended(s3: FakeS3, tmp_path: Path) -> None:
    calls = {"n": 0}

    def answer(r: Request) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            r.reply(200, V1, {"ETag": '"v1"'}, cut=1000)
        elif "Range" in r.headers:  # a broken proxy: the whole object as a 206
            r.reply(206, V1, {"ETag": '"v1"', "Content-Range": f"bytes 0-{len(V1) - 1}/{len(V1)}"})
        else:
            r.reply(200, V1, {"ETag": '"v1"'})

    s3.answer = answer
    assert _download(s3.store(attempts=3), tmp_path) == V1


def test_invalid_range_after_the_object_was_replaced_starts_over(s3: FakeS3, tmp_path: Path) -> None:
    # V1 was cut at 3000 bytes, then replaced by the 3000-byte V2: "bytes=3000-" is unsatisfiable,
    # which used to end the download with V1's first 3000 bytes.
    calls = {"n": 0}

    def answer(r: Request) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            r.reply(200, V1, {"ETag": '"v1"'}, cut=3000)
        elif "Range" in r.headers:
            _ranged(V2, '"v2"', r)
        else:
            r.reply(200, V2, {"ETag": '"v2"'})

    s3.answer = answer
    assert _download(s3.store(attempts=3), tmp_path) == V2
    assert s3.count("HEAD") == 1


def test_invalid_range_with_every_byte_read_ends_the_download(s3: FakeS3, tmp_path: Path) -> None:
    # The connection dropped after the last byte (the length promised one more): nothing is left.
    calls = {"n": 0}

    def answer(r: Request) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            r.reply(200, V1 + b"!", {"ETag": '"v1"'}, cut=len(V1))
        elif "Range" in r.headers:
            _ranged(V1, '"v1"', r)
        else:
            r.reply(200, V1, {"ETag": '"v1"'})

    s3.answer = answer
    assert _download(s3.store(attempts=3), tmp_path) == V1
    assert [m for m, *_ in s3.seen] == ["GET", "GET", "HEAD"]


def test_an_object_that_keeps_changing_fails_the_download_in_bounded_time(s3: FakeS3, tmp_path: Path) -> None:
    calls = {"n": 0}

    def answer(r: Request) -> None:
        calls["n"] += 1
        etag = f'"v{calls["n"]}"'
        if "Range" in r.headers:
            _ranged(V1, etag, r)
        else:
            r.reply(200, V1, {"ETag": etag}, cut=1000)

    s3.answer = answer
    with pytest.raises(http.client.IncompleteRead):  # every start over needs a dropped read first
        s3.store(attempts=3).download_file("k", tmp_path / "out")
    assert s3.count("GET") == 5 and not (tmp_path / "out").exists()


# -- proxies -----------------------------------------------------------------------------------


def _unproxied(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_both_kinds_of_call_go_through_the_environments_http_proxy(
    s3: FakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake is the proxy: the store's name does not resolve, so only a proxied call arrives.
    _unproxied(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", s3.url.replace("http://", "http://us%40r:p%3Ass@"))
    auth: list[str | None] = []

    def answer(r: Request) -> None:
        auth.append(r.headers.get("Proxy-Authorization"))
        if r.command == "GET" and "list-type" in r.path:
            r.reply(200, LISTED)
        elif r.command == "GET" and "uploads" in r.path:
            r.reply(200, b"<ListMultipartUploadsResult></ListMultipartUploadsResult>")
        elif r.command == "POST":
            r.reply(200, b"<DeleteResult></DeleteResult>")
        else:
            r.reply(200, b"{}", {"ETag": '"e"'})

    s3.answer = answer
    store = Storage(
        StorageSettings(endpoint="http://s3.invalid:9000", bucket="b", access_key="AK", secret_key="SK")
    )
    store.put_bytes("projects/p/jobs/j/result.json", b"{}")  # dsjobs.s3http
    assert store.get_bytes("projects/p/jobs/j/result.json") == b"{}"
    assert store.delete_prefix("projects/p/jobs/j/") == 1  # botocore: list, batch delete, uploads
    paths = [p for _, p, _, _ in s3.seen]
    assert len(paths) == 5 and all(p.startswith("http://s3.invalid:9000/b") for p in paths), paths
    assert auth == ["Basic " + base64.b64encode(b"us@r:p:ss").decode()] * 5  # the URL's user


def test_no_proxy_and_unsupported_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    _unproxied(monkeypatch)
    assert proxy_for("https", "storage.example") is None
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", ".svc,.cluster.local")
    assert proxy_for("https", "storage.example") == Proxy("proxy.corp", 3128, {})
    assert proxy_for("http", "storage.example") is None  # HTTP_PROXY is another variable
    assert proxy_for("https", "minio.dsjobs.svc") is None
    monkeypatch.setenv("NO_PROXY", "minio.dsjobs:9000")  # urllib's (botocore's) rule: host:port too
    assert proxy_for("https", "minio.dsjobs:9000") is None
    assert proxy_for("https", "minio.dsjobs:9001") == Proxy("proxy.corp", 3128, {})
    monkeypatch.setenv("HTTPS_PROXY", "http://u:pa/ss@proxy.corp:3128")  # an unquoted '/'
    with pytest.raises(ValueError, match="https_proxy: not a URL of the form") as bad:
        proxy_for("https", "storage.example")
    assert "pa" not in str(bad.value).replace("password", "")
    monkeypatch.setenv("HTTPS_PROXY", "https://u:secret@proxy.corp:3129")
    with pytest.raises(
        ValueError, match=r"https_proxy 'https://proxy.corp:3129': .* http:// proxy only"
    ) as e:
        proxy_for("https", "storage.example")
    assert "secret" not in str(e.value)


def _connect_proxy(target: tuple[str, int], asked: list[bytes]) -> tuple[socket.socket, threading.Thread]:
    """A CONNECT proxy that records what it was asked and tunnels every connection to `target`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                head = b""
                while b"\r\n\r\n" not in head:
                    head += client.recv(4096)
                asked.append(head)
                upstream = socket.create_connection(target)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_an_https_store_is_reached_through_a_connect_tunnel_with_its_name_checked(
    s3: FakeS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _unproxied(monkeypatch)
    ca = CertificateAuthority.create(tmp_path)
    pair = ca.issue("s3", "s3.invalid", server=True, dns_names=("s3.invalid",))
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Request)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    tls.fake = s3  # type: ignore[attr-defined]
    threading.Thread(target=tls.serve_forever, daemon=True).start()
    asked: list[bytes] = []
    proxy, _ = _connect_proxy(("127.0.0.1", tls.server_address[1]), asked)
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://u:pw@127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca.cert_path))
        s3.answer = lambda r: r.reply(200, b"through the tunnel", {"ETag": '"e"'})
        store = Storage(
            StorageSettings(endpoint="https://s3.invalid", bucket="b", access_key="AK", secret_key="SK")
        )
        assert store.get_bytes("projects/p/k") == b"through the tunnel"
        assert asked[0].startswith(b"CONNECT s3.invalid:443 HTTP/1.")
        assert b"Proxy-Authorization: Basic " + base64.b64encode(b"u:pw") in asked[0]
        assert [p for _, p, _, _ in s3.seen] == ["/b/projects/p/k"]
    finally:
        tls.shutdown()
        tls.server_close()
        proxy.close()


@pytest.mark.parametrize("size", [1000, 16 * MiB + 1])
def test_a_file_growing_while_it_is_uploaded_is_sent_as_it_was_when_the_upload_began(
    s3: FakeS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    # An output a leftover process keeps appending to: followed, it kept the job uploading for as
    # long as the process wrote (up to 10000 parts).
    s3.answer = _multipart(fail_part=0, failures=0) if size > 1000 else lambda r: r.reply(200)
    path = tmp_path / "train.log"
    path.write_bytes(b"x" * size)
    real_fstat = os.fstat

    grown: list[int] = []

    def fstat_then_grow(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if not grown:  # once, right after the upload looked at the file
            grown.append(fd)
            with open(path, "ab") as f:
                f.write(b"y" * (6 * MiB))
        return st

    monkeypatch.setattr(storage.os, "fstat", fstat_then_grow)
    res = s3.store(part_size=5 * MiB).upload_file(path, "projects/p/jobs/j/outputs/train.log")
    assert (res.size, res.sha256) == (size, hashlib.sha256(b"x" * size).hexdigest())
    assert sum(n for m, _, _, n in s3.seen if m == "PUT") == size
