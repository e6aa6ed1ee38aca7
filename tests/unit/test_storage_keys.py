"""Object key layout, path safety, settings, presigning and retry classification (no network)."""

from __future__ import annotations

import errno
import hashlib
import socket
import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError, SSLError
from urllib3.exceptions import SSLError as URLLib3SSLError

from dsjobs.s3http import S3HttpError
from dsjobs.storage import (
    TEMPLATE_PLACEHOLDER,
    Storage,
    StorageConfigError,
    StorageSettings,
    UnsafePathError,
    content_disposition,
    input_key,
    is_stored_input,
    is_transient,
    job_prefix,
    log_prefix,
    normalize_relpath,
    output_key,
    result_key,
    retry,
)

SHA = "a" * 64

ROOT = Path(__file__).resolve().parents[2]


def test_layout_matches_contract() -> None:
    assert input_key("p1", SHA) == f"projects/p1/inputs/{SHA}"
    assert output_key("p1", "j1", "out/model.pt") == "projects/p1/jobs/j1/outputs/out/model.pt"
    assert log_prefix("p1", "j1") == "projects/p1/jobs/j1/logs/"
    assert result_key("p1", "j1") == "projects/p1/jobs/j1/result.json"
    assert job_prefix("p1", "j1") == "projects/p1/jobs/j1/"


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "a b", "-x", "x" * 129, "p\x00"])
def test_ids_that_could_escape_their_prefix_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        input_key(bad, SHA)
    with pytest.raises(ValueError):
        result_key("p", bad)


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "g" * 64, ""])
def test_input_key_needs_a_lowercase_sha256(bad: str) -> None:
    with pytest.raises(ValueError):
        input_key("p", bad)


@pytest.mark.parametrize(
    ("path", "norm"),
    [("a.txt", "a.txt"), ("./a/./b", "a/b"), ("a//b/", "a/b"), ("dir", "dir"), ("a\\b", "a/b")],
)
def test_relpaths_are_normalized(path: str, norm: str) -> None:
    assert normalize_relpath(path) == norm


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/etc/passwd",
        "\\x",
        "C:/x",
        "./C:x",
        "../x",
        "a/../../x",
        "a\\..\\..\\x",
        "a/..",
        ".",
        "./",
        "a\x00b",
    ],
)
def test_unsafe_relpaths_are_refused(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        normalize_relpath(bad)
    with pytest.raises(UnsafePathError):
        output_key("p", "j", bad)


def test_settings_from_env_reports_every_missing_variable() -> None:
    with pytest.raises(StorageConfigError) as e:
        StorageSettings.from_env({"DSJOBS_S3_ENDPOINT": "http://h:1"})
    assert "DSJOBS_S3_BUCKET" in str(e.value) and "DSJOBS_S3_SECRET_KEY" in str(e.value)


def test_settings_from_env_and_secret_is_not_printed() -> None:
    s = StorageSettings.from_env(
        {
            "DSJOBS_S3_ENDPOINT": "http://127.0.0.1:9000/",
            "DSJOBS_S3_BUCKET": "b",
            "DSJOBS_S3_ACCESS_KEY": "ak",
            "DSJOBS_S3_SECRET_KEY": "very-secret",
        }
    )
    assert s.endpoint == "http://127.0.0.1:9000" and s.region == "us-east-1" and s.public_endpoint is None
    assert "very-secret" not in repr(s)


def test_settings_from_files_of_a_mounted_secret(tmp_path: Path) -> None:
    for key, value in {
        "DSJOBS_S3_ENDPOINT": "http://s3.local:9000",
        "DSJOBS_S3_BUCKET": "from-file",
        "DSJOBS_S3_ACCESS_KEY": "ak",
        "DSJOBS_S3_SECRET_KEY": "sk",
        "runner.json": "{}",  # other keys of the Secret are not settings
    }.items():
        (tmp_path / key).write_text(value)
    s = StorageSettings.from_env({"DSJOBS_S3_FILES_DIR": str(tmp_path), "DSJOBS_S3_BUCKET": "from-env"})
    assert (s.endpoint, s.bucket, s.access_key, s.secret_key) == (
        "http://s3.local:9000",
        "from-env",  # the environment wins over a file
        "ak",
        "sk",
    )
    assert s.region == "us-east-1" and s.public_endpoint is None  # optional keys may be absent
    (tmp_path / "DSJOBS_S3_SECRET_KEY").unlink()
    with pytest.raises(StorageConfigError, match="DSJOBS_S3_SECRET_KEY"):
        StorageSettings.from_env({"DSJOBS_S3_FILES_DIR": str(tmp_path)})


def test_settings_from_env_refuse_the_templates_placeholder_keys() -> None:
    # deploy/base/storage-credentials.yaml applied as it is: every request would be refused later,
    # far from the cause.
    env = {
        "DSJOBS_S3_ENDPOINT": "https://s3.example.com",
        "DSJOBS_S3_BUCKET": "dsjobs",
        "DSJOBS_S3_ACCESS_KEY": "REPLACE-ME",
        "DSJOBS_S3_SECRET_KEY": "REPLACE-ME",
    }
    with pytest.raises(StorageConfigError) as e:
        StorageSettings.from_env(env)
    assert str(e.value) == (
        "storage settings DSJOBS_S3_ACCESS_KEY, DSJOBS_S3_SECRET_KEY still hold the template's "
        "placeholder 'REPLACE-ME': put the object store's keys in the dsjobs-storage Secret"
    )
    with pytest.raises(StorageConfigError, match=r"^storage settings DSJOBS_S3_SECRET_KEY still"):
        StorageSettings.from_env({**env, "DSJOBS_S3_ACCESS_KEY": "AKIA1"})
    assert StorageSettings.from_env({**env, "DSJOBS_S3_ACCESS_KEY": "a", "DSJOBS_S3_SECRET_KEY": "s"})
    # The template's keys are what is refused.
    template = yaml.safe_load((ROOT / "deploy/base/storage-credentials.yaml").read_text())["stringData"]
    assert {k: template[k] for k in ("DSJOBS_S3_ACCESS_KEY", "DSJOBS_S3_SECRET_KEY")} == {
        "DSJOBS_S3_ACCESS_KEY": TEMPLATE_PLACEHOLDER,
        "DSJOBS_S3_SECRET_KEY": TEMPLATE_PLACEHOLDER,
    }


def test_settings_from_env_name_the_variable_of_a_bad_endpoint() -> None:
    env = {"DSJOBS_S3_BUCKET": "b", "DSJOBS_S3_ACCESS_KEY": "a", "DSJOBS_S3_SECRET_KEY": "s"}
    with pytest.raises(StorageConfigError) as e:
        StorageSettings.from_env({**env, "DSJOBS_S3_ENDPOINT": "s3.local:9000"})
    assert str(e.value) == (
        "storage setting DSJOBS_S3_ENDPOINT: expected http(s)://host[:port], got 's3.local:9000'"
    )
    with pytest.raises(StorageConfigError, match=r"^storage setting DSJOBS_S3_PUBLIC_ENDPOINT: expected"):
        StorageSettings.from_env(
            {**env, "DSJOBS_S3_ENDPOINT": "http://s3:1", "DSJOBS_S3_PUBLIC_ENDPOINT": "x"}
        )


def test_settings_reject_non_http_endpoints() -> None:
    with pytest.raises(ValueError):
        StorageSettings(endpoint="127.0.0.1:9000", bucket="b", access_key="a", secret_key="s")
    with pytest.raises(ValueError):  # re.match's $ let a trailing newline through
        StorageSettings(endpoint="http://s3:9000\n", bucket="b", access_key="a", secret_key="s")


def test_values_of_a_secret_made_from_files_lose_their_trailing_newline(tmp_path: Path) -> None:
    # `kubectl create secret generic --from-file` of files an editor ended with a newline: the
    # first request failed with "Invalid header value".
    for key, value in {
        "DSJOBS_S3_ENDPOINT": "http://s3.local:9000\n",
        "DSJOBS_S3_BUCKET": "b\n",
        "DSJOBS_S3_ACCESS_KEY": "ak\r\n",
        "DSJOBS_S3_SECRET_KEY": "sk\n",
    }.items():
        (tmp_path / key).write_text(value)
    s = StorageSettings.from_env({"DSJOBS_S3_FILES_DIR": str(tmp_path)})
    assert (s.endpoint, s.bucket, s.access_key, s.secret_key) == ("http://s3.local:9000", "b", "ak", "sk")
    env = StorageSettings.from_env({"DSJOBS_S3_FILES_DIR": str(tmp_path), "DSJOBS_S3_SECRET_KEY": "sk2\n"})
    assert env.secret_key == "sk2"


def _storage(public: str | None = None) -> Storage:
    return Storage(
        StorageSettings(
            endpoint="http://10.0.0.1:9000",
            bucket="dsjobs",
            access_key="ak",
            secret_key="sk",
            public_endpoint=public,
        )
    )


def test_clients_are_made_on_first_use_or_on_connect() -> None:
    # A runner process that never touches storage must not pay for importing botocore.
    lazy, eager = _storage("http://public:9000"), _storage("http://public:9000").connect()
    assert not lazy._clients
    assert set(eager._clients) == {"http://10.0.0.1:9000", "http://public:9000"}
    lazy.presign_get("projects/p/x")
    assert set(lazy._clients) == {"http://public:9000"}


def test_presigned_urls_are_path_style_sigv4_with_default_expiry() -> None:
    url = _storage().presign_put(input_key("p", SHA))
    parts = urlsplit(url)
    q = parse_qs(parts.query)
    assert parts.netloc == "10.0.0.1:9000"
    assert parts.path == f"/dsjobs/projects/p/inputs/{SHA}"
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert q["X-Amz-Expires"] == ["900"]
    assert q["X-Amz-SignedHeaders"] == ["host"]  # a plain PUT with no extra headers works
    # An input's URL takes its declared size only (the client's Content-Length is signed).
    sized = parse_qs(urlsplit(_storage().presign_put(input_key("p", SHA), size=12)).query)
    assert sized["X-Amz-SignedHeaders"] == ["content-length;host"]


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("r.json", 'attachment; filename="r.json"'),
        ('a"b\\c.txt', 'attachment; filename="abc.txt"'),
        ('""', 'attachment; filename="download"'),
        (
            "результаты.csv",
            'attachment; filename="__________.csv"; '
            "filename*=UTF-8''%D1%80%D0%B5%D0%B7%D1%83%D0%BB%D1%8C%D1%82%D0%B0%D1%82%D1%8B.csv",
        ),
        ("模型 v1.pt", "attachment; filename=\"__ v1.pt\"; filename*=UTF-8''%E6%A8%A1%E5%9E%8B%20v1.pt"),
    ],
)
def test_a_download_s_name_is_a_header_value_s3_accepts(name: str, header: str) -> None:
    # S3 answers 400 to a response-content-disposition outside ISO-8859-1: the URL would not work.
    assert content_disposition(name) == header
    header.encode("ascii")


def test_presigned_urls_use_the_public_endpoint_and_cap_expiry() -> None:
    s = _storage(public="https://s3.example.test")
    url = s.presign_get("projects/p/jobs/j/result.json", expires=timedelta(hours=1), filename="r.json")
    assert url.startswith("https://s3.example.test/dsjobs/projects/p/jobs/j/result.json?")
    assert "response-content-disposition" in url
    with pytest.raises(ValueError):
        s.presign_get("k", expires=timedelta(days=7, seconds=1))
    with pytest.raises(ValueError):
        s.presign_put("k", expires=timedelta(0))


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


def test_transient_errors_are_told_apart() -> None:
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(_client_error("SlowDown", 503))
    assert is_transient(_client_error("Whatever", 500))
    assert not is_transient(_client_error("NoSuchKey", 404))
    assert not is_transient(_client_error("AccessDenied", 403))
    assert not is_transient(ValueError("x"))


def _cert_failure() -> ssl.SSLCertVerificationError:
    return ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")


@pytest.mark.parametrize(
    "exc",
    [
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        OSError(errno.EMFILE, "Too many open files"),  # a connection's socket: fds free up again
        OSError(errno.ENFILE, "Too many open files in system"),
        OSError(errno.ENOBUFS, "No buffer space available"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac"),
        SSLError(endpoint_url="https://x", error=URLLib3SSLError(ssl.SSLEOFError(8, "EOF"))),
    ],
    ids=repr,
)
def test_network_trouble_on_the_direct_path_is_transient_as_through_botocore(exc: BaseException) -> None:
    # botocore retries these as connection errors; s3http's calls used to fail on the first one.
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        _cert_failure(),
        SSLError(endpoint_url="https://x", error=URLLib3SSLError(_cert_failure())),
        S3HttpError(403, "RequestTimeTooSkewed", "clock", "k"),  # a retry has the same clock
        _client_error("RequestTimeTooSkewed", 403),
        OSError(errno.ENOSPC, "No space left on device"),  # local: a download's disk
        FileNotFoundError(errno.ENOENT, "No such file"),
    ],
    ids=repr,
)
def test_certificates_clock_skew_and_local_errors_are_permanent(exc: BaseException) -> None:
    assert not is_transient(exc)


def _failing(times: int) -> Callable[[], str]:
    """A call refused (connection refused) its first `times` times, then answering "ok"."""
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise ConnectionError("refused")
        return "ok"

    return call


def test_retry_backs_off_then_succeeds_and_gives_up_on_permanent_errors() -> None:
    sleeps: list[float] = []
    assert retry(_failing(2), what="t", attempts=5, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.5

    def permanent() -> None:
        raise _client_error("AccessDenied", 403)

    with pytest.raises(ClientError):
        retry(permanent, what="t", sleep=sleeps.append)
    assert len(sleeps) == 2

    def always() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        retry(always, what="t", attempts=3, sleep=sleeps.append)
    assert len(sleeps) == 4


def test_retry_with_patience_rides_out_an_outage_longer_than_its_attempts() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def down_for(seconds: float) -> Callable[[], str]:
        start = now[0]

        def call() -> str:
            if now[0] - start < seconds:
                raise ConnectionError("refused")
            return "ok"

        return call

    def clock() -> float:
        return now[0]

    # 3 attempts alone give up within a few seconds; patience waits out a 100 s outage.
    with pytest.raises(ConnectionError):
        retry(down_for(100), what="t", attempts=3, sleep=sleep, clock=clock)
    assert now[0] < 3
    assert retry(down_for(100), what="t", attempts=3, patience=300, sleep=sleep, clock=clock) == "ok"
    # An outage longer than the patience still fails, soon after the patience ran out.
    start = now[0]
    with pytest.raises(ConnectionError):
        retry(down_for(1000), what="t", attempts=3, patience=60, sleep=sleep, clock=clock)
    assert 60 <= now[0] - start <= 60 + 20  # the last wait is at most max_delay

    # Permanent errors are not waited on.
    def denied() -> None:
        raise _client_error("AccessDenied", 403)

    start = now[0]
    with pytest.raises(ClientError):
        retry(denied, what="t", patience=300, sleep=sleep, clock=clock)
    assert now[0] == start


def test_part_size_stays_within_s3_part_limits() -> None:
    from dsjobs.storage import MAX_PARTS, MIN_PART_SIZE, part_size_for

    mib = 1024 * 1024
    assert part_size_for(0) == MIN_PART_SIZE
    assert part_size_for(1024 * mib) == MIN_PART_SIZE
    assert part_size_for(MAX_PARTS * MIN_PART_SIZE) == MIN_PART_SIZE
    for size in (MAX_PARTS * MIN_PART_SIZE + 1, 100 * 1024 * mib, 5 * 1024**4):
        part = part_size_for(size)
        assert part % mib == 0 and part > MIN_PART_SIZE
        assert -(-size // part) <= MAX_PARTS
    assert part_size_for(10 * mib, minimum=5 * mib) == 5 * mib


def test_download_writer_keeps_order_and_reports_a_failed_write(tmp_path: Path) -> None:
    from dsjobs.storage import _OrderedWriter

    chunks = [bytes([i]) * (1000 + i) for i in range(50)]
    with open(tmp_path / "f", "wb") as f, _OrderedWriter(f, depth=2) as sink:
        for c in chunks:
            sink.write(c)
        sink.flush()
        assert f.tell() == sum(map(len, chunks))  # all written once flush returns
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)

    class Full:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    with _OrderedWriter(Full(), depth=1) as sink:
        sink.write(b"x")
        with pytest.raises(OSError, match="No space"):
            for _ in range(10):  # later writes are taken, never block, and raise the error
                sink.write(b"y")
            sink.flush()


def test_only_the_empty_file_is_not_stored() -> None:
    empty = hashlib.sha256(b"").hexdigest()
    assert not is_stored_input(empty, 0)
    assert is_stored_input(empty, 1)  # contradictory (validation refuses it): fetched, and checked
    assert is_stored_input("a" * 64, 0)
    assert is_stored_input("a" * 64, 10)


def test_a_retry_that_goes_on_for_hours_keeps_its_delay_bounded() -> None:
    # attempts <= 0 retries for ever: the exponent of the backoff must not overflow a float.
    sleeps: list[float] = []
    assert retry(_failing(1999), what="t", attempts=0, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 1999 and max(sleeps) <= 20.0
