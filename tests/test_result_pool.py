"""The CPU backend's result memory: the pool of large result buffers (memory is reused only once
nothing refers to it), and the cache-line-aligned ``out`` buffers of :func:`nbdw.empty`."""

import numpy as np
import pytest

import nbdw
from nbdw import cpu

SHAPE = (2, 64, 64, 160)  # 5.2 MB of float32: above the pool's 4 MiB threshold


def _forward(x, f):
    return nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal((3, 3, SHAPE[3], 1), dtype=np.float32)


def test_live_results_and_views_are_never_overwritten(inputs):
    x, f = inputs
    first = _forward(x, f)
    keep = first.copy()
    view = first[:, 3:9]
    exported = memoryview(first)
    del first
    for scale in (2.0, 3.0, -1.0):
        again = _forward(x * np.float32(scale), f)
        np.testing.assert_allclose(again, keep * scale, rtol=1e-5, atol=1e-4)
        del again
    np.testing.assert_array_equal(view, keep[:, 3:9])
    np.testing.assert_array_equal(np.asarray(exported), keep)


def test_dropped_result_memory_is_reused_with_correct_values(inputs):
    x, f = inputs
    cpu.release_result_pool()
    first = _forward(x, f)
    address = first.ctypes.data
    del first
    second = _forward(-x, f)
    assert second.ctypes.data == address  # the first result's memory, recycled
    third = _forward(x, f)
    assert third.ctypes.data != address  # second is alive
    np.testing.assert_allclose(second, -third, rtol=1e-6, atol=1e-6)


def test_pool_limits(monkeypatch):
    monkeypatch.setenv("NBDW_RESULT_POOL_MB", "0")
    off = cpu._ResultPool()
    a = off.take(8 * 2**20)
    del a
    assert off.take(8 * 2**20) is not None and off._buffers == []  # disabled: nothing kept
    monkeypatch.setenv("NBDW_RESULT_POOL_MB", "20")
    small = cpu._ResultPool()
    held = [small.take(6 * 2**20) for _ in range(5)]
    assert sum(b.nbytes for b in small._buffers) <= 20 * 2**20  # the oldest are forgotten
    assert all(h.nbytes == 6 * 2**20 for h in held)  # and stay valid for their holders
    monkeypatch.setenv("NBDW_RESULT_POOL_MB", "lots")
    with pytest.raises(ValueError, match="NBDW_RESULT_POOL_MB must be a number of MiB, got 'lots'"):
        cpu._ResultPool()


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float32, np.float64])
def test_empty_gives_cache_line_aligned_arrays(dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    for shape in (5, (3,), (7, 9), (2, 13, 11, 3), np.array([4, 6])):
        a = nbdw.empty(shape, dtype)
        assert a.shape == tuple(np.atleast_1d(shape)) and a.dtype == np.dtype(dtype)
        assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous and a.flags.writeable


def test_empty_as_out_is_written_directly_with_streaming_stores(inputs):
    x, f = inputs
    want = _forward(x, f)
    out = nbdw.empty(want.shape, np.float32)
    assert nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=out) is out
    np.testing.assert_array_equal(out, want)
    # non-temporal stores need whole aligned lines: a NumPy array 16 bytes into a line gets none
    assert cpu._stream(out) == (cpu.VECTOR_BYTES >= 64)
    raw = nbdw.empty(want.size + 16, np.float32)
    assert not cpu._stream(raw[4:4 + want.size].reshape(want.shape))


@pytest.mark.parametrize("shape, dtype, error, words", [
    ((-1, 2), np.float32, ValueError, "shape must not have negative dimensions, got (-1, 2)"),
    ("ab", np.float32, TypeError, "shape must be an int or a sequence of ints, got 'ab'"),
    ((2.5,), np.float32, TypeError, "shape must be an int or a sequence of ints, got (2.5,)"),
    ((2,), "nonsense", TypeError, "dtype must be a NumPy dtype, got 'nonsense'"),
])
def test_empty_rejects_bad_arguments(shape, dtype, error, words):
    with pytest.raises(error) as info:
        nbdw.empty(shape, dtype)
    assert words in str(info.value)
