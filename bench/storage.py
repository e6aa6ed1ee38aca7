"""Object storage figures (issue 5 baseline): 1 GiB through the local S3 server.

    .venv/bin/python bench/storage.py [--dir DIR] [--quick]

Plain boto3 (`upload_file`, multipart with boto3's default TransferConfig; `download_file`) is the
baseline; `dsjobs.storage.Storage.upload_file` / `download_file` (what the runner's stage-in and
stage-out use: sha256 on the way, verified download, atomic rename) is compared with it. Every
transfer runs in a subprocess of its own so that its peak RSS (`ru_maxrss` from wait4) is the
transfer's alone; an import-only subprocess gives the floor (interpreter + boto3) for context.

The S3 server and this client share the 2 cores, so absolute throughput is the pair's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import VENV_PYTHON, Context, Figure, LoadSpan, Section, module_missing, run_measured, secs, suffix

KEY = "storage"
TITLE = "Object storage (`bench/storage.py`)"
MiB = 1024 * 1024
RATIO_TARGET = 0.9
RSS_TARGET_MIB = 100


# ------------------------------------------------------------------ the worker (a subprocess)


def _boto3_client() -> object:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ["DSJOBS_S3_ENDPOINT"],
        aws_access_key_id=os.environ["DSJOBS_S3_ACCESS_KEY"],
        aws_secret_access_key=os.environ["DSJOBS_S3_SECRET_KEY"],
        region_name=os.environ.get("DSJOBS_S3_REGION", "us-east-1"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def worker(impl: str, op: str, path: str, key: str, size: int, sha256: str) -> None:
    """One transfer; prints {"seconds": ...} (the transfer only, not the imports)."""
    bucket = os.environ["DSJOBS_S3_BUCKET"]
    if impl == "boto3":
        client = _boto3_client()
        t0 = time.monotonic()
        if op == "upload":
            client.upload_file(path, bucket, key)  # type: ignore[attr-defined]
        elif op == "download":
            client.download_file(bucket, key, path)  # type: ignore[attr-defined]
    elif impl == "dsjobs":
        from dsjobs.storage import Storage

        store = Storage.from_env().connect()  # as boto3's client above: made before the clock
        t0 = time.monotonic()
        if op == "upload":
            store.upload_file(path, key)
        elif op == "download":
            store.download_file(key, path, expected_size=size, expected_sha256=sha256)
    else:
        raise SystemExit(f"unknown impl {impl}")
    print(json.dumps({"seconds": time.monotonic() - t0}))


# ------------------------------------------------------------------ the parent


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float


def _spawn(env: dict[str, str], *args: str) -> Run:
    m = run_measured([VENV_PYTHON, __file__, "worker", *args], env)
    return Run(float(json.loads(m.stdout.strip().splitlines()[-1])["seconds"]), m.peak_rss_mib)


def _make_blob(path: Path, size: int) -> str:
    """Random (incompressible) bytes; returns their sha256."""
    h = hashlib.sha256()
    chunk = 8 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(chunk, left))
            f.write(b)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def _rate(size: int, seconds: float) -> str:
    return f"{size / MiB / seconds:.0f} MiB/s ({secs(seconds)})"


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    size = ctx.n(1024, 64) * MiB
    reps = ctx.n(int(os.environ.get("BENCH_STORAGE_REPS", "2")), 1)
    env = {**os.environ, **ctx.cluster.s3_env()}
    blob = ctx.work / "blob"
    sha = _make_blob(blob, size)
    impls = ["boto3"]
    if missing := module_missing("dsjobs.storage"):
        sec.skip(f"dsjobs.storage comparison: {missing}")
    else:
        from dsjobs import storage as ds

        if hasattr(ds.Storage, "upload_file") and hasattr(ds.Storage, "download_file"):
            impls.append("dsjobs")
        else:
            sec.skip("dsjobs.storage comparison: Storage has no streaming upload_file/download_file")

    floor = {impl: _spawn(env, impl, "noop", "-", "-", "0", "-").peak_rss_mib for impl in impls}
    prefix = f"bench/{suffix()}"
    results: dict[tuple[str, str], list[Run]] = {}
    load = LoadSpan()
    for rep in range(reps):
        # Interleaved, so that both see the same (shared, drifting) machine load, and in turns
        # first: the first transfer of a run finds the machine freshest.
        for impl in impls if rep % 2 == 0 else impls[::-1]:
            key = f"{prefix}/{impl}-{rep}"
            results.setdefault((impl, "upload"), []).append(
                _spawn(env, impl, "upload", str(blob), key, str(size), sha)
            )
            dest = ctx.work / f"down-{impl}"
            results.setdefault((impl, "download"), []).append(
                _spawn(env, impl, "download", str(dest), key, str(size), sha)
            )
            got = dest.stat().st_size
            dest.unlink()
            if got != size:
                raise RuntimeError(f"{impl} download wrote {got} bytes, expected {size}")
            # Gone before the next transfer: otherwise each one also competes with the write-back
            # of the gigabytes stored before it, and later runs are slower whoever makes them.
            _cleanup(env, key, exact=True)
    load.stop()

    label = f"{size // MiB} MiB"
    best: dict[tuple[str, str], Run] = {k: min(v, key=lambda r: r.seconds) for k, v in results.items()}
    for op in ("upload", "download"):
        b = best[("boto3", op)]
        all_runs = ", ".join(secs(r.seconds) for r in results[("boto3", op)])
        what = "`upload_file` (multipart, default TransferConfig: 8 MiB parts, 10 threads)"
        if op == "download":
            what = "`download_file` (default TransferConfig)"
        sec.add(
            Figure(
                f"boto3 {what}, {label}",
                _rate(size, b.seconds),
                "",
                str(load),
                f"best of {reps} ({all_runs}); peak RSS {b.peak_rss_mib:.0f} MiB",
            )
        )
    if "dsjobs" in impls:
        for op in ("upload", "download"):
            d, b = best[("dsjobs", op)], best[("boto3", op)]
            ratio = b.seconds / d.seconds
            peak = max(r.peak_rss_mib for r in results[("dsjobs", op)])
            all_runs = ", ".join(secs(r.seconds) for r in results[("dsjobs", op)])
            what = "`Storage.upload_file` (sha256 while sending; 8 MiB parts, 2 upload threads, 3 reused buffers)"
            if op == "download":
                what = "`Storage.download_file` (sha256 + size verified, atomic rename)"
            sec.add(
                Figure(
                    f"dsjobs.storage {what}, {label}",
                    f"{_rate(size, d.seconds)}; {ratio:.2f}x boto3",
                    f"≥ {RATIO_TARGET}x boto3",
                    str(load),
                    f"best of {reps} ({all_runs})",
                    ok=ratio >= RATIO_TARGET,
                )
            )
            sec.add(
                Figure(
                    f"dsjobs.storage {op}: peak RSS of the process",
                    f"{peak:.0f} MiB",
                    f"≤ {RSS_TARGET_MIB} MB",
                    str(load),
                    f"import-only floor {floor['dsjobs']:.0f} MiB (Python + boto3 + dsjobs.storage)",
                    ok=peak * MiB <= RSS_TARGET_MIB * 1000 * 1000,
                )
            )
    sec.notes.append(
        f"Import-only peak RSS: boto3 {floor['boto3']:.0f} MiB"
        + (f", dsjobs.storage {floor['dsjobs']:.0f} MiB" if "dsjobs" in floor else "")
        + ". Random data; the file is in the page cache; S3 server and client on the same 2 cores."
    )
    _cleanup(env, prefix)
    blob.unlink()
    return sec


def _cleanup(env: dict[str, str], prefix: str, *, exact: bool = False) -> None:
    """Delete the objects under `prefix/` (or the one key `prefix` when exact)."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("DSJOBS_S3_")})
    client = _boto3_client()
    bucket = env["DSJOBS_S3_BUCKET"]
    if exact:
        client.delete_object(Bucket=bucket, Key=prefix)  # type: ignore[attr-defined]
        return
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")  # type: ignore[attr-defined]
    for obj in listed.get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])  # type: ignore[attr-defined]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        impl, op, path, key, size, sha = sys.argv[2:8]
        worker(impl, op, path, key, int(size), sha)
        sys.exit(0)
    import run as runner_main

    sys.exit(runner_main.main([KEY, *sys.argv[1:]]))
