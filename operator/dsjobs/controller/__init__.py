"""The dsjobs operator: ProjectJob -> Pod (`python -m dsjobs.controller`).

Pure core: `render` (the pod), `status` (the status from the pod), `plan` (one reconcile step),
`secrets`, `cleanup`; Kopf glue: `handlers`, `kube`; entry point: `__main__`. See docs/operator.md.
This package's `__init__` imports only the Python check (dsjobs.serverpython), so the pure
modules load without Kopf.
"""

from dsjobs import serverpython  # noqa: F401  (checks the Python at import)
