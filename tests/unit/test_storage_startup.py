"""The API and the operator refuse to start with storage settings that cannot work (the template's
placeholder keys, an endpoint that is no URL), naming the variable, before they touch a cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TEMPLATE = {
    "DSJOBS_S3_ENDPOINT": "https://s3.example.com",
    "DSJOBS_S3_BUCKET": "dsjobs",
    "DSJOBS_S3_ACCESS_KEY": "REPLACE-ME",
    "DSJOBS_S3_SECRET_KEY": "REPLACE-ME",
}
PLACEHOLDER = (
    "storage settings DSJOBS_S3_ACCESS_KEY, DSJOBS_S3_SECRET_KEY still hold the template's "
    "placeholder 'REPLACE-ME': put the object store's keys in the dsjobs-storage Secret"
)
BAD_ENDPOINT = "storage setting DSJOBS_S3_ENDPOINT: expected http(s)://host[:port], got 's3:9000'"
CASES = [
    (TEMPLATE, PLACEHOLDER),
    (
        {
            **TEMPLATE,
            "DSJOBS_S3_ACCESS_KEY": "a",
            "DSJOBS_S3_SECRET_KEY": "s",
            "DSJOBS_S3_ENDPOINT": "s3:9000",
        },
        BAD_ENDPOINT,
    ),
    # None at all (the Secret not mounted), or some but not all (a Secret missing keys).
    (
        {},
        "storage settings missing: DSJOBS_S3_ENDPOINT, DSJOBS_S3_BUCKET, DSJOBS_S3_ACCESS_KEY, DSJOBS_S3_SECRET_KEY",
    ),
    (
        {"DSJOBS_S3_BUCKET": "dsjobs"},
        "storage settings missing: DSJOBS_S3_ENDPOINT, DSJOBS_S3_ACCESS_KEY, DSJOBS_S3_SECRET_KEY",
    ),
]


def _run(module: str, storage: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSJOBS_", "KUBECONFIG"))}
    # No cluster anywhere: the refusal must come before any attempt to reach one.
    env.update(
        storage, KUBECONFIG="/nonexistent/kubeconfig", DSJOBS_METRICS_PORT="0", DSJOBS_LIVENESS_PORT="0"
    )
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(("storage", "message"), CASES)
def test_the_operator_exits_naming_storage_settings_that_cannot_work(
    storage: dict[str, str], message: str
) -> None:
    done = _run("dsjobs.controller", storage)
    assert done.returncode == 2, done.stderr
    # As its other wrong settings are told, and as the API tells them.
    assert done.stderr.strip().splitlines() == [f"dsjobs.controller: {message}"]
    assert done.stdout == ""


@pytest.mark.parametrize(("storage", "message"), CASES)
def test_the_api_exits_naming_storage_settings_that_cannot_work(
    storage: dict[str, str], message: str
) -> None:
    done = _run("dsjobs.api", storage, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"dsjobs.api: {message}"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("module", "settings", "args"),
    [
        ("dsjobs.controller", {"DSJOBS_MAX_REQUEUE": "0"}, ()),
        ("dsjobs.api", {"DSJOBS_API_URL_TTL": "10s"}, ("--metrics-listen", "")),
    ],
)
def test_storage_settings_are_told_with_the_other_wrong_ones(
    module: str, settings: dict[str, str], args: tuple[str, ...]
) -> None:
    # docs/configuration.md: every wrong variable at once; the store's came only once the rest
    # was right, a second crash loop and rollout.
    done = _run(module, {**CASES[1][0], **settings}, *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1] == f"{module}: {BAD_ENDPOINT}", lines
    assert lines[0].startswith(f"{module}: {next(iter(settings))}"), lines
