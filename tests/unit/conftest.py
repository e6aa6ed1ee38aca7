"""Fixtures shared by the unit test modules."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline: a timing bound would be a timed assertion, and a CI machine that is
# busy for a moment must not fail a property that holds.
settings.register_profile("dsjobs", deadline=None)
settings.load_profile("dsjobs")

# tests/shared: test helpers the unit and e2e suites share (kube_fake).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "shared"))

#: The shells the job's entry script must run under (Debian packages `dash` and `busybox`; bash).
SHELLS = {"dash": ["dash"], "busybox": ["busybox", "sh"], "bash": ["bash"]}


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest) -> list[str]:
    """Each of SHELLS in turn; a missing one is skipped with its name in the reason."""
    name: str = request.param
    if shutil.which(SHELLS[name][0]) is None:
        pytest.skip(f"{name} is not installed (apt-get install dash busybox)")
    return SHELLS[name]
