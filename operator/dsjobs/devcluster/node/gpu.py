"""Fake GPU devices: indices 0..N-1 handed to containers that limit `nvidia.com/gpu`.

The scheduler already prevents overcommit; the allocator still refuses to hand one index
to two live containers (a terminating pod's process can outlive its API object's
accounting), and the agent waits for indices to be freed instead.
"""

from __future__ import annotations


class GpuAllocator:
    def __init__(self, count: int) -> None:
        if count < 0:
            raise ValueError("GPU count must be >= 0")
        self.count = count
        self._owner: dict[int, str] = {}

    def free_count(self) -> int:
        return self.count - len(self._owner)

    def allocated(self, owner: str) -> tuple[int, ...]:
        return tuple(sorted(i for i, o in self._owner.items() if o == owner))

    def try_allocate(self, owner: str, n: int) -> tuple[int, ...] | None:
        """Lowest free indices for `owner`, or None if fewer than n are free. Idempotent per owner."""
        if n <= 0:
            return ()
        held = self.allocated(owner)
        if held:
            if len(held) == n:
                return held
            self.release(owner)
        if n > self.free_count():
            return None
        picked = [i for i in range(self.count) if i not in self._owner][:n]
        for i in picked:
            self._owner[i] = owner
        return tuple(picked)

    def release(self, owner: str) -> tuple[int, ...]:
        freed = self.allocated(owner)
        for i in freed:
            del self._owner[i]
        return freed


def visible_devices_env(indices: tuple[int, ...]) -> dict[str, str]:
    value = ",".join(str(i) for i in indices)
    return {"CUDA_VISIBLE_DEVICES": value, "NVIDIA_VISIBLE_DEVICES": value}
