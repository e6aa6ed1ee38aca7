"""One-request S3 object calls (HEAD, GET, PUT, DELETE of one key) over http.client, SigV4-signed.

Why not botocore for these: importing botocore's client and building it from its S3 model costs
~0.16 s of CPU, and every job's runner processes paid it for a handful of small requests (log
chunks, result, markers), which then cost ~4 ms each through botocore against ~0.3 ms here.
Multipart transfers, listings, batch deletes and presigned URLs stay with botocore
(`dsjobs.storage` decides which path a call takes).

`sign_v4` is pure (tested against botocore's signer); `S3Http` is the thin client around it:
path-style addressing, one keep-alive connection per thread, errors as `S3HttpError`, through
the HTTP proxy the environment names (HTTP_PROXY / HTTPS_PROXY / NO_PROXY), as botocore's calls go.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import os
import re
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
ALGORITHM = "AWS4-HMAC-SHA256"
#: Seconds to wait for a TCP connection, and then for the next bytes of a response.
CONNECT_TIMEOUT_SECONDS = 10.0
TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    region: str


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def canonical_uri(path: str) -> str:
    """RFC 3986 encoding of each path segment, as S3 signs it (no double encoding)."""
    return urllib.parse.quote(path, safe="/~")


def canonical_query(query: Mapping[str, str]) -> str:
    pairs = sorted(
        (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~")) for k, v in query.items()
    )
    return "&".join(f"{k}={v}" for k, v in pairs)


def _signature(
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    payload_sha256: str,
    creds: Credentials,
    amz_date: str,
    scope: str,
) -> str:
    """The SigV4 signature of a canonical request whose signed headers are all of `headers`
    (lowercase names, trimmed values)."""
    names = sorted(headers)
    canonical = "\n".join(
        [
            method,
            canonical_uri(path),
            canonical_query(query),
            "".join(f"{k}:{headers[k]}\n" for k in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{creds.secret_key}".encode(), amz_date[:8]), creds.region), "s3"),
        "aws4_request",
    )
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def sign_v4(
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    payload_sha256: str,
    creds: Credentials,
    now: datetime,
) -> dict[str, str]:
    """The request's headers plus ``x-amz-date``, ``x-amz-content-sha256`` and ``Authorization``.

    ``headers`` must hold ``host``; every header given is signed. Pure: the same inputs give the
    same signature (AWS Signature Version 4, header form, service ``s3``).
    """
    amz_date = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    out = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_sha256
    signed = sorted(out)
    scope = f"{day}/{creds.region}/s3/aws4_request"
    signature = _signature(method, path, query, out, payload_sha256, creds, amz_date, scope)
    out["authorization"] = (
        f"{ALGORITHM} Credential={creds.access_key}/{scope}, SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return out


def presign_v4(
    method: str,
    host: str,
    path: str,
    creds: Credentials,
    now: datetime,
    expires: int,
    headers: Mapping[str, str] | None = None,
) -> str:
    """The query string of a presigned URL (AWS Signature Version 4, query form, service ``s3``,
    an unsigned payload). `host` and every header given are signed: whoever holds the URL must
    send those values. Pure, as `sign_v4`."""
    amz_date = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    scope = f"{day}/{creds.region}/s3/aws4_request"
    signed_headers = {k.lower(): " ".join(str(v).split()) for k, v in (headers or {}).items()}
    signed_headers["host"] = host
    names = sorted(signed_headers)
    query = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{creds.access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": ";".join(names),
    }
    query["X-Amz-Signature"] = _signature(
        method, path, query, signed_headers, "UNSIGNED-PAYLOAD", creds, amz_date, scope
    )
    return canonical_query(query)


def connect(
    address: tuple[str, int], timeout: float | None, source_address: tuple[str, int] | None = None
) -> socket.socket:
    """A connection that gives up after CONNECT_TIMEOUT_SECONDS (or ``timeout``, if shorter) and
    then reads with ``timeout``: an unreachable endpoint fails fast, a slow response still has its
    minute."""
    connect_timeout = min(CONNECT_TIMEOUT_SECONDS, timeout) if timeout else CONNECT_TIMEOUT_SECONDS
    sock = socket.create_connection(address, connect_timeout, source_address)
    sock.settimeout(timeout)
    return sock


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    headers: Mapping[str, str] = field(repr=False)  # Proxy-Authorization, if the URL has a user


def proxy_for(scheme: str, host: str) -> Proxy | None:
    """The proxy the environment names for `scheme` requests to `host` (none if NO_PROXY covers
    it): the variables and rules botocore's calls follow (urllib's), so that both kinds
    of call take one way to the store. A proxy without a scheme is http://; an https:// proxy
    (TLS to the proxy itself) is refused, by name, rather than bypassed."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    # `host` as the URL has it (host:port when the port is given): NO_PROXY entries may name one.
    if not url or urllib.request.proxy_bypass(host):
        return None
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parsed.port
    except ValueError:  # the message would quote the URL's password
        raise ValueError(
            f"{scheme}_proxy: not a URL of the form http://[user:password@]host[:port]"
        ) from None
    if parsed.scheme != "http" or not parsed.hostname:
        shown = f"{parsed.scheme}://{parsed.hostname or ''}" + (f":{port}" if port else "")
        raise ValueError(
            f"{scheme}_proxy {shown!r}: the storage client reaches a store through an http:// proxy only"
        )
    headers: dict[str, str] = {}
    if parsed.username is not None:
        user = urllib.parse.unquote(parsed.username)
        secret = urllib.parse.unquote(parsed.password or "")
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {token}"
    return Proxy(parsed.hostname, port or 80, headers)


class S3HttpError(Exception):
    """An S3 error response: HTTP status plus the error code from its XML body (or the status)."""

    def __init__(self, status: int, code: str, message: str, key: str) -> None:
        super().__init__(
            f"{code} ({status}) for {key}: {message}" if message else f"{code} ({status}) for {key}"
        )
        self.status = status
        self.code = code
        self.key = key


_XML_FIELD = re.compile(r"<(Code|Message)>([^<]*)</\1>")


_XML_REFERENCE = re.compile(r"&(#[0-9]+|#x[0-9a-fA-F]+|amp|lt|gt|quot|apos);")
_XML_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _xml_text(escaped: str) -> str:
    """The text of an XML element's content: Go's encoding/xml (the dev store, MinIO) writes
    `&#34;` and `&#xA;` where AWS writes `&quot;`. XML's references only (html.unescape would
    read `&#128;` as cp1252's euro sign)."""

    def one(ref: re.Match[str]) -> str:
        name = ref.group(1)
        if not name.startswith("#"):
            return _XML_ENTITIES[name]
        code = int(name[2:], 16) if name[1] == "x" else int(name[1:])
        return chr(code) if 0 < code <= 0x10FFFF else ref.group(0)

    return _XML_REFERENCE.sub(one, escaped)


def error_from(status: int, body: bytes, key: str) -> S3HttpError:
    fields = {
        name: _xml_text(text) for name, text in _XML_FIELD.findall(body[:4096].decode("utf-8", "replace"))
    }
    message = fields.get("Message", "")
    if status == 403 and "Code" not in fields:
        # A HEAD's refusal has no body to say why (a job's first store request is one): the
        # usual causes, where a bare "403 (403)" told nothing.
        message = "access denied, reason not given (wrong storage keys, or this machine's clock off)"
    return S3HttpError(status, fields.get("Code") or str(status), message, key)


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


class S3Http:
    """Signed single requests to one bucket. Thread-safe: each thread keeps its own connection."""

    def __init__(
        self, endpoint: str, bucket: str, creds: Credentials, *, timeout: float = TIMEOUT_SECONDS
    ) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expected http(s)://host[:port], got {endpoint!r}")
        self.https = url.scheme == "https"
        self.hostname = url.hostname
        self.port = url.port or (443 if self.https else 80)
        default_port = 443 if self.https else 80
        # The Host header (signed): an IPv6 literal keeps its brackets, as in the URL.
        bracketed = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        self.host = url.netloc if url.port not in (None, default_port) else bracketed
        self.bucket = bucket
        self.creds = creds
        self.timeout = timeout
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        self._proxy = proxy_for(url.scheme, self.host)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # The same CA bundle botocore would use for the bucket's other calls.
            self._ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
        return self._ssl

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        proxy = self._proxy
        host, port = (proxy.host, proxy.port) if proxy else (self.hostname, self.port)
        if self.https:
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl_context())
            if proxy:  # CONNECT, then TLS with the store (its name checked) inside the tunnel
                conn.set_tunnel(self.hostname, self.port, headers=dict(proxy.headers))
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        conn._create_connection = connect  # type: ignore[attr-defined]  # http.client's own hook
        self._local.conn = conn
        return conn, False

    def _drop_connection(self) -> None:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._drop_connection()

    def request(
        self,
        method: str,
        key: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        body_sha256: str | None = None,
        query: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one signed request and read the whole answer; error statuses raise S3HttpError.
        `key` "" with a `query` is a request to the bucket itself (e.g. a listing)."""
        resp = self._send(method, key, body, headers, body_sha256, query)
        data = self._read_all(resp)
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)

    def open_get(self, key: str, headers: Mapping[str, str] | None = None) -> StreamResponse:
        """A GET whose body is then read in chunks (`StreamResponse.iter_chunks`)."""
        resp = self._send("GET", key, b"", headers, None, None)
        return StreamResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp, self)

    def _send(
        self,
        method: str,
        key: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        body_sha256: str | None,
        query: Mapping[str, str] | None,
    ) -> http.client.HTTPResponse:
        """A kept-alive connection the server has meanwhile closed is replaced and the request
        sent once more (every call made here is idempotent)."""
        path = f"/{self.bucket}/{key}"
        hdrs = {"host": self.host, **(headers or {})}
        if body or method in ("PUT", "POST"):
            hdrs["content-length"] = str(len(body))
        signed = sign_v4(
            method,
            path,
            query or {},
            hdrs,
            body_sha256 or (hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256),
            self.creds,
            datetime.now(UTC),
        )
        target = canonical_uri(path) + (f"?{canonical_query(query)}" if query else "")
        if self._proxy and not self.https:  # a plain-HTTP proxy is asked for the absolute URL
            target = f"http://{self.host}{target}"
            signed = {**signed, **self._proxy.headers}
        while True:
            conn, reused = self._connection()
            try:
                try:
                    conn.request(method, target, body=body or None, headers=signed)
                except OSError as exc:
                    # A pipe broken or reset under plain HTTP, an SSLEOFError under TLS; a timeout,
                    # or a connection never made (a name that did not resolve), is no answer to
                    # look for.
                    if isinstance(exc, TimeoutError) or conn.sock is None:
                        raise
                    early = _early_answer(conn)
                    if early is None:
                        raise
                    self._drop_connection()
                    raise error_from(early[0], early[1], key) from None
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop_connection()
                if reused:
                    continue
                raise
            except BaseException:
                self._drop_connection()
                raise
            break
        if resp.status >= 300:
            raise error_from(resp.status, self._read_all(resp), key)
        return resp

    def _read_all(self, resp: http.client.HTTPResponse) -> bytes:
        try:
            data = resp.read()  # HEAD: b"", and it frees the connection
        except BaseException:
            self._drop_connection()
            raise
        self._finish(resp)
        return data

    def _finish(self, resp: http.client.HTTPResponse) -> None:
        if resp.will_close:
            self._drop_connection()


def _early_answer(conn: http.client.HTTPConnection) -> tuple[int, bytes] | None:
    """The refusal a store sent before reading a request's body, found after sending the body
    failed (status and body), or None. Stores refuse a PUT from its headers (a quota, a clock
    skew, access denied) and close the connection with the body unread, so the sender gets EPIPE
    or ECONNRESET: taken for a lost connection and retried for minutes, the refusal's own words
    never read. An answer of success is none: the body did not get there."""
    try:
        resp = conn.getresponse()
        return (resp.status, resp.read()) if resp.status >= 300 else None
    except (OSError, http.client.HTTPException):
        return None


_XML_KEY = re.compile(r"<Key>([^<]*)</Key>")


def listed_keys(body: bytes) -> list[str]:
    """The object keys of a ListObjectsV2 answer (XML-escaped text unescaped)."""
    return [_xml_text(k) for k in _XML_KEY.findall(body.decode("utf-8", "replace"))]


class StreamResponse:
    """A GET's answer whose body is read in chunks; stopping early drops the connection."""

    def __init__(
        self, status: int, headers: Mapping[str, str], resp: http.client.HTTPResponse, owner: S3Http
    ) -> None:
        self.status = status
        self.headers = headers
        self._resp = resp
        self._owner = owner

    def iter_chunks(self, size: int) -> Iterator[bytes]:
        try:
            while chunk := self._resp.read(size):
                yield chunk
            if self._resp.length:
                # http.client's read(amt) ends quietly when the server closes early.
                raise http.client.IncompleteRead(b"", self._resp.length)
        except BaseException:  # also GeneratorExit: the rest of the body is still on the wire
            self._owner._drop_connection()
            raise
        self._owner._finish(self._resp)

    def close(self) -> None:
        if not self._resp.isclosed():
            self._owner._drop_connection()
