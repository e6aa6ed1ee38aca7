"""`make up` waits for its CRDs to be Established, also while one has no conditions yet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsjobs.localstack import Kubectl, _wait_established


def test_a_crd_without_conditions_yet_is_waited_for_not_a_failure(tmp_path: Path) -> None:
    """Right after `kubectl apply` a CRD has no status conditions: the jsonpath filter `make up`
    used (`[?(@.type=="Established")]`) made kubectl exit 1 then, and `make up` failed ("<nil> is
    not array or slice and cannot be filtered"). A kubectl answering as the API server does: no
    conditions on the first read, Established on the next."""
    answers = [
        {"kind": "CustomResourceDefinition", "status": {}},
        {"kind": "CustomResourceDefinition", "status": {"conditions": None}},
        {
            "kind": "CustomResourceDefinition",
            "status": {"conditions": [{"type": "Established", "status": "True"}]},
        },
    ]
    for i, answer in enumerate(answers):
        (tmp_path / f"answer{i}.json").write_text(json.dumps(answer))
    counter = tmp_path / "count"
    fake = tmp_path / "kubectl"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        f"c = pathlib.Path({str(counter)!r})\n"
        "n = int(c.read_text()) if c.exists() else 0\n"
        "c.write_text(str(n + 1))\n"
        "assert sys.argv[-2:] == ['-o', 'json'], sys.argv\n"
        f"sys.stdout.write((d / f'answer{{min(n, {len(answers) - 1})}}.json').read_text())\n"
    )
    fake.chmod(0o755)
    _wait_established(Kubectl(str(fake), tmp_path / "kubeconfig"), ["crd/projectjobs.dsjobs.dev"], timeout=60)
    assert int(counter.read_text()) == len(answers)
