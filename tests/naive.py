"""Slow, obviously correct float64 references, written from TensorFlow's documented formula.

Independent of nbdw on purpose: the padding rules and output sizes are derived here again
from the documentation, so a mistake in ``nbdw.spec`` cannot hide in both places.

    output[b, i, j, k * M + q] = sum_{di, dj} filter[di, dj, k, q] *
        padded_input[b, strides_h * i + rate_h * di, strides_w * j + rate_w * dj, k]

All functions take and return NHWC/HWCM arrays in float64; ``to_nhwc``/``from_nhwc``
convert layouts for NCHW callers.
"""

import ml_dtypes
import numpy as np


def same_pads(size, k, stride, rate):
    """TensorFlow's SAME padding for one axis: (before, after)."""
    eff = (k - 1) * rate + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def resolve_pads(padding, in_hw, k_hw, strides_hw, rates_hw, data_format="NHWC"):
    """((top, bottom), (left, right)) for "SAME", "VALID" or four explicit pairs."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return (0, 0), (0, 0)
        return tuple(same_pads(*a) for a in zip(in_hw, k_hw, strides_hw, rates_hw))
    pairs = [tuple(p) for p in padding]
    return (pairs[1], pairs[2]) if data_format == "NHWC" else (pairs[2], pairs[3])


def to_nhwc(a, data_format):
    a = np.asarray(a, dtype=np.float64)
    return a if data_format == "NHWC" else a.transpose(0, 2, 3, 1)


def from_nhwc(a, data_format):
    return a if data_format == "NHWC" else a.transpose(0, 3, 1, 2)


def _windows(shape_hw, k_hw, strides_hw, rates_hw, pads):
    """Output size and, per tap (di, dj), the slices of the padded input it reads."""
    (kh, kw), (sh, sw), (rh, rw) = k_hw, strides_hw, rates_hw
    hp = shape_hw[0] + pads[0][0] + pads[0][1]
    wp = shape_hw[1] + pads[1][0] + pads[1][1]
    oh = (hp - ((kh - 1) * rh + 1)) // sh + 1
    ow = (wp - ((kw - 1) * rw + 1)) // sw + 1
    taps = {}
    for di in range(kh):
        for dj in range(kw):
            taps[di, dj] = (slice(di * rh, di * rh + (oh - 1) * sh + 1, sh),
                            slice(dj * rw, dj * rw + (ow - 1) * sw + 1, sw))
    return oh, ow, taps


def _pad(x, pads):
    return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def forward(x, f, strides_hw, rates_hw, pads):
    """x (N, H, W, C), f (KH, KW, C, M) -> (N, OH, OW, C*M), all float64."""
    x = np.asarray(x, np.float64)
    f = np.asarray(f, np.float64)
    n, h, w, c = x.shape
    kh, kw, _, m = f.shape
    oh, ow, taps = _windows((h, w), (kh, kw), strides_hw, rates_hw, pads)
    xp = _pad(x, pads)
    out = np.zeros((n, oh, ow, c, m))
    for (di, dj), (rows, cols) in taps.items():
        out += xp[:, rows, cols, :, None] * f[di, dj]
    return out.reshape(n, oh, ow, c * m)


def backprop_input(input_shape, f, dy, strides_hw, rates_hw, pads):
    """Adjoint of :func:`forward` in x: scatter each output gradient back through its taps."""
    f = np.asarray(f, np.float64)
    n, h, w, c = input_shape
    kh, kw, _, m = f.shape
    oh, ow, taps = _windows((h, w), (kh, kw), strides_hw, rates_hw, pads)
    dy = np.asarray(dy, np.float64).reshape(n, oh, ow, c, m)
    dxp = np.zeros((n, h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1], c))
    for (di, dj), (rows, cols) in taps.items():
        dxp[:, rows, cols, :] += (dy * f[di, dj]).sum(axis=-1)
    return dxp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w, :]


def backprop_filter(x, filter_shape, dy, strides_hw, rates_hw, pads):
    """Adjoint of :func:`forward` in f: correlate the input windows with the output gradient."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    kh, kw, _, m = filter_shape
    oh, ow, taps = _windows((h, w), (kh, kw), strides_hw, rates_hw, pads)
    dy = np.asarray(dy, np.float64).reshape(n, oh, ow, c, m)
    xp = _pad(x, pads)
    df = np.zeros((kh, kw, c, m))
    for (di, dj), (rows, cols) in taps.items():
        df[di, dj] = np.einsum("nhwc,nhwcm->cm", xp[:, rows, cols, :], dy)
    return df


# TensorFlow-style entry points: 4-element strides/dilations in data_format order.

def _hw(values, data_format):
    values = list(values)
    return (values[1], values[2]) if data_format == "NHWC" else (values[2], values[3])


def _setup(input_shape_nhwc, filter_shape, strides, padding, data_format, dilations):
    strides_hw, rates_hw = _hw(strides, data_format), _hw(dilations, data_format)
    pads = resolve_pads(padding, input_shape_nhwc[1:3], filter_shape[:2], strides_hw, rates_hw, data_format)
    return strides_hw, rates_hw, pads


def tf_forward(x, f, strides, padding, data_format="NHWC", dilations=(1, 1, 1, 1)):
    xn = to_nhwc(x, data_format)
    args = _setup(xn.shape, np.shape(f), strides, padding, data_format, dilations)
    return from_nhwc(forward(xn, f, *args), data_format)


def tf_backprop_input(input_sizes, f, dy, strides, padding, data_format="NHWC", dilations=(1, 1, 1, 1)):
    n, a, b, c = input_sizes
    shape = (n, a, b, c) if data_format == "NHWC" else (n, b, c, a)
    args = _setup(shape, np.shape(f), strides, padding, data_format, dilations)
    return from_nhwc(backprop_input(shape, f, to_nhwc(dy, data_format), *args), data_format)


def tf_backprop_filter(x, filter_sizes, dy, strides, padding, data_format="NHWC", dilations=(1, 1, 1, 1)):
    xn = to_nhwc(x, data_format)
    args = _setup(xn.shape, filter_sizes, strides, padding, data_format, dilations)
    return backprop_filter(xn, filter_sizes, to_nhwc(dy, data_format), *args)


# Tolerances: inputs are exact in their dtype, so the error of an element is at most the
# accumulation error (terms * unit roundoff of the accumulator) plus one rounding of the result,
# both relative to the sum of absolute terms (the reference applied to |x|, |f|).

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}


def assert_close(actual, expected, abs_terms, dtype, terms, what="result"):
    """Assert ``|actual - expected| <= 2 * (u_out + terms * u_acc) * abs_terms`` elementwise."""
    name = np.dtype(dtype).name
    u_out = UNIT_ROUNDOFF[name]
    u_acc = UNIT_ROUNDOFF["float64" if name == "float64" else "float32"]
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # plus the absolute spacing of subnormals, where relative precision runs out
    tiny = float(ml_dtypes.finfo(np.dtype(dtype)).smallest_subnormal)
    bound = 2 * (u_out + terms * u_acc) * np.asarray(abs_terms, np.float64) + tiny
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what} ({name}): {bad.sum()} of {bad.size} elements off; first at {i}: "
            f"got {actual[i]!r}, expected {expected[i]!r}, bound {bound[i]!r}")
