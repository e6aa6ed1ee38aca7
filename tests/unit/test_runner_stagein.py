"""Stage-in's storage-free part: directories, requirements file, entry script; no storage without inputs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from runner_fakes import MemoryStore

from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.stagein import prepare, run_stage_in


def test_prepare_lays_out_the_shared_volume(tmp_path: Path) -> None:
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="python main.py",
        outputs=[{"path": ".dsjobs-vars/OUT/model.pt", "var": "OUT"}, {"path": "plain.txt"}],
        python_env={"requirements": ["a==1", "b>=2"]},
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    prepare(cfg)
    lay = cfg.layout
    assert lay.requirements.read_text() == "a==1\nb>=2\n"
    script = lay.entry_script
    assert script.read_text().startswith("#!/bin/sh\n")
    assert os.access(script, os.X_OK)
    # The job may run as any uid: everything it writes to must be world-writable.
    for d in (
        lay.logs_dir,
        lay.run_dir,
        lay.site_dir,
        lay.tmp_dir,
        cfg.work_dir,
        cfg.work_dir / ".dsjobs-vars" / "OUT",
    ):
        assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o777, d
    prepare(cfg)  # idempotent (a restarted init container)


def test_a_job_without_inputs_stages_in_without_any_storage_request(tmp_path: Path) -> None:
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="echo ok",
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    store = MemoryStore()
    assert run_stage_in(cfg, store)  # type: ignore[arg-type]
    assert store.requests == 0 and cfg.layout.entry_script.is_file()
