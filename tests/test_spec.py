"""The spec module's rules, checked against TensorFlow's documented formulas and brute force."""

import itertools

import numpy as np
import pytest

from nbdw import spec


@pytest.mark.parametrize("size, k, stride, rate, expected_out, expected_pads", [
    (5, 3, 1, 1, 5, (1, 1)),
    (5, 3, 2, 1, 3, (1, 1)),
    (6, 3, 2, 1, 3, (0, 1)),      # total 1: the smaller half (0) goes before
    (7, 4, 1, 1, 7, (1, 2)),
    (7, 3, 1, 2, 7, (2, 2)),      # dilation widens the filter to 5
    (10, 3, 3, 2, 4, (2, 2)),     # out = ceil(10/3) = 4, total = 3*3 + 5 - 10 = 4
    (1, 7, 1, 1, 1, (3, 3)),      # filter larger than the input
    (4, 1, 5, 1, 1, (0, 0)),
])
def test_same_padding(size, k, stride, rate, expected_out, expected_pads):
    g = spec.forward_geometry((1, size, 3, 2), (k, 1, 2, 1), [1, stride, 1, 1], "SAME", "NHWC", [1, rate, 1, 1])
    assert g.out_height == expected_out == -(-size // stride)
    assert (g.pad_top, g.pad_bottom) == expected_pads


def test_valid_and_explicit_output_sizes():
    g = spec.forward_geometry((2, 3, 11, 9), (3, 2, 3, 4), [1, 1, 2, 3], "VALID", "NCHW", [1, 1, 2, 1])
    assert (g.out_height, g.out_width) == ((11 - 5) // 2 + 1, (9 - 2) // 3 + 1)
    assert g.output_shape == (2, 12, g.out_height, g.out_width)
    assert g.padding == ([0, 0], [0, 0], [0, 0], [0, 0])
    g = spec.forward_geometry((2, 11, 9, 3), (3, 2, 3, 4), [1, 2, 3, 1],
                              [[0, 0], [1, 4], [2, 0], [0, 0]], "NHWC", [1, 2, 1, 1])
    assert (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == (1, 4, 2, 0)
    assert (g.out_height, g.out_width) == ((16 - 5) // 2 + 1, (11 - 2) // 3 + 1)
    assert g.output_shape == (2, g.out_height, g.out_width, 12)
    assert g.filter_shape == (3, 2, 3, 4) and g.input_shape == (2, 11, 9, 3)


def test_tap_and_output_ranges_by_brute_force():
    for o, stride, pad, dil, taps, size in itertools.product(range(6), range(1, 4), range(0, 4), range(1, 4),
                                                             range(1, 5), range(0, 7)):
        inside = [k for k in range(taps) if 0 <= o * stride - pad + k * dil < size]
        lo, hi = spec.tap_range(o, stride, pad, dil, taps, size)
        assert list(range(lo, hi)) == inside, (o, stride, pad, dil, taps, size)
    for k, stride, pad, dil, outputs, size in itertools.product(range(5), range(1, 4), range(0, 4), range(1, 4),
                                                                range(0, 7), range(0, 7)):
        inside = [o for o in range(outputs) if 0 <= o * stride - pad + k * dil < size]
        lo, hi = spec.output_range(k, stride, pad, dil, outputs, size)
        assert list(range(lo, hi)) == inside, (k, stride, pad, dil, outputs, size)


def test_dtype_rules():
    assert spec.storage_dtype(np.float16) == np.uint16
    assert spec.storage_dtype(spec.bfloat16) == np.int16
    assert spec.storage_dtype(np.float32) == np.float32
    assert spec.accumulator_dtype(np.float16) == np.float32
    assert spec.accumulator_dtype(np.float64) == np.float64
    with pytest.raises(TypeError, match="x dtype must be one of"):
        spec.check_dtypes(x=np.int8)


def test_epilogue_keeps_nan():
    bias = np.array([1.0, -1.0])
    assert np.isnan(spec.epilogue(np.nan, bias, 0, 0.0, 6.0))
    assert spec.epilogue(7.0, bias, 1, 0.0, 6.0) == 6.0
    assert spec.epilogue(-3.0, bias[:0], 0, 0.0, np.inf) == 0.0
    assert spec.epilogue(-np.inf, bias[:0], 0, *spec.activation_bounds("relu", np.float32)) == 0.0


def test_geometry_memo_agrees_with_full_validation():
    """The memoised geometry equals the one validated from scratch, for list, tuple and NumPy
    arguments alike, and never turns an invalid call into a valid one."""
    args = ((2, 9, 7, 3), (3, 3, 3, 2), [1, 2, 1, 1], [[0, 0], [1, 2], [0, 1], [0, 0]], "NHWC", [1, 1, 2, 1])
    fresh = spec._make_checked(*args)
    assert spec.forward_geometry(*args) == fresh
    assert spec.forward_geometry(*args) is spec.forward_geometry(*args)  # served from the memo
    as_tuples = (args[0], args[1], tuple(args[2]), tuple(map(tuple, args[3])), args[4], tuple(args[5]))
    assert spec.forward_geometry(*as_tuples) == fresh
    as_numpy = (args[0], args[1], np.array(args[2]), np.array(args[3]), args[4], np.array(args[5]))
    assert spec.forward_geometry(*as_numpy) == fresh
    with pytest.raises(TypeError, match=r"strides must contain integers, got \[1, True, 1, 1\]"):
        spec.forward_geometry(args[0], args[1], [1, True, 1, 1], "VALID", "NHWC")
    for _ in range(2):  # an error is raised every time (errors are not memoised), in the caller's words
        with pytest.raises(ValueError, match=r"strides must have length 4, got \[1, 1\]"):
            spec.forward_geometry(args[0], args[1], [1, 1], "VALID", "NHWC")
