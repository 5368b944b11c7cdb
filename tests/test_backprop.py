"""The two gradient ops on the CPU backend: reference sweep, adjoint identities, finite
differences, determinism, thread counts and shape validation."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
import nbdw
from strategies import DTYPES, conv_configs, random_array

bp_input = nbdw.depthwise_conv2d_native_backprop_input
bp_filter = nbdw.depthwise_conv2d_native_backprop_filter


def _args(cfg):
    return cfg["strides"], cfg["padding"], cfg["data_format"], cfg["dilations"]


def _output_shape(cfg):
    return nbdw.spec.forward_geometry(cfg["input_shape"], cfg["filter_shape"], cfg["strides"], cfg["padding"],
                                      cfg["data_format"], cfg["dilations"]).output_shape


# --------------------------------------------------------------------------- reference sweep

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=300)
@given(cfg=conv_configs())
def test_backprop_input_matches_reference(dtype, cfg):
    rng = np.random.default_rng(abs(hash(str(cfg))) % 2**32)
    f = random_array(rng, cfg["filter_shape"], dtype)
    dy = random_array(rng, _output_shape(cfg), dtype)
    sizes = np.array(cfg["input_shape"], np.int32)  # a 1-D integer array, as TF passes it
    dx = bp_input(sizes, f, dy, *_args(cfg))
    assert dx.dtype == dtype and dx.shape == cfg["input_shape"]
    f64, dy64 = f.astype(np.float64), dy.astype(np.float64)
    ref = naive.tf_backprop_input(cfg["input_shape"], f64, dy64, *_args(cfg))
    abs_terms = naive.tf_backprop_input(cfg["input_shape"], np.abs(f64), np.abs(dy64), *_args(cfg))
    kh, kw, _, m = cfg["filter_shape"]
    naive.assert_close(dx, ref, abs_terms, dtype, terms=kh * kw * m, what="backprop_input")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=300)
@given(cfg=conv_configs())
def test_backprop_filter_matches_reference(dtype, cfg):
    rng = np.random.default_rng(abs(hash(str(cfg))) % 2**32)
    x = random_array(rng, cfg["input_shape"], dtype)
    dy = random_array(rng, _output_shape(cfg), dtype)
    df = bp_filter(x, list(cfg["filter_shape"]), dy, *_args(cfg))
    assert df.dtype == dtype and df.shape == cfg["filter_shape"]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    ref = naive.tf_backprop_filter(x64, cfg["filter_shape"], dy64, *_args(cfg))
    abs_terms = naive.tf_backprop_filter(np.abs(x64), cfg["filter_shape"], np.abs(dy64), *_args(cfg))
    out_shape = _output_shape(cfg)
    terms = int(np.prod(out_shape)) // (cfg["filter_shape"][2] * cfg["filter_shape"][3]) + 1  # N * OH * OW
    naive.assert_close(df, ref, abs_terms, dtype, terms=terms, what="backprop_filter")


# --------------------------------------------------------------------------- adjoint identities

@settings(max_examples=150)
@given(cfg=conv_configs(allow_empty_batch=False), seed=st.integers(0, 2**31))
def test_adjoint_identities(cfg, seed):
    """<forward(x, f), dy> = <x, backprop_input(dy)> = <f, backprop_filter(x, dy)>."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg["input_shape"])
    f = rng.standard_normal(cfg["filter_shape"])
    y = nbdw.depthwise_conv2d_native(x, f, *_args(cfg))
    dy = rng.standard_normal(y.shape)
    dx = bp_input(cfg["input_shape"], f, dy, *_args(cfg))
    df = bp_filter(x, cfg["filter_shape"], dy, *_args(cfg))
    lhs = np.vdot(y, dy)
    scale = np.vdot(np.abs(y), np.abs(dy)) + np.abs(x).sum() * np.abs(dx).max() + 1.0
    assert abs(lhs - np.vdot(x, dx)) <= 1e-12 * scale
    assert abs(lhs - np.vdot(f, df)) <= 1e-12 * scale


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("strides, rate, padding", [
    ((1, 1), (1, 1), "SAME"), ((2, 1), (1, 2), "VALID"), ((2, 2), (2, 2), "EXPLICIT")])
def test_central_finite_differences(fmt, strides, rate, padding):
    """d/dx and d/df of L = <forward(x, f), dy> by central differences, in float64."""
    rng = np.random.default_rng(12)
    nhwc = (2, 6, 7, 2)
    shape = nhwc if fmt == "NHWC" else (2, 2, 6, 7)
    s4 = [1, *strides, 1] if fmt == "NHWC" else [1, 1, *strides]
    d4 = [1, *rate, 1] if fmt == "NHWC" else [1, 1, *rate]
    if padding == "EXPLICIT":
        padding = [[0, 0], [1, 2], [2, 0], [0, 0]] if fmt == "NHWC" else [[0, 0], [0, 0], [1, 2], [2, 0]]
    x = rng.standard_normal(shape)
    f = rng.standard_normal((3, 2, 2, 2))
    dy = rng.standard_normal(nbdw.depthwise_conv2d_native(x, f, s4, padding, fmt, d4).shape)

    def loss(x_, f_):
        return np.vdot(nbdw.depthwise_conv2d_native(x_, f_, s4, padding, fmt, d4), dy)

    dx = bp_input(shape, f, dy, s4, padding, fmt, d4)
    df = bp_filter(x, f.shape, dy, s4, padding, fmt, d4)
    h = 1e-6
    for grad, arr, is_x in ((dx, x, True), (df, f, False)):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(12)]:
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            numeric = (loss(plus, f) - loss(minus, f)) / (2 * h) if is_x else (loss(x, plus) - loss(x, minus)) / (2 * h)
            assert abs(numeric - grad[idx]) <= 1e-6 * (1 + abs(numeric)), (is_x, idx, numeric, grad[idx])


# --------------------------------------------------------------------------- determinism and threads

@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_backprop_filter_is_bitwise_repeatable_and_thread_consistent(fmt, dtype):
    rng = np.random.default_rng(13)
    shape = (1, 40, 24, 6) if fmt == "NHWC" else (1, 6, 40, 24)  # batch 1: rows are split over tasks
    s4 = [1, 1, 1, 1]
    x = random_array(rng, shape, dtype)
    dy = random_array(rng, shape[:3] + (12,) if fmt == "NHWC" else (1, 12) + shape[2:], dtype)
    before = numba.get_num_threads()
    try:
        runs = {}
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            first = bp_filter(x, (3, 3, 6, 2), dy, s4, "SAME", fmt)
            for _ in range(3):
                again = bp_filter(x, (3, 3, 6, 2), dy, s4, "SAME", fmt)
                np.testing.assert_array_equal(again.view(np.uint8), first.view(np.uint8))
            runs[threads] = first.astype(np.float64)
    finally:
        numba.set_num_threads(before)
    ref = naive.tf_backprop_filter(x.astype(np.float64), (3, 3, 6, 2), dy.astype(np.float64), s4, "SAME", fmt)
    abs_terms = naive.tf_backprop_filter(np.abs(x.astype(np.float64)), (3, 3, 6, 2),
                                         np.abs(dy.astype(np.float64)), s4, "SAME", fmt)
    for threads, result in runs.items():
        naive.assert_close(result, ref, abs_terms, dtype, terms=40 * 24, what=f"{threads} threads")
    values = list(runs.values())
    naive.assert_close(values[0], values[-1], abs_terms, dtype, terms=2 * 40 * 24, what="1 vs many threads")


def test_backprop_input_is_thread_independent():
    rng = np.random.default_rng(14)
    f = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
    dy = rng.standard_normal((1, 10, 10, 8)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = bp_input((1, 20, 20, 4), f, dy, [1, 2, 2, 1], "SAME")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = bp_input((1, 20, 20, 4), f, dy, [1, 2, 2, 1], "SAME")
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


# --------------------------------------------------------------------------- arrays, out=, zero sizes

def test_backprop_odd_layouts_out_and_no_mutation():
    rng = np.random.default_rng(15)
    x = np.asfortranarray(rng.standard_normal((2, 7, 6, 3)))
    f = rng.standard_normal((3, 3, 3, 2))[::-1]
    dy = rng.standard_normal((2, 4, 6, 6))[:, :, ::-1]
    copies = x.copy(), f.copy(), dy.copy()
    for a in (x, dy):
        a.flags.writeable = False
    args = ([1, 2, 1, 1], "SAME", "NHWC")
    dx_out = np.empty((2, 7, 6, 3))
    assert bp_input(np.array(x.shape), f, dy, *args, out=dx_out) is dx_out
    np.testing.assert_allclose(dx_out, naive.tf_backprop_input(x.shape, f, dy, *args), rtol=1e-12, atol=1e-12)
    df_out = np.empty((3, 3, 3, 2))[:, :, :, :]
    assert bp_filter(x, (3, 3, 3, 2), dy, *args, out=df_out) is df_out
    np.testing.assert_allclose(df_out, naive.tf_backprop_filter(x, (3, 3, 3, 2), dy, *args), rtol=1e-12, atol=1e-12)
    for before, after in zip(copies, (x, f, dy)):
        np.testing.assert_array_equal(before, after)


def test_backprop_out_validation():
    f, dy = np.ones((3, 3, 2, 1)), np.ones((1, 5, 5, 2))
    with pytest.raises(ValueError, match=r"out has shape \(1, 5, 5, 3\), expected \(1, 5, 5, 2\)"):
        bp_input([1, 5, 5, 2], f, dy, [1, 1, 1, 1], "SAME", out=np.empty((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"out has dtype float32, expected float64"):
        bp_filter(np.ones((1, 5, 5, 2)), [3, 3, 2, 1], dy, [1, 1, 1, 1], "SAME", out=np.empty((3, 3, 2, 1), np.float32))
    ro = np.empty((3, 3, 2, 1))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        bp_filter(np.ones((1, 5, 5, 2)), [3, 3, 2, 1], dy, [1, 1, 1, 1], "SAME", out=ro)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_backprop_zero_batch(fmt):
    sizes = (0, 5, 6, 3) if fmt == "NHWC" else (0, 3, 5, 6)
    dy_shape = (0, 5, 6, 6) if fmt == "NHWC" else (0, 6, 5, 6)
    f = np.ones((3, 3, 3, 2), np.float32)
    dy = np.zeros(dy_shape, np.float32)
    assert bp_input(sizes, f, dy, [1, 1, 1, 1], "SAME", fmt).shape == sizes
    df = bp_filter(np.zeros(sizes, np.float32), f.shape, dy, [1, 1, 1, 1], "SAME", fmt)
    assert df.shape == (3, 3, 3, 2) and not df.any()


# --------------------------------------------------------------------------- validation

F = np.ones((3, 3, 2, 2), np.float32)
DY = np.ones((1, 5, 5, 4), np.float32)
XIN = np.ones((1, 5, 5, 2), np.float32)


@pytest.mark.parametrize("call, error, message", [
    (lambda: bp_input([1, 5, 5, 2], F, np.ones((1, 5, 4, 4), np.float32), [1, 1, 1, 1], "SAME"), ValueError,
     r"out_backprop has shape \(1, 5, 4, 4\), but the forward output for input_sizes \[1, 5, 5, 2\] and filter shape \(3, 3, 2, 2\) is \(1, 5, 5, 4\)"),
    (lambda: bp_input([1, 5, 5, 2], F, DY, [1, 2, 2, 1], "SAME"), ValueError,
     r"out_backprop has shape \(1, 5, 5, 4\), but the forward output .* is \(1, 3, 3, 4\)"),
    (lambda: bp_input([1, 5, 5, 3], F, DY, [1, 1, 1, 1], "SAME"), ValueError,
     r"filter in_channels \(filter.shape\[2\] = 2\) must equal the input_sizes channels \(3"),
    (lambda: bp_input([1, 5, 5], F, DY, [1, 1, 1, 1], "SAME"), ValueError, r"input_sizes must have length 4"),
    (lambda: bp_input([1, 5, 5.0, 2], F, DY, [1, 1, 1, 1], "SAME"), TypeError, r"input_sizes must contain integers"),
    (lambda: bp_input(np.array([1, 5, 5, 2], np.float32), F, DY, [1, 1, 1, 1], "SAME"), TypeError,
     r"input_sizes must be a 1-D integer array"),
    (lambda: bp_input(np.array([[1, 5], [5, 2]]), F, DY, [1, 1, 1, 1], "SAME"), TypeError,
     r"input_sizes must be a 1-D integer array"),
    (lambda: bp_input([1, -5, 5, 2], F, DY, [1, 1, 1, 1], "SAME"), ValueError, r"input_sizes must be non-negative"),
    (lambda: bp_input("1552", F, DY, [1, 1, 1, 1], "SAME"), TypeError, r"input_sizes must be a sequence of 4 integers"),
    (lambda: bp_input([1, 5, 5, 2], F, DY.astype(np.float64), [1, 1, 1, 1], "SAME"), TypeError,
     r"out_backprop dtype float64 must equal filter dtype float32"),
    (lambda: bp_input([1, 5, 5, 2], F, DY[0], [1, 1, 1, 1], "SAME"), ValueError,
     r"out_backprop has shape \(5, 5, 4\), but the forward output .* is \(1, 5, 5, 4\)"),
    (lambda: bp_filter(XIN, [3, 3, 2, 2], np.ones((1, 3, 3, 4), np.float32), [1, 1, 1, 1], "SAME"), ValueError,
     r"out_backprop has shape \(1, 3, 3, 4\), but the forward output for input shape \(1, 5, 5, 2\) and filter_sizes \[3, 3, 2, 2\] is \(1, 5, 5, 4\)"),
    (lambda: bp_filter(XIN, [3, 3, 2, 1], DY, [1, 1, 1, 1], "SAME"), ValueError,
     r"out_backprop has shape \(1, 5, 5, 4\), but the forward output .* is \(1, 5, 5, 2\)"),
    (lambda: bp_filter(XIN, [3, 3, 3, 2], DY, [1, 1, 1, 1], "SAME"), ValueError,
     r"filter in_channels \(filter.shape\[2\] = 3\) must equal the input channels \(2"),
    (lambda: bp_filter(XIN, [3, 0, 2, 2], DY, [1, 1, 1, 1], "SAME"), ValueError, r"filter must have no zero dimension"),
    (lambda: bp_filter(XIN, (3, 3, 2), DY, [1, 1, 1, 1], "SAME"), ValueError, r"filter_sizes must have length 4"),
    (lambda: bp_filter(XIN.astype(np.int32), [3, 3, 2, 2], DY, [1, 1, 1, 1], "SAME"), TypeError,
     r"input dtype must be one of float16, bfloat16, float32, float64"),
    (lambda: bp_filter(XIN, [3, 3, 2, 2], DY, [1, 1, 1, 1], "SAME", "NCHW"), ValueError,
     r"filter in_channels .* must equal the input channels \(5"),
    (lambda: bp_filter(XIN, [7, 3, 2, 2], DY, [1, 1, 1, 1], "VALID"), ValueError,
     r"effective filter height 7 .* exceeds the padded input height 5"),
])
def test_backprop_validation(call, error, message):
    with pytest.raises(error, match=message):
        call()
