"""runner_pod_parts: the pod contract the operator renders."""

from __future__ import annotations

import json
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from runner_fakes import umask

from dsjobs.runner import contract
from dsjobs.runner.config import RunnerConfig
from dsjobs.runner.contract import (
    CONFIG_KEY,
    CONFIG_MOUNT_PATH,
    ENTRY_KEY,
    SHARED_VOLUME,
    WORK_VOLUME,
    config_secret_data,
    runner_config_secret,
    runner_pod_parts,
    shell_stage_in,
    stages_in_python,
)
from dsjobs.runner.entry import render_entry_script
from dsjobs.runner.stagein import prepare


def cfg(**kw: Any) -> RunnerConfig:
    return RunnerConfig(project_id="p", job_id="j", cmd="python main.py", **kw)


def parts(config: RunnerConfig, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "runner_image": "dsjobs-runner:1",
        "user_image": "python:3.11",
        "storage_secret_name": "store-secret",
        "config_secret_name": "cfg-secret",
    }
    args.update(kw)
    return runner_pod_parts(config, **args)


def _secret_refs(container: dict[str, Any]) -> set[str]:
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    refs |= {f["secretRef"]["name"] for f in container.get("envFrom", []) if "secretRef" in f}
    return refs


def test_shape_and_credentials_only_in_runner_containers() -> None:
    p = parts(cfg(graceful_shutdown={"signal": 10, "timeout_seconds": 30}))
    spec = p.pod_spec(main_resources={"limits": {"cpu": "4"}}, nodeSelector={"a": "b"})
    assert spec["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["initContainers"]] == ["stage-in"]
    assert [c["name"] for c in spec["containers"]] == ["job", "ship"]
    assert spec["nodeSelector"] == {"a": "b"}
    job, ship = spec["containers"]
    stage_in = spec["initContainers"][0]
    assert job["image"] == "python:3.11" and job["command"] == ["/bin/sh", "/job/.dsjobs/entry.sh"]
    assert job["resources"] == {"limits": {"cpu": "4"}}
    assert job["workingDir"] == "/job/work"
    # Nothing but its CPU limit (the downward API): no Secret, no config.
    cpus = {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}
    assert _secret_refs(job) == set() and job["env"] == [{"name": "DSJOBS_CPUS", "valueFrom": cpus}]
    assert {m["name"] for m in job["volumeMounts"]} == {SHARED_VOLUME, WORK_VOLUME}
    for c in (stage_in, ship):
        assert c["image"] == "dsjobs-runner:1"
        assert _secret_refs(c) == {"store-secret"}
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {
            "/job/.dsjobs",
            "/job/work",
            "/job/.dsjobs-config",
        }
        assert c["terminationMessagePath"] == "/dev/termination-log"
    # Nothing to fetch: stage-in is a shell script (see test_shell_stage_in_...).
    assert stage_in["command"][:2] == ["/bin/sh", "-c"] and ship["command"][-1] == "ship"
    assert next(m for m in ship["volumeMounts"] if m["mountPath"] == "/job/work")["readOnly"] is True
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["dsjobs-config"]["secret"]["secretName"] == "cfg-secret"
    assert vols[SHARED_VOLUME] == {"name": SHARED_VOLUME, "emptyDir": {}}
    assert spec["terminationGracePeriodSeconds"] == 30 + 300
    # Nothing in the job container's spec names the config secret either.
    assert "cfg-secret" not in json.dumps(job) and "store-secret" not in json.dumps(job)


def test_env_delivery_of_the_config() -> None:
    p = parts(cfg(), config_delivery="env")
    ship = p.sidecars[0]
    env = {e["name"]: e for e in ship["env"]}
    assert env["DSJOBS_RUNNER_CONFIG"]["valueFrom"]["secretKeyRef"] == {
        "name": "cfg-secret",
        "key": CONFIG_KEY,
    }
    assert all(v["name"] != "dsjobs-config" for v in p.volumes)


def test_files_delivery_of_the_storage_settings() -> None:
    # The operator's shape: one Secret with the config and the DSJOBS_S3_* keys, mounted whole.
    p = parts(cfg(), storage_secret_name="cfg-secret", storage_delivery="files")
    config_volume = next(v for v in p.volumes if v["name"] == "dsjobs-config")
    assert config_volume["secret"] == {"secretName": "cfg-secret"}  # every key, not only runner.json
    for c in (*p.init_containers, *p.sidecars):
        env = {e["name"]: e for e in c["env"]}
        assert env["DSJOBS_S3_FILES_DIR"] == {"name": "DSJOBS_S3_FILES_DIR", "value": "/job/.dsjobs-config"}
        assert not any("valueFrom" in e for e in c["env"])  # no credentials in the environment
        assert {"name": "dsjobs-config", "mountPath": "/job/.dsjobs-config", "readOnly": True} in c[
            "volumeMounts"
        ]
    assert "cfg-secret" not in json.dumps(p.main)


@pytest.mark.parametrize(
    "kw",
    [
        {"storage_secret_name": "store-secret"},
        {"storage_secret_name": "cfg-secret", "config_delivery": "env"},
    ],
)
def test_files_delivery_needs_the_config_volume_to_hold_the_settings(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="storage_delivery='files' needs"):
        parts(cfg(), storage_delivery="files", **kw)


def test_mounts_datasets_project_disk_and_working_storage() -> None:
    c = cfg(
        s3_mounts=[{"id": "conn1", "mount_path": "/job/s3/conn1"}],
        datasets=[{"id": "ds1", "var": "D", "mount_path": "/job/datasets/ds1"}],
        project_disk_path="/job/project",
    )
    work_src = {"ephemeral": {"volumeClaimTemplate": {"spec": {}}}}
    p = parts(
        c,
        mount_claims={"conn1": "pvc-s3", "ds1": "pvc-ds"},
        project_disk_claim="pvc-disk",
        work_volume_source=work_src,
    )
    vols = {v["name"]: v for v in p.volumes}
    assert vols["dsjobs-s3-0"]["persistentVolumeClaim"] == {"claimName": "pvc-s3", "readOnly": False}
    assert vols["dsjobs-dataset-0"]["persistentVolumeClaim"] == {"claimName": "pvc-ds", "readOnly": True}
    assert vols["dsjobs-project-disk"]["persistentVolumeClaim"]["claimName"] == "pvc-disk"
    assert vols[WORK_VOLUME] == {"name": WORK_VOLUME, **work_src}
    mounts = {m["mountPath"]: m for m in p.main["volumeMounts"]}
    assert mounts["/job/datasets/ds1"]["readOnly"] is True
    assert set(mounts) >= {"/job/s3/conn1", "/job/project"}
    # The runner's own containers do not get the user's mounts.
    assert all("/job/s3/conn1" not in json.dumps(c) for c in [*p.init_containers, *p.sidecars])
    with pytest.raises(ValueError, match="conn1"):
        parts(c, mount_claims={"ds1": "x"}, project_disk_claim="d")
    with pytest.raises(ValueError, match="project disk"):
        parts(c, mount_claims={"conn1": "a", "ds1": "b"})


def test_config_secret_manifest() -> None:
    c = cfg(env={"TOKEN": "s3cr3t"})
    s = runner_config_secret(c, name="n", namespace="ns", labels={"a": "b"})
    assert s["kind"] == "Secret" and s["metadata"] == {"name": "n", "namespace": "ns", "labels": {"a": "b"}}
    # A shell stage-in: the env values travel in the entry script only.
    assert RunnerConfig.from_json(s["stringData"][CONFIG_KEY]) == replace(c, env={})
    assert "s3cr3t" in s["stringData"][ENTRY_KEY]
    fetching = cfg(env={"TOKEN": "s3cr3t"}, python_env={"requirements": ["numpy"]})
    s = runner_config_secret(fetching, name="n", namespace="ns")
    assert (
        RunnerConfig.from_json(s["stringData"][CONFIG_KEY]) == fetching and ENTRY_KEY not in s["stringData"]
    )


def test_pure() -> None:
    c = cfg(env={"A": "1"}, python_env={"requirements": ["numpy"]})
    before = c.to_json()
    assert parts(c) == parts(c)
    assert c.to_json() == before  # the config it was given is left as it was


@pytest.mark.parametrize(
    "kw",
    [
        {"inputs": [{"path": "a.csv", "sha256": "a" * 64, "size_bytes": 1}]},
        {"local_modules": [{"path": "m.py", "sha256": "b" * 64, "size_bytes": 1}]},
        {"python_env": {"requirements": ["numpy"]}},
    ],
)
def test_stage_in_is_the_python_runner_when_there_is_something_to_fetch(kw: dict[str, Any]) -> None:
    config = cfg(**kw)
    assert stages_in_python(config)
    stage_in = parts(config).init_containers[0]
    assert stage_in["command"] == ["python", "-m", "dsjobs.runner", "stage-in"]
    assert stage_in["terminationMessagePolicy"] == "File"
    assert ENTRY_KEY not in config_secret_data(config)


def test_without_anything_to_fetch_the_entry_script_travels_in_the_config_secret() -> None:
    config = cfg(env={"TOKEN": "s3cret"})
    assert not stages_in_python(config)
    data = config_secret_data(config)
    assert data.keys() == {CONFIG_KEY, ENTRY_KEY} and data[ENTRY_KEY] == render_entry_script(config)
    p = parts(config)
    # The entry script holds the env values: a Secret key, never the pod spec; and only once in
    # the Secret (its 1 MiB).
    assert "s3cret" in data[ENTRY_KEY] and "s3cret" not in json.dumps(p.pod_spec())
    assert "s3cret" not in data[CONFIG_KEY] and RunnerConfig.from_json(data[CONFIG_KEY]).env == {}
    stage_in = p.init_containers[0]
    assert stage_in["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # With only some keys of the Secret mounted, the entry script is one of them.
    config_volume = next(v for v in p.volumes if v["name"] == "dsjobs-config")
    assert config_volume["secret"]["items"] == [
        {"key": CONFIG_KEY, "path": CONFIG_KEY},
        {"key": ENTRY_KEY, "path": ENTRY_KEY},
    ]
    # The config as an env variable has no file to copy: then stage-in stays in Python.
    assert parts(config, config_delivery="env").init_containers[0]["command"][-1] == "stage-in"


def test_shell_stage_in_makes_what_the_python_stage_in_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def config_in(root: Path) -> RunnerConfig:
        return cfg(
            paths={"work_dir": str(root / "work"), "shared_dir": str(root / "shared")},
            outputs=[{"path": "out/deep/result.csv"}, {"path": "top.txt"}],
        )

    py_root, sh_root = tmp_path / "py", tmp_path / "sh"
    with umask(0o022):  # a container's usual umask: the Python stage-in must not depend on it
        prepare(config_in(py_root))
    config = config_in(sh_root)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / ENTRY_KEY).write_text(config_secret_data(config)[ENTRY_KEY])
    # Where the Secret is mounted, before rendering: the script quotes it as it quotes the rest.
    monkeypatch.setattr(contract, "CONFIG_MOUNT_PATH", str(secret_dir))
    script = shell_stage_in(config)
    subprocess.run(["/bin/sh", "-c", script], check=True, capture_output=True)

    def tree(root: Path) -> dict[str, tuple[str, int]]:
        out = {}
        for p in sorted(root.rglob("*")):
            mode = stat.S_IMODE(p.stat().st_mode)
            text = p.read_text().replace(str(root), "<root>") if p.is_file() else ""
            out[str(p.relative_to(root))] = (text, mode)
        return out

    assert tree(sh_root) == tree(py_root)
    assert tree(sh_root)["shared/entry.sh"][1] == 0o755
    assert tree(sh_root)["work/out/deep"][1] == 0o777
    # Appended to by the runner's uid and the job's.
    assert tree(sh_root)["shared/logs/system.log"] == ("", 0o666)


def test_a_failing_shell_stage_in_says_why_on_stderr(tmp_path: Path) -> None:
    config = cfg(paths={"work_dir": str(tmp_path / "work"), "shared_dir": str(tmp_path / "shared")})
    script = shell_stage_in(config).replace(CONFIG_MOUNT_PATH, str(tmp_path / "missing"))
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True)
    assert done.returncode != 0 and "entry.sh" in done.stderr


@pytest.mark.parametrize(
    "line", ["six\n-e .", "six\r", "six\x00", "six\x85-e .", "six\u2028-e .", "six\u2029"]
)
def test_the_runner_refuses_a_requirement_that_is_not_one_line(line: str) -> None:
    with pytest.raises(ValueError, match="invalid requirement"):
        cfg(python_env={"requirements": [line]})
    assert cfg(python_env={"requirements": ["six ; python_version>'3'"]}).python_env is not None
