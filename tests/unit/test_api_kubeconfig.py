"""Where the API finds its own cluster credentials (no cluster needed)."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from dsjobs import kubeconfig
from dsjobs.api import kube
from dsjobs.api.errors import KubeError
from dsjobs.kubemetrics import call_kind


def _write(tmp_path: Path, user: Mapping[str, object], cluster: Mapping[str, object] | None = None) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://10.0.0.1:6443/"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_inline_certificates_become_private_files(tmp_path: Path) -> None:
    data = {
        "client-certificate-data": base64.b64encode(b"CERT").decode(),
        "client-key-data": base64.b64encode(b"KEY").decode(),
    }
    cluster = {"server": "https://h:1", "certificate-authority-data": base64.b64encode(b"CA").decode()}
    cfg, refresh = kubeconfig.load_config(str(_write(tmp_path, data, cluster)))
    assert cfg.host == "https://h:1" and cfg.token is None and refresh is None
    assert cfg.ca_file and Path(cfg.ca_file).read_bytes() == b"CA"
    assert cfg.cert_file and Path(cfg.cert_file).read_bytes() == b"CERT"
    assert cfg.key_file and Path(cfg.key_file).read_bytes() == b"KEY"
    # In this process's memory, never on a disk: nothing is left of a key when the process is
    # killed (a private temporary directory per process piled up in /tmp).
    assert all(f.startswith("/proc/self/fd/") for f in (cfg.ca_file, cfg.cert_file, cfg.key_file))


def test_token_and_relative_files(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA")
    cluster = {"server": "https://h:1", "certificate-authority": "ca.crt", "tls-server-name": "kubernetes"}
    cfg, _ = kubeconfig.load_config(str(_write(tmp_path, {"token": "abc"}, cluster)))
    assert cfg.token == "abc" and cfg.ca_file == str((tmp_path / "ca.crt").resolve())
    assert cfg.server_name == "kubernetes" and cfg.verify


def test_token_file_is_reread(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("one\n")
    cfg, refresh = kubeconfig.load_config(str(_write(tmp_path, {"tokenFile": "token"})))
    assert cfg.token == "one" and refresh is not None
    (tmp_path / "token").write_text("two\n")
    assert refresh(cfg).token == "two"


def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(b"CA")
    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT_DIR", tmp_path)
    monkeypatch.delenv("KUBECONFIG", raising=False)  # it comes first, as in client-go
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    cfg, refresh = kubeconfig.load_config(None)
    assert cfg.host == "https://[fd00::1]:443" and cfg.token == "sa-token"
    assert cfg.ca_file == str(tmp_path / "ca.crt")
    (tmp_path / "token").write_text("rotated")
    assert refresh is not None and refresh(cfg).token == "rotated"


def test_broken_kubeconfigs(tmp_path: Path) -> None:
    with pytest.raises(kubeconfig.KubeConfigError, match="cannot read"):
        kubeconfig.load_config(str(tmp_path / "missing"))
    path = _write(tmp_path, {"token": "x"}, {"certificate-authority-data": ""})
    with pytest.raises(kubeconfig.KubeConfigError, match="no server"):
        kubeconfig.load_config(str(path))
    path.write_text(yaml.safe_dump({"current-context": "nope", "contexts": []}))
    with pytest.raises(kubeconfig.KubeConfigError, match="no context named 'nope'"):
        kubeconfig.load_config(str(path))


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/apis/dsjobs.dev/v1alpha1/namespaces/p/projectjobs/j1", ("get", "projectjobs")),
        (
            "GET",
            "/apis/dsjobs.dev/v1alpha1/projectjobs?fieldSelector=metadata.name%3Dj1",
            ("get", "projectjobs"),
        ),
        (
            "PATCH",
            "/apis/dsjobs.dev/v1alpha1/namespaces/p/projectjobs/j1/status",
            ("patch", "projectjobs/status"),
        ),
        ("POST", "/api/v1/namespaces/p/secrets", ("post", "secrets")),
        ("DELETE", "/api/v1/namespaces/p/secrets/j1-docker-password", ("delete", "secrets")),
        ("GET", "/api/v1/namespaces", ("get", "namespaces")),
        ("GET", "/api/v1/namespaces/p", ("get", "namespaces")),
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews", ("post", "tokenreviews")),
        ("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", ("post", "subjectaccessreviews")),
        ("GET", "/version", ("get", "version")),
    ],
)
def test_a_requests_metric_labels_name_its_resource_never_an_object(
    method: str, path: str, kind: tuple[str, str]
) -> None:
    assert call_kind(method, path) == kind


def test_rotated_credentials_are_read_again_and_a_failed_read_keeps_the_old(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A projected service account token is rotated (and expires) under a long-running replica:
    it is read again at most every minute, in a thread (an exec plugin may run for seconds: the
    replica's other calls go on meanwhile with the token they have); a read that fails keeps the
    last token."""
    import asyncio
    import dataclasses
    import logging
    import threading

    from aiohttp import web

    seen: list[str] = []
    tokens = iter(["second", RuntimeError("the token file is being replaced")])
    released = threading.Event()
    waited: list[bool] = []

    def refresh(config: kubeconfig.KubeConfig) -> kubeconfig.KubeConfig:
        # Blocks until the test lets it go: on the event loop, the request made meanwhile could
        # not be answered (and this would give up after 10 s, unreleased).
        waited.append(released.wait(10))
        token = next(tokens)
        if isinstance(token, Exception):
            raise token
        return dataclasses.replace(config, token=token)

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/api", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = kube.Kube(
            kubeconfig.KubeConfig(f"http://127.0.0.1:{port}", None, None, None, False, "first"), refresh
        )
        await client.start()

        async def read_again() -> None:
            client._refreshed -= kube._CREDENTIAL_REFRESH_SECONDS + 1
            await client.request("GET", "/api")  # starts the read; answered with the token it has
            released.set()
            while client._refreshing is not None:
                await asyncio.sleep(0.01)
            released.clear()

        try:
            await client.request("GET", "/api")  # fresh: not read again
            await read_again()
            await client.request("GET", "/api")  # the rotated token
            await client.request("GET", "/api")  # read a minute ago: not again
            await read_again()  # the read fails
            await client.request("GET", "/api")  # the last token still
        finally:
            await client.close()
            await runner.cleanup()

    with caplog.at_level(logging.WARNING, logger="dsjobs"):
        asyncio.run(scenario())
    assert waited == [True, True]
    assert seen == [
        "Bearer first",
        "Bearer first",
        "Bearer second",
        "Bearer second",
        "Bearer second",
        "Bearer second",
    ]
    assert "could not refresh cluster credentials" in caplog.text


def test_kubeconfig_env_comes_before_the_service_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As client-go (and the operator): the API took the pod's service account over $KUBECONFIG,
    # so both set meant the API on one cluster and the operator on another.
    (tmp_path / "token").write_text("sa-token")
    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(_write(tmp_path, {"token": "from-file"})))
    cfg, _ = kubeconfig.load_config(None)
    assert cfg.host == "https://10.0.0.1:6443" and cfg.token == "from-file"


def test_a_kubeconfig_of_several_files_is_merged_skipping_missing_ones(tmp_path: Path) -> None:
    # Contexts in one file, clusters and users in another (what KUBECONFIG=a:b is for); a file of
    # the list that is not there is skipped, as kubectl does. Relative paths: from each one's file.
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "ca.crt").write_bytes(b"CA")
    (tmp_path / "two" / "token").write_text("tok\n")
    contexts = {"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}
    rest = {
        "current-context": "ignored",
        "clusters": [{"name": "c", "cluster": {"server": "https://h:1", "certificate-authority": "ca.crt"}}],
        "users": [{"name": "u", "user": {"tokenFile": "token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "other", "user": "other"}}],  # the first wins
    }
    (tmp_path / "one" / "config").write_text(yaml.safe_dump(contexts))
    (tmp_path / "two" / "config").write_text(yaml.safe_dump(rest))
    paths = os.pathsep.join(
        str(p) for p in (tmp_path / "missing", tmp_path / "one" / "config", tmp_path / "two" / "config")
    )
    cfg, refresh = kubeconfig.load_config(paths)
    assert cfg.host == "https://h:1" and cfg.token == "tok" and refresh is not None
    assert cfg.ca_file == str((tmp_path / "two" / "ca.crt").resolve())
    with pytest.raises(kubeconfig.KubeConfigError, match="cannot read kubeconfig"):
        kubeconfig.load_config(os.pathsep.join([str(tmp_path / "missing"), str(tmp_path / "gone")]))


def test_a_watch_of_an_address_that_answers_nothing_gives_up_as_a_request_does() -> None:
    # Connecting had no limit: a watch reconnecting to a vanished API server instance waited out
    # the kernel's SYN retries (~2 min) while the job index still said it was in sync.
    import asyncio
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(5):  # the backlog full: further SYNs go unanswered
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        held.append(s)

    async def scenario() -> None:
        client = kube.Kube(
            kubeconfig.KubeConfig(f"http://127.0.0.1:{port}", None, None, None, False, "t"), timeout=1.0
        )
        await client.start()
        try:
            with pytest.raises(KubeError):
                async for _ in client.watch("/api/v1/pods", params={"timeoutSeconds": 300}, idle_seconds=300):
                    pass
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 20))  # a hang guard, far below the ~2 min
    finally:
        for s in [*held, listener]:
            s.close()


def test_a_review_on_a_pooled_connection_the_server_closed_is_asked_again() -> None:
    # The server dropped an idle pooled connection as the request went out (an API server
    # restart, a load balancer's idle timeout): aiohttp retries a GET itself, not a POST, and the
    # caller of the API was told UNAVAILABLE for a TokenReview. Other POSTs are not repeated.
    import asyncio
    import json
    import socket
    import threading

    requests: list[str] = []

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for n in (1, 2):
                line = f.readline()
                if not line:
                    return
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                f.read(int(headers.get("content-length", 0)))
                requests.append(line.decode().split()[1])
                if n == 2:
                    return  # dropped, unanswered
                body = json.dumps({"status": {"authenticated": True}}).encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                conn.sendall(head.encode() + body)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    async def scenario() -> KubeError | None:
        client = kube.Kube(kubeconfig.KubeConfig(f"http://127.0.0.1:{port}", None, None, None, False, "t"))
        await client.start()
        try:
            for _ in range(3):
                await client.request("POST", kube.TOKEN_REVIEWS, body={"spec": {"token": "x"}})
            try:  # on the pooled connection again: dropped, and a create is not repeated
                await client.request("POST", "/api/v1/namespaces/p/secrets", body={})
            except KubeError as exc:
                return exc
            return None
        finally:
            await client.close()

    try:
        refused = asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        listener.close()
    # Each connection answers one request and drops the next: 5 sent for the 3 answered.
    assert requests.count(kube.TOKEN_REVIEWS) == 5
    assert refused is not None and refused.reason == "Unavailable"


@pytest.mark.parametrize("where", ["header", "status"])
def test_a_throttled_call_is_asked_again_after_the_wait_it_names(where: str) -> None:
    # API Priority and Fairness answers 429 with Retry-After (the request was not processed): the
    # API told its caller UNAVAILABLE at once, where client-go waits and asks again. Once only.
    import asyncio

    from aiohttp import web

    answers = iter([429, 200, 429, 429, 429])
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.method)
        if next(answers) == 200:
            return web.json_response({"metadata": {"name": "s"}})
        status = {"kind": "Status", "code": 429, "reason": "TooManyRequests", "message": "throttled"}
        wait = 30 if request.method == "DELETE" else 1  # a long wait is the caller's
        if where == "status":
            status["details"] = {"retryAfterSeconds": wait}
            return web.json_response(status, status=429)
        return web.json_response(status, status=429, headers={"Retry-After": str(wait)})

    async def scenario() -> KubeError | None:
        app = web.Application()
        app.router.add_route("*", "/api/v1/namespaces/p/secrets", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = kube.Kube(kubeconfig.KubeConfig(f"http://127.0.0.1:{port}", None, None, None, False, "t"))
        await client.start()
        try:
            created = await client.request("POST", "/api/v1/namespaces/p/secrets", body={})
            assert created["metadata"]["name"] == "s"
            refused = None
            try:
                await client.request("GET", "/api/v1/namespaces/p/secrets")
            except KubeError as exc:
                refused = exc
            with pytest.raises(KubeError, match="429"):
                await client.request("DELETE", "/api/v1/namespaces/p/secrets")
            return refused
        finally:
            await client.close()
            await runner.cleanup()

    refused = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert seen == ["POST", "POST", "GET", "GET", "DELETE"]
    assert refused is not None and refused.status == 429 and refused.retry_after == 1.0
