"""Secrets the operator renders for a job (pure): registry credentials and the runner's config.

The ProjectJob never holds a password: the API moves a DockerImageSpec's plain-text password
into a Secret and leaves `passwordSecretRef`; `passwordDsSecretName` names a project secret. The
operator reads that value and renders a `kubernetes.io/dockerconfigjson` Secret owned by the job,
which the pod uses as its imagePullSecret.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Final

from dsjobs.controller.names import (
    PROJECT_STORAGE_ACCESS_KEY,
    PROJECT_STORAGE_SECRET_KEY,
    REGISTRY_PASSWORD_ROLE,
    REGISTRY_SECRET_ROLE,
    SECRET_ROLE_LABEL,
)
from dsjobs.models import PROJECTJOB_KIND
from dsjobs.models.limits import MAX_REGISTRY_PASSWORD_BYTES
from dsjobs.storage import ENV_ACCESS_KEY, ENV_SECRET_KEY

DOCKER_HUB: Final = "https://index.docker.io/v1/"


def registry_of(image_url: str) -> str:
    """The registry an image reference is pulled from (docker's own rule for the first component)."""
    first, sep, _rest = image_url.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


def dockerconfigjson(image_url: str, username: str, password: str) -> str:
    """The `.dockerconfigjson` document for one registry login."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    entry = {"username": username, "password": password, "auth": auth}
    return json.dumps({"auths": {registry_of(image_url): entry}}, sort_keys=True)


def owned_secret(
    *,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    owner: Mapping[str, Any],
    role: str,
    secret_type: str,
    string_data: Mapping[str, str],
) -> dict[str, Any]:
    """A Secret owned by the job (garbage-collected with it), labelled with its role."""
    data = {key: base64.b64encode(value.encode()).decode() for key, value in string_data.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, SECRET_ROLE_LABEL: role},
            "ownerReferences": [dict(owner)],
        },
        "type": secret_type,
        "immutable": True,
        "data": data,
    }


def registry_secret(
    *,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    owner: Mapping[str, Any],
    image_url: str,
    username: str,
    password: str,
) -> dict[str, Any]:
    """The job's imagePullSecret."""
    return owned_secret(
        name=name,
        namespace=namespace,
        labels=labels,
        owner=owner,
        role=REGISTRY_SECRET_ROLE,
        secret_type="kubernetes.io/dockerconfigjson",
        string_data={".dockerconfigjson": dockerconfigjson(image_url, username, password)},
    )


def registry_password_length_problem(password: str) -> str:
    """What is wrong with a registry password's length, or "". The imagePullSecret holds it twice
    (plain and in base64): one past a Secret's 1 MiB was refused at every reconcile. The API
    refuses such a password in plain text likewise."""
    size = len(password.encode())
    if size > MAX_REGISTRY_PASSWORD_BYTES:
        return f"holds {size} bytes, more than the {MAX_REGISTRY_PASSWORD_BYTES} a registry password may have"
    return ""


def holds_key(secret: Mapping[str, Any], key: str) -> bool:
    """Whether a Secret object has `key` at all: `secret_value` is None for a value that is not
    UTF-8 too, which told as "has no key" sent its owner looking for a key that is there."""
    return key in (secret.get("data") or {}) or key in (secret.get("stringData") or {})


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A key of a Secret object as text (None when absent or not UTF-8)."""
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        text = (secret.get("stringData") or {}).get(key)
        return str(text) if text is not None else None
    try:
        return base64.b64decode(raw).decode()
    except (ValueError, UnicodeDecodeError):
        return None


#: The key of a Spark connector's Secret: the connection config the official `datasphere.spark`
#: module reads (`connect_to_spark()`, from $JOB_DATAPROC_CONNECTION_CONFIG).
SPARK_CONFIG_KEY: Final = "config.json"
SPARK_CONNECTION_MODES: Final = ("SPARK_CONNECT", "SPARK_CONTEXT", "SPARK_LOCAL")


def spark_connector_problem(secret: Mapping[str, Any] | None) -> str | None:
    """Why a Spark connector's Secret cannot serve a job, or None; checked as `datasphere.spark`
    reads it, so a job fails before it starts rather than at `connect_to_spark()`."""
    if secret is None:
        return "does not exist"
    text = secret_value(secret, SPARK_CONFIG_KEY)
    if text is None:
        if holds_key(secret, SPARK_CONFIG_KEY):
            return f"key {SPARK_CONFIG_KEY!r} is not UTF-8 text"
        return f"has no key {SPARK_CONFIG_KEY!r}"
    try:
        config = json.loads(text)
    except ValueError as exc:
        return f"key {SPARK_CONFIG_KEY!r} is not JSON ({exc})"
    if not isinstance(config, dict):
        return f"key {SPARK_CONFIG_KEY!r} must be a JSON object"
    if not isinstance(config.get("master_node_host"), str):
        return f"key {SPARK_CONFIG_KEY!r}: master_node_host must be a string"
    if config.get("connection_mode") not in SPARK_CONNECTION_MODES:
        return f"key {SPARK_CONFIG_KEY!r}: connection_mode must be one of {', '.join(SPARK_CONNECTION_MODES)}"
    params = config.get("session_params")
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in params.items()
    ):
        return f"key {SPARK_CONFIG_KEY!r}: session_params must be an object of strings"
    return None


def project_storage_env(
    storage_env: Mapping[str, str], secret: Mapping[str, Any] | None
) -> tuple[dict[str, str] | None, str]:
    """The runner's storage settings with the project's own key pair from its `dsjobs-project-storage`
    Secret (endpoint, bucket and region stay the operator's), or (None, what is wrong)."""
    if secret is None:
        return None, "not found"
    values: dict[str, str] = {}
    missing: list[str] = []
    for key in (PROJECT_STORAGE_ACCESS_KEY, PROJECT_STORAGE_SECRET_KEY):
        # `kubectl create secret --from-file` keeps the file's last newline: not part of a key.
        text = secret_value(secret, key)
        if text is None and holds_key(secret, key):
            return None, f"has a {key!r} that is not UTF-8 text"
        value = (text or "").strip()
        if not value:
            missing.append(repr(key))
        elif any(c.isspace() or not c.isprintable() for c in value):
            return None, f"has a {key!r} with whitespace or control characters"
        values[key] = value
    if missing:
        return None, "has no " + " and no ".join(missing)
    return {
        **storage_env,
        ENV_ACCESS_KEY: values[PROJECT_STORAGE_ACCESS_KEY],
        ENV_SECRET_KEY: values[PROJECT_STORAGE_SECRET_KEY],
    }, ""


def is_registry_password(secret: Mapping[str, Any]) -> bool:
    labels = (secret.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(SECRET_ROLE_LABEL) == REGISTRY_PASSWORD_ROLE)


#: On a registry password Secret no ProjectJob owns (an admin's, shared by a project's jobs): the
#: registries, comma-separated, it may be sent to.
REGISTRY_HOSTS_ANNOTATION = "dsjobs.dev/registry-hosts"


def registry_password_source_problem(
    secret: Mapping[str, Any], *, by_ref: bool, job_uid: str, image_url: str
) -> str:
    """Why this Secret's value must not go to the registry of job `job_uid`'s image, or "".

    The operator and the API read Secrets that project users may not: a passwordSecretRef to any
    Secret of the namespace (say a runner Secret with the storage credentials) and an image URL of
    the user's choice would make the kubelet hand that value to the user's registry. So a
    passwordSecretRef must name a Secret labelled as a registry password (the API labels the ones
    it makes; a kubectl user labels their own), and one a ProjectJob owns (the API's, holding that
    job's user's password) serves that job only: another member of the project could otherwise
    send it to a registry of theirs. One no job owns (an admin's, for the project's registry)
    names the registries it may go to (REGISTRY_HOSTS_ANNOTATION): any member could otherwise
    send it to a registry of theirs with an image URL of their choice. The API names the
    registry on the job's own ones too: a member may edit a colleague's job's image before it
    runs. passwordDsSecretName reads the project secrets, which the job's environment gets anyway.
    """
    if not by_ref:
        return ""
    meta = secret.get("metadata") or {}
    if not is_registry_password(secret):
        return f"is not labelled {SECRET_ROLE_LABEL}={REGISTRY_PASSWORD_ROLE} (only such Secrets are used as passwords)"
    jobs = [
        o
        for o in meta.get("ownerReferences") or ()
        if isinstance(o, Mapping) and o.get("kind") == PROJECTJOB_KIND
    ]
    if jobs and all(o.get("uid") != job_uid for o in jobs):
        names = ", ".join(repr(str(o.get("name", ""))) for o in jobs)
        return f"holds the registry password of ProjectJob {names} (such a Secret serves its own job only)"
    annotations = meta.get("annotations") or {}
    if jobs and REGISTRY_HOSTS_ANNOTATION not in annotations:
        return ""  # the job's own, stored by an API that did not yet name its registry
    listed = str(annotations.get(REGISTRY_HOSTS_ANNOTATION) or "")
    hosts = [h.strip() for h in listed.split(",") if h.strip()]
    registry = registry_of(image_url)
    if registry == DOCKER_HUB:  # the config file's key for Docker Hub; people write docker.io
        registry = "docker.io"
        hosts = [
            "docker.io" if h in ("index.docker.io", "registry-1.docker.io", DOCKER_HUB) else h for h in hosts
        ]
    if not hosts:
        return (
            f"is owned by no ProjectJob and has no annotation {REGISTRY_HOSTS_ANNOTATION} naming the "
            "registries it may be sent to"
        )
    if registry not in hosts:
        return f"may be sent only to {', '.join(hosts)} ({REGISTRY_HOSTS_ANNOTATION}), not to {registry}"
    return ""
