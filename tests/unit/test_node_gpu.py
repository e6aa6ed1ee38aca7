"""The fake GPU allocator: distinct indices, never shared, released on exit."""

from __future__ import annotations

import pytest

from dsjobs.devcluster.node.gpu import GpuAllocator, visible_devices_env


def test_allocates_distinct_lowest_indices() -> None:
    gpus = GpuAllocator(8)
    a = gpus.try_allocate("pod-a/c", 2)
    b = gpus.try_allocate("pod-b/c", 3)
    assert a == (0, 1)
    assert b == (2, 3, 4)
    assert gpus.free_count() == 3


def test_refuses_overcommit_until_release() -> None:
    gpus = GpuAllocator(8)
    assert gpus.try_allocate("a", 8) == tuple(range(8))
    assert gpus.try_allocate("b", 1) is None
    assert gpus.release("a") == tuple(range(8))
    assert gpus.try_allocate("b", 8) == tuple(range(8))


def test_reuses_freed_holes() -> None:
    gpus = GpuAllocator(4)
    gpus.try_allocate("a", 1)
    gpus.try_allocate("b", 2)
    gpus.release("a")
    assert gpus.try_allocate("c", 2) == (0, 3)


def test_idempotent_per_owner_and_zero() -> None:
    gpus = GpuAllocator(2)
    assert gpus.try_allocate("a", 1) == (0,)
    assert gpus.try_allocate("a", 1) == (0,)
    assert gpus.free_count() == 1
    assert gpus.try_allocate("z", 0) == ()
    assert gpus.release("nobody") == ()
    with pytest.raises(ValueError):
        GpuAllocator(-1)


def test_visible_devices_env() -> None:
    assert visible_devices_env((1, 3)) == {"CUDA_VISIBLE_DEVICES": "1,3", "NVIDIA_VISIBLE_DEVICES": "1,3"}
