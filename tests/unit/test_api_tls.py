"""The API's TLS files are read again when they change (cert-manager renews the Secret, the kubelet
swaps the mounted files): a real grpc.aio server on localhost, certificates of the dev cluster's PKI."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsjobs.api.tlsfiles import ReloadingCertificate
from dsjobs.devcluster.pki import CertificateAuthority


@dataclass(frozen=True)
class Issued:
    key: bytes
    cert: bytes
    ca: bytes  # what a client trusts


def issued(tmp: Path, name: str) -> Issued:
    """A server certificate for 127.0.0.1 from a CA of its own (the dev cluster's PKI)."""
    ca = CertificateAuthority.create(tmp / name)
    pair = ca.issue("tls", "dsjobs-api", server=True, ips=("127.0.0.1",))
    return Issued(pair.read_key(), pair.read_cert(), ca.cert_path.read_bytes())


def install(work: Path, key: bytes, cert: bytes) -> None:
    """Write the pair as the kubelet does: new files, then a rename over the old ones."""
    for name, data in (("tls.key", key), ("tls.crt", cert)):
        tmp = work / f".{name}.new"
        tmp.write_bytes(data)
        os.replace(tmp, work / name)


async def health_check(port: int, trusted: bytes) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    creds = grpc.ssl_channel_credentials(trusted)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return answer.status


def test_a_renewed_certificate_is_served_to_new_connections(tmp_path: Path) -> None:
    old, new = issued(tmp_path, "before"), issued(tmp_path, "after")
    install(tmp_path, old.key, old.cert)

    async def run() -> tuple[bool, bool, grpc.StatusCode]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        creds = ReloadingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key").credentials()
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            before = await health_check(port, old.ca) == health_pb2.HealthCheckResponse.SERVING
            install(tmp_path, new.key, new.cert)
            after = await health_check(port, new.ca) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as stale:
                await health_check(port, old.ca)  # a client that trusts only the old one
            return before, after, stale.value.code()
        finally:
            await server.stop(None)

    before, after, stale = asyncio.run(run())
    assert before and after
    assert stale == grpc.StatusCode.UNAVAILABLE


def test_a_pair_caught_half_replaced_is_not_served_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = issued(tmp_path, "before"), issued(tmp_path, "after")
    install(tmp_path, old.key, old.cert)
    files = ReloadingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key")
    files.initial()
    assert files.fetch() is None  # unchanged: nothing read
    install(tmp_path, old.key, new.cert)  # the certificate written, its key not yet
    with caplog.at_level(logging.WARNING, logger="dsjobs.api"):
        assert files.fetch() is None
        assert files.fetch() is None
    told = [r.getMessage() for r in caplog.records if "TLS files changed" in r.getMessage()]
    assert told == ["TLS files changed but the key is not the certificate's: serving the last ones"]
    install(tmp_path, new.key, new.cert)
    assert files.fetch() is not None
    assert files.fetch() is None


def test_a_bad_pair_fails_the_start_naming_the_files(tmp_path: Path) -> None:
    install(tmp_path, issued(tmp_path, "one").key, issued(tmp_path, "two").cert)
    with pytest.raises(ValueError, match=r"tls\.crt and .*tls\.key: the key is not the certificate's"):
        ReloadingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key").initial()
