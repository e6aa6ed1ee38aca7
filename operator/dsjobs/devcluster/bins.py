"""Finding (and, when missing, building) the control-plane binaries.

The binaries come from `hack/k8s-bins.sh`, which builds them once into a cache
directory keyed by what they are built from. Only the script computes that key:
it is asked for the directory (--dir-only, --print-dir), so the two cannot
disagree. `DSJOBS_K8S_BIN_DIR` overrides the lookup.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REQUIRED = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "dsjobs-s3server")
SCRIPT_RELPATH = Path("hack") / "k8s-bins.sh"


class BinariesError(RuntimeError):
    pass


def missing_in(directory: Path) -> list[str]:
    return [b for b in REQUIRED if not os.access(directory / b, os.X_OK)]


def find_script() -> Path | None:
    """hack/k8s-bins.sh of the checkout this package runs from, else of the cwd."""
    if env := os.environ.get("DSJOBS_K8S_BINS_SCRIPT"):
        return Path(env)
    # operator/dsjobs/devcluster/bins.py -> repository root is parents[3]
    candidates = [Path(__file__).resolve().parents[3], Path.cwd(), *Path.cwd().parents]
    for root in candidates:
        if (root / SCRIPT_RELPATH).is_file():
            return root / SCRIPT_RELPATH
    return None


def ensure_bin_dir(build: bool = True) -> Path:
    """Return a directory holding every binary in REQUIRED.

    With `build`, runs the build script when something is missing; its
    progress goes straight to our stderr (a cold build takes ~8 minutes on 2 cores).
    """
    if env := os.environ.get("DSJOBS_K8S_BIN_DIR"):
        directory = Path(env)
        if missing := missing_in(directory):
            raise BinariesError(f"DSJOBS_K8S_BIN_DIR={directory} lacks {', '.join(missing)}")
        return directory
    script = find_script()
    if script is None:
        raise BinariesError(
            f"cannot find {SCRIPT_RELPATH} (run from the dsjobs checkout, or set DSJOBS_K8S_BIN_DIR "
            "to a directory with " + ", ".join(REQUIRED) + ")"
        )
    args = ["bash", str(script), "--print-dir" if build else "--dir-only"]
    proc = subprocess.run(args, stdout=subprocess.PIPE, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BinariesError(f"{script} failed (exit {proc.returncode}); see its messages above")
    directory = Path(lines[-1])
    if missing := missing_in(directory):
        raise BinariesError(f"{directory} lacks {', '.join(missing)}; run: bash {script}")
    return directory
