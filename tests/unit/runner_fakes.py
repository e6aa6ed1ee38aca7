"""In-memory stand-ins shared by the runner/log unit tests (not a test module)."""

from __future__ import annotations

import threading

from dsjobs.storage import ObjectInfo, PreconditionFailedError


class MemoryStore:
    """Implements dsjobs.storage.ObjectStore in memory, counting requests."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.requests = 0
        self.fail_puts = 0  # the next N puts raise ConnectionError (transient)
        self._lock = threading.Lock()

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> None:
        with self._lock:
            self.requests += 1
            if self.fail_puts > 0:
                self.fail_puts -= 1
                raise ConnectionError("injected failure")
            if if_none_match and key in self.objects and self.objects[key] != data:
                raise PreconditionFailedError(key)
            self.objects[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes | None:
        with self._lock:
            self.requests += 1
            return self.objects.get(key)

    def head(self, key: str) -> ObjectInfo | None:
        with self._lock:
            self.requests += 1
            data = self.objects.get(key)
            return None if data is None else ObjectInfo(key=key, size=len(data), etag="")

    def delete(self, key: str) -> None:
        with self._lock:
            self.requests += 1
            self.objects.pop(key, None)
