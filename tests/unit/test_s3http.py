"""SigV4 signing (pure) and the one-request S3 client, against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from dsjobs import storage
from dsjobs.devcluster.pki import CertificateAuthority
from dsjobs.s3http import (
    CONNECT_TIMEOUT_SECONDS,
    EMPTY_SHA256,
    TIMEOUT_SECONDS,
    Credentials,
    S3Http,
    S3HttpError,
    canonical_query,
    canonical_uri,
    connect,
    error_from,
    listed_keys,
    presign_v4,
    sign_v4,
)
from dsjobs.storage import Storage, StorageSettings

# The worked examples of Amazon S3's "Signature Calculations for the Authorization Header" page.
AWS_EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1")
EXAMPLE_TIME = datetime(2013, 5, 24, tzinfo=UTC)


def test_get_object_example_from_the_s3_documentation() -> None:
    h = sign_v4(
        "GET",
        "/test.txt",
        {},
        {"Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9"},
        EMPTY_SHA256,
        AWS_EXAMPLE,
        EXAMPLE_TIME,
    )
    assert h["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert h["x-amz-date"] == "20130524T000000Z"


def test_presigned_url_example_from_the_s3_documentation() -> None:
    # "Authenticating Requests: Using Query Parameters (AWS Signature Version 4)".
    query = presign_v4("GET", "examplebucket.s3.amazonaws.com", "/test.txt", AWS_EXAMPLE, EXAMPLE_TIME, 86400)
    assert query == (
        "X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        "&X-Amz-SignedHeaders=host"
    )


@pytest.mark.parametrize("public", ["", "https://s3.example.com:8443"])
def test_an_upload_url_signed_with_another_key_pair_is_botocores(
    public: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A project's own key pair signs its inputs' upload URLs (DSJOBS_STORAGE_CREDENTIALS=project):
    # the same URL as botocore's client of that key pair would make.
    import urllib.parse

    now = datetime(2026, 11, 29, 3, 4, 5, tzinfo=UTC)
    settings = StorageSettings(
        endpoint="http://127.0.0.1:9000",
        public_endpoint=public,
        bucket="dsjobs",
        access_key="BUCKETWIDE",
        secret_key="bucket-wide-secret",
        region="ru-central1",
    )
    key = "projects/p/inputs/" + "a" * 64
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    monkeypatch.setattr(storage, "datetime", type("Fixed", (), {"now": staticmethod(lambda tz=None: now)}))
    ours = Storage(settings).presign_put(key, size=123, credentials=("PROJECTKEY", "project/secret+key"))
    theirs = Storage(
        StorageSettings(
            **{**settings.__dict__, "access_key": "PROJECTKEY", "secret_key": "project/secret+key"}
        )
    ).presign_put(key, size=123)

    def parts(url: str) -> tuple[str, dict[str, list[str]]]:
        split = urllib.parse.urlsplit(url)
        return f"{split.scheme}://{split.netloc}{split.path}", urllib.parse.parse_qs(split.query)

    assert parts(ours) == parts(theirs)
    assert parts(ours)[1]["X-Amz-SignedHeaders"] == ["content-length;host"]
    assert parts(ours)[1]["X-Amz-Credential"][0].startswith("PROJECTKEY/")


def test_put_object_example_from_the_s3_documentation() -> None:
    body = b"Welcome to Amazon S3."
    h = sign_v4(
        "PUT",
        "/test$file.text",
        {},
        {
            "Host": "examplebucket.s3.amazonaws.com",
            "Date": "Fri, 24 May 2013 00:00:00 GMT",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
        },
        hashlib.sha256(body).hexdigest(),
        AWS_EXAMPLE,
        EXAMPLE_TIME,
    )
    assert h["authorization"].endswith(
        "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class, "
        "Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
    )


@pytest.mark.parametrize(
    ("method", "key", "headers", "body"),
    [
        (
            "PUT",
            "projects/p/jobs/j/logs/00000001",
            {"Content-Type": "application/octet-stream"},
            b"\x00chunk",
        ),
        ("PUT", "projects/p/jobs/j/outputs/dir with space/ü+x=1&y.txt", {"If-None-Match": "*"}, b"x"),
        ("GET", "projects/p/jobs/j/result.json", {}, b""),
        ("HEAD", "projects/p/inputs/" + "a" * 64, {}, b""),
        ("DELETE", "projects/p/jobs/j/logs/final~1", {}, b""),
    ],
)
def test_signatures_agree_with_botocores_signer(
    method: str, key: str, headers: dict[str, str], body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = datetime(2026, 11, 29, 3, 4, 5, tzinfo=UTC)
    creds = Credentials("DSJOBSTEST", "s3cr3t/key+with=chars", "ru-central1")
    host = "127.0.0.1:9000"
    payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
    ours = sign_v4(method, f"/bucket/{key}", {}, {"host": host, **headers}, payload, creds, now)

    req = botocore.awsrequest.AWSRequest(
        method=method,
        url=f"http://{host}{canonical_uri('/bucket/' + key)}",
        headers={**headers, "X-Amz-Content-SHA256": payload},
        data=body,
    )
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    botocore.auth.S3SigV4Auth(
        botocore.credentials.Credentials(creds.access_key, creds.secret_key), "s3", creds.region
    ).add_auth(req)
    assert ours["authorization"] == req.headers["Authorization"]


def test_query_parameters_are_signed_as_botocore_signs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime(2026, 11, 29, 3, 4, 5, tzinfo=UTC)
    creds = Credentials("DSJOBSTEST", "secret", "us-east-1")
    query = {"prefix": "projects/p/jobs/j/logs/", "list-type": "2", "continuation-token": "a b+c="}
    ours = sign_v4("GET", "/bucket", query, {"host": "s3.local"}, EMPTY_SHA256, creds, now)
    req = botocore.awsrequest.AWSRequest(
        method="GET",
        url="http://s3.local/bucket?" + canonical_query(query),
        headers={"X-Amz-Content-SHA256": EMPTY_SHA256},
    )
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    botocore.auth.S3SigV4Auth(
        botocore.credentials.Credentials("DSJOBSTEST", "secret"), "s3", "us-east-1"
    ).add_auth(req)
    assert ours["authorization"] == req.headers["Authorization"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    objects: ClassVar[dict[str, bytes]] = {}
    seen: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        self.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "port": self.client_address[1],
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        )
        if "Authorization" not in self.headers:
            self._reply(403, b"<Error><Code>AccessDenied</Code><Message>no auth</Message></Error>")
            return
        obj = self.objects.get(self.path)
        if (
            self.command == "GET"
            and obj is not None
            and self.path.endswith("/cut")
            and "Range" not in self.headers
        ):
            # Half of the body, then the connection drops.
            self.send_response(200)
            self.send_header("Content-Length", str(len(obj)))
            self.send_header("ETag", '"e"')
            self.end_headers()
            self.wfile.write(obj[: len(obj) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.command == "GET" and obj is not None and "Range" in self.headers:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self._reply(
                206, obj[start:], {"ETag": '"e"', "Content-Range": f"bytes {start}-{len(obj) - 1}/{len(obj)}"}
            )
            return
        if self.command == "PUT":
            if self.headers.get("If-None-Match") == "*" and obj is not None:
                self._reply(412, b"<Error><Code>PreconditionFailed</Code><Message>exists</Message></Error>")
                return
            self.objects[self.path] = body
            self._reply(200, headers={"ETag": '"e"'})
        elif self.command == "DELETE":
            self.objects.pop(self.path, None)
            self._reply(204)
        elif obj is None:
            self._reply(
                404, b"<Error><Code>NoSuchKey</Code><Message>The key does not exist</Message></Error>"
            )
        else:
            self._reply(200, obj, {"ETag": '"e"'})

    do_GET = do_PUT = do_HEAD = do_DELETE = _handle


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.objects = {}
    _Handler.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_requests_round_trip_and_keep_one_connection(server: str) -> None:
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"))
    key = "projects/p/jobs/j/a b+c.txt"
    s3.request("PUT", key, body=b"hello", headers={"content-type": "text/plain"})
    assert _Handler.objects["/bkt/projects/p/jobs/j/a%20b%2Bc.txt"] == b"hello"
    assert s3.request("GET", key).body == b"hello"
    head = s3.request("HEAD", key)
    assert head.headers["content-length"] == "5" and head.body == b""
    assert b"".join(s3.open_get(key).iter_chunks(2)) == b"hello"
    s3.request("DELETE", key)
    with pytest.raises(S3HttpError) as err:
        s3.request("GET", key)
    assert (err.value.status, err.value.code) == (404, "NoSuchKey")
    assert "The key does not exist" in str(err.value) and key in str(err.value)
    put = _Handler.seen[0]["headers"]
    assert put["x-amz-content-sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "content-type" in put["authorization"]
    # One connection for all of it: the server saw one client port.
    assert len({r["port"] for r in _Handler.seen}) == 1
    assert {r["headers"]["host"] for r in _Handler.seen} == {server.removeprefix("http://")}


def test_a_bucket_request_carries_its_signed_query(server: str) -> None:
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"))
    with pytest.raises(S3HttpError):  # the fake server has no listing: 404 for any bucket GET
        s3.request("GET", "", query={"list-type": "2", "prefix": "projects/p/jobs/a b/", "max-keys": "1"})
    assert _Handler.seen[0]["path"] == "/bkt/?list-type=2&max-keys=1&prefix=projects%2Fp%2Fjobs%2Fa%20b%2F"


def test_listed_keys_reads_a_list_objects_v2_answer() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><KeyCount>2</KeyCount>'
        b"<Contents><Key>projects/p/jobs/j/logs/a&amp;b</Key><Size>3</Size></Contents>"
        b"<Contents><Key>projects/p/jobs/j/result.json</Key><Size>9</Size></Contents></ListBucketResult>"
    )
    assert listed_keys(body) == ["projects/p/jobs/j/logs/a&b", "projects/p/jobs/j/result.json"]
    assert listed_keys(b"<ListBucketResult><KeyCount>0</KeyCount></ListBucketResult>") == []
    # Go's encoding/xml (the dev store, MinIO) escapes by number: read as AWS's names are, or the
    # key deleted next is not the one listed.
    go = b"<Contents><Key>p/&#34;q&#34; &#39;r&#39;&#xA;&amp;copy;</Key></Contents>"
    assert listed_keys(go) == ["p/\"q\" 'r'\n&copy;"]
    assert listed_keys(b"<Key>p/&quot;q&quot; &apos;r&apos;</Key>") == ["p/\"q\" 'r'"]
    assert listed_keys("<Key>€&#128;&#x1F600;&copy;</Key>".encode()) == ["€\x80😀&copy;"]  # XML's, not HTML's


def test_an_error_message_is_read_unescaped() -> None:
    body = b"<Error><Code>AccessDenied</Code><Message>not under the prefix &#34;projects/demo/&#34;</Message></Error>"
    assert (
        str(error_from(403, body, "k")) == 'AccessDenied (403) for k: not under the prefix "projects/demo/"'
    )


def test_conditional_put_and_errors_without_a_body(server: str) -> None:
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"))
    s3.request("PUT", "k", body=b"1", headers={"if-none-match": "*"})
    with pytest.raises(S3HttpError) as err:
        s3.request("PUT", "k", body=b"2", headers={"if-none-match": "*"})
    assert (err.value.status, err.value.code) == (412, "PreconditionFailed")
    with pytest.raises(S3HttpError) as err:
        s3.request("HEAD", "missing")
    assert (err.value.status, err.value.code) == (404, "404")
    # A refused HEAD says nothing of why: the usual causes are named.
    refused = error_from(403, b"", "projects/p/jobs/j/logs/chunks/000000000000")
    assert str(refused) == (
        "403 (403) for projects/p/jobs/j/logs/chunks/000000000000: access denied, reason not given "
        "(wrong storage keys, or this machine's clock off)"
    )
    assert "reason not given" not in str(error_from(403, b"<Code>AccessDenied</Code>", "k"))
    # The connection is still good after errors.
    assert s3.request("GET", "k").body == b"1"
    assert len({r["port"] for r in _Handler.seen}) == 1


def test_a_connection_closed_by_the_server_is_replaced(server: str) -> None:
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"))
    s3.request("PUT", "k", body=b"1")
    conn = s3._local.conn
    assert conn is not None and conn.sock is not None
    conn.sock.close()  # as if the server had dropped the idle keep-alive connection
    conn.sock = None
    assert s3.request("GET", "k").body == b"1"


@pytest.fixture(params=["http", "https"])
def refusing_server(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, list[str]]]:
    """Answers every request from its headers alone, then closes with the body unread (as stores
    refuse a PUT for a quota or a clock skew): `answer` is what it sends ("" for nothing). Over
    TLS too: the sender's failure is then an SSLEOFError, not a broken pipe."""
    answer: list[str] = [""]
    listener = socket.create_server(("127.0.0.1", 0))
    scheme = str(request.param)
    if scheme == "https":
        ca = CertificateAuthority.create(tmp_path)
        pair = ca.issue("s3", "localhost", server=True, dns_names=("localhost",))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pair.cert, pair.key)
        listener = context.wrap_socket(listener, server_side=True)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca.cert_path))
    body = b"<Error><Code>XMinioStorageFull</Code><Message>Storage backend is full.</Message></Error>"

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if answer[0]:
                    head = f"HTTP/1.1 {answer[0]}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
                    conn.sendall(head.encode() + body)
                    # As Go's net/http (MinIO's) closes after an early answer: its write side
                    # first, then the socket a moment later, the body still unread (the sender
                    # of a large one then fails on a reset); an immediate close's reset could
                    # overtake the answer itself.
                    conn.shutdown(socket.SHUT_WR)
                    time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    host = "localhost" if scheme == "https" else "127.0.0.1"
    try:
        yield f"{scheme}://{host}:{listener.getsockname()[1]}", answer
    finally:
        listener.close()


def test_a_refusal_sent_before_the_body_was_read_is_the_error(refusing_server: tuple[str, list[str]]) -> None:
    # The sender of a large body gets EPIPE or ECONNRESET: taken for a lost connection, the upload
    # was retried for minutes and its file error read "Broken pipe" instead of the store's words.
    endpoint, answer = refusing_server
    answer[0] = "507 Insufficient Storage"
    s3 = S3Http(endpoint, "bkt", Credentials("AK", "SK", "us-east-1"))
    for size in (1000, 8 << 20):
        with pytest.raises(S3HttpError) as err:
            s3.request("PUT", "k", body=b"x" * size)
        assert (err.value.status, err.value.code) == (507, "XMinioStorageFull")
        assert not storage.is_transient(err.value)
    # A connection cut without an answer stays a lost connection (retried).
    answer[0] = ""
    with pytest.raises((OSError, http.client.RemoteDisconnected)) as lost:
        s3.request("PUT", "k", body=b"x" * (8 << 20))
    assert storage.is_transient(lost.value)


def test_a_client_can_wait_less_than_a_minute(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"), timeout=3.0)
    s3.request("PUT", "k", body=b"1")
    assert s3._local.conn.sock.gettimeout() == 3.0
    # Connecting gives up after the shorter of the two (an endpoint that drops packets).
    asked: list[float | None] = []

    def create_connection(address: object, timeout: float | None, source: object = None) -> socket.socket:
        asked.append(timeout)
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    for timeout in (3.0, 60.0):
        with pytest.raises(OSError):
            connect(("192.0.2.1", 9), timeout)
    assert asked == [3.0, CONNECT_TIMEOUT_SECONDS]


def test_a_store_with_a_timeout_of_its_own_keeps_it_through_its_copies(server: str) -> None:
    store = Storage(StorageSettings(endpoint=server, bucket="bkt", access_key="AK", secret_key="SK"))
    quick = store.with_timeout(3.0).with_attempts(1)
    assert quick._http.timeout == 3.0 and quick.attempts == 1
    assert store._http.timeout == TIMEOUT_SECONDS and store._http is not quick._http
    quick.put_bytes("k", b"1")
    assert store.get_bytes("k") == b"1"


def test_stopping_a_download_early_drops_the_connection(server: str) -> None:
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"))
    s3.request("PUT", "big", body=b"x" * 100_000)
    chunks = s3.open_get("big").iter_chunks(1000)
    assert next(chunks) == b"x" * 1000
    chunks.close()
    assert getattr(s3._local, "conn", None) is None
    assert len(s3.request("GET", "big").body) == 100_000


def test_connections_wait_10_s_to_connect_and_60_s_for_answers(server: str) -> None:
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"))
    s3.request("PUT", "k", body=b"1")
    conn = s3._local.conn
    assert conn._create_connection is connect
    assert conn.sock.gettimeout() == TIMEOUT_SECONDS
    host, port = server.removeprefix("http://").split(":")
    sock = connect((host, int(port)), 7.0)
    try:
        assert sock.gettimeout() == 7.0
    finally:
        sock.close()


def test_a_body_cut_short_is_an_error_and_storage_resumes_the_download(server: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 400
    _Handler.objects["/bkt/in/cut"] = data
    s3 = S3Http(server, "bkt", Credentials("AK", "SK", "us-east-1"))
    with pytest.raises(http.client.IncompleteRead):
        b"".join(s3.open_get("in/cut").iter_chunks(4096))
    store = Storage(
        StorageSettings(endpoint=server, bucket="bkt", access_key="AK", secret_key="SK"),
        attempts=3,
    )
    res = store.download_file(
        "in/cut", tmp_path / "out", expected_size=len(data), expected_sha256=hashlib.sha256(data).hexdigest()
    )
    assert (tmp_path / "out").read_bytes() == data and res.size == len(data)
    assert [r["headers"].get("range") for r in _Handler.seen if r["path"] == "/bkt/in/cut"][-1] == (
        f"bytes={len(data) // 2}-"
    )


def test_a_temporary_dns_failure_is_retried_as_botocore_would(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EAI_AGAIN from the resolver (CoreDNS restarting) used to fail the call at once.
    _Handler.objects["/bkt/in/x"] = b"data"
    real = socket.getaddrinfo
    failures = {"left": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", flaky)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    store = Storage(
        StorageSettings(endpoint=server, bucket="bkt", access_key="AK", secret_key="SK"),
        attempts=3,
    )
    failures["left"] = 1
    info = store.head("in/x")
    assert info is not None and info.size == 4
    store._http.close()
    failures["left"] = 1
    assert store.download_file("in/x", tmp_path / "x", expected_size=4).size == 4


def test_endpoint_must_be_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        S3Http("ftp://x", "b", Credentials("a", "b", "r"))


@pytest.mark.parametrize(
    ("endpoint", "host"),
    [
        ("http://[::1]", "[::1]"),
        ("https://[fd00::5]:443", "[fd00::5]"),
        ("http://[::1]:9000", "[::1]:9000"),
        ("http://store.example:80", "store.example"),
    ],
)
def test_the_host_header_of_an_ipv6_store_keeps_its_brackets(endpoint: str, host: str) -> None:
    # `Host: ::1` (signed too) for an IPv6 literal on the default port; botocore sends `[::1]`.
    assert S3Http(endpoint, "bkt", Credentials("AK", "SK", "us-east-1")).host == host
