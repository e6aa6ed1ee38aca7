"""FakeKube: an in-memory stand-in for the few Kubernetes REST calls the API makes on single objects
(POST to a collection, GET, merge PATCH and DELETE of one object), for unit tests of races and lost
answers that a real API server cannot produce on demand.

It models only what tests/e2e/test_kube_fake_contract.py checks against the real API server, and
answers as that server does (status code and reason of each error, what a write stores). Change
the two together: a behaviour added here without a row there is a guess about Kubernetes.

Modelled:
- POST: 409 AlreadyExists for a taken name; the namespace comes from the path (400 BadRequest if
  the body names another); a new uid, resourceVersion "1" and creationTimestamp.
- GET of one object; 404 NotFound for anything missing (also PATCH and DELETE).
- PATCH as a JSON merge patch (RFC 7386): `metadata.resourceVersion` in the patch is a
  precondition (409 Conflict when stale); a patch that changes nothing keeps the resourceVersion.
- Subresources: `status` of a dsjobs custom resource is written only through its status
  subresource (dropped from POST and PATCH bodies here); a Secret's `stringData` is stored
  base64-encoded into `data`.
- DELETE: `preconditions` (uid, resourceVersion; null means none) fail with 409 Conflict; an
  object with finalizers gets a deletionTimestamp and stays until a PATCH empties its finalizers.

Not modelled (no unit test may rely on it): LIST and watch, schema validation and pruning, CEL
and admission policies, immutable Secrets, metadata.generation, managedFields, garbage
collection of dependents, finalizers added during deletion (422 on the real server).

`fail(method, path)` may return an exception to raise instead of answering (after the call is
recorded in `calls`); `write` is another writer's change (the operator's, or a status update).
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Mapping
from typing import Any

from dsjobs.api.errors import KubeError

Failure = Callable[[str, str], BaseException | None]

#: Custom resources of these API groups have a status subresource.
STATUS_SUBRESOURCE_PREFIX = "/apis/dsjobs.dev/"
CREATED_AT = "2025-06-01T00:00:00Z"
DELETED_AT = "2025-06-01T00:00:01Z"


def merged(target: Any, patch: Any) -> Any:
    """A JSON merge patch (RFC 7386) applied to a copy of `target`."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merged(out.get(k), v)
    return out


def _namespace_of(collection: str) -> str | None:
    """The namespace of a namespaced collection's path (`.../namespaces/<ns>/<resource>`)."""
    parts = collection.split("/")
    i = parts.index("namespaces") if "namespaces" in parts else len(parts)
    return parts[i + 1] if i + 2 < len(parts) else None


class FakeKube:
    """Objects by path (`objects`, which tests may seed or read); every call recorded in `calls`."""

    def __init__(self, fail: Failure | None = None) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail = fail

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        self.calls.append((method, path, body))
        error = self.fail(method, path) if self.fail else None
        if error is not None:
            raise error
        if method == "POST":
            return copy.deepcopy(self._create(path, body))
        if path in self.objects:
            if method == "GET":
                return copy.deepcopy(self.objects[path])
            if method == "PATCH":
                return copy.deepcopy(self._patch(path, body))
            if method == "DELETE":
                return copy.deepcopy(self._delete(path, body))
        raise KubeError(404, "NotFound", f"{path} not found")

    def _create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = dict(body["metadata"])
        namespace = _namespace_of(path)
        if namespace is not None:
            if meta.get("namespace", namespace) != namespace:
                raise KubeError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace
        key = f"{path}/{meta['name']}"
        if key in self.objects:
            raise KubeError(409, "AlreadyExists", f"{meta['name']} already exists")
        obj = self._stored_form(path, copy.deepcopy(dict(body)))
        if path.startswith(STATUS_SUBRESOURCE_PREFIX):
            obj.pop("status", None)
        obj["metadata"] = {
            **meta,
            "uid": f"uid-{len(self.calls)}",
            "resourceVersion": "1",
            "creationTimestamp": CREATED_AT,
        }
        self.objects[key] = obj
        return obj

    def _patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        current = self.objects[path]
        patch = dict(patch)
        meta = dict(patch.get("metadata") or {})
        wanted = meta.pop("resourceVersion", None)
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "the object has been modified")
        if "metadata" in patch:
            patch["metadata"] = meta
        if path.startswith(STATUS_SUBRESOURCE_PREFIX):
            patch.pop("status", None)
        obj = self.write(path, patch)
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            del self.objects[path]  # its last finalizer is gone: deleted now
        return obj

    def _delete(self, path: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        meta = self.objects[path]["metadata"]
        for key, wanted in ((body or {}).get("preconditions") or {}).items():
            if wanted is not None and wanted != meta.get(key):
                raise KubeError(409, "Conflict", f"{key} precondition failed")
        if not meta.get("finalizers"):
            return self.objects.pop(path)
        if meta.get("deletionTimestamp"):
            return self.objects[path]
        return self.write(
            path, {"metadata": {"deletionTimestamp": DELETED_AT, "deletionGracePeriodSeconds": 0}}
        )

    @staticmethod
    def _stored_form(path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """A Secret's stringData as the server stores it: base64 in `data`."""
        if "/secrets" in path and obj.get("stringData"):
            encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in obj["stringData"].items()}
            obj["data"] = {**(obj.get("data") or {}), **encoded}
        obj.pop("stringData", None)
        return obj

    def write(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `patch` into a stored object (also another writer's change, e.g. to its status):
        a new resourceVersion if that changed anything, the same object otherwise."""
        before = self.objects[path]
        obj: dict[str, Any] = self._stored_form(path, merged(before, patch))
        if obj == before:
            return before
        obj["metadata"] = {
            **obj["metadata"],
            "resourceVersion": str(int(before["metadata"]["resourceVersion"]) + 1),
        }
        self.objects[path] = obj
        return obj

    def names(self, collection: str) -> list[str]:
        """Names of the objects under `collection` (a path) that are not being deleted."""
        prefix = collection + "/"
        return [
            key[len(prefix) :]
            for key, obj in self.objects.items()
            if key.startswith(prefix)
            and "/" not in key[len(prefix) :]
            and not obj["metadata"].get("deletionTimestamp")
        ]

    def methods(self) -> list[str]:
        return [m for m, _, _ in self.calls]
