"""Geometry and validation rules shared by every backend.

This module is the single place where TensorFlow's depthwise-convolution
rules live: argument validation, the padding algorithms, output sizes and the
dtypes that may cross into a kernel. It is pure Python (no Numba), works on
shapes and dtypes only, and so serves the CPU and CUDA backends, the backprop
ops, the Keras-style layer and the Dask wrapper alike.

The small index helpers at the bottom (:func:`tap_range`, :func:`source_index`)
are plain Python functions that the backends compile for their own target
(``numba.njit`` on the CPU, ``numba.cuda.jit(device=True)`` on the GPU), so the
index arithmetic is written once.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = [
    "Geometry",
    "DATA_FORMATS",
    "SUPPORTED_DTYPES",
    "forward_geometry",
    "backprop_input_geometry",
    "backprop_filter_geometry",
    "check_dtypes",
    "check_out",
    "dilations_from_rate",
    "storage_dtype",
    "accumulator_dtype",
    "tap_range",
    "output_range",
    "FUSED_ACTIVATIONS",
    "activation_bounds",
    "epilogue",
]

DATA_FORMATS = ("NHWC", "NCHW")

bfloat16 = np.dtype(ml_dtypes.bfloat16)

#: The dtypes TensorFlow's depthwise ops accept, in order of width.
SUPPORTED_DTYPES = (np.dtype(np.float16), bfloat16, np.dtype(np.float32), np.dtype(np.float64))

# Kernels see 16-bit floats as their raw bit patterns. The two patterns get two
# different integer types so that a kernel's type signature alone selects the
# widening rule at compile time: float16 travels as uint16, bfloat16 as int16.
_STORAGE = {
    np.dtype(np.float16): np.dtype(np.uint16),
    bfloat16: np.dtype(np.int16),
}


def storage_dtype(dtype) -> np.dtype:
    """The dtype a kernel sees for arrays of ``dtype`` (a bit-pattern view for 16-bit floats)."""
    dtype = np.dtype(dtype)
    return _STORAGE.get(dtype, dtype)


def accumulator_dtype(dtype) -> np.dtype:
    """Sums run in float64 for float64 data and in float32 for everything narrower."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclass(frozen=True)
class Geometry:
    """Everything a kernel needs to know about one depthwise convolution.

    Sizes are logical (layout independent); ``data_format`` says how the 4-D
    arrays order them. Pads are the amounts of implicit zeros before and after
    each spatial axis.
    """

    data_format: str
    batch: int
    in_height: int
    in_width: int
    channels: int
    multiplier: int
    filter_height: int
    filter_width: int
    stride_h: int
    stride_w: int
    dilation_h: int
    dilation_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    out_height: int
    out_width: int

    @property
    def out_channels(self) -> int:
        return self.channels * self.multiplier

    @property
    def input_shape(self) -> tuple:
        return self._layout(self.in_height, self.in_width, self.channels)

    @property
    def output_shape(self) -> tuple:
        return self._layout(self.out_height, self.out_width, self.out_channels)

    @property
    def filter_shape(self) -> tuple:
        return (self.filter_height, self.filter_width, self.channels, self.multiplier)

    @property
    def effective_filter_height(self) -> int:
        return (self.filter_height - 1) * self.dilation_h + 1

    @property
    def effective_filter_width(self) -> int:
        return (self.filter_width - 1) * self.dilation_w + 1

    @property
    def padding(self) -> tuple:
        """Explicit padding in ``data_format`` order, as TensorFlow writes it."""
        spatial = [[self.pad_top, self.pad_bottom], [self.pad_left, self.pad_right]]
        if self.data_format == "NHWC":
            return ([0, 0], *spatial, [0, 0])
        return ([0, 0], [0, 0], *spatial)

    @property
    def macs(self) -> int:
        """Multiply-adds of the forward op (border taps included)."""
        return (self.batch * self.out_height * self.out_width * self.out_channels
                * self.filter_height * self.filter_width)

    def _layout(self, h, w, c):
        if self.data_format == "NHWC":
            return (self.batch, h, w, c)
        return (self.batch, c, h, w)


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------

def _is_int(value) -> bool:
    if type(value) is int:  # the common case, without the slower abstract-class check
        return True
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_data_format(data_format) -> str:
    if data_format is None:
        return "NHWC"
    if not isinstance(data_format, str) or data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS} or None, got {data_format!r}")
    return data_format


def _int_list(name, value, length):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a sequence of {length} integers, got {value!r}")
    values = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
    if len(values) != length:
        raise ValueError(f"{name} must have length {length}, got {value!r} (length {len(values)})")
    for v in values:
        if not _is_int(v):
            raise TypeError(f"{name} must contain integers, got {value!r} (element {v!r})")
    return [int(v) for v in values]


def _spatial_pair(name, value, data_format):
    """Validate a length-4 strides/dilations list and return its (h, w) entries."""
    values = _int_list(name, value, 4)
    if any(v < 1 for v in values):
        raise ValueError(f"{name} must be >= 1 everywhere, got {value!r}")
    batch_axis, channel_axis = (0, 3) if data_format == "NHWC" else (0, 1)
    if values[batch_axis] != 1 or values[channel_axis] != 1:
        raise ValueError(
            f"{name} must be 1 in the batch and channel dimensions for data_format "
            f"{data_format!r}, got {value!r}")
    h, w = (1, 2) if data_format == "NHWC" else (2, 3)
    return values[h], values[w]


def dilations_from_rate(dilations, data_format="NHWC"):
    """Turn ``tf.nn.depthwise_conv2d``'s length-2 ``dilations`` into the native length-4 form."""
    data_format = check_data_format(data_format)
    if dilations is None:
        return [1, 1, 1, 1]
    rate = _int_list("dilations", dilations, 2)
    if any(r < 1 for r in rate):
        raise ValueError(f"dilations must be >= 1, got {dilations!r}")
    return [1, *rate, 1] if data_format == "NHWC" else [1, 1, *rate]


def _check_shape(name, shape, what):
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be a 4-D array {what}, got shape {shape} (rank {len(shape)})")
    return tuple(int(s) for s in shape)


def _check_filter_shape(name, shape):
    shape = _check_shape(name, shape, "of shape [filter_height, filter_width, in_channels, channel_multiplier]")
    if min(shape) < 1:
        raise ValueError(f"{name} must have no zero dimension, got shape {shape}")
    return shape


def check_sizes(name, sizes):
    """Validate ``input_sizes`` / ``filter_sizes``: a length-4 integer sequence or 1-D integer array."""
    if isinstance(sizes, np.ndarray):
        if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
            raise TypeError(f"{name} must be a 1-D integer array, got {sizes.dtype} array of shape {sizes.shape}")
    values = _int_list(name, sizes, 4)
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative, got {list(values)}")
    return tuple(values)


def _padding_amounts(padding, data_format, in_hw, eff_hw, strides):
    """Return ((top, bottom), (left, right)) for a padding argument."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode == "SAME":
            pads = []
            for size, eff, stride in zip(in_hw, eff_hw, strides):
                out = -(-size // stride)
                total = max((out - 1) * stride + eff - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"padding must be 'SAME', 'VALID' or a list of four [before, after] pairs, got {padding!r}")
    try:
        pairs = np.asarray(padding, dtype=object)
    except Exception:  # ragged nesting
        pairs = None
    if pairs is None or pairs.shape != (4, 2):
        raise ValueError(
            "explicit padding must be four [before, after] pairs in data_format order, got "
            f"{padding!r}")
    if not all(_is_int(v) for v in pairs.ravel()):
        raise TypeError(f"explicit padding must contain integers, got {padding!r}")
    pairs = [[int(a), int(b)] for a, b in pairs]
    if any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"explicit padding must be non-negative, got {padding!r}")
    batch_axis, channel_axis = (0, 3) if data_format == "NHWC" else (0, 1)
    if pairs[batch_axis] != [0, 0] or pairs[channel_axis] != [0, 0]:
        raise ValueError(
            f"explicit padding must be [0, 0] for the batch and channel dimensions with "
            f"data_format {data_format!r}, got {padding!r}")
    h, w = (1, 2) if data_format == "NHWC" else (2, 3)
    return tuple(pairs[h]), tuple(pairs[w])


class _Uncacheable(Exception):
    pass


def _frozen(value):
    """``value`` as a hashable key when it is built only of ``int``, ``str``, ``None``, lists and
    tuples (what ops are usually called with); anything else (NumPy scalars or arrays, bools)
    raises :class:`_Uncacheable` and goes through the full validation."""
    kind = type(value)
    if kind is int or kind is str or value is None:
        return value
    if kind is tuple or kind is list:
        items = []
        for v in value:  # elements are mostly ints: test them here rather than by recursion
            k = type(v)
            items.append(v if k is int or k is str or v is None else _frozen(v))
        return tuple(items)
    raise _Uncacheable


@functools.lru_cache(maxsize=512)
def _make_cached(*key):
    return _make_checked(*key)


def _make(input_shape, filter_shape, strides, padding, data_format, dilations, input_name="input"):
    """The :class:`Geometry` of the arguments, memoised: a loop calling an op with the same
    arguments validates them once (about 25 us a call otherwise). Errors are never cached."""
    try:
        key = _frozen((input_shape, filter_shape, strides, padding, data_format, dilations))
    except _Uncacheable:
        return _make_checked(input_shape, filter_shape, strides, padding, data_format, dilations, input_name)
    try:
        return _make_cached(*key, input_name)
    except (TypeError, ValueError):  # raise again with the caller's own objects in the message
        return _make_checked(input_shape, filter_shape, strides, padding, data_format, dilations, input_name)


def _make_checked(input_shape, filter_shape, strides, padding, data_format, dilations, input_name="input"):
    data_format = check_data_format(data_format)
    input_shape = _check_shape(input_name, input_shape, f"in {data_format} layout")
    filter_shape = _check_filter_shape("filter", filter_shape)
    if data_format == "NHWC":
        n, h, w, c = input_shape
    else:
        n, c, h, w = input_shape
    kh, kw, fc, m = filter_shape
    if fc != c:
        raise ValueError(
            f"filter in_channels (filter.shape[2] = {fc}) must equal the {input_name} channels "
            f"({c}, from {input_name} shape {input_shape} in {data_format})")
    sh, sw = _spatial_pair("strides", strides, data_format)
    dh, dw = _spatial_pair("dilations", [1, 1, 1, 1] if dilations is None else dilations, data_format)
    eff_h, eff_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    (pt, pb), (pl, pr) = _padding_amounts(padding, data_format, (h, w), (eff_h, eff_w), (sh, sw))
    same = isinstance(padding, str) and padding.upper() == "SAME"
    out_hw = []
    for axis, size, lo, hi, eff, stride in (("height", h, pt, pb, eff_h, sh), ("width", w, pl, pr, eff_w, sw)):
        padded = size + lo + hi
        if same:  # TF: ceil(in / stride), which is 0 for an empty axis
            out_hw.append(-(-size // stride))
            continue
        if padded < eff:
            raise ValueError(
                f"the effective filter {axis} {eff} (filter size with dilation) exceeds the padded "
                f"{input_name} {axis} {padded}; expected a filter no larger than the padded input")
        out_hw.append((padded - eff) // stride + 1)
    return Geometry(data_format, n, h, w, c, m, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, *out_hw)


def forward_geometry(input_shape, filter_shape, strides, padding, data_format="NHWC", dilations=None) -> Geometry:
    """Validate the forward op's arguments and return its :class:`Geometry`.

    ``dilations`` is the native length-4 form (``None`` means no dilation).
    """
    return _make(input_shape, filter_shape, strides, padding, data_format, dilations)


def backprop_input_geometry(input_sizes, filter_shape, out_backprop_shape, strides, padding,
                            data_format="NHWC", dilations=None) -> Geometry:
    """Geometry of ``depthwise_conv2d_native_backprop_input``; checks ``out_backprop``'s shape."""
    sizes = check_sizes("input_sizes", input_sizes)
    geom = _make(sizes, filter_shape, strides, padding, data_format, dilations, input_name="input_sizes")
    _check_out_backprop(geom, out_backprop_shape, f"input_sizes {list(sizes)} and filter shape {tuple(filter_shape)}")
    return geom


def backprop_filter_geometry(input_shape, filter_sizes, out_backprop_shape, strides, padding,
                             data_format="NHWC", dilations=None) -> Geometry:
    """Geometry of ``depthwise_conv2d_native_backprop_filter``; checks ``out_backprop``'s shape."""
    sizes = check_sizes("filter_sizes", filter_sizes)
    geom = _make(input_shape, sizes, strides, padding, data_format, dilations)
    _check_out_backprop(geom, out_backprop_shape, f"input shape {tuple(input_shape)} and filter_sizes {list(sizes)}")
    return geom


def _check_out_backprop(geom, shape, source):
    shape = tuple(int(s) for s in shape)
    if shape != geom.output_shape:
        raise ValueError(
            f"out_backprop has shape {shape}, but the forward output for {source} "
            f"is {geom.output_shape} ({geom.data_format})")


def check_dtypes(**named) -> np.dtype:
    """Check that every named dtype is one supported float type and that they all agree."""
    first_name, first = None, None
    for name, dtype in named.items():
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dtype is None or dt is None or dt not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} dtype must be one of float16, bfloat16, float32, float64, got {dtype!r}")
        if first is None:
            first_name, first = name, dt
        elif dt != first:
            raise TypeError(f"{name} dtype {dt} must equal {first_name} dtype {first}")
    return first


def check_out(out_shape, out_dtype, expected_shape, expected_dtype) -> None:
    """Validate a preallocated ``out`` argument against the op's result."""
    if tuple(out_shape) != tuple(expected_shape):
        raise ValueError(f"out has shape {tuple(out_shape)}, expected {tuple(expected_shape)}")
    if np.dtype(out_dtype) != np.dtype(expected_dtype):
        raise ValueError(f"out has dtype {np.dtype(out_dtype)}, expected {np.dtype(expected_dtype)}")


# ---------------------------------------------------------------------------
# Index helpers compiled by each backend for its own target
# ---------------------------------------------------------------------------

def tap_range(o, stride, pad, dilation, taps, size):
    """Taps ``[lo, hi)`` of a filter axis that land inside the input for output position ``o``.

    Output ``o`` reads input ``o * stride - pad + k * dilation`` for tap ``k``.
    """
    start = o * stride - pad
    lo = 0
    if start < 0:
        lo = (-start + dilation - 1) // dilation
    hi = taps
    last = size - 1 - start  # the largest in-range offset k * dilation
    if last < 0:
        hi = 0
    elif last // dilation + 1 < taps:
        hi = last // dilation + 1
    if lo > hi:
        lo = hi
    return lo, hi


def output_range(k, stride, pad, dilation, outputs, size):
    """Outputs ``[lo, hi)`` for which tap ``k`` of a filter axis lands inside the input."""
    offset = k * dilation - pad  # input index of output 0
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    hi = outputs
    last = size - 1 - offset
    if last < 0:
        hi = 0
    elif last // stride + 1 < outputs:
        hi = last // stride + 1
    if lo > hi:
        lo = hi
    return lo, hi


# ---------------------------------------------------------------------------
# Fused forward epilogue (bias add and a cheap activation in the output store)
# ---------------------------------------------------------------------------

#: Activations a forward kernel can apply as it stores each output, as clamp bounds.
FUSED_ACTIVATIONS = {
    "linear": (-np.inf, np.inf),
    "relu": (0.0, np.inf),
    "relu6": (0.0, 6.0),
}


def activation_bounds(name, dtype):
    """``(lo, hi)`` clamp bounds of a fusable activation, as scalars of ``dtype``'s accumulator type."""
    if not isinstance(name, str) or name not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(FUSED_ACTIVATIONS)} to be fused, got {name!r}")
    acc = accumulator_dtype(dtype).type
    lo, hi = FUSED_ACTIVATIONS[name]
    return acc(lo), acc(hi)


def epilogue(value, bias, j, lo, hi):
    """Bias add and clamp for output channel ``j``; ``bias`` may be empty (no bias).

    Comparisons rather than ``min``/``max`` so that NaN passes through, as in TensorFlow.
    """
    if bias.shape[0] != 0:
        value += bias[j]
    if value < lo:
        value = lo
    if value > hi:
        value = hi
    return value
