"""The API's TLS certificate and key, read again when their files change.

cert-manager renews the `kubernetes.io/tls` Secret weeks before the certificate expires and the
kubelet swaps the mounted files (one symlink flip of the Secret volume): a server that read them
once at start would serve the old certificate until it expired, and every client then failed the
handshake (the probes, TCP checks in TLS mode, would not notice). grpc asks `fetch` before each new
connection's handshake; a stat of the two files tells whether to read them again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("dsjobs.api")

# (inode, size, mtime) of each file: what a rename, a symlink flip or a rewrite changes.
_Stamp = tuple[tuple[int, int, int], tuple[int, int, int]]


def _stamp_of(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows the Secret volume's ..data symlink to the current files
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def matching_pair(key_pem: bytes, cert_pem: bytes) -> str | None:
    """Why the key and the certificate chain's first certificate do not belong together (None:
    they do). A writer that replaces the two files one after the other is seen in between."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        return f"not a PEM key and certificate: {exc}"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        return "the key is not the certificate's"
    return None


class ReloadingCertificate:
    """The certificate and key files, for `grpc.dynamic_ssl_server_credentials`."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._refused: _Stamp | None = None

    def _stamps(self) -> _Stamp:
        return (_stamp_of(self.cert), _stamp_of(self.key))

    def _read(self) -> tuple[_Stamp, bytes, bytes]:
        # Stamped before reading: a change while they are read is seen at the next handshake.
        stamp = self._stamps()
        return stamp, self.key.read_bytes(), self.cert.read_bytes()

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The files as they are now (a bad pair fails the start: better than serving it)."""
        stamp, key, cert = self._read()
        problem = matching_pair(key, cert)
        if problem is not None:
            raise ValueError(f"TLS files {self.cert} and {self.key}: {problem}")
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The files read again when they changed since last read; None: keep serving the last ones
        (unchanged, unreadable for now, or a pair that does not match yet)."""
        with self._lock:  # grpc may ask from several threads at once
            try:
                stamp = self._stamps()
                if stamp in (self._stamp, self._refused):
                    return None
                stamp, key, cert = self._read()
            except OSError as exc:
                log.warning("cannot read the TLS files, serving the last ones: %s", exc)
                return None
            problem = matching_pair(key, cert)
            if problem is not None:
                self._refused = stamp  # said once per change
                log.warning("TLS files changed but %s: serving the last ones", problem)
                return None
            self._stamp = stamp
            log.info("TLS certificate read again", extra={"cert": str(self.cert)})
            return grpc.ssl_server_certificate_configuration([(key, cert)])

    def credentials(self) -> grpc.ServerCredentials:
        # grpc documents None as "no change"; its type stubs do not say so.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(self.initial(), fetch)
