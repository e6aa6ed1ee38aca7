"""Files that hold secrets (keys, tokens, S3 credentials) on the local stack."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_private(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Replace `path` with a file of mode 0600 holding `data` (its directory is made if missing).

    A new file (mkstemp: 0600 from the start) renamed over the target: opening the target itself
    would keep the mode of a file that exists already, e.g. a world-readable one, and put the
    secret in it. Readers never see a half-written file either.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
