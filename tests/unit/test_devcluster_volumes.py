"""What `devcluster down` removes of the hostPath provisioner's directories (pure selection)."""

from __future__ import annotations

from typing import Any

from dsjobs.devcluster.cluster import HOSTPATH_PV_DIR, LOCAL_STORAGE_CLASS, provisioned_dirs


def pv(path: str, klass: str = LOCAL_STORAGE_CLASS, kind: str = "hostPath") -> dict[str, Any]:
    return {"metadata": {"name": "pv"}, "spec": {"storageClassName": klass, kind: {"path": path}}}


def test_only_the_provisioners_directories_of_the_local_class() -> None:
    made = f"{HOSTPATH_PV_DIR}/4b9f2a"
    assert provisioned_dirs([pv(made)]) == [made]
    # A hand-made PV of another class (e2e tests bind tmp dirs that way), a local PV, paths that
    # are not one level below the provisioner's directory: never touched.
    assert provisioned_dirs([pv(made, klass="manual")]) == []
    assert provisioned_dirs([pv(made, kind="local")]) == []
    for path in (HOSTPATH_PV_DIR, f"{HOSTPATH_PV_DIR}/a/b", f"{HOSTPATH_PV_DIR}/../etc", "/srv/data", ""):
        assert provisioned_dirs([pv(path)]) == [], path
    assert provisioned_dirs([{"spec": {}}, {}]) == []
