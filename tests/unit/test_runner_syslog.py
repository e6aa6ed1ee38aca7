"""SystemLog: several uids append to one file, so the file it creates must be appendable by all."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from runner_fakes import umask

from dsjobs.runner.syslog import SystemLog, open_shared


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


def test_a_system_log_replaced_by_a_fifo_or_a_directory_is_refused_not_waited_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The job can replace the file: opening a FIFO for writing waited for a reader for good, and
    # ship hung with it (no result, no outputs).
    fifo = tmp_path / "system.log"
    os.mkfifo(fifo, 0o666)
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (SystemLog(fifo, "ship")("job finished"), done.set()), daemon=True
    )
    thread.start()
    thread.join(30)  # a hang guard only
    assert done.is_set()
    assert "cannot write system log" in caplog.text
    with pytest.raises(OSError):
        open_shared(fifo)
    os.unlink(fifo)
    fifo.mkdir()
    with pytest.raises(OSError):
        open_shared(fifo)


def test_a_system_log_that_cannot_be_written_is_warned_about_once_until_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "system.log"
    path.mkdir()  # the program made it something else
    syslog = SystemLog(path, "ship")
    for message in ("one", "two", "three"):
        syslog(message)
    assert caplog.text.count("cannot write system log") == 1
    path.rmdir()
    syslog("works again")
    path.unlink()
    path.mkdir()
    syslog("fails again")
    assert caplog.text.count("cannot write system log") == 2
