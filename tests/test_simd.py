"""Intrinsics of :mod:`nbdw.simd` that the kernel tests cannot isolate: the prefetch hints (what
LLVM is asked for, and that they change nothing) and the lane select."""

import numpy as np
import pytest
from numba import njit

from nbdw.simd import prefetch, prefetch_write, vload, vselect_lanes, vstore


@njit
def _touch_read(a):
    for i in range(0, a.size, 16):
        prefetch(a, i)


@njit
def _touch_write(a):
    for i in range(0, a.size, 16):
        prefetch_write(a, i)


@pytest.mark.parametrize("fn, rw", [(_touch_read, 0), (_touch_write, 1)])
def test_prefetch_hints_ask_for_read_or_write_and_leave_data_alone(fn, rw):
    a = np.arange(256, dtype=np.float32)
    before = a.copy()
    fn(a)
    np.testing.assert_array_equal(a, before)
    calls = [line for line in fn.inspect_llvm(fn.signatures[0]).splitlines()
             if "call void @llvm.prefetch" in line]
    assert calls, "no prefetch was emitted"
    # llvm.prefetch(ptr, rw, locality, cache type): rw 1 fetches the line for writing
    assert all(f"i32 {rw}, i32 2, i32 1)" in line for line in calls), calls


@njit
def _select(a, b, first, stop, out):
    vstore(out, 0, vselect_lanes(vload(a, 0), first, stop, vload(b, 0)))


@pytest.mark.parametrize("first, stop", [(0, 16), (3, 9), (-5, 2), (14, 40), (7, 7), (9, 3)])
def test_select_lanes_takes_a_lane_range_unchanged(first, stop):
    a = np.arange(16, dtype=np.float32)
    b = np.array([np.nan, -0.0, np.inf, -np.inf] * 4, dtype=np.float32)
    out = np.empty(16, np.float32)
    _select(a, b, first, stop, out)
    lanes = np.arange(16)
    expected = np.where((lanes >= first) & (lanes < stop), b, a)
    np.testing.assert_array_equal(out, expected)  # NaN equal to NaN
    assert np.array_equal(np.signbit(out), np.signbit(expected))  # -0.0 stays -0.0
