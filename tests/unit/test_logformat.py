"""The one log line format of the API server and the operator (dsjobs.logformat)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import kopf
from kopf._core.actions.loggers import ObjectLogger

from dsjobs.controller.joblog import jlog
from dsjobs.logformat import JsonFormatter, TextFormatter

BODY = {
    "apiVersion": "dsjobs.dev/v1alpha1",
    "kind": "ProjectJob",
    "metadata": {"name": "j1", "namespace": "p", "uid": "u1"},
}


def _lines(formatter: logging.Formatter, log: Callable[[], None]) -> list[str]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        log()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return out.getvalue().splitlines()


def test_kopf_s_object_lines_keep_their_object_and_drop_its_settings() -> None:
    # Kopf's object loggers put all of its settings on every record (~2 KB a line once formatted).
    kopf_logger = ObjectLogger(body=BODY, settings=kopf.OperatorSettings())  # type: ignore[arg-type]
    (line,) = _lines(JsonFormatter(), lambda: kopf_logger.error("Handler failed"))
    entry = json.loads(line)
    assert set(entry) == {"ts", "level", "logger", "msg", "k8s_ref"}
    assert (entry["level"], entry["logger"], entry["msg"]) == ("error", "kopf.objects", "Handler failed")
    assert entry["k8s_ref"] == {
        "apiVersion": "dsjobs.dev/v1alpha1",
        "kind": "ProjectJob",
        "name": "j1",
        "uid": "u1",
        "namespace": "p",
    }
    assert entry["ts"].endswith("Z")
    (text,) = _lines(
        TextFormatter("%(levelname)s %(name)s: %(message)s"), lambda: kopf_logger.warning("slow")
    )
    assert text.startswith("WARNING kopf.objects: slow k8s_ref=") and "settings" not in text


def test_a_line_about_one_job_carries_its_namespace_and_name_as_fields() -> None:
    (line,) = _lines(JsonFormatter(), lambda: jlog(logging.INFO, ("p", "j1"), "pod %s created", "j1-a1"))
    entry = json.loads(line)
    assert {k: entry[k] for k in ("level", "logger", "msg", "namespace", "job")} == {
        "level": "info",
        "logger": "dsjobs.controller",
        "msg": "p/j1: pod j1-a1 created",
        "namespace": "p",
        "job": "j1",
    }
