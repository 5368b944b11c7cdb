"""Intrinsics of :mod:`nbdw.simd` that the kernel tests cannot isolate: the prefetch hints (what
LLVM is asked for, and that they change nothing) and the lane select."""

import numpy as np
import pytest
from numba import njit

from nbdw.simd import (VECTOR_BYTES, prefetch, prefetch_write, target_vector_bytes, vload, vload_at, vselect_lanes,
                       vstore, vtranspose)


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
    n = VECTOR_BYTES // 4  # float32 lanes
    a = np.arange(n, dtype=np.float32)
    b = np.array([np.nan, -0.0, np.inf, -np.inf] * (n // 4), dtype=np.float32)
    out = np.empty(n, np.float32)
    _select(a, b, first, stop, out)
    lanes = np.arange(n)
    expected = np.where((lanes >= first) & (lanes < stop), b, a)
    np.testing.assert_array_equal(out, expected)  # NaN equal to NaN
    assert np.array_equal(np.signbit(out), np.signbit(expected))  # -0.0 stays -0.0


@njit
def _load_at(a, offset, disp, out):
    vstore(out, 0, vload_at(a, offset, disp))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
@pytest.mark.parametrize("offset, disp", [(0, 0), (5, 3), (9, -4), (0, 17)])
def test_load_at_reads_offset_plus_displacement(dtype, offset, disp):
    a = np.arange(64).astype(dtype)
    n = VECTOR_BYTES // (8 if dtype == np.float64 else 4)
    out = np.empty(n, np.float64 if dtype == np.float64 else np.float32)
    _load_at(a, offset, disp, out)
    expected = a[offset + disp:offset + disp + n]
    if dtype == np.uint16:  # float16 bits, widened on load
        expected = expected.view(np.float16)
    np.testing.assert_array_equal(out, expected.astype(out.dtype))


@njit
def _transpose(src, s0, sstride, dst, d0, dstride, count):
    vtranspose(src, s0, sstride, dst, d0, dstride, count)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
@pytest.mark.parametrize("count", [None, 5, 0])
def test_transpose_moves_a_square_of_vectors(dtype, count):
    """Strided rows in, strided transposed rows out (widened and narrowed), only the first
    ``count`` rows stored; in place, with the square's rows adjacent."""
    n = VECTOR_BYTES // (8 if dtype == np.float64 else 4)
    count = n if count is None else count
    values = np.arange(3 * n * n) * 0.5 - 7
    src = values.astype(np.float16).view(np.uint16) if dtype == np.uint16 else values.astype(dtype)
    dst = np.full(4 * n * n, 99, src.dtype)
    _transpose(src, 3, 2 * n + 1, dst, 5, 3 * n, count)
    square = np.stack([src[3 + i * (2 * n + 1):][:n] for i in range(n)])
    expected = np.full_like(dst, 99)
    for i in range(count):
        expected[5 + i * 3 * n:][:n] = square[:, i]
    np.testing.assert_array_equal(dst, expected)
    inplace = src.copy()
    _transpose(inplace, 0, n, inplace, 0, n, n)
    np.testing.assert_array_equal(inplace[:n * n].reshape(n, n), src[:n * n].reshape(n, n).T)
    np.testing.assert_array_equal(inplace[n * n:], src[n * n:])


@pytest.mark.parametrize("features, expected", [
    ("+avx512f,+avx2,+avx,+sse2", 64),     # AVX-512 (Zen 4, Skylake-SP and later)
    ("-avx512f,+avx2,+avx,+sse2", 32),     # AVX2 (Zen 3, Haswell to Comet Lake)
    ("-avx512f,-avx2,+avx,+sse2", 32),
    ("-avx512f,-avx2,-avx,+sse4.2,+sse2", 16),
    ("+neon,+fp-armv8", 64),               # not x86: unmeasured, LLVM splits the vectors
])
def test_vector_width_follows_the_target_features(features, expected, monkeypatch):
    monkeypatch.delenv("NBDW_VECTOR_BYTES", raising=False)
    assert target_vector_bytes(features) == expected


def test_vector_width_override_is_checked(monkeypatch):
    monkeypatch.setenv("NBDW_VECTOR_BYTES", "32")
    assert target_vector_bytes("+avx512f") == 32
    monkeypatch.setenv("NBDW_VECTOR_BYTES", "48")
    with pytest.raises(ValueError, match="NBDW_VECTOR_BYTES must be 16, 32 or 64, got '48'"):
        target_vector_bytes()
