"""Stage-in's storage-free part: directories, requirements file, entry script; no storage without inputs."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from runner_fakes import FileStore, MemoryStore, umask

from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.ship import upload_outputs
from dsjobs.runner.stagein import prepare, run_stage_in
from dsjobs.storage import input_key


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


def test_prepare_makes_the_system_log_appendable_by_the_job_s_uid(tmp_path: Path) -> None:
    # Stage-in, the entry script and ship append to it as different uids: whoever came first used
    # to make it 0644 and lock the others out.
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="true",
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    with umask(0o022):
        prepare(cfg)
    assert stat.S_IMODE(cfg.layout.system_log.stat().st_mode) == 0o666
    cfg.layout.system_log.write_text("earlier lines\n")
    prepare(cfg)  # a restarted init container keeps what is there
    assert cfg.layout.system_log.read_text() == "earlier lines\n"


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


def test_an_input_rewritten_in_place_is_staged_then_collected_as_the_output(tmp_path: Path) -> None:
    old = b"weights v1"
    sha = hashlib.sha256(old).hexdigest()
    store = FileStore()
    store.objects[input_key("p", sha)] = old
    cfg = RunnerConfig(
        project_id="p",
        job_id="j",
        cmd="python train.py --resume model.pt",
        inputs=[{"path": "ckpt/model.pt", "sha256": sha, "size_bytes": len(old)}],
        outputs=[{"path": "ckpt/model.pt"}],
        paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")},
    )
    assert run_stage_in(cfg, store, termination_log=str(tmp_path / "term"))  # type: ignore[arg-type]
    model = cfg.work_dir / "ckpt" / "model.pt"
    assert model.read_bytes() == old
    # The job (any uid) may replace it: the file is 0666, its directory 0777.
    assert stat.S_IMODE(model.stat().st_mode) == 0o666
    assert stat.S_IMODE(model.parent.stat().st_mode) == 0o777
    model.write_bytes(b"weights v2")
    outputs, errors = upload_outputs(cfg, store, lambda m: None)  # type: ignore[arg-type]
    assert errors == [] and [o.path for o in outputs] == ["ckpt/model.pt"]
    assert store.objects[outputs[0].key] == b"weights v2"
