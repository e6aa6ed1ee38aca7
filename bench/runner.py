"""Runner figures (issue 5): stage-in and stage-out of 1 GiB, against plain boto3.

    .venv/bin/python bench/runner.py [--dir DIR] [--quick]

`python -m dsjobs.runner stage-in` (one 1 GiB input) and `python -m dsjobs.runner ship` (one 1 GiB
output, then a directory holding it; the program is already over: its status file is written before ship starts) run as the
pod's containers do, with paths in a scratch directory and the bench cluster's S3. The baseline is
a process doing the same transfer with plain boto3 (`download_file` / `upload_file`, default
TransferConfig). Both are timed spawn to exit (interpreter start-up in both) with their own peak
RSS, best of BENCH_RUNNER_REPS (default 2).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from common import (
    VENV_PYTHON,
    Context,
    Figure,
    LoadSpan,
    Measured,
    Section,
    module_missing,
    run_measured,
    secs,
    suffix,
)

KEY = "runner"
TITLE = "Runner stage-in / stage-out (`bench/runner.py`)"
MiB = 1024 * 1024
RATIO_TARGET = 0.9
RSS_TARGET_MIB = 100
STORAGE_SCRIPT = str(Path(__file__).with_name("storage.py"))


def _best(runs: list[Measured]) -> Measured:
    return min(runs, key=lambda m: m.wall)


def run(ctx: Context) -> Section:
    sec = Section(KEY, TITLE)
    if missing := module_missing("dsjobs.runner", runnable=True):
        sec.skip(f"all runner figures: {missing}")
        return sec
    import storage as storage_bench  # the blob maker and the boto3 worker

    from dsjobs.runner.config import InputFile, OutputFile, RunnerConfig, RunnerPaths
    from dsjobs.storage import Storage, input_key, output_prefix

    size = ctx.n(1024, 64) * MiB
    reps = ctx.n(int(os.environ.get("BENCH_RUNNER_REPS", "2")), 1)
    s3 = ctx.cluster.s3_env()
    env = {**os.environ, **s3}
    store = Storage.from_env(s3)
    project, job = f"bench-runner-{suffix()}", "job"
    blob = ctx.work / "runner-blob"
    sha = storage_bench._make_blob(blob, size)
    store.upload_file(blob, input_key(project, sha))

    results: dict[str, list[Measured]] = {
        "stage-in": [],
        "ship": [],
        "ship-dir": [],
        "boto3-down": [],
        "boto3-up": [],
    }
    load = LoadSpan()
    for rep in range(reps):
        root = ctx.work / f"runner-{rep}"
        work, shared = root / "work", root / "shared"
        cfg = RunnerConfig(
            project_id=project,
            job_id=f"{job}{rep}",
            cmd="true",
            inputs=[InputFile(path="in.bin", sha256=sha, size_bytes=size)],
            outputs=[OutputFile(path="out.bin")],
            paths=RunnerPaths(work_dir=str(work), shared_dir=str(shared)),
        )
        renv = {**env, "DSJOBS_RUNNER_CONFIG": cfg.to_json()}
        results["stage-in"].append(run_measured([VENV_PYTHON, "-m", "dsjobs.runner", "stage-in"], renv))
        if (work / "in.bin").stat().st_size != size:
            raise RuntimeError("stage-in placed a file of the wrong size")
        down = ctx.work / "boto3-down"
        results["boto3-down"].append(
            run_measured(
                [
                    VENV_PYTHON,
                    STORAGE_SCRIPT,
                    "worker",
                    "boto3",
                    "download",
                    str(down),
                    input_key(project, sha),
                    "0",
                    "-",
                ],
                env,
            )
        )
        down.unlink()
        # The program "ran": its output is the blob (a hard link, no copy), its status is written.
        (work / "in.bin").unlink()
        os.link(blob, work / "out.bin")
        cfg.layout.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.layout.started.write_text("")
        cfg.layout.status.write_text("rc=0\nphase=run\ncancelled=0\nreason=\nend=1\n")
        # Outside a pod: keep the termination message off the host's /dev.
        renv = {**renv, "DSJOBS_TERMINATION_LOG": str(work.parent / "termination-log")}
        results["ship"].append(run_measured([VENV_PYTHON, "-m", "dsjobs.runner", "ship"], renv))
        uploaded = {o.key: o.size for o in store.iter_objects(output_prefix(project, cfg.job_id))}
        if size not in uploaded.values():
            raise RuntimeError(f"ship did not upload the output: {json.dumps(uploaded)[:300]}")
        results["boto3-up"].append(
            run_measured(
                [
                    VENV_PYTHON,
                    STORAGE_SCRIPT,
                    "worker",
                    "boto3",
                    "upload",
                    str(blob),
                    f"{output_prefix(project, 'x')}b{rep}",
                    "0",
                    "-",
                ],
                env,
            )
        )
        # A directory output: zipped straight into its upload (no local zip).
        dcfg = cfg.replace(job_id=f"{job}{rep}d", inputs=[], outputs=[OutputFile(path="outdir")])
        (work / "outdir").mkdir()
        os.link(blob, work / "outdir" / "blob.bin")
        denv = {**renv, "DSJOBS_RUNNER_CONFIG": dcfg.to_json()}
        results["ship-dir"].append(run_measured([VENV_PYTHON, "-m", "dsjobs.runner", "ship"], denv))
        zipped = {o.key: o.size for o in store.iter_objects(output_prefix(project, dcfg.job_id))}
        if not any(key.endswith("/outdir") and n > size for key, n in zipped.items()):
            raise RuntimeError(f"ship did not upload the directory: {json.dumps(zipped)[:300]}")
        shutil.rmtree(root)
    load.stop()

    label = f"{size // MiB} MiB"
    for what, base, title in (
        ("stage-in", "boto3-down", f"stage-in of one {label} input (download, sha256 + size check, place)"),
        ("ship", "boto3-up", f"stage-out (ship) of one {label} output, plus logs and result"),
    ):
        r, b = _best(results[what]), _best(results[base])
        ratio = b.wall / r.wall
        peak = max(m.peak_rss_mib for m in results[what])
        sec.add(
            Figure(
                f"runner {title}",
                f"{size / MiB / r.wall:.0f} MiB/s ({secs(r.wall)}); {ratio:.2f}x boto3",
                f"≥ {RATIO_TARGET}x boto3",
                str(load),
                f"boto3 process: {secs(b.wall)}, peak RSS {b.peak_rss_mib:.0f} MiB; best of {reps} "
                f"({', '.join(secs(m.wall) for m in results[what])}); process wall incl. start-up",
                ok=ratio >= RATIO_TARGET,
            )
        )
        sec.add(
            Figure(
                f"runner {what}: peak RSS",
                f"{peak:.0f} MiB",
                f"≤ {RSS_TARGET_MIB} MB",
                str(load),
                "GNU time %M of the process alone",
                ok=peak * MiB <= RSS_TARGET_MIB * 1000 * 1000,
            )
        )
    d = _best(results["ship-dir"])
    sec.add(
        Figure(
            f"runner stage-out (ship) of one directory holding a {label} file, zipped on the fly",
            f"{size / MiB / d.wall:.0f} MiB/s ({secs(d.wall)}); peak RSS "
            f"{max(m.peak_rss_mib for m in results['ship-dir']):.0f} MiB",
            f"RSS ≤ {RSS_TARGET_MIB} MB",
            str(load),
            f"random data: deflating its head saves nothing, so it is stored, not deflated; streamed "
            f"through a pipe into a multipart upload; best of {reps} ({', '.join(secs(m.wall) for m in results['ship-dir'])})",
            ok=max(m.peak_rss_mib for m in results["ship-dir"]) * MiB <= RSS_TARGET_MIB * 1000 * 1000,
        )
    )
    store.delete_prefix(f"projects/{project}/")
    blob.unlink()
    return sec


if __name__ == "__main__":
    import run as runner_main

    sys.exit(runner_main.main([KEY, *sys.argv[1:]]))
