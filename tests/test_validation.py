"""Every bad argument gets a ValueError or TypeError naming the argument, the value and what was expected."""

import subprocess
import sys

import numpy as np
import pytest

import nbdw
from nbdw import spec

X = np.ones((1, 5, 5, 2), np.float32)
F = np.ones((3, 3, 2, 1), np.float32)
S = [1, 1, 1, 1]


def conv(x=X, f=F, strides=S, padding="SAME", **kw):
    return nbdw.depthwise_conv2d_native(x, f, strides, padding, **kw)


@pytest.mark.parametrize("x, message", [
    (np.ones((5, 5, 2), np.float32), r"input must be a 4-D array .*got shape \(5, 5, 2\) \(rank 3\)"),
    (np.ones((1, 1, 5, 5, 2), np.float32), r"input must be a 4-D array .*rank 5"),
])
def test_input_rank(x, message):
    with pytest.raises(ValueError, match=message):
        conv(x=x)


def test_filter_rank():
    with pytest.raises(ValueError, match=r"filter must be a 4-D array .*got shape \(3, 3, 2\) \(rank 3\)"):
        conv(f=np.ones((3, 3, 2), np.float32))


def test_filter_channels_must_match():
    with pytest.raises(ValueError, match=r"filter in_channels \(filter.shape\[2\] = 3\) must equal the input channels \(2"):
        conv(f=np.ones((3, 3, 3, 1), np.float32))
    with pytest.raises(ValueError, match=r"filter in_channels .* = 2\) must equal the input channels \(5.*NCHW"):
        conv(data_format="NCHW")  # X read as NCHW has 5 channels


@pytest.mark.parametrize("shape", [(0, 3, 2, 1), (3, 0, 2, 1), (3, 3, 2, 0)])
def test_filter_with_zero_dimension(shape):
    x = X if shape[2] == 2 else np.ones((1, 5, 5, 0), np.float32)
    with pytest.raises(ValueError, match=r"filter must have no zero dimension, got shape"):
        conv(x=x, f=np.ones(shape, np.float32))


@pytest.mark.parametrize("name", ["strides", "dilations"])
@pytest.mark.parametrize("value, error, message", [
    ([1, 1, 1], ValueError, r"must have length 4, got \[1, 1, 1\] \(length 3\)"),
    ([1, 1, 1, 1, 1], ValueError, r"must have length 4"),
    ([1, 1.5, 1, 1], TypeError, r"must contain integers, got \[1, 1.5, 1, 1\] \(element 1.5\)"),
    ([1, True, 1, 1], TypeError, r"must contain integers"),
    ([1, 0, 1, 1], ValueError, r"must be >= 1 everywhere, got \[1, 0, 1, 1\]"),
    ([1, -2, 1, 1], ValueError, r"must be >= 1 everywhere"),
    ([2, 1, 1, 1], ValueError, r"must be 1 in the batch and channel dimensions for data_format 'NHWC', got \[2, 1, 1, 1\]"),
    ([1, 1, 1, 2], ValueError, r"must be 1 in the batch and channel dimensions"),
    ("1111", TypeError, r"must be a sequence of 4 integers, got '1111'"),
    (2, TypeError, r"must be a sequence of 4 integers, got 2"),
    (None, TypeError, r"must be a sequence of 4 integers, got None"),
])
def test_strides_and_dilations(name, value, error, message):
    if name == "dilations" and value is None:
        np.testing.assert_array_equal(conv(dilations=None), conv())  # None means no dilation
        return
    with pytest.raises(error, match=f"{name} " + message):
        conv(**{name: value}) if name == "dilations" else conv(strides=value)


def test_nchw_batch_and_channel_entries():
    x = np.ones((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"strides must be 1 in the batch and channel dimensions for data_format 'NCHW', got \[1, 2, 1, 1\]"):
        conv(x=x, strides=[1, 2, 1, 1], data_format="NCHW")
    assert conv(x=x, strides=[1, 1, 2, 1], data_format="NCHW").shape == (1, 2, 3, 5)


def test_tf2_dilations_length_two():
    with pytest.raises(ValueError, match=r"dilations must have length 2, got \[1, 1, 1, 1\]"):
        nbdw.depthwise_conv2d(X, F, S, "SAME", dilations=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"dilations must be >= 1, got \[0, 1\]"):
        nbdw.depthwise_conv2d(X, F, S, "SAME", dilations=[0, 1])
    with pytest.raises(TypeError, match=r"dilations must contain integers"):
        nbdw.depthwise_conv2d(X, F, S, "SAME", dilations=[1.0, 1])


@pytest.mark.parametrize("padding, error, message", [
    ("FULL", ValueError, r"padding must be 'SAME', 'VALID' or a list of four \[before, after\] pairs, got 'FULL'"),
    ("", ValueError, r"padding must be 'SAME', 'VALID'"),
    (None, ValueError, r"explicit padding must be four \[before, after\] pairs in data_format order, got None"),
    ([[0, 0], [1, 1], [1, 1]], ValueError, r"explicit padding must be four \[before, after\] pairs"),
    ([[0, 0], [1, 1, 1], [1, 1], [0, 0]], ValueError, r"explicit padding must be four"),
    ([0, 0, 1, 1, 1, 1, 0, 0], ValueError, r"explicit padding must be four"),
    ([[0, 0], [1, -1], [1, 1], [0, 0]], ValueError, r"explicit padding must be non-negative, got \[\[0, 0\], \[1, -1\]"),
    ([[0, 0], [1.5, 1], [1, 1], [0, 0]], TypeError, r"explicit padding must contain integers"),
    ([[1, 0], [1, 1], [1, 1], [0, 0]], ValueError, r"explicit padding must be \[0, 0\] for the batch and channel dimensions with data_format 'NHWC'"),
    ([[0, 0], [1, 1], [1, 1], [0, 2]], ValueError, r"must be \[0, 0\] for the batch and channel"),
])
def test_padding(padding, error, message):
    with pytest.raises(error, match=message):
        conv(padding=padding)


def test_padding_is_case_insensitive_and_accepts_arrays():
    np.testing.assert_array_equal(conv(padding="same"), conv(padding="SAME"))
    np.testing.assert_array_equal(conv(padding=np.array([[0, 0], [1, 1], [1, 1], [0, 0]])), conv(padding="SAME"))


@pytest.mark.parametrize("fmt", ["nhwc", "NHCW", "channels_last", 4])
def test_data_format(fmt):
    with pytest.raises(ValueError, match=r"data_format must be one of \('NHWC', 'NCHW'\) or None, got " + repr(fmt)):
        conv(data_format=fmt)
    with pytest.raises(ValueError, match=r"data_format must be one of"):
        nbdw.depthwise_conv2d(X, F, S, "SAME", data_format=fmt)


@pytest.mark.parametrize("value", [
    np.ones((1, 5, 5, 2), np.int32), np.ones((1, 5, 5, 2), np.int64), np.ones((1, 5, 5, 2), bool),
    np.ones((1, 5, 5, 2), np.complex64), np.ones((1, 5, 5, 2), object), np.full((1, 5, 5, 2), "a"),
    [[[[None]]]], None,
], ids=["int32", "int64", "bool", "complex", "object", "str", "None-list", "None"])
def test_non_floating_dtypes(value):
    with pytest.raises(TypeError, match=r"input dtype must be one of float16, bfloat16, float32, float64, got"):
        conv(x=value)
    with pytest.raises(TypeError, match=r"filter dtype must be one of float16, bfloat16, float32, float64"):
        conv(f=np.ones((3, 3, 2, 1), np.int32))


def test_dtypes_must_agree():
    with pytest.raises(TypeError, match=r"filter dtype float64 must equal input dtype float32"):
        conv(f=F.astype(np.float64))


@pytest.mark.parametrize("padding, message", [
    ("VALID", r"effective filter height 7 \(filter size with dilation\) exceeds the padded input height 5"),
    ([[0, 0], [0, 1], [0, 0], [0, 0]], r"effective filter height 7 .* padded input height 6"),
])
def test_filter_larger_than_padded_input(padding, message):
    with pytest.raises(ValueError, match=message):
        conv(f=np.ones((4, 3, 2, 1), np.float32), dilations=[1, 2, 1, 1], padding=padding)
    with pytest.raises(ValueError, match=r"effective filter width 6 .* padded input width 5"):
        conv(f=np.ones((1, 6, 2, 1), np.float32), padding="VALID")


def test_same_padding_allows_a_filter_larger_than_the_input():
    out = conv(f=np.ones((7, 7, 2, 1), np.float32), padding="SAME")
    assert out.shape == (1, 5, 5, 2)
    assert out[0, 2, 2, 0] == 25.0


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['cpu', 'cuda'\], got 'tpu'"):
        conv(backend="tpu")


def test_cpu_backend_refuses_device_arrays():
    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (1, 5, 5, 2), "typestr": "<f4", "data": (0, False), "version": 3}
        shape, dtype = (1, 5, 5, 2), np.dtype(np.float32)

    with pytest.raises(TypeError, match="input is a GPU array .*the cpu backend takes host arrays"):
        conv(x=FakeDeviceArray(), backend="cpu")


def test_auto_selects_cuda_for_device_arrays(monkeypatch):
    from nbdw import backends

    class FakeDeviceArray:
        __cuda_array_interface__ = {}

    assert backends.select("auto", X, F) == "cpu"
    assert backends.select("auto", FakeDeviceArray(), F) == "cuda"
    assert backends.select("cpu", FakeDeviceArray()) == "cpu"
    assert "cpu" in nbdw.available_backends()


def test_import_compiles_nothing():
    """import nbdw must not import Numba at all (kernels load with their backend on first use)."""
    code = "import sys, nbdw; print('numba' in sys.modules, 'nbdw.cpu' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_geometry_is_frozen():
    geom = spec.forward_geometry(X.shape, F.shape, S, "SAME")
    with pytest.raises(Exception):
        geom.pad_top = 3


def test_backend_availability_is_asked_on_every_call(monkeypatch):
    """``backends.load`` imports a backend's module once (an op looks its backend up on every
    call) but asks it whether it can run every time, and says why when it cannot."""
    import types

    from nbdw import backends
    fake = types.ModuleType("nbdw_fake_backend")
    fake.unavailable_reason = lambda: "no device here"
    monkeypatch.setitem(sys.modules, "nbdw_fake_backend", fake)
    monkeypatch.setitem(backends.BACKENDS, "fake", "nbdw_fake_backend")
    monkeypatch.setattr(backends, "_IMPORTED", {})
    with pytest.raises(backends.BackendUnavailableError, match="backend 'fake' is unavailable: no device here"):
        backends.load("fake")
    fake.unavailable_reason = lambda: None  # the device appeared
    assert backends.load("fake") is fake
    fake.unavailable_reason = lambda: "gone"  # and went away again
    with pytest.raises(backends.BackendUnavailableError, match="unavailable: gone"):
        backends.load("fake")
    assert backends._IMPORTED == {"nbdw_fake_backend": fake}
