"""Fixtures and helpers of the runner's storage-backed tests (not a test module).

The S3 endpoint comes from ``DSJOBS_S3_ENDPOINT`` / ``_BUCKET`` / ``_ACCESS_KEY`` / ``_SECRET_KEY``
(``_REGION`` optional) in the environment, else from the session's local cluster (``dev_s3``), so
these tests run whatever order the modules run in.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dsjobs.storage import Storage, StorageSettings, input_key, job_prefix

_KEYS = ("DSJOBS_S3_ENDPOINT", "DSJOBS_S3_BUCKET", "DSJOBS_S3_ACCESS_KEY", "DSJOBS_S3_SECRET_KEY")


def s3_env() -> dict[str, str] | None:
    """An S3 endpoint given in the environment, if any."""
    if all(os.environ.get(k) for k in _KEYS):
        return {k: v for k, v in os.environ.items() if k.startswith("DSJOBS_S3_")}
    return None


@dataclass
class S3Target:
    storage: Storage
    env: dict[str, str]
    project: str
    job: str


@pytest.fixture
def runner_s3(request: pytest.FixtureRequest) -> Iterator[S3Target]:
    env = s3_env()
    if env is None:
        env = dict(request.getfixturevalue("dev_s3").env())
    storage = Storage(StorageSettings.from_env(env))
    # Fresh ids per test: runs never see each other's objects.
    target = S3Target(storage, env, f"e2e-{uuid.uuid4().hex[:10]}", f"job-{uuid.uuid4().hex[:10]}")
    try:
        yield target
    finally:
        storage.delete_prefix(f"projects/{target.project}/")


def put_input(t: S3Target, data: bytes) -> tuple[str, int]:
    sha = hashlib.sha256(data).hexdigest()
    t.storage.put_bytes(input_key(t.project, sha), data)
    return sha, len(data)


def zip_like_cli(path: Path) -> bytes:
    """Zip a file or directory the way the DataSphere CLI does: entries relative to its parent."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
        for f in files:
            zf.write(f, f.relative_to(path.parent).as_posix())
    return buf.getvalue()


def write_wheel(dest_dir: Path, name: str, version: str, module_source: str) -> Path:
    """A minimal pure-Python wheel built by hand (no network, no build backend)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_source.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dsjobs-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def local_index(tmp: Path, name: str = "tinypkg", source: str = "VALUE = 42\n") -> str:
    """A PEP 503 index on disk with one tiny wheel; its file:// URL (pip --index-url)."""
    pkg = tmp / "simple" / name
    pkg.mkdir(parents=True)
    wheel = write_wheel(pkg, name, "0.1", source)
    (pkg / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
    return (tmp / "simple").as_uri()


def job_keys(t: S3Target) -> list[str]:
    return [o.key for o in t.storage.iter_objects(job_prefix(t.project, t.job))]
