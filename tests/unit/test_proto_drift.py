"""The committed generated code in operator/dsjobs/pb matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "operator" / "dsjobs" / "pb"
HINT = "generated protobuf code is out of date with proto/: run `make proto` and commit the result"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen-proto")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(REPO / "hack" / "gen-proto.sh"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"hack/gen-proto.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return out / "dsjobs" / "pb"


def test_generated_code_is_up_to_date(regenerated: Path) -> None:
    fresh, committed = _files(regenerated), _files(COMMITTED)
    problems = [f"missing: {name}" for name in sorted(fresh.keys() - committed.keys())]
    problems += [f"stale (no longer generated): {name}" for name in sorted(committed.keys() - fresh.keys())]
    problems += [
        f"differs: {name}"
        for name in sorted(fresh.keys() & committed.keys())
        if fresh[name] != committed[name]
    ]
    assert not problems, HINT + "\n" + "\n".join(problems)


def test_generation_is_deterministic(regenerated: Path, tmp_path: Path) -> None:
    # PYTHON and OUT_DIR relative to the caller's directory, as `make proto` passes PYTHON (the
    # script then changes to the checkout, and protoc runs in proto/).
    env = dict(os.environ, PYTHON=os.path.relpath(sys.executable, tmp_path))
    subprocess.run(
        ["bash", str(REPO / "hack" / "gen-proto.sh"), "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert _files(tmp_path / "out" / "dsjobs" / "pb") == _files(regenerated)


def test_generated_code_never_imports_a_top_level_yandex_package() -> None:
    """Installing dsjobs must not add (or need) a top-level `yandex` package."""
    offenders = [
        name
        for name, content in _files(COMMITTED).items()
        if name.endswith((".py", ".pyi"))
        and any(line.startswith(("from yandex", "import yandex")) for line in content.decode().splitlines())
    ]
    assert not offenders, offenders
    assert not (REPO / "operator" / "yandex").exists()
