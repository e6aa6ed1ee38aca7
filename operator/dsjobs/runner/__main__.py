"""``python -m dsjobs.runner stage-in|ship|entry-script``.

Reads the runner config (``$DSJOBS_RUNNER_CONFIG_FILE`` or ``$DSJOBS_RUNNER_CONFIG``) and the
storage settings (``$DSJOBS_S3_*``). Exit codes: 0 done (ship: whatever the job's outcome; it is in
the result), 1 the job cannot start (stage-in) or a runner failure, 2 usage/config errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from dsjobs import __version__
from dsjobs.runner.config import ENV_CONFIG, ENV_CONFIG_FILE, RunnerConfig
from dsjobs.runner.contract import STORAGE_PATIENCE_SECONDS
from dsjobs.runner.entry import render_entry_script
from dsjobs.storage import Storage, StorageSettings


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # boto's own chatter is noise at INFO.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _tell_config_refused(command: str, exc: Exception) -> None:
    """The job's result when this runner cannot read the config its operator wrote: most likely
    the runner image (DSJOBS_RUNNER_IMAGE) is of another dsjobs version than the operator, which
    the job's status should say rather than "staging inputs failed: Error"."""
    from dsjobs.runner.result import RunnerResult, RunnerStatus, termination_message
    from dsjobs.runner.ship import write_termination_message

    reason = (
        f"the job's runner (dsjobs {__version__}) cannot read the config the operator gave it "
        f"({str(exc)[:500]}): the operator's runner image (DSJOBS_RUNNER_IMAGE) must be of the "
        "operator's own dsjobs version"
    )
    raw: dict[str, object] = {}
    with contextlib.suppress(Exception):  # the ids are a courtesy: the operator knows the pod's job
        loaded = json.loads(_raw_config())
        raw = loaded if isinstance(loaded, dict) else {}
    attempt = raw.get("attempt")
    result = RunnerResult(
        project_id=str(raw.get("project_id") or ""),
        job_id=str(raw.get("job_id") or ""),
        attempt=attempt if isinstance(attempt, int) and attempt >= 0 else 0,
        status=RunnerStatus.STAGE_IN_FAILED if command == "stage-in" else RunnerStatus.SETUP_FAILED,
        reason=reason,
    )
    try:
        write_termination_message(termination_message(result))
    except OSError as write_exc:
        logging.getLogger("dsjobs.runner").error("termination message not written error=%s", write_exc)


def _raw_config() -> bytes:
    path = os.environ.get(ENV_CONFIG_FILE)
    if path:
        return Path(path).read_bytes()
    return os.environ.get(ENV_CONFIG, "").encode()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # The exit status of a process the signal killed (128 + N), as the operator reads a stop.
    os._exit(128 + signum)


def stop_on_signals(command: str) -> list[int]:
    """Handlers for SIGTERM and SIGINT from the start. In a container the runner is PID 1, and the
    kernel drops a signal PID 1 has no handler for: a stage-in told to stop (its pod deleted, a
    cancel) went on downloading until the SIGKILL at the grace's end (the graceful timeout plus
    the ship margin), and ship, told before its own handler was set, waited the same. Stage-in
    exits at once; ship's signals are recorded (the list returned) until its handler takes over."""
    if command == "stage-in":
        signal.signal(signal.SIGTERM, _exit_on_signal)
        signal.signal(signal.SIGINT, _exit_on_signal)
        return []
    early: list[int] = []
    if command == "ship":

        def remember(signum: int, frame: FrameType | None) -> None:
            early.append(signum)

        signal.signal(signal.SIGTERM, remember)
        signal.signal(signal.SIGINT, remember)
    return early


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsjobs.runner")
    parser.add_argument("command", choices=["stage-in", "ship", "entry-script"])
    args = parser.parse_args(argv)
    early_signals = stop_on_signals(args.command)
    _setup_logging()
    log = logging.getLogger("dsjobs.runner")
    try:
        config = RunnerConfig.load()
    except Exception as exc:
        log.error("invalid runner config error=%s", exc)
        if args.command != "entry-script":
            _tell_config_refused(args.command, exc)
        return 2
    if args.command == "entry-script":
        sys.stdout.write(render_entry_script(config))
        return 0
    try:
        store = Storage(StorageSettings.from_env(), patience=STORAGE_PATIENCE_SECONDS)
    except Exception as exc:
        log.error("invalid storage settings error=%s", exc)
        return 2
    log.info(
        "runner start command=%s project=%s job=%s attempt=%d",
        args.command,
        config.project_id,
        config.job_id,
        config.attempt,
    )
    if args.command == "stage-in":
        from dsjobs.runner.stagein import run_stage_in

        return 0 if run_stage_in(config, store) else 1

    from dsjobs.runner.ship import Ship

    ship = Ship(config, store)

    def on_term(signum: int, frame: FrameType | None) -> None:
        ship.request_stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if early_signals:
        ship.request_stop()
    ship.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
