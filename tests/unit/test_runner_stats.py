"""Resource usage samples of the job container (docker_stats.tsv, gpu_stats.tsv).

The entry script runs for real under dash, busybox sh and bash, reading a fake cgroup filesystem
and /proc (`render_entry_script(cgroup_fs=..., proc=...)`) laid out as cgroup v2, cgroup v1 and
docker's v1 view show a container its own cgroup; nvidia-smi is a fake on PATH. The ship sidecar
turns both files into the log records the official CLI writes to its docker_stats.tsv and
gpu_stats.tsv.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from runner_fakes import FileStore, MemoryStore
from runner_fakes import config as ship_config

from dsjobs.logrecords import DOCKER_STATS_LOG_PATH, GPU_STATS_LOG_PATH, Stream, read_records
from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.entry import DOCKER_STATS_HEADER, GPU_STATS_QUERY, render_entry_script
from dsjobs.runner.result import FileErrorType
from dsjobs.runner.ship import LogShipper, upload_diagnostic_files


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class Fakes:
    """A cgroup filesystem and a /proc with `self/cgroup` and `uptime`."""

    def __init__(self, root: Path) -> None:
        self.fs = root / "cgroup"
        self.proc = root / "proc"
        self.fs.mkdir(parents=True)
        _write(self.proc / "uptime", "100.00 5.00\n")

    def cgroup_lines(self, *lines: str) -> None:
        _write(self.proc / "self" / "cgroup", "".join(f"{line}\n" for line in lines))

    def file(self, rel: str, text: str) -> Path:
        path = self.fs / rel
        _write(path, text)
        return path


def _config(tmp: Path, cmd: str, fakes: Fakes) -> RunnerConfig:
    cfg = ship_config(tmp, cmd=cmd)
    script = render_entry_script(cfg, cgroup_fs=str(fakes.fs), proc=str(fakes.proc), stats_seconds=1)
    cfg.layout.entry_script.write_text(script)
    return cfg


def _run(shell: list[str], cfg: RunnerConfig, path: str | None = None) -> None:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    done = subprocess.run(
        [*shell, str(cfg.layout.entry_script)], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def _rows(path: Path) -> list[dict[str, str]]:
    header, *lines = path.read_text().splitlines()
    names = header.split("\t")
    rows = [dict(zip(names, line.split("\t"), strict=True)) for line in lines]
    assert rows, "no sample"
    return rows


def test_cgroup_v2_usage_as_docker_stats_tells_it(shell: list[str], tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.file("cgroup.controllers", "cpu memory pids\n")
    fakes.cgroup_lines("0::/kubepods/burstable/pod1/c1")
    own = "kubepods/burstable/pod1/c1"
    cpu = fakes.file(f"{own}/cpu.stat", "usage_usec 500000\nuser_usec 400000\nsystem_usec 100000\n")
    fakes.file(f"{own}/memory.current", "300000000\n")
    fakes.file(f"{own}/memory.stat", "anon 150000000\nfile 150000000\ninactive_file 100000000\n")
    fakes.file(f"{own}/memory.max", "1000000000\n")
    fakes.file(f"{own}/memory.peak", "400000000\n")
    fakes.file(f"{own}/pids.current", "7\n")
    # The program burns 2 CPU seconds in 2 seconds (the counters move under it): 100%.
    cmd = (
        f"sleep 1.2; printf 'usage_usec 2500000\\n' > {shlex.quote(str(cpu))}; "
        f"printf '102.00 1\\n' > {shlex.quote(str(fakes.proc / 'uptime'))}; "
        "sleep 1.2"
    )
    cfg = _config(tmp_path, cmd, fakes)
    _run(shell, cfg)
    rows = _rows(cfg.layout.docker_stats)
    assert cfg.layout.docker_stats.read_text().splitlines()[0].split("\t") == list(DOCKER_STATS_HEADER)
    assert rows[0]["cpu_seconds"] in ("0.500", "2.500") and rows[0]["cpu_percent"] == ""  # nothing before it
    assert rows[-1]["cpu_seconds"] == "2.500"  # the script's own last line, after the program
    assert [r["cpu_percent"] for r in rows if r["cpu_percent"]] == ["100.0"]
    for r in rows:
        assert r["time"].endswith("Z") and len(r["time"]) == 20, r
        # Without the inactive page cache, as `docker stats`.
        assert (r["memory_bytes"], r["memory_limit_bytes"], r["memory_percent"]) == (
            "200000000",
            "1000000000",
            "20.0",
        )
        assert (r["memory_peak_bytes"], r["pids"]) == ("400000000", "7")
    assert "cgroup v2" in cfg.layout.system_log.read_text()


def test_cgroup_v1_hierarchies_and_no_limit(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.cgroup_lines(
        "12:pids:/",
        "11:cpu,cpuacct:/kubepods/pod1/c1",
        "10:memory:/kubepods/pod1/c1",
        "1:name=systemd:/kubepods/pod1/c1",
        "0::/",
    )
    fakes.file("cpu,cpuacct/kubepods/pod1/c1/cpuacct.usage", "1234567890\n")
    mem = "memory/kubepods/pod1/c1"
    fakes.file(f"{mem}/memory.usage_in_bytes", "5000000\n")
    fakes.file(f"{mem}/memory.stat", "cache 10\ninactive_file 5\ntotal_inactive_file 1000000\n")
    fakes.file(f"{mem}/memory.limit_in_bytes", "9223372036854771712\n")
    fakes.file(f"{mem}/memory.max_usage_in_bytes", "6000000\n")
    # The pids hierarchy's root is the whole machine's: not read.
    fakes.file("pids/pids.current", "4000\n")
    cfg = _config(tmp_path, "sleep 1.2", fakes)
    _run(["dash"], cfg)
    for r in _rows(cfg.layout.docker_stats):
        assert r["cpu_seconds"] == "1.234"
        assert (r["memory_bytes"], r["memory_limit_bytes"], r["memory_percent"]) == ("4000000", "", "")
        assert (r["memory_peak_bytes"], r["pids"]) == ("6000000", "")


def test_docker_s_v1_view_mounts_the_container_s_own_cgroup_at_the_hierarchy(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.cgroup_lines("4:memory:/docker/0123abcd", "2:cpuacct:/docker/0123abcd")
    fakes.file("memory/memory.usage_in_bytes", "2048\n")
    fakes.file("memory/memory.limit_in_bytes", "4096\n")
    fakes.file("cpuacct/cpuacct.usage", "2000000\n")
    cfg = _config(tmp_path, "sleep 1.2", fakes)
    _run(["dash"], cfg)
    for r in _rows(cfg.layout.docker_stats):
        assert (r["memory_bytes"], r["memory_limit_bytes"], r["memory_percent"]) == ("2048", "4096", "50.0")
        assert r["cpu_seconds"] == "0.002"


def test_a_process_in_the_host_s_root_cgroup_writes_no_stats(tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.file("cgroup.controllers", "cpu memory\n")
    fakes.file("cpu.stat", "usage_usec 99999999999\n")  # the root: no memory.current
    fakes.cgroup_lines("0::/")
    cfg = _config(tmp_path, "sleep 1.2", fakes)
    _run(["dash"], cfg)
    assert not cfg.layout.docker_stats.exists()
    assert "no cgroup of its own to read" in cfg.layout.system_log.read_text()


def test_gpus_through_the_image_s_nvidia_smi(shell: list[str], tmp_path: Path) -> None:
    fakes = Fakes(tmp_path)
    fakes.cgroup_lines("0::/")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    args = tmp_path / "smi-args"
    smi.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {shlex.quote(str(args))}\n'
        "echo '0, NVIDIA A100-SXM4-80GB, 97, 40, 30000, 81920, 55, 250.12'\n"
        "echo '1, NVIDIA A100-SXM4-80GB, 0, 0, 0, 81920, 31, 50.00'\n"
    )
    smi.chmod(0o755)
    cfg = _config(tmp_path, "sleep 1.2", fakes)
    _run(shell, cfg, path=str(bindir))
    lines = cfg.layout.gpu_stats.read_text().splitlines()
    assert lines[0].split("\t") == ["time", *GPU_STATS_QUERY]
    rows = [line.split("\t") for line in lines[1:]]
    assert rows and len(rows) % 2 == 0
    assert rows[0][1:] == ["0", "NVIDIA A100-SXM4-80GB", "97", "40", "30000", "81920", "55", "250.12"]
    assert rows[1][1:] == ["1", "NVIDIA A100-SXM4-80GB", "0", "0", "0", "81920", "31", "50.00"]
    assert args.read_text().split() == [
        f"--query-gpu={','.join(GPU_STATS_QUERY)}",
        "--format=csv,noheader,nounits",
    ]
    assert not cfg.layout.docker_stats.exists()


def test_the_ship_sidecar_sends_both_files_as_the_cli_s_system_logs(tmp_path: Path) -> None:
    cfg = ship_config(tmp_path)
    store = MemoryStore()
    shipper = LogShipper(store, cfg)
    shipper.resume()
    cfg.layout.docker_stats.write_bytes(
        b"time\tcpu_percent\n2026-11-30T00:00:00Z\t12.5\n2026-11-30T00:00:10Z"
    )
    cfg.layout.gpu_stats.write_bytes(b"time\tindex\n2026-11-30T00:00:00Z\t0\n")
    shipper.pump(final=True)
    records = read_records(store, "p", "j", 0, max_records=100).records
    assert {r.stream for r in records} == {Stream.FILE}
    sent = {
        path: b"".join(r.content for r in records if r.file_path == path)
        for path in {r.file_path for r in records}
    }
    assert sent == {
        DOCKER_STATS_LOG_PATH: b"time\tcpu_percent\n2026-11-30T00:00:00Z\t12.5\n2026-11-30T00:00:10Z",
        GPU_STATS_LOG_PATH: b"time\tindex\n2026-11-30T00:00:00Z\t0\n",
    }


def test_both_files_are_kept_as_the_job_s_diagnostic_files(tmp_path: Path) -> None:
    cfg = ship_config(tmp_path)
    store = FileStore()
    cfg.layout.docker_stats.write_bytes(b"time\tcpu_percent\n2026-11-30T00:00:00Z\t12.5\n")
    cfg.layout.gpu_stats.write_bytes(b"")  # empty: no object, as for log files
    files, errors = upload_diagnostic_files(cfg, store)  # type: ignore[arg-type]
    assert errors == []
    assert [(f.name, f.size_bytes) for f in files] == [
        ("docker_stats.tsv", cfg.layout.docker_stats.stat().st_size)
    ]
    assert store.objects[files[0].key] == cfg.layout.docker_stats.read_bytes()
    assert files[0].key == "projects/p/jobs/j/logs/files/docker_stats.tsv"
    # A job that replaced one by a symlink (to the runner's credentials, say) gets it refused.
    secret = tmp_path / "secret"
    secret.write_text("key")
    cfg.layout.gpu_stats.unlink()
    cfg.layout.gpu_stats.symlink_to(secret)
    files, errors = upload_diagnostic_files(cfg, store)  # type: ignore[arg-type]
    assert [f.name for f in files] == ["docker_stats.tsv"]
    assert [(e.type, e.log_file_name) for e in errors] == [(FileErrorType.UPLOAD_FAILED, "gpu_stats.tsv")]
    assert b"key" not in b"".join(store.objects.values())
