"""CPU backend: ``@njit(parallel=True)`` kernels for the three depthwise ops.

Every kernel works natively in its layout (no transposed copies) with the
unit-stride axis innermost: channels (times multiplier) in NHWC, width in NCHW.
Tap ranges come from :func:`nbdw.spec.tap_range` / :func:`nbdw.spec.output_range`,
so border handling is done by loop bounds and the hot loops carry no bounds
checks. Work is split over batch x rows, so a batch of one still uses every
thread; ``numba.set_num_threads`` is honoured.

16-bit floats stay 16-bit in memory: kernels receive their bit patterns
(:func:`nbdw.spec.storage_dtype`) and widen each element to float32 in
registers (:func:`widen`), then narrow results on store (:func:`narrow`). Only
the small filter is copied, into its accumulator dtype.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import spec

# Like fastmath=True but keeping NaN and Inf semantics (no nnan/ninf), so NaNs propagate.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def unavailable_reason():
    return None


# ---------------------------------------------------------------------------
# 16-bit float conversions, in registers
# ---------------------------------------------------------------------------

@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16_bits(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):  # fptrunc rounds to nearest even
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):  # bfloat16 is the top half of a float32
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_bf16_bits(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        high = builder.lshr(bits, ir.Constant(i32, 16))
        # round to nearest, ties to even, as ml_dtypes and TensorFlow do
        bias = builder.add(ir.Constant(i32, 0x7FFF), builder.and_(high, ir.Constant(i32, 1)))
        rounded = builder.lshr(builder.add(bits, bias), ir.Constant(i32, 16))
        quiet_nan = builder.or_(high, ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return types.int16(types.float32), codegen


def widen(value):
    """A stored element as its accumulator type (float32, or float64 for float64)."""


@overload(widen, jit_options={"fastmath": FASTMATH})
def _widen_impl(value):
    if value == types.uint16:
        return lambda value: _f16_bits_to_f32(value)
    if value == types.int16:
        return lambda value: _bf16_bits_to_f32(value)
    if value in (types.float32, types.float64):
        return lambda value: value
    return None


def narrow(value, array):
    """An accumulator value converted to the storage type of ``array``'s elements."""


@overload(narrow, jit_options={"fastmath": FASTMATH})
def _narrow_impl(value, array):
    dtype = array.dtype
    if dtype == types.uint16:
        return lambda value, array: _f32_to_f16_bits(np.float32(value))
    if dtype == types.int16:
        return lambda value, array: _f32_to_bf16_bits(np.float32(value))
    if dtype == types.float32:
        return lambda value, array: np.float32(value)
    if dtype == types.float64:
        return lambda value, array: np.float64(value)
    return None


tap_range = njit(cache=True)(spec.tap_range)
output_range = njit(cache=True)(spec.output_range)
epilogue = njit(cache=True, fastmath=FASTMATH)(spec.epilogue)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_nhwc(x, w, bias, act_lo, act_hi, out, sh, sw, dh, dw, pt, pl):
    """x (N, H, W, C), w (KH, KW, C*M) widened, bias (C*M,) or empty, clamp [act_lo, act_hi], out (N, OH, OW, C*M)."""
    n_, h_, w_, c_ = x.shape
    kh_, kw_, cm = w.shape
    m_ = cm // c_
    oh_, ow_ = out.shape[1], out.shape[2]
    for row in prange(n_ * oh_):
        n = row // oh_
        oh = row - n * oh_
        acc = np.empty(cm, w.dtype)
        kh_lo, kh_hi = tap_range(oh, sh, pt, dh, kh_, h_)
        for ow in range(ow_):
            kw_lo, kw_hi = tap_range(ow, sw, pl, dw, kw_, w_)
            acc[:] = 0
            for kh in range(kh_lo, kh_hi):
                ih = oh * sh - pt + kh * dh
                for kw in range(kw_lo, kw_hi):
                    iw = ow * sw - pl + kw * dw
                    if m_ == 1:
                        for c in range(c_):
                            acc[c] += widen(x[n, ih, iw, c]) * w[kh, kw, c]
                    else:
                        for c in range(c_):
                            xv = widen(x[n, ih, iw, c])
                            for q in range(m_):
                                acc[c * m_ + q] += xv * w[kh, kw, c * m_ + q]
            for j in range(cm):
                out[n, oh, ow, j] = narrow(epilogue(acc[j], bias, j, act_lo, act_hi), out)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_nchw(x, w, bias, act_lo, act_hi, out, sh, sw, dh, dw, pt, pl):
    """x (N, C, H, W), w (KH, KW, C*M) widened, bias (C*M,) or empty, clamp [act_lo, act_hi], out (N, C*M, OH, OW)."""
    n_, c_, h_, w_ = x.shape
    kh_, kw_, cm = w.shape
    m_ = cm // c_
    oh_, ow_ = out.shape[2], out.shape[3]
    for row in prange(n_ * oh_):
        n = row // oh_
        oh = row - n * oh_
        acc = np.empty(ow_, w.dtype)
        kh_lo, kh_hi = tap_range(oh, sh, pt, dh, kh_, h_)
        for j in range(cm):
            c = j // m_
            acc[:] = 0
            for kh in range(kh_lo, kh_hi):
                ih = oh * sh - pt + kh * dh
                for kw in range(kw_):
                    lo, hi = output_range(kw, sw, pl, dw, ow_, w_)
                    wv = w[kh, kw, j]
                    base = kw * dw - pl
                    for ow in range(lo, hi):
                        acc[ow] += widen(x[n, c, ih, ow * sw + base]) * wv
            for ow in range(ow_):
                out[n, j, oh, ow] = narrow(epilogue(acc[ow], bias, j, act_lo, act_hi), out)


# ---------------------------------------------------------------------------
# Backprop input (gather: each input element sums the outputs it fed)
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_input_nhwc(dy, w, dx, sh, sw, dh, dw, pt, pl):
    """dy (N, OH, OW, C*M), w (KH, KW, C*M) widened, dx (N, H, W, C)."""
    n_, h_, w_, c_ = dx.shape
    kh_, kw_, cm = w.shape
    m_ = cm // c_
    oh_, ow_ = dy.shape[1], dy.shape[2]
    for row in prange(n_ * h_):
        n = row // h_
        ih = row - n * h_
        acc = np.empty(c_, w.dtype)
        for iw in range(w_):
            acc[:] = 0
            for kh in range(kh_):
                t = ih + pt - kh * dh
                if t < 0:
                    break
                oh = t // sh
                if oh * sh != t or oh >= oh_:
                    continue
                for kw in range(kw_):
                    u = iw + pl - kw * dw
                    if u < 0:
                        break
                    ow = u // sw
                    if ow * sw != u or ow >= ow_:
                        continue
                    if m_ == 1:
                        for c in range(c_):
                            acc[c] += widen(dy[n, oh, ow, c]) * w[kh, kw, c]
                    else:
                        for c in range(c_):
                            s = acc[c]
                            for q in range(m_):
                                s += widen(dy[n, oh, ow, c * m_ + q]) * w[kh, kw, c * m_ + q]
                            acc[c] = s
            for c in range(c_):
                dx[n, ih, iw, c] = narrow(acc[c], dx)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_input_nchw(dy, w, dx, sh, sw, dh, dw, pt, pl):
    """dy (N, C*M, OH, OW), w (KH, KW, C*M) widened, dx (N, C, H, W)."""
    n_, c_, h_, w_ = dx.shape
    kh_, kw_, cm = w.shape
    m_ = cm // c_
    oh_, ow_ = dy.shape[2], dy.shape[3]
    for row in prange(n_ * h_):
        n = row // h_
        ih = row - n * h_
        acc = np.empty(w_, w.dtype)  # one input row, private to this iteration
        for c in range(c_):
            acc[:] = 0
            for kh in range(kh_):
                t = ih + pt - kh * dh
                if t < 0:
                    break
                oh = t // sh
                if oh * sh != t or oh >= oh_:
                    continue
                for q in range(m_):
                    j = c * m_ + q
                    for kw in range(kw_):
                        lo, hi = output_range(kw, sw, pl, dw, ow_, w_)
                        wv = w[kh, kw, j]
                        base = kw * dw - pl
                        for ow in range(lo, hi):
                            acc[ow * sw + base] += widen(dy[n, j, oh, ow]) * wv
            for iw in range(w_):
                dx[n, c, ih, iw] = narrow(acc[iw], dx)


# ---------------------------------------------------------------------------
# Backprop filter (per-task partial sums, reduced afterwards in a fixed order)
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_filter_nhwc(x, dy, partial, sh, sw, dh, dw, pt, pl):
    """x (N, H, W, C), dy (N, OH, OW, C*M), partial (T, KH, KW, C*M) zeroed."""
    n_, h_, w_, c_ = x.shape
    tasks, kh_, kw_, cm = partial.shape
    m_ = cm // c_
    oh_, ow_ = dy.shape[1], dy.shape[2]
    rows = n_ * oh_
    for t in prange(tasks):
        acc = partial[t]
        for row in range(t * rows // tasks, (t + 1) * rows // tasks):
            n = row // oh_
            oh = row - n * oh_
            kh_lo, kh_hi = tap_range(oh, sh, pt, dh, kh_, h_)
            for ow in range(ow_):
                kw_lo, kw_hi = tap_range(ow, sw, pl, dw, kw_, w_)
                for kh in range(kh_lo, kh_hi):
                    ih = oh * sh - pt + kh * dh
                    for kw in range(kw_lo, kw_hi):
                        iw = ow * sw - pl + kw * dw
                        if m_ == 1:
                            for c in range(c_):
                                acc[kh, kw, c] += widen(x[n, ih, iw, c]) * widen(dy[n, oh, ow, c])
                        else:
                            for c in range(c_):
                                xv = widen(x[n, ih, iw, c])
                                for q in range(m_):
                                    j = c * m_ + q
                                    acc[kh, kw, j] += xv * widen(dy[n, oh, ow, j])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_filter_nchw(x, dy, partial, sh, sw, dh, dw, pt, pl):
    """x (N, C, H, W), dy (N, C*M, OH, OW), partial (T, KH, KW, C*M) zeroed."""
    n_, c_, h_, w_ = x.shape
    tasks, kh_, kw_, cm = partial.shape
    m_ = cm // c_
    oh_, ow_ = dy.shape[2], dy.shape[3]
    rows = n_ * oh_
    for t in prange(tasks):
        acc = partial[t]
        for row in range(t * rows // tasks, (t + 1) * rows // tasks):
            n = row // oh_
            oh = row - n * oh_
            kh_lo, kh_hi = tap_range(oh, sh, pt, dh, kh_, h_)
            for j in range(cm):
                c = j // m_
                for kh in range(kh_lo, kh_hi):
                    ih = oh * sh - pt + kh * dh
                    for kw in range(kw_):
                        lo, hi = output_range(kw, sw, pl, dw, ow_, w_)
                        base = kw * dw - pl
                        s = acc[kh, kw, j]
                        for ow in range(lo, hi):
                            s += widen(x[n, c, ih, ow * sw + base]) * widen(dy[n, j, oh, ow])
                        acc[kh, kw, j] = s


_KERNELS = {
    ("forward", "NHWC"): _forward_nhwc,
    ("forward", "NCHW"): _forward_nchw,
    ("backprop_input", "NHWC"): _backprop_input_nhwc,
    ("backprop_input", "NCHW"): _backprop_input_nchw,
    ("backprop_filter", "NHWC"): _backprop_filter_nhwc,
    ("backprop_filter", "NCHW"): _backprop_filter_nchw,
}


# ---------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------

def as_array(obj, name):
    """Any array-like as a NumPy array (no copy when it already is one)."""
    if hasattr(obj, "__cuda_array_interface__"):
        raise TypeError(f"{name} is a GPU array ({type(obj).__name__}); the cpu backend takes host arrays")
    return np.asarray(obj)


def _kernel_view(array, dtype):
    """A C-contiguous array of ``dtype`` data as the kernel sees it (16-bit floats as bit patterns)."""
    return np.ascontiguousarray(array, dtype=dtype).view(spec.storage_dtype(dtype))


def _widened_filter(f, geom):
    acc = spec.accumulator_dtype(f.dtype)
    return np.ascontiguousarray(f, dtype=acc).reshape(geom.filter_height, geom.filter_width, geom.out_channels)


def _run(op, geom, dtype, out, inputs, result_shape, *operands):
    """Run ``op``'s kernel into ``out`` (or a new array) and return it.

    ``inputs`` are the caller's arrays: a direct write into ``out`` is only made when it is a
    writeable C-contiguous array that shares no memory with them.
    """
    if out is not None and not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    direct = (out is not None and out.flags.c_contiguous
              and not any(np.may_share_memory(out, a) for a in inputs))
    result = out if direct else np.empty(result_shape, dtype)
    kernel = _KERNELS[op, geom.data_format]
    kernel(*operands, result.view(spec.storage_dtype(dtype)),
           geom.stride_h, geom.stride_w, geom.dilation_h, geom.dilation_w, geom.pad_top, geom.pad_left)
    if out is not None and not direct:
        out[...] = result
        return out
    return result


def forward(x, f, geom, out=None, bias=None, activation="linear"):
    """Forward op; ``bias`` (C*M,) and an activation from :data:`nbdw.spec.FUSED_ACTIVATIONS`
    are fused into the store of each output element (one pass over the output)."""
    dtype = x.dtype
    acc = spec.accumulator_dtype(dtype)
    bias = np.zeros(0, acc) if bias is None else np.ascontiguousarray(bias, dtype=acc)
    return _run("forward", geom, dtype, out, (x, f), geom.output_shape,
                _kernel_view(x, dtype), _widened_filter(f, geom), bias, *spec.activation_bounds(activation, dtype))


def backprop_input(f, dy, geom, out=None):
    dtype = dy.dtype
    return _run("backprop_input", geom, dtype, out, (f, dy), geom.input_shape,
                _kernel_view(dy, dtype), _widened_filter(f, geom))


def backprop_filter(x, dy, geom, out=None):
    dtype = x.dtype
    if out is not None and not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    tasks = max(1, min(numba.get_num_threads(), geom.batch * geom.out_height))
    partial = np.zeros((tasks, geom.filter_height, geom.filter_width, geom.out_channels),
                       spec.accumulator_dtype(dtype))
    kernel = _KERNELS["backprop_filter", geom.data_format]
    kernel(_kernel_view(x, dtype), _kernel_view(dy, dtype), partial,
           geom.stride_h, geom.stride_w, geom.dilation_h, geom.dilation_w, geom.pad_top, geom.pad_left)
    # Fixed-order reduction over tasks, still in the accumulator dtype; one rounding at the end.
    total = partial[0]
    for t in range(1, tasks):
        total += partial[t]
    result = total.reshape(geom.filter_shape).astype(dtype)
    if out is None:
        return result
    out[...] = result
    return out
