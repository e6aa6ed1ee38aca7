"""SystemLog: several uids append to one file, so the file it creates must be appendable by all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from runner_fakes import umask

from dsjobs.runner.syslog import SystemLog


def test_a_system_log_it_creates_is_appendable_by_any_uid(tmp_path: Path) -> None:
    path = tmp_path / "system.log"
    with umask(0o022):
        SystemLog(path, "ship")("job finished")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    assert path.read_text().endswith(" ship: job finished\n")


def test_an_existing_system_log_keeps_its_owner_s_mode(tmp_path: Path) -> None:
    path = tmp_path / "system.log"
    path.write_text("")
    os.chmod(path, 0o640)
    SystemLog(path, "ship")("x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_message_naming_a_non_utf8_file_is_still_written(tmp_path: Path) -> None:
    path = tmp_path / "system.log"
    name = os.fsdecode(b"caf\xe9.txt")  # surrogate-escaped, as os.walk returns it
    SystemLog(path, "ship")(f"output results: skipped {name}")
    assert "skipped caf" in path.read_text()
