"""The API's TLS files are read again when they change (cert-manager renews the Secret, the kubelet
swaps the mounted files): a real grpc.aio server on localhost, certificates made here."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsjobs.api.tlsfiles import ReloadingCertificate


def self_signed(cn: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


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
    old_key, old_cert = self_signed("before")
    new_key, new_cert = self_signed("after")
    install(tmp_path, old_key, old_cert)

    async def run() -> tuple[bool, bool, grpc.StatusCode]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        creds = ReloadingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key").credentials()
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        try:
            before = await health_check(port, old_cert) == health_pb2.HealthCheckResponse.SERVING
            install(tmp_path, new_key, new_cert)
            after = await health_check(port, new_cert) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as stale:
                await health_check(port, old_cert)  # a client that trusts only the old one
            return before, after, stale.value.code()
        finally:
            await server.stop(None)

    before, after, stale = asyncio.run(run())
    assert before and after
    assert stale == grpc.StatusCode.UNAVAILABLE


def test_a_pair_caught_half_replaced_is_not_served_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_key, old_cert = self_signed("before")
    new_key, new_cert = self_signed("after")
    install(tmp_path, old_key, old_cert)
    files = ReloadingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key")
    files.initial()
    assert files.fetch() is None  # unchanged: nothing read
    install(tmp_path, old_key, new_cert)  # the certificate written, its key not yet
    with caplog.at_level(logging.WARNING, logger="dsjobs.api"):
        assert files.fetch() is None
        assert files.fetch() is None
    told = [r.getMessage() for r in caplog.records if "TLS files changed" in r.getMessage()]
    assert told == ["TLS files changed but the key is not the certificate's: serving the last ones"]
    install(tmp_path, new_key, new_cert)
    assert files.fetch() is not None
    assert files.fetch() is None


def test_a_bad_pair_fails_the_start_naming_the_files(tmp_path: Path) -> None:
    key, _ = self_signed("one")
    _, cert = self_signed("two")
    install(tmp_path, key, cert)
    with pytest.raises(ValueError, match=r"tls\.crt and .*tls\.key: the key is not the certificate's"):
        ReloadingCertificate(tmp_path / "tls.crt", tmp_path / "tls.key").initial()
