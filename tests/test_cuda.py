"""The CUDA backend against the float64 reference and the CPU backend.

CI has no GPU: these tests run under Numba's CUDA simulator, in their own process,

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda.py

on tiny shapes with tiny blocks (see ``small_blocks``), so that every launch spans several blocks
and backprop filter sums several partial slices. On a machine with a GPU the same file runs on the
device; tests marked ``gpu`` (realistic shapes, foreign ``__cuda_array_interface__`` objects,
more than 2**31 elements) run only there. The unavailable-backend messages are tested everywhere.
"""

import dataclasses
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

import naive
import nbdw
from nbdw import backends
from strategies import DTYPES, conv_configs, random_array

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
try:
    backends.load("cuda")
    UNAVAILABLE = None
except (backends.BackendUnavailableError, ImportError) as error:
    UNAVAILABLE = str(error)

needs_cuda = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"{UNAVAILABLE}")
needs_real_gpu = pytest.mark.skipif(
    UNAVAILABLE is not None or SIMULATOR,
    reason=UNAVAILABLE or "needs a real GPU (the simulator is far too slow for these shapes and cannot "
                          "import __cuda_array_interface__ objects)")

if UNAVAILABLE is None:
    from numba import cuda

    from nbdw import cuda as nbcuda

BF16 = np.dtype(ml_dtypes.bfloat16)
OPS = ("forward", "backprop_input", "backprop_filter")


@pytest.fixture(autouse=True)
def small_blocks(request):
    """Tiny blocks everywhere except in real-GPU tests, so small problems span many blocks and slices."""
    if UNAVAILABLE is not None or request.node.get_closest_marker("gpu"):
        yield
        return
    with nbcuda.launch_config(block_threads=8, channel_lanes=4, width_lanes=4, pixels_per_thread=2,
                              filter_tap_rows=2, filter_blocks=24, filter_min_rows=1, reduce_lanes=4,
                              reduce_rows=2, copy_threads=8):
        yield


# --------------------------------------------------------------------------- helpers

def make_cfg(fmt, n, h, w, c, m, kh, kw, sh, sw, dh, dw, padding):
    """A configuration in the form of strategies.conv_configs; ``padding`` is a mode or ((t, b), (l, r))."""
    if not isinstance(padding, str):
        (t, b), (l, r) = padding
        padding = ([[0, 0], [t, b], [l, r], [0, 0]] if fmt == "NHWC" else [[0, 0], [0, 0], [t, b], [l, r]])
    if fmt == "NHWC":
        return dict(data_format=fmt, input_shape=(n, h, w, c), filter_shape=(kh, kw, c, m),
                    strides=[1, sh, sw, 1], dilations=[1, dh, dw, 1], padding=padding)
    return dict(data_format=fmt, input_shape=(n, c, h, w), filter_shape=(kh, kw, c, m),
                strides=[1, 1, sh, sw], dilations=[1, 1, dh, dw], padding=padding)


# Every padding kind, stride and dilation on both axes, multipliers 1-3, borders on all sides.
CASES = {
    "same-s2x1-m2": (2, 5, 4, 3, 2, 3, 2, 2, 1, 1, 1, "SAME"),
    "valid-d2x1-m1": (1, 6, 5, 2, 1, 2, 3, 1, 1, 2, 1, "VALID"),
    "explicit-s1x2-d1x2-m3": (2, 4, 6, 3, 3, 2, 2, 1, 2, 1, 2, ((1, 0), (2, 1))),
}


def _args(cfg):
    return cfg["strides"], cfg["padding"], cfg["data_format"], cfg["dilations"]


def _output_shape(cfg):
    return nbdw.spec.forward_geometry(cfg["input_shape"], cfg["filter_shape"], *_args(cfg)).output_shape


def run(op, cfg, backend, x=None, f=None, dy=None, **kw):
    """One op with ``cfg``'s geometry on ``backend``."""
    if op == "forward":
        return nbdw.depthwise_conv2d_native(x, f, *_args(cfg), backend=backend, **kw)
    if op == "backprop_input":
        return nbdw.depthwise_conv2d_native_backprop_input(cfg["input_shape"], f, dy, *_args(cfg),
                                                           backend=backend, **kw)
    return nbdw.depthwise_conv2d_native_backprop_filter(x, cfg["filter_shape"], dy, *_args(cfg),
                                                        backend=backend, **kw)


def reference(op, cfg, x, f, dy):
    """(float64 result, the same with absolute values: the scale of the rounding error, terms per sum)."""
    x, f, dy = (None if a is None else a.astype(np.float64) for a in (x, f, dy))
    kh, kw, c, m = cfg["filter_shape"]
    if op == "forward":
        fn = lambda a, b, _: naive.tf_forward(a, b, *_args(cfg))  # noqa: E731
        terms = kh * kw
    elif op == "backprop_input":
        fn = lambda _, b, d: naive.tf_backprop_input(cfg["input_shape"], b, d, *_args(cfg))  # noqa: E731
        terms = kh * kw * m
    else:
        fn = lambda a, _, d: naive.tf_backprop_filter(a, cfg["filter_shape"], d, *_args(cfg))  # noqa: E731
        terms = int(np.prod(_output_shape(cfg))) // (c * m) + 1
    absolute = (None if a is None else np.abs(a) for a in (x, f, dy))
    return fn(x, f, dy), fn(*absolute), terms


def data(cfg, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (random_array(rng, cfg["input_shape"], dtype), random_array(rng, cfg["filter_shape"], dtype),
            random_array(rng, _output_shape(cfg), dtype))


def check(op, cfg, dtype, seed=0, against_cpu=True):
    """The CUDA result against the float64 reference and against the CPU backend."""
    x, f, dy = data(cfg, dtype, seed)
    got = run(op, cfg, "cuda", x, f, dy)
    assert isinstance(got, np.ndarray), "host inputs must give a host result"
    ref, abs_terms, terms = reference(op, cfg, x, f, dy)
    assert got.dtype == dtype and got.shape == ref.shape
    naive.assert_close(got, ref, abs_terms, dtype, terms, what=f"cuda {op}")
    if against_cpu:
        # both are within the bound of the reference, so within twice the bound of each other
        naive.assert_close(got, run(op, cfg, "cpu", x, f, dy), 2 * abs_terms, dtype, terms, what=f"cuda vs cpu {op}")
    return got


# --------------------------------------------------------------------------- every option

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", OPS)
def test_every_option_matches_reference_and_cpu(op, fmt, dtype):
    for case in CASES.values():
        check(op, make_cfg(fmt, *case), dtype)


@needs_cuda
@settings(max_examples=10)
@given(cfg=conv_configs(max_batch=2, max_size=6, max_channels=3, max_multiplier=2, max_taps=3))
def test_sweep_float32(cfg):
    for op in OPS:
        check(op, cfg, np.dtype(np.float32), against_cpu=False)


@needs_cuda
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", ["forward", "backprop_input"])
def test_filter_taps_from_global_memory(op, fmt):
    """Filters too big for the shared-memory budget read their taps from global memory instead."""
    cfg = make_cfg(fmt, *CASES["explicit-s1x2-d1x2-m3"])
    geom = nbdw.spec.forward_geometry(cfg["input_shape"], cfg["filter_shape"], *_args(cfg))
    plan = nbcuda.forward_plan if op == "forward" else nbcuda.backprop_input_plan
    assert plan(geom, np.float32).staged
    with nbcuda.launch_config(max_shared_bytes=4):
        assert not plan(geom, np.float32).staged
        check(op, cfg, np.dtype(np.float32))


@needs_cuda
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_small_blocks_span_many_blocks_and_slices(fmt):
    """The test configuration really exercises multi-block grids and the multi-slice reduction."""
    cfg = make_cfg(fmt, *CASES["same-s2x1-m2"])
    geom = nbdw.spec.forward_geometry(cfg["input_shape"], cfg["filter_shape"], *_args(cfg))
    for plan in (nbcuda.forward_plan(geom, np.float32), nbcuda.backprop_input_plan(geom, np.float32)):
        assert np.prod(plan.grid) > 4 and plan.staged
    bf = nbcuda.backprop_filter_plan(geom, np.float32)
    assert bf.slices >= 3 and np.prod(bf.grid) >= 3 * 2
    reduce = nbcuda.reduce_plan(3 * 2 * 6, bf.slices, np.float32)
    assert reduce.grid[0] > 1 and reduce.block[1] > 1  # several blocks, and a tree over slice rows


# --------------------------------------------------------------------------- fused epilogue

@needs_cuda
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=lambda d: d.name)
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("activation", ["linear", "relu", "relu6"])
def test_bias_activation(activation, fmt, dtype):
    cfg = make_cfg(fmt, *CASES["same-s2x1-m2"])
    x, f, _ = data(cfg, dtype, seed=3)
    bias = (np.arange(6) - 2.5).astype(dtype)
    got = nbdw.depthwise_conv2d_bias_activation(x, f, bias, *_args(cfg), activation=activation, backend="cuda")
    lo, hi = {"linear": (-np.inf, np.inf), "relu": (0, np.inf), "relu6": (0, 6)}[activation]
    ref, abs_terms, terms = reference("forward", cfg, x, f, None)
    channel_axis = 3 if fmt == "NHWC" else 1
    shape = [1, 1, 1, 1]
    shape[channel_axis] = 6
    ref = np.clip(ref + bias.astype(np.float64).reshape(shape), lo, hi)
    naive.assert_close(got, ref, abs_terms + np.abs(bias.astype(np.float64)).reshape(shape), dtype, terms + 1)
    cpu = nbdw.depthwise_conv2d_bias_activation(x, f, bias, *_args(cfg), activation=activation, backend="cpu")
    naive.assert_close(got, cpu, 2 * (abs_terms + np.abs(bias.astype(np.float64)).reshape(shape)), dtype, terms + 1)


@needs_cuda
@pytest.mark.parametrize("bias_dtype", [np.float16, BF16, np.float32, np.float64], ids=str)
def test_device_bias_of_any_float_dtype(bias_dtype):
    """A device bias is widened to the accumulator dtype on the device (float16/bf16/float64 here)."""
    cfg = make_cfg("NHWC", *CASES["valid-d2x1-m1"])
    x, f, _ = data(cfg, np.float32, seed=4)
    bias = np.array([0.5, -2.0], dtype=bias_dtype)
    got = nbdw.depthwise_conv2d_bias_activation(x, f, cuda.to_device(bias), *_args(cfg), backend="cuda")
    expected = nbdw.depthwise_conv2d_bias_activation(x, f, bias.astype(np.float32), *_args(cfg), backend="cpu")
    np.testing.assert_allclose(got.copy_to_host(), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- determinism

@needs_cuda
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_backprop_filter_is_bitwise_repeatable(fmt):
    cfg = make_cfg(fmt, *CASES["explicit-s1x2-d1x2-m3"])
    x, _, dy = data(cfg, np.float32, seed=5)
    first = run("backprop_filter", cfg, "cuda", x, dy=dy)
    for _ in range(1 if SIMULATOR else 10):
        np.testing.assert_array_equal(run("backprop_filter", cfg, "cuda", x, dy=dy).view(np.uint32),
                                      first.view(np.uint32))
    # another slicing adds in another order: equal up to rounding, and still correct
    geom = nbdw.spec.forward_geometry(cfg["input_shape"], cfg["filter_shape"], *_args(cfg))
    with nbcuda.launch_config(filter_blocks=4):
        assert nbcuda.backprop_filter_plan(geom, np.float32).slices != nbcuda.backprop_filter_plan(
            geom, np.float32, dataclasses.replace(nbcuda.CONFIG, filter_blocks=24)).slices
        other = run("backprop_filter", cfg, "cuda", x, dy=dy)
    np.testing.assert_allclose(other, first, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 16-bit rounding

@needs_cuda
@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the simulator computes inf * 0 in NumPy
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=lambda d: d.name)
def test_half_rounding_bitwise_equal_to_cpu(dtype, fmt):
    """A 1x1 filter makes each output one exact float32 product, so the only rounding is the final
    narrowing: it must match the CPU backend (round to nearest even) bit for bit, specials included."""
    rng = np.random.default_rng(6)
    bits = rng.integers(0, 2**16, 250).astype(np.uint16)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3e38, 65504.0, 6e-8],
                        np.float32).astype(dtype).view(np.uint16)
    x = np.concatenate([bits, specials]).view(dtype).reshape(1, 13, 20, 1)
    if fmt == "NCHW":
        x = x.transpose(0, 3, 1, 2).copy()
    f = np.array([1.0, 1.0 + 2.0**-9, -0.3, 3.0], np.float32).astype(dtype).reshape(1, 1, 1, 4)
    strides = [1, 1, 1, 1]
    got = nbdw.depthwise_conv2d_native(x, f, strides, "VALID", fmt, backend="cuda")
    cpu = nbdw.depthwise_conv2d_native(x, f, strides, "VALID", fmt, backend="cpu")
    nan = np.isnan(cpu.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], cpu.view(np.uint16)[~nan])


@pytest.mark.skipif(not SIMULATOR or UNAVAILABLE is not None, reason="the Python bodies of the device "
                    "functions run as Python only under the simulator (on a GPU they use libdevice)")
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # NaN to bfloat16
def test_bfloat16_conversions_exhaustive():
    """The integer rounding shared by the simulator and the GPU, against ml_dtypes, on every bf16 value
    and on float32 values between them (ties included)."""
    every = np.arange(2**16, dtype=np.uint16).view(np.int16)
    widened = np.array([nbcuda._bf16_bits_to_f32(b) for b in every], np.float32)
    np.testing.assert_array_equal(widened.view(np.uint32), every.view(ml_dtypes.bfloat16).astype(np.float32)
                                  .view(np.uint32))
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                             (widened.view(np.uint32)[::7] + np.uint32(0x8000)).view(np.float32)])  # ties
    narrowed = np.array([nbcuda._f32_to_bf16_bits(v) for v in values], np.int16)
    expected = values.astype(ml_dtypes.bfloat16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(narrowed[~nan], expected[~nan].view(np.int16))
    assert np.isnan(narrowed[nan].view(ml_dtypes.bfloat16).astype(np.float32)).all()


# --------------------------------------------------------------------------- arrays in, arrays out

@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_device_in_device_out_with_auto_backend(op):
    cfg = make_cfg("NHWC", *CASES["same-s2x1-m2"])
    x, f, dy = data(cfg, np.float32, seed=8)
    got = run(op, cfg, "auto", *(None if a is None else cuda.to_device(a) for a in
                                 ((x, f, None) if op == "forward" else (None, f, dy) if op == "backprop_input"
                                  else (x, None, dy))))
    assert not isinstance(got, np.ndarray) and getattr(got, "__cuda_ndarray__", False)
    expected = run(op, cfg, "cpu", x, f, dy)
    np.testing.assert_allclose(got.copy_to_host(), expected, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_mixed_host_and_device_inputs_give_a_device_result():
    cfg = make_cfg("NCHW", *CASES["valid-d2x1-m1"])
    x, f, _ = data(cfg, np.float32, seed=9)
    got = run("forward", cfg, "auto", x, cuda.to_device(f))
    assert not isinstance(got, np.ndarray)
    np.testing.assert_allclose(got.copy_to_host(), run("forward", cfg, "cpu", x, f), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16, np.dtype(np.float64)], ids=lambda d: d.name)
def test_device_arrays_of_16_bit_and_double_dtypes(dtype):
    cfg = make_cfg("NHWC", *CASES["valid-d2x1-m1"])
    x, f, dy = data(cfg, dtype, seed=10)
    got = run("backprop_input", cfg, "auto", f=cuda.to_device(f), dy=cuda.to_device(dy))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.copy_to_host().view(np.uint8), run("backprop_input", cfg, "cuda", f=f, dy=dy)
                                  .view(np.uint8))


@needs_cuda
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_non_contiguous_device_arrays(fmt):
    """Sliced and transposed device arrays give the same result as the same views on the host."""
    cfg = make_cfg(fmt, *CASES["explicit-s1x2-d1x2-m3"])
    x, f, dy = data(cfg, np.float32, seed=11)
    big_x = np.zeros((x.shape[0], x.shape[1] * 2, x.shape[2] + 1, x.shape[3]), np.float32)
    big_x[:, ::2, 1:, :] = x
    x_dev = cuda.to_device(big_x)[:, ::2, 1:, :]
    f_dev = cuda.to_device(np.ascontiguousarray(f.transpose(1, 0, 2, 3))).transpose((1, 0, 2, 3))
    dy_dev = cuda.to_device(np.ascontiguousarray(dy[::-1]))[::-1]
    for a in (x_dev, f_dev, dy_dev):
        assert not a.is_c_contiguous()
    for op in OPS:
        got = run(op, cfg, "auto", x_dev, f_dev, dy_dev)
        np.testing.assert_allclose(got.copy_to_host(), run(op, cfg, "cpu", x, f, dy), rtol=1e-5, atol=1e-5,
                                   err_msg=op)


@needs_cuda
def test_out_on_the_host():
    cfg = make_cfg("NHWC", *CASES["same-s2x1-m2"])
    x, f, dy = data(cfg, np.float32, seed=12)
    expected = run("forward", cfg, "cpu", x, f)
    out = np.full(expected.shape, np.nan, np.float32)
    assert run("forward", cfg, "cuda", x, f, out=out) is out
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    strided = np.full(expected.shape[::-1], np.nan, np.float32).T  # Fortran order
    assert run("forward", cfg, "cuda", x, f, out=strided) is strided
    np.testing.assert_allclose(strided, expected, rtol=1e-6, atol=1e-6)
    frozen = np.empty_like(expected)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        run("forward", cfg, "cuda", x, f, out=frozen)


@needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_out_on_the_device(op):
    cfg = make_cfg("NCHW", *CASES["explicit-s1x2-d1x2-m3"])
    x, f, dy = data(cfg, np.float32, seed=13)
    expected = run(op, cfg, "cpu", x, f, dy)
    out = cuda.to_device(np.full(expected.shape, np.nan, np.float32))
    assert run(op, cfg, "cuda", x, f, dy, out=out) is out
    np.testing.assert_allclose(out.copy_to_host(), expected, rtol=1e-5, atol=1e-5)
    # a strided window of a bigger device array: written in place, the rest untouched
    canvas = cuda.to_device(np.full((2,) + expected.shape, -7.0, np.float32))
    window = canvas[1]
    if expected.ndim == 4:
        canvas = cuda.to_device(np.full(expected.shape[:-1] + (2 * expected.shape[-1],), -7.0, np.float32))
        window = canvas[..., ::2]
        assert not window.is_c_contiguous()
    assert run(op, cfg, "cuda", x, f, dy, out=window) is window
    host = canvas.copy_to_host()
    np.testing.assert_allclose(window.copy_to_host(), expected, rtol=1e-5, atol=1e-5)
    assert (host[..., 1::2] == -7.0).all() if expected.ndim == 4 else (host[0] == -7.0).all()


@needs_cuda
def test_out_given_only_as_a_cuda_array_interface_is_validated():
    """PyTorch-style out (no NumPy dtype): shape and dtype are read from the interface and checked."""
    class InterfaceOnly:
        __cuda_array_interface__ = {"shape": (2, 3, 4, 5), "typestr": "<f4", "data": (0, False), "version": 3}

    cfg = make_cfg("NHWC", *CASES["same-s2x1-m2"])
    x, f, _ = data(cfg, np.float32)
    with pytest.raises(ValueError, match=r"out has shape \(2, 3, 4, 5\), expected \(2, 3, 4, 6\)"):
        run("forward", cfg, "cuda", x, f, out=InterfaceOnly())


@needs_cuda
def test_out_aliasing_a_device_input():
    """In-place forward (out is the input's own buffer) reads the original input."""
    cfg = make_cfg("NHWC", 1, 5, 4, 3, 1, 3, 3, 1, 1, 1, 1, "SAME")
    x, f, _ = data(cfg, np.float32, seed=14)
    expected = run("forward", cfg, "cpu", x, f)
    x_dev = cuda.to_device(x)
    assert run("forward", cfg, "cuda", x_dev, f, out=x_dev) is x_dev
    np.testing.assert_allclose(x_dev.copy_to_host(), expected, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_empty_tensors(fmt):
    cfg = make_cfg(fmt, 0, 4, 4, 2, 2, 3, 3, 1, 1, 1, 1, "SAME")
    x, f, dy = data(cfg, np.float32)
    assert run("forward", cfg, "cuda", x, f).shape == _output_shape(cfg)
    assert run("backprop_input", cfg, "cuda", f=f, dy=dy).shape == cfg["input_shape"]
    np.testing.assert_array_equal(run("backprop_filter", cfg, "cuda", x, dy=dy), np.zeros(cfg["filter_shape"]))


@needs_cuda
def test_launch_config_is_validated():
    with pytest.raises(ValueError, match="reduce_rows must be a power of two"):
        nbcuda.LaunchConfig(reduce_rows=3)
    with pytest.raises(ValueError, match="channel_lanes \\* filter_tap_rows must be <= 1024"):
        nbcuda.LaunchConfig(channel_lanes=64, filter_tap_rows=32)
    with pytest.raises(ValueError, match="width_lanes must be a power of two"):
        nbcuda.LaunchConfig(width_lanes=6)
    with pytest.raises(ValueError, match="block_threads must be a positive integer"):
        nbcuda.LaunchConfig(block_threads=0)


# --------------------------------------------------------------------------- unavailable backend

def test_message_when_numba_cuda_is_missing(monkeypatch):
    module = pytest.importorskip("nbdw.cuda")
    monkeypatch.setattr(module, "cuda", None)
    with pytest.raises(nbdw.BackendUnavailableError, match="numba-cuda is not installed.*nbdw\\[cuda\\]"):
        nbdw.depthwise_conv2d(np.ones((1, 3, 3, 1), np.float32), np.ones((1, 1, 1, 1), np.float32),
                              [1, 1, 1, 1], "VALID", backend="cuda")
    assert "cuda" not in nbdw.available_backends()


def test_message_when_there_is_no_gpu(monkeypatch):
    module = pytest.importorskip("nbdw.cuda")
    fake = type("FakeCuda", (), {"implementation": "NVIDIA", "is_available": staticmethod(lambda: False),
                                 "cuda_error": staticmethod(lambda: "CUDA driver library cannot be found.")})
    monkeypatch.setattr(module, "cuda", fake)
    with pytest.raises(nbdw.BackendUnavailableError,
                       match="numba-cuda is installed, but no usable CUDA GPU or driver.*driver library cannot"):
        nbdw.depthwise_conv2d_native_backprop_filter(np.ones((1, 3, 3, 1)), [1, 1, 1, 1], np.ones((1, 3, 3, 1)),
                                                     [1, 1, 1, 1], "VALID", backend="cuda")


def test_import_without_numba_cuda_and_clear_error():
    """In a fresh process where numba_cuda cannot be imported: `import nbdw` works, the CPU backend
    runs, and backend="cuda" names the missing package."""
    code = (
        "import sys; sys.modules['numba_cuda'] = None\n"
        "import numpy as np, nbdw\n"
        "x = np.ones((1, 3, 3, 1), np.float32); f = np.ones((1, 1, 1, 1), np.float32)\n"
        "assert nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], 'VALID').sum() == 9\n"
        "try:\n"
        "    nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], 'VALID', backend='cuda')\n"
        "except nbdw.BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert "backend 'cuda' is unavailable: numba-cuda is not installed" in done.stdout


# --------------------------------------------------------------------------- real GPU only

@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16)], ids=lambda d: d.name)
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("shape", [(8, 56, 56, 144, 1, 3, 3, 1, 1, 1, 1, "SAME"),
                                   (8, 112, 112, 96, 1, 3, 3, 2, 2, 1, 1, "SAME"),
                                   (4, 28, 28, 240, 1, 5, 5, 1, 1, 1, 1, "SAME"),
                                   (4, 56, 56, 96, 1, 7, 7, 1, 1, 1, 1, "SAME"),
                                   (4, 28, 28, 32, 2, 3, 3, 1, 1, 2, 2, "VALID")],
                         ids=["mbv2-56x144", "mbv2-112x96-s2", "effnet-28x240-5x5", "convnext-56x96-7x7",
                              "m2-dilated"])
@pytest.mark.gpu
@needs_real_gpu
def test_realistic_shapes_default_config(shape, fmt, dtype):
    cfg = make_cfg(fmt, *shape)
    for op in OPS:
        check(op, cfg, dtype)


@pytest.mark.gpu
@needs_real_gpu
def test_foreign_cuda_array_interface_objects():
    """Objects that only expose __cuda_array_interface__ (as CuPy and PyTorch do), strided ones too."""
    class Foreign:
        def __init__(self, array):
            self._array = array
            self.__cuda_array_interface__ = array.__cuda_array_interface__

    cfg = make_cfg("NHWC", *CASES["same-s2x1-m2"])
    x, f, _ = data(cfg, np.float32, seed=15)
    big = cuda.to_device(np.concatenate([x, x], axis=2))
    strided = Foreign(big[:, :, ::2, :])
    assert strided.__cuda_array_interface__["strides"] is not None
    got = nbdw.depthwise_conv2d_native(strided, Foreign(cuda.to_device(f)), *_args(cfg))
    expected = run("forward", cfg, "cpu", np.concatenate([x, x], axis=2)[:, :, ::2, :], f)
    np.testing.assert_allclose(got.copy_to_host(), expected, rtol=1e-5, atol=1e-5)
    out = cuda.device_array(got.shape, np.float32)
    assert nbdw.depthwise_conv2d_native(strided, f, *_args(cfg), out=Foreign(out)).__cuda_array_interface__
    np.testing.assert_allclose(out.copy_to_host(), got.copy_to_host())


@pytest.mark.gpu
@needs_real_gpu
def test_torch_tensors():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    x = torch.randn(2, 8, 9, 5, device="cuda")
    f = torch.randn(3, 3, 5, 2, device="cuda")
    got = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")
    expected = nbdw.depthwise_conv2d(x.cpu().numpy(), f.cpu().numpy(), [1, 1, 1, 1], "SAME")
    np.testing.assert_allclose(got.copy_to_host(), expected, rtol=1e-5, atol=1e-5)
    out = torch.empty(2, 8, 9, 10, device="cuda")
    assert nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=out) is out
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
    # torch's own depthwise convolution agrees (NCHW input, filter as (C*M, 1, KH, KW))
    y = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), f.permute(2, 3, 0, 1).reshape(10, 1, 3, 3),
                                   padding=1, groups=5)
    np.testing.assert_allclose(y.permute(0, 2, 3, 1).cpu().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_real_gpu
def test_more_than_2_31_elements():
    """64-bit indexing: a float16 input of 2**31 + 2**20 elements; the last rows are checked on the CPU."""
    n, h, w, c = 1, 2**15 + 2**4, 2**14, 4  # 2**31 + 2**20 elements, 4 GiB
    free, _ = cuda.current_context().get_memory_info()
    if free < 3 * 2 * n * h * w * c:
        pytest.skip("not enough GPU memory")
    x = cuda.device_array((n, h, w, c), np.float16)
    tail = np.random.default_rng(16).standard_normal((n, 8, w, c)).astype(np.float16)
    x[:, h - 8:, :, :] = tail
    f = np.random.default_rng(17).standard_normal((3, 3, c, 1)).astype(np.float16)
    y = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "VALID")
    got = y[:, h - 8:, :, :].copy_to_host()  # output rows fed only by the known input rows
    expected = nbdw.depthwise_conv2d(tail, f, [1, 1, 1, 1], "VALID", backend="cpu")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)
