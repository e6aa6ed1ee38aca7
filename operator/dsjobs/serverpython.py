"""The Python dsjobs' server parts need, checked when they are imported.

The client (`dsjobs datasphere`, `dsjobs download-files`: dsjobs.cli, dsjobs.download, the
protobuf stubs and the runner's safe file modules they share) runs on Python 3.10, as a data
scientist's laptop may have (Ubuntu 22.04, many conda environments). The models, the operator,
the API and the local cluster use 3.11's standard library: their packages import this module
first, so that a 3.10 install of the `server` extra says so instead of failing on a missing name.
(The runner runs in the runner image, whose Python is the operator's.)
"""

from __future__ import annotations

import sys
from typing import Final

SERVER_PYTHON: Final = (3, 11)


def require_server_python(version: tuple[int, ...]) -> None:
    """ImportError when `version` is older than SERVER_PYTHON."""
    if tuple(version[:2]) < SERVER_PYTHON:
        raise ImportError(
            f"dsjobs' models, operator, API and local cluster need Python {SERVER_PYTHON[0]}."
            f"{SERVER_PYTHON[1]} or newer, this is {version[0]}.{version[1]}: on older Pythons only "
            "dsjobs' client runs (`dsjobs datasphere`, `dsjobs download-files`)"
        )


require_server_python((sys.version_info.major, sys.version_info.minor))
