"""Forward op on the CPU backend against the float64 reference, TF's documented examples, and
the array-handling promises (layouts, read-only inputs, out=, zero sizes, NaN)."""

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings

import naive
import nbdw
from strategies import DTYPES, conv_configs, random_array

# --------------------------------------------------------------------------- seed examples

SEED_X = np.array([[1., 2.], [3., 4.], [5., 6.]], dtype=np.float32).reshape((1, 3, 2, 1))
SEED_K = np.array([[1., 2.], [3., 4]], dtype=np.float32).reshape((2, 1, 1, 2))


def test_seed_example_valid():
    out = nbdw.depthwise_conv2d(SEED_X, SEED_K, strides=[1, 1, 1, 1], padding="VALID")
    expected = np.array([[[[10., 14.], [14., 20.]], [[18., 26.], [22., 32.]]]], dtype=np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_seed_example_explicit_padding():
    out = nbdw.depthwise_conv2d(SEED_X, SEED_K, strides=[1, 1, 1, 1], padding=[[0, 0], [1, 0], [1, 0], [0, 0]])
    expected = np.array([[[[0., 0.], [3., 4.], [6., 8.]],
                          [[0., 0.], [10., 14.], [14., 20.]],
                          [[0., 0.], [18., 26.], [22., 32.]]]], dtype=np.float32)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_seed_example_every_dtype_and_nchw(dtype):
    """Small integers are exact in every dtype, so the seed's answer holds bit for bit."""
    expected = nbdw.depthwise_conv2d(SEED_X, SEED_K, [1, 1, 1, 1], "VALID").astype(dtype)
    out = nbdw.depthwise_conv2d(SEED_X.transpose(0, 3, 1, 2).astype(dtype), SEED_K.astype(dtype),
                                [1, 1, 1, 1], "VALID", data_format="NCHW")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.transpose(0, 2, 3, 1), expected)


# --------------------------------------------------------------------------- option sweep

def _run_forward(cfg, dtype, rng):
    x = random_array(rng, cfg["input_shape"], dtype)
    f = random_array(rng, cfg["filter_shape"], dtype)
    args = (cfg["strides"], cfg["padding"], cfg["data_format"], cfg["dilations"])
    out = nbdw.depthwise_conv2d_native(x, f, *args)
    ref = naive.tf_forward(x.astype(np.float64), f.astype(np.float64), *args)
    abs_terms = naive.tf_forward(np.abs(x.astype(np.float64)), np.abs(f.astype(np.float64)), *args)
    return out, ref, abs_terms


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@settings(max_examples=500)
@given(cfg=conv_configs())
def test_forward_matches_reference(dtype, cfg):
    rng = np.random.default_rng(abs(hash(str(cfg))) % 2**32)
    out, ref, abs_terms = _run_forward(cfg, dtype, rng)
    assert out.dtype == dtype
    kh, kw = cfg["filter_shape"][:2]
    naive.assert_close(out, ref, abs_terms, dtype, terms=kh * kw)


@given(cfg=conv_configs(allow_empty_batch=False))
@settings(max_examples=100)
def test_tf2_wrapper_equals_native(cfg):
    """depthwise_conv2d takes 2-element dilations and data_format=None; same numbers as native."""
    rng = np.random.default_rng(0)
    x = random_array(rng, cfg["input_shape"], np.float32)
    f = random_array(rng, cfg["filter_shape"], np.float32)
    fmt = cfg["data_format"]
    rate = cfg["dilations"][1:3] if fmt == "NHWC" else cfg["dilations"][2:4]
    native = nbdw.depthwise_conv2d_native(x, f, cfg["strides"], cfg["padding"], fmt, cfg["dilations"])
    wrapped = nbdw.depthwise_conv2d(x, f, cfg["strides"], cfg["padding"], None if fmt == "NHWC" else fmt,
                                    dilations=rate)
    np.testing.assert_array_equal(native, wrapped)


def test_strides_with_dilations_and_unequal_strides():
    """TensorFlow's native CPU kernel refuses these; nbdw computes them."""
    rng = np.random.default_rng(1)
    x, f = rng.standard_normal((2, 13, 11, 3)), rng.standard_normal((3, 3, 3, 2))
    for strides, rate in (([1, 2, 3, 1], [2, 3]), ([1, 3, 1, 1], [1, 1]), ([1, 2, 2, 1], [2, 2])):
        out = nbdw.depthwise_conv2d(x, f, strides, "SAME", dilations=rate)
        ref = naive.tf_forward(x, f, strides, "SAME", "NHWC", [1, *rate, 1])
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_same_padding_splits_smaller_half_before():
    """Even-sized filter, SAME: total pad 1 goes after (TF's rule), visible in the output."""
    x = np.zeros((1, 4, 1, 1))
    x[0, 0, 0, 0] = 1.0
    f = np.array([1.0, 10.0]).reshape(2, 1, 1, 1)
    out = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")
    # pad_top = 0: output row 0 reads rows 0 and 1 -> 1 * x[0]
    np.testing.assert_array_equal(out[0, :, 0, 0], [1.0, 0.0, 0.0, 0.0])
    assert nbdw.spec.forward_geometry(x.shape, f.shape, [1, 1, 1, 1], "SAME").pad_bottom == 1


# --------------------------------------------------------------------------- array handling

def _reference32(x, f, strides=(1, 1, 1, 1), padding="SAME", fmt="NHWC"):
    return naive.tf_forward(np.asarray(x, np.float64), np.asarray(f, np.float64), strides, padding, fmt)


@pytest.mark.parametrize("make", [
    lambda a: a[:, ::2, 1::2, :],                 # strided view
    lambda a: a[:, ::-1, :, ::-1],                # negative strides
    lambda a: np.asfortranarray(a),               # Fortran order
    lambda a: a.transpose(0, 2, 1, 3),            # transposed view
], ids=["strided", "negative", "fortran", "transposed"])
def test_any_memory_layout(make):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((2, 10, 10, 4)).astype(np.float32)
    x = make(base)
    f = rng.standard_normal((3, 3, x.shape[3], 2)).astype(np.float32)
    out = nbdw.depthwise_conv2d(x, f[::-1, ::-1], [1, 1, 1, 1], "SAME")  # a negative-stride filter too
    ref = _reference32(x, f[::-1, ::-1])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_read_only_inputs_and_no_mutation():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 7, 3)).astype(np.float32)
    f = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    x_copy, f_copy = x.copy(), f.copy()
    x.flags.writeable = False
    f.flags.writeable = False
    out = nbdw.depthwise_conv2d(x, f, [1, 2, 1, 1], "SAME")
    np.testing.assert_allclose(out, _reference32(x, f, [1, 2, 1, 1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(f, f_copy)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_half_inputs_are_not_modified(dtype):
    rng = np.random.default_rng(4)
    x = random_array(rng, (1, 5, 5, 2), dtype)
    f = random_array(rng, (2, 2, 2, 1), dtype)
    before = x.copy(), f.copy()
    nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "VALID")
    np.testing.assert_array_equal(x.view(np.uint8), before[0].view(np.uint8))
    np.testing.assert_array_equal(f.view(np.uint8), before[1].view(np.uint8))


def test_array_likes():
    x = SEED_X.tolist()
    f = SEED_K.tolist()
    out = nbdw.depthwise_conv2d(x, f, (1, 1, 1, 1), "VALID")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, nbdw.depthwise_conv2d(SEED_X, SEED_K, [1, 1, 1, 1], "VALID"))


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_out_argument(fmt):
    rng = np.random.default_rng(5)
    shape = (2, 6, 5, 3) if fmt == "NHWC" else (2, 3, 6, 5)
    x = rng.standard_normal(shape).astype(np.float32)
    f = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    expected = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", data_format=fmt)
    out = np.full(expected.shape, np.nan, np.float32)
    result = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", data_format=fmt, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)
    # a non-contiguous out is filled too
    big = np.zeros(expected.shape[:-1] + (expected.shape[-1] * 2,), np.float32)
    view = big[..., ::2]
    assert nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", data_format=fmt, out=view) is view
    np.testing.assert_array_equal(view, expected)
    assert not big[..., 1::2].any()


def test_out_wrong_shape_dtype_or_read_only():
    x, f = np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 1), np.float32)
    with pytest.raises(ValueError, match=r"out has shape \(1, 4, 4, 3\), expected \(1, 4, 4, 2\)"):
        nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=np.empty((1, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="out has dtype float64, expected float32"):
        nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=np.empty((1, 4, 4, 2), np.float64))
    ro = np.empty((1, 4, 4, 2), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=ro)
    with pytest.raises(TypeError, match="out must be an array"):
        nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=[[0.0]])


def test_out_aliasing_the_input():
    """out may be the input itself (same shape): the result is still the convolution of the original."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 6, 6, 2))
    f = rng.standard_normal((3, 3, 2, 1))
    expected = _reference32(x, f)
    nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=x)
    np.testing.assert_allclose(x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_zero_batch_with_multiplier(fmt):
    """TensorFlow returns the wrong channel count here when M > 1; nbdw returns C * M."""
    shape = (0, 5, 6, 3) if fmt == "NHWC" else (0, 3, 5, 6)
    out = nbdw.depthwise_conv2d(np.zeros(shape, np.float32), np.ones((2, 2, 3, 4), np.float32),
                                [1, 1, 1, 1], "VALID", data_format=fmt)
    assert out.shape == ((0, 4, 5, 12) if fmt == "NHWC" else (0, 12, 4, 5))
    assert out.dtype == np.float32


def test_zero_spatial_size_same_padding():
    out = nbdw.depthwise_conv2d(np.zeros((2, 0, 5, 3)), np.ones((3, 3, 3, 2)), [1, 1, 1, 1], "SAME")
    assert out.shape == (2, 0, 5, 6)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_propagate(fmt, dtype, bad):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 7, 7, 2))
    x[0, 3, 2, 1] = bad
    f = rng.standard_normal((3, 3, 2, 2))
    ref = naive.tf_forward(x, f, [1, 1, 1, 1], "SAME")
    if fmt == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    out = nbdw.depthwise_conv2d(x.astype(dtype), f.astype(dtype), [1, 1, 1, 1], "SAME", data_format=fmt)
    out = out.astype(np.float64)
    if fmt == "NCHW":
        out = out.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(ref))
    assert np.isfinite(ref).sum() > 0 and (~np.isfinite(ref)).sum() > 0


def test_thread_count_is_honoured_and_does_not_change_forward():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 33, 17, 5)).astype(np.float32)
    f = rng.standard_normal((3, 3, 5, 2)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


def test_bfloat16_rounds_to_nearest_even():
    """Results are rounded once from the float32 accumulator, like ml_dtypes' own cast."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 8, 8, 3)).astype(ml_dtypes.bfloat16)
    f = rng.standard_normal((1, 1, 3, 1)).astype(ml_dtypes.bfloat16)
    out = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "VALID")
    expected = (x.astype(np.float32) * f.astype(np.float32)[0, 0, :, 0]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(out.view(np.int16), expected.view(np.int16))


def test_float16_rounds_to_nearest_even():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1, 8, 8, 3)).astype(np.float16)
    f = rng.standard_normal((1, 1, 3, 1)).astype(np.float16)
    out = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "VALID")
    expected = (x.astype(np.float32) * f.astype(np.float32)[0, 0, :, 0]).astype(np.float16)
    np.testing.assert_array_equal(out.view(np.uint16), expected.view(np.uint16))


# --------------------------------------------------------------------------- fused epilogue

@pytest.mark.parametrize("activation", ["linear", "relu", "relu6"])
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_bias_activation_fusion(activation, fmt, dtype):
    rng = np.random.default_rng(11)
    shape = (2, 6, 5, 3) if fmt == "NHWC" else (2, 3, 6, 5)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    f = rng.standard_normal((3, 3, 3, 2)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    got = nbdw.depthwise_conv2d_bias_activation(x, f, b, [1, 1, 1, 1], "SAME", fmt, activation=activation)
    ref = naive.tf_forward(x.astype(np.float64), f.astype(np.float64), [1, 1, 1, 1], "SAME", fmt)
    ref = ref + (b.astype(np.float64) if fmt == "NHWC" else b.astype(np.float64)[:, None, None])
    lo, hi = {"linear": (-np.inf, np.inf), "relu": (0, np.inf), "relu6": (0, 6)}[activation]
    ref = np.clip(ref, lo, hi)
    abs_terms = naive.tf_forward(np.abs(x.astype(np.float64)), np.abs(f.astype(np.float64)),
                                 [1, 1, 1, 1], "SAME", fmt) + np.abs(b.astype(np.float64)).max()
    naive.assert_close(got, ref, abs_terms, dtype, terms=10)
    if activation != "linear":
        assert got.astype(np.float64).min() >= 0


def test_bias_activation_errors():
    x, f = np.ones((1, 4, 4, 2), np.float32), np.ones((3, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\).*got \(2,\)"):
        nbdw.depthwise_conv2d_bias_activation(x, f, np.ones(2, np.float32), [1, 1, 1, 1], "SAME")
    with pytest.raises(ValueError, match="activation must be one of .*got 'gelu'"):
        nbdw.depthwise_conv2d_bias_activation(x, f, None, [1, 1, 1, 1], "SAME", activation="gelu")
