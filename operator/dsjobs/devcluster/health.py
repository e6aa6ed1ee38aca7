"""Small HTTP(S) probes used while bringing the cluster up and in `status`.

Plain urllib + ssl on purpose: the launcher must not depend on the
Kubernetes client library to find out whether Kubernetes is up.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsjobs.devcluster.pki import CertPair


class ProbeTimeout(TimeoutError):
    pass


def client_context(ca: Path | None, client: CertPair | None = None) -> ssl.SSLContext:
    """TLS context verifying against `ca`; without a CA, no verification (for
    the components' self-signed health endpoints on loopback)."""
    if ca is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body); a connection failure is status 0."""
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, b""


def create(url: str, body: Any, ctx: ssl.SSLContext | None = None, timeout: float = 5.0) -> None:
    """POST a JSON object; one that exists already (409) counts as created."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise RuntimeError(f"POST {url}: HTTP {e.code}: {e.read()[:300]!r}") from e


def get_json(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 5.0) -> Any:
    status, body = get(url, ctx, timeout)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


def wait_until(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 0.25,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll `check` until true. `alive` lets a crashed component fail fast
    instead of waiting out the whole timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if alive is not None and not alive():
            raise ProbeTimeout(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise ProbeTimeout(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(interval)


def url_ok(url: str, ctx: ssl.SSLContext | None = None) -> Callable[[], bool]:
    return lambda: get(url, ctx, timeout=2.0)[0] == 200
