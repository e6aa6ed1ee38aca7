"""Every `python -m dsjobs...` entry point documented in README/docs answers --help.

argparse %-formats help texts: one literal `%` in a setting's help made `python -m dsjobs.api
--help` a traceback, the very command docs/api.md sends an admin to for the flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsjobs.api.settings import SETTINGS

ENTRY_POINTS = (
    "dsjobs.api",
    "dsjobs.controller",
    "dsjobs.devcluster",
    "dsjobs.runner",
    "dsjobs.crdgen",
    "dsjobs.instancetypes",
    "dsjobs.localstack",
    "dsjobs.orphans",
)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_is_printed(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}"), done.stdout[:200]


def test_the_apis_help_names_every_variable_with_its_flag() -> None:
    from dsjobs.api.settings import parser

    text = " ".join(parser().format_help().split())
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        assert flag in text and f"${s.env}" in text, s.env
    assert "(default: 80% of it, at most 500:" in text
