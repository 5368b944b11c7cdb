"""The prefetch hints of :mod:`nbdw.simd`: what LLVM is asked for, and that they change nothing."""

import numpy as np
import pytest
from numba import njit

from nbdw.simd import prefetch, prefetch_write


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
