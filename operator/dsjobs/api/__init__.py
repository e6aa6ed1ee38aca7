"""The gRPC front-end: DataSphere-compatible ProjectJobService, OperationService and ProjectService.Get.

It is thin: it authenticates and authorizes the caller, validates and converts the request, and
writes the ProjectJob's spec; the operator does the work and writes the status. Everything it
answers is derived from the ProjectJob and the object store, so any replica can answer any call.
Entry point: `python -m dsjobs.api` (see docs/api.md).
"""

from dsjobs import serverpython  # noqa: F401  (checks the Python at import)
