"""deploy/components/prometheus-rules: every alert is well-formed and names only metrics dsjobs
exports (a renamed metric would leave an alert that never fires)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from dsjobs.api import metrics as api_metrics
from dsjobs.controller import metrics as operator_metrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "components" / "prometheus-rules" / "rules.yaml"
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> set[str]:
    """The sample names the operator's and the API's /metrics can hold."""
    names: set[str] = set()
    for module in (operator_metrics, api_metrics):
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                for family in obj.describe():
                    names |= {family.name + s for s in _SUFFIXES.get(family.type, ("",))}
    book = operator_metrics.WaitBook(clock=lambda: 1.0)
    condition = {"type": "Scheduled", "status": "False", "lastTransitionTime": "1970-01-01T00:00:00Z"}
    book.update(
        ("ns", "job"), {"phase": "PREPARING", "actualCloudInstanceType": "g1.1", "conditions": [condition]}
    )
    names |= {family.name for family in book.collect()}
    return names


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["apiVersion"] == "monitoring.coreos.com/v1"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_every_alert_names_metrics_dsjobs_exports() -> None:
    known = exported()
    assert "dsjobs_job_oldest_wait_seconds" in known and "dsjobs_reconcile_errors_total" in known
    for rule in rules():
        used = set(re.findall(r"\bdsjobs_[a-z_]+", rule["expr"]))
        assert used and used <= known, (rule["alert"], sorted(used - known))


def test_every_alert_says_what_and_how_bad() -> None:
    seen: set[str] = set()
    for rule in rules():
        assert re.fullmatch(r"Dsjobs[A-Za-z]+", rule["alert"]) and rule["alert"] not in seen
        seen.add(rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
