"""Limits and syntax rules of job specs, in one place.

The models attach these to their JSON schema (so the CRD rejects what can be checked statically) and
`dsjobs.validation` enforces them with field paths, so the API, the operator and the CRD agree.
Numbers marked "CLI" mirror the official `datasphere` client's own checks; the rest are this
server's choices, documented in docs/projectjob.md.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from dsjobs.syntax import SHELL_SPECIAL_ENV

# --- sizes and counts -------------------------------------------------------------------------
MAX_LIST_ITEMS: Final = 100  # CLI: inputs, outputs, s3 mounts, datasets
MAX_FILE_SIZE_BYTES: Final = 5 * (1 << 30)  # CLI: one upload
MAX_TOTAL_UPLOAD_BYTES: Final = 10 * (1 << 30)  # CLI: inputs + local modules
MAX_PATH_LENGTH: Final = 4096  # a declared path, in characters (a var file's may be any path)
MAX_NAME_BYTES: Final = 255  # NAME_MAX: one segment of a path, in bytes (UTF-8)
#: A path the runner opens in the job's pod, in bytes (UTF-8) from its leading `/`: Linux's
#: PATH_MAX is 4096 with the terminating NUL.
MAX_PLACED_PATH_BYTES: Final = 4096 - 1
#: The name a download is written to before it is renamed into place, `.dsjobs-partial-<24 hex>`
#: (dsjobs.storage, which the runner imports without the models).
PARTIAL_NAME_BYTES: Final = len(".dsjobs-partial-") + 24
#: An output's place below `projects/<project>/jobs/<job>/outputs/` (ids of 63 at most): an S3 key
#: is at most 1024 bytes.
MAX_OUTPUT_PLACE_BYTES: Final = 1024 - len("projects//jobs//outputs/") - 2 * 63
MAX_CMD_LENGTH: Final = 64 * 1024
# cmd with its `${...}` values is one argument of the program's shell: Linux's MAX_ARG_STRLEN
# (32 pages of 4 KiB) with its NUL.
MAX_RENDERED_CMD_BYTES: Final = 128 * 1024 - 1
# The CR lives in etcd (1.5 MiB per object): the user's config text and env must leave room.
MAX_CONFIG_LENGTH: Final = 256 * 1024
MAX_ENV_VARS: Final = 256
MAX_ENV_VALUE_LENGTH: Final = 32 * 1024
# `NAME=value` with its NUL is one string of the program's environment: Linux's MAX_ARG_STRLEN
# again (32 K characters of 4 bytes in UTF-8 are past it).
MAX_ENV_STRING_BYTES: Final = 128 * 1024
#: What a job may take (`spec-size`): its spec as the API server writes it (JSON in UTF-8, with Go's
#: escapes: `<`, `>`, `&` take 6 bytes), plus what its finished status repeats of it (each output's
#: desc and object key, each output dataset's desc) and what its runner config repeats that the spec
#: holds once (conda_yaml's pip packages, joined to the requirements). Of etcd's 1.5 MiB per object
#: (ETCD_MAX_REQUEST_BYTES) this leaves 640 KiB to the status's own text (file errors 256 KiB of it,
#: details 64 KiB, conditions, logs) and the metadata; and the runner config, at most this plus
#: RUNNER_CONFIG_MARGIN, fits its Secret's 1 MiB.
MAX_SPEC_JSON_BYTES: Final = 896 * 1024
ETCD_MAX_REQUEST_BYTES: Final = 1536 * 1024
#: What the runner config (dsjobs.controller.render.runner_config) holds beyond the spec's own bytes
#: and its conda pip packages: per input, output, local module, s3 mount and dataset at most 128
#: bytes (a var file's place `.dsjobs-vars/<var>/<var>` for a path as short as `/`, a mount's path
#: `/job/datasets/<id>`), per output dataset 256 (its dataset id and mount path), 2 KiB of job id,
#: attempt and snake_case keys, and 8 KiB for the storage settings beside it in the Secret.
RUNNER_CONFIG_MARGIN: Final = MAX_LIST_ITEMS * (5 * 128 + 256) + 2 * 1024 + 8 * 1024
#: A registry password given in plain text (registry tokens and key files are a few KiB).
MAX_REGISTRY_PASSWORD_BYTES: Final = 64 * 1024
MAX_NAME_LENGTH: Final = 256  # job name, argument names, dataset names
# A Kubernetes username: a ServiceAccount's is `system:serviceaccount:<ns>:<name>`, up to 339.
MAX_USER_ID_LENGTH: Final = 512
MAX_DESC_LENGTH: Final = 4096
MAX_SHORT_STRING: Final = 1024  # URLs, hostnames, requirement lines, messages
MAX_STRING: Final = 64 * 1024  # free text the server writes (status details, error descriptions)
MAX_REQUIREMENTS: Final = 1000
MAX_STATUS_FILES: Final = 1000  # outputs + logs + diagnostics the server records
MAX_CONDITIONS: Final = 32

# --- storage and time -------------------------------------------------------------------------
MIN_WORKING_STORAGE_GB: Final = 100  # public docs: 100 GB ..
MAX_WORKING_STORAGE_GB: Final = 10 * 1024  # .. 10 TB
DEFAULT_DATA_TTL: Final = timedelta(days=14)  # CLI sends this on every Create
# `timedelta.max` stands for "infinity" (SetProjectJobDataTtl without a ttl; CLI `--days infinity`).
INFINITE_TTL: Final = timedelta.max
# One hour rather than one day so that expiry can be exercised in demos and tests.
MIN_DATA_TTL: Final = timedelta(hours=1)
MAX_DATA_TTL: Final = timedelta(days=365)
MIN_GRACEFUL_TIMEOUT: Final = timedelta(seconds=1)
MAX_GRACEFUL_TIMEOUT: Final = timedelta(hours=1)
DEFAULT_GRACEFUL_TIMEOUT: Final = timedelta(seconds=30)
MAX_ATTEMPTS: Final = 10
MAX_BACKOFF_SECONDS: Final = 3600
MIN_SCHEDULE_TIMEOUT_SECONDS: Final = 1
MAX_SCHEDULE_TIMEOUT_SECONDS: Final = 7 * 24 * 3600

# Signals the public docs allow for graceful shutdown (CLI: SHUTDOWN_SIGNALS).
SHUTDOWN_SIGNALS: Final[dict[str, int]] = {
    "SIGHUP": 1,
    "SIGINT": 2,
    "SIGUSR1": 10,
    "SIGUSR2": 12,
    "SIGTERM": 15,
}
DEFAULT_SHUTDOWN_SIGNAL: Final = 15

DEFAULT_INSTANCE_TYPE: Final = "c1.4"  # an empty cloud_instance_types list means this

# --- names the server reserves ----------------------------------------------------------------
DS_PROJECT_HOME: Final = "DS_PROJECT_HOME"
JOB_PROGRESS_FILENAME: Final = "JOB_PROGRESS_FILENAME"
# `${NAME}` references in cmd that need no declaration (CLI: reserved_vars).
RESERVED_CMD_VARS: Final = frozenset({DS_PROJECT_HOME})
# Environment variables the runner sets itself; a job may not override them.
RESERVED_ENV_VARS: Final = frozenset({DS_PROJECT_HOME, JOB_PROGRESS_FILENAME})
RESERVED_ENV_PREFIX: Final = "DSJOBS_"
# The shell's own variables (readonly in bash, or arithmetic in dash/bash): a job cannot set them.
SHELL_SPECIAL_ENV_VARS: Final = SHELL_SPECIAL_ENV

# --- syntax (RE2-compatible: the same strings go into the CRD) ---------------------------------
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
# CLI var pattern `[0-9a-z-A-z\-_]{1,50}` (its `A-z` range is a typo for `A-Z`).
VAR_PATTERN: Final = r"^[0-9A-Za-z_-]{1,50}$"
# S3 mount, dataset, docker image and connector ids become label values and `${id}` references.
RESOURCE_ID_PATTERN: Final = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
INSTANCE_TYPE_NAME_PATTERN: Final = r"^[a-z][a-z0-9]*\.[a-z0-9]+$"
ENV_VAR_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,255}$"
PYTHON_VERSION_PATTERN: Final = r"^3(\.[0-9]{1,3}){0,2}$"
NO_CONTROL_CHARS_PATTERN: Final = r"^[^\x00-\x1f\x7f]*$"
#: Text of several lines (descriptions, reasons): tabs and line breaks, no other control character.
TEXT_PATTERN: Final = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
SECRET_NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"  # DNS subdomain
SECRET_KEY_PATTERN: Final = r"^[-._a-zA-Z0-9]{1,253}$"
LABEL_VALUE_PATTERN: Final = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"  # may be empty
# Durations are written like Go's time.Duration plus a `d` (day) unit, or `infinity`. No sign:
# neither a data TTL nor a shutdown timeout means anything below zero, and the API server should
# refuse `-1d` at `kubectl apply` rather than leave it to the operator.
DURATION_PARTS: Final = r"([0-9]+(\.[0-9]+)?(d|h|m|s|ms|us))+"
DURATION_PATTERN: Final = rf"^(infinity|{DURATION_PARTS})$"

# Docker image reference, the distribution/reference grammar (`\w` spelled out: Python's is Unicode).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
DOCKER_REFERENCE_PATTERN: Final = (
    rf"^(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$"
)
MAX_DOCKER_NAME_LENGTH: Final = 255  # distribution/reference NameTotalLengthMax
URL_PATTERN: Final = r"^https?://[^\s/]+(/\S*)?$"
HOST_PORT_PATTERN: Final = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:[0-9]{1,5})?$"
#: A ProjectJob's name (its id) is a label value of its pods and Secrets.
MAX_JOB_NAME: Final = 63
