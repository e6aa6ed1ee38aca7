"""A small asyncio Kubernetes REST client on aiohttp: JSON in, JSON out, plus watches.

The node agent needs a dozen calls and a pod watch; this avoids a thread per request
(the official client is synchronous) and a new dependency (kubernetes_asyncio).
Objects stay plain dicts, which is also what the pure modules consume.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

from dsjobs import ndjson
from dsjobs.devcluster.files import write_private

Obj = dict[str, Any]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: Obj | str, method: str, path: str) -> None:
        self.status = status
        self.body = body
        if isinstance(body, dict):
            self.reason = str(body.get("reason", ""))
            self.message = str(body.get("message", ""))
        else:
            self.reason = ""
            self.message = str(body)[:500]
        super().__init__(f"{method} {path}: {status} {self.reason} {self.message}")

    @property
    def refused(self) -> bool:
        """An answer, not an outage (RBAC, admission, a bad request): the same request again
        changes nothing. A timeout (408) or throttling (429) is worth another try."""
        return 400 <= self.status < 500 and self.status not in (408, 429)


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass
class KubeConfig:
    server: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    token: str | None
    insecure: bool

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.server)
        return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = (
            ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()
        )
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def ca_pem(self) -> bytes | None:
        if not self.ca_file:
            return None
        with open(self.ca_file, "rb") as fh:
            return fh.read()


def load_kubeconfig(path: str, data_dir: str) -> KubeConfig:
    """The current context's cluster and user.

    Inline `*-data` is written to files in `data_dir` (mode 0600, overwritten on every start):
    the ssl module loads certificates only from files.
    """
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    base = os.path.dirname(os.path.abspath(path))

    def by_name(section: str, name: str) -> Obj:
        for item in doc.get(section) or []:
            if item.get("name") == name:
                return dict(item.get(section[:-1]) or {})
        raise ValueError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

    ctx_name = doc.get("current-context") or ((doc.get("contexts") or [{}])[0].get("name"))
    ctx = by_name("contexts", ctx_name)
    cluster = by_name("clusters", ctx["cluster"])
    user = by_name("users", ctx["user"]) if ctx.get("user") else {}
    os.makedirs(data_dir, mode=0o700, exist_ok=True)

    def materialize(field: str, data_field: str, section: Obj, name: str) -> str | None:
        if section.get(data_field):
            p = os.path.join(data_dir, name)
            write_private(p, base64.b64decode(section[data_field]))
            return p
        if section.get(field):
            return (
                str(section[field]) if os.path.isabs(section[field]) else os.path.join(base, section[field])
            )
        return None

    token = user.get("token")
    if not token and user.get("tokenFile"):
        with open(user["tokenFile"]) as fh:
            token = fh.read().strip()
    return KubeConfig(
        server=str(cluster["server"]).rstrip("/"),
        ca_file=materialize("certificate-authority", "certificate-authority-data", cluster, "ca.crt"),
        cert_file=materialize("client-certificate", "client-certificate-data", user, "client.crt"),
        key_file=materialize("client-key", "client-key-data", user, "client.key"),
        token=token,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
    )


class KubeClient:
    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._ssl = config.ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Accept": JSON, "User-Agent": "dsjobs-node-agent"}
        if config.token:
            self._headers["Authorization"] = f"Bearer {config.token}"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=64, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=30, sock_connect=10),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout: float | None = None,
    ) -> Obj:
        url = self.config.server + path
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        headers = {"Content-Type": content_type} if data is not None else None
        to = aiohttp.ClientTimeout(total=timeout if timeout is not None else 30.0, sock_connect=10)
        async with self.session.request(
            method, url, params=params, data=data, headers=headers, timeout=to
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    parsed: Obj | str = json.loads(text)
                except ValueError:
                    parsed = text
                raise ApiError(resp.status, parsed, method, path)
            if not text:
                return {}
            result: Obj = json.loads(text)
            return result

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Obj:
        return await self.request("GET", path, params=params)

    async def get_or_none(self, path: str) -> Obj | None:
        try:
            return await self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[Obj]:
        """Yield watch events until the server ends the stream. Raises WatchExpired on 410."""
        q = {**params, "watch": "1"}
        url = self.config.server + path
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=float(q.get("timeoutSeconds", "300")) + 30
        )
        async with self.session.get(url, params=q, timeout=timeout) as resp:
            if resp.status == 410:
                raise WatchExpired()
            if resp.status >= 400:
                text = await resp.text()
                try:
                    parsed: Obj | str = json.loads(text)
                except ValueError:
                    parsed = text
                raise ApiError(resp.status, parsed, "WATCH", path)
            async for line in ndjson.lines(resp.content.iter_any()):
                event: Obj = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    if status.get("code") == 410:
                        raise WatchExpired()
                    raise ApiError(int(status.get("code") or 500), status, "WATCH", path)
                yield event
