"""CUDA backend: numba-cuda kernels for the three depthwise ops.

The twin of :mod:`nbdw.cpu`, with the same module interface (``unavailable_reason``,
``as_array``, ``forward``, ``backprop_input``, ``backprop_filter``). Geometry and
validation come from :mod:`nbdw.spec`; the index helpers :func:`nbdw.spec.tap_range`,
:func:`nbdw.spec.output_range` and the fused :func:`nbdw.spec.epilogue` are compiled
here with ``cuda.jit(device=True)``, so the index arithmetic is written once.

Kernel design (see ``docs/gpu.md`` for the reasoning and the bytes moved):

* Depthwise convolution is memory-bound, so every kernel reads its inputs and writes its
  result once, coalesced: NHWC kernels put consecutive threads on consecutive channels,
  NCHW kernels on consecutive pixels of one plane (consecutive width).
* Forward and backprop input are gathers (one thread computes one result element, no
  atomics). A block first stages its filter taps, widened to the accumulator type, in
  shared memory; blocks whose taps would not fit read them from global memory instead.
* Backprop filter is deterministic: stage 1 writes one partial sum per (slice of output
  rows, tap, channel) to a buffer, stage 2 adds the slices in a fixed order. No
  floating-point atomics, so the result is bitwise repeatable for a given shape and
  :data:`CONFIG`.
* float16 travels natively (``cuda_fp16``) and bfloat16 as its int16 bit pattern
  (:func:`nbdw.spec.storage_dtype`); both accumulate in float32.
* Pixel indices are int64, so tensors of more than 2**31 elements index correctly.

All launch parameters live in :class:`LaunchConfig` (module-level :data:`CONFIG`), so the
tests can force tiny blocks that exercise many blocks and many partial-sum slices under
the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading

import ml_dtypes
import numpy as np

from . import spec

try:  # the NVIDIA-maintained CUDA target; numba's built-in numba.cuda is deprecated
    import numba_cuda  # noqa: F401
except ImportError:
    cuda = None
else:
    from numba import cuda

__all__ = [
    "LaunchConfig",
    "CONFIG",
    "launch_config",
    "unavailable_reason",
    "as_array",
    "forward",
    "backprop_input",
    "backprop_filter",
]

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------
# Launch configuration: the one place for block sizes and work per thread
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and work splits of every CUDA kernel.

    The defaults aim at current NVIDIA GPUs (warps of 32, 48 KiB of shared memory per
    block, ~1000 resident blocks of 256 threads on the largest parts). Tests shrink them
    so that tiny problems still span many blocks and many partial-sum slices.

    Attributes
    ----------
    block_threads : int
        Threads per block of the forward and backprop-input kernels.
    channel_lanes : int
        NHWC: most threads of a block along the channel axis (the coalesced axis); fewer
        when there are fewer channels.
    width_lanes : int
        NCHW backprop filter: threads along the output width; a power of two (their sums
        are added by a tree).
    pixels_per_thread : int
        Forward and backprop input: result pixels one thread computes, so that a block's
        staged filter taps are reused.
    filter_tap_rows : int
        Backprop filter: most filter taps a block works on side by side (block y size).
    filter_blocks : int
        Backprop filter: the number of stage-1 blocks to aim for; the output rows
        (batch x height) are cut into as many slices as that takes, which sets the size
        of the partial-sum buffer. Depends on nothing but the shape and this value, so
        the result is the same on every device.
    filter_min_rows : int
        Backprop filter: at least this many output rows per slice.
    reduce_lanes, reduce_rows : int
        Backprop filter stage 2: a block adds the slices of ``reduce_lanes`` consecutive
        filter elements, ``reduce_rows`` threads per element (a power of two, then a tree).
    copy_threads : int
        Threads per block of the strided-copy and bias kernels.
    max_shared_bytes : int
        Filter taps are staged in shared memory only when they fit in this many bytes.
    """

    block_threads: int = 256
    channel_lanes: int = 32
    width_lanes: int = 32
    pixels_per_thread: int = 8
    filter_tap_rows: int = 8
    filter_blocks: int = 2048
    filter_min_rows: int = 2
    reduce_lanes: int = 32
    reduce_rows: int = 16
    copy_threads: int = 256
    max_shared_bytes: int = 48 * 1024

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LaunchConfig.{field.name} must be a positive integer, got {value!r}")
        for name in ("width_lanes", "reduce_rows"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {value}")
        for names in (("block_threads",), ("copy_threads",), ("channel_lanes", "filter_tap_rows"),
                      ("width_lanes", "filter_tap_rows"), ("reduce_lanes", "reduce_rows")):
            threads = math.prod(getattr(self, name) for name in names)
            if threads > 1024:
                raise ValueError(f"LaunchConfig.{' * '.join(names)} must be <= 1024 (threads per block), "
                                 f"got {threads}")


#: The launch configuration every op reads at call time.
CONFIG = LaunchConfig()


@contextlib.contextmanager
def launch_config(**changes):
    """Temporarily replace fields of :data:`CONFIG`, e.g. ``with launch_config(block_threads=8): ...``."""
    global CONFIG
    previous = CONFIG
    CONFIG = dataclasses.replace(previous, **changes)
    try:
        yield CONFIG
    finally:
        CONFIG = previous


# ---------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------

def unavailable_reason():
    """``None`` when the CUDA backend can run here, else why not (which of numba-cuda or a GPU is missing)."""
    if cuda is None:
        return ("numba-cuda is not installed; install it with `pip install 'nbdw[cuda]'` "
                "(nbdw does not use the deprecated numba.cuda built into numba)")
    if getattr(cuda, "implementation", None) != "NVIDIA":
        return ("numba-cuda is installed but `numba.cuda` resolves to numba's deprecated built-in "
                "CUDA target; reinstall numba-cuda (`pip install 'nbdw[cuda]'`)")
    if not cuda.is_available():
        error = cuda.cuda_error()
        detail = f": {' '.join(str(error).split())}" if error else ""
        return ("numba-cuda is installed, but no usable CUDA GPU or driver was found" + detail
                + " (set NUMBA_ENABLE_CUDASIM=1 before importing numba to use the CUDA simulator)")
    return None


def _simulating() -> bool:
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba-cuda releases read numba's own config
        from numba.core import config
    return bool(config.ENABLE_CUDASIM)


# ---------------------------------------------------------------------------
# Element conversions (compiled as device functions by _device())
# ---------------------------------------------------------------------------

def _widen_to_f32(value):
    return np.float32(value)


def _widen_to_f64(value):
    return np.float64(value)


def _narrow_to_f16(value):
    return np.float16(value)  # cvt.rn.f16.f32: round to nearest even


def _narrow_to_f32(value):
    return np.float32(value)


def _narrow_to_f64(value):
    return np.float64(value)


def _bf16_bits_to_f32(bits):
    """bfloat16 is the top half of a float32."""
    return _int_as_float(np.int32((np.int64(bits) & 0xFFFF) << 16))


def _f32_to_bf16_bits(value):
    """Round to nearest, ties to even, as ml_dtypes, TensorFlow and the CPU backend do; NaN stays quiet NaN."""
    value = np.float32(value)
    bits = np.int64(np.uint32(_float_as_int(value)))
    if value != value:
        return np.int16((bits >> 16) | 0x40)
    return np.int16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


# Bit reinterpretation: libdevice on the GPU; NumPy scalar views in the simulator, which
# runs kernels as Python. Everything around these two is shared by both.
def _float_as_int(value):
    return np.float32(value).view(np.int32)


def _int_as_float(value):
    return np.int32(value).view(np.float32)


if cuda is not None and not _simulating():
    from numba.cuda import libdevice

    _float_as_int = libdevice.float_as_int  # noqa: F811
    _int_as_float = libdevice.int_as_float  # noqa: F811


# dtype name -> (widen, narrow, accumulator type); widen/narrow are names in _device().
_KINDS = {
    "float16": ("widen_f32", "narrow_f16", np.float32),
    "bfloat16": ("widen_bf16", "narrow_bf16", np.float32),
    "float32": ("widen_f32", "narrow_f32", np.float32),
    "float64": ("widen_f64", "narrow_f64", np.float64),
}


def kernel_dtype(dtype) -> np.dtype:
    """The dtype a CUDA kernel sees for ``dtype`` data.

    float16 stays float16 (the CUDA target has native half conversions); bfloat16 becomes
    its int16 bit pattern, :func:`nbdw.spec.storage_dtype`.
    """
    dtype = np.dtype(dtype)
    return dtype if dtype == np.float16 else spec.storage_dtype(dtype)


def _make_window(tap_range):
    def window(o, stride, pad, dilation, taps, size):
        """spec.tap_range, with the common all-taps-inside case decided without a division."""
        start = o * stride - pad
        if start >= 0 and start + (taps - 1) * dilation < size:
            return 0, taps
        return tap_range(o, stride, pad, dilation, taps, size)

    return window


def _advance(n, row, col, step, rows, cols):
    """Move the pixel (n, row, col) of an (N, rows, cols) grid ``step`` pixels on, in row-major order.

    Replaces two divisions per pixel by additions; divides only when a row boundary is crossed.
    """
    col += step
    if col >= cols:
        q = col // cols
        col -= q * cols
        row += q
        if row >= rows:
            q = row // rows
            row -= q * rows
            n += q
    return n, row, col


def _split(p, rows, cols):
    """Pixel ``p`` of an (N, rows, cols) grid as (n, row, col)."""
    q = p // cols
    col = p - q * cols
    n = q // rows
    return n, q - n * rows, col


def _divmod_nonneg(a, b):
    """(a // b, a % b) for a >= 0, b >= 1, skipping the division when b == 1 (the common stride)."""
    if b == 1:
        return a, a - a
    q = a // b
    return q, a - q * b


@functools.lru_cache(maxsize=None)
def _device():
    """Device functions, compiled lazily so that importing this module needs no GPU."""
    device = cuda.jit(device=True)
    tap_range = device(spec.tap_range)
    return {
        "tap_range": tap_range,
        "window": device(_make_window(tap_range)),
        "output_range": device(spec.output_range),
        "epilogue": device(spec.epilogue),
        "advance": device(_advance),
        "split": device(_split),
        "divmod": device(_divmod_nonneg),
        "widen_f32": device(_widen_to_f32),
        "widen_f64": device(_widen_to_f64),
        "widen_bf16": device(_bf16_bits_to_f32),
        "narrow_f16": device(_narrow_to_f16),
        "narrow_f32": device(_narrow_to_f32),
        "narrow_f64": device(_narrow_to_f64),
        "narrow_bf16": device(_f32_to_bf16_bits),
    }


def _kind(dtype_name):
    """(widen, narrow, accumulator scalar type, accumulator numba type for shared arrays)."""
    from numba.core import types

    widen, narrow, acc_t = _KINDS[dtype_name]
    d = _device()
    return d[widen], d[narrow], acc_t, types.float64 if acc_t is np.float64 else types.float32


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
#
# Every kernel takes its tensors as flat 1-D C-contiguous arrays plus the geometry tuple
# g = (N, H, W, C, M, KH, KW, OH, OW, stride_h, stride_w, dilation_h, dilation_w, pad_top,
# pad_left) (see _dims), and walks flat int64 offsets: one add per filter tap instead of a
# 4-D index computation. Offsets that are in range by construction are indexed as unsigned
# (_u), which spares Numba's negative-index wraparound (a compare and select per access).

_u = np.uint64


@functools.lru_cache(maxsize=None)
def _forward_kernel(data_format, dtype_name, staged):
    """Forward: one thread per output element; the block's filter taps staged in shared memory
    (``staged``) or read from global memory when they do not fit."""
    widen, narrow, acc_t, acc_nb = _kind(dtype_name)
    d = _device()
    window, epilogue, advance, split = d["window"], d["epilogue"], d["advance"], d["split"]

    if data_format == "NHWC":
        @cuda.jit
        def kernel(x, w, bias, act_lo, act_hi, out, g, chunk):
            """Block: lanes over output channels x rows over output pixels; grid: (pixel chunks, channel tiles)."""
            n_, h_, w_, c_, m_, kh_, kw_, oh_, ow_, sh, sw, dh, dw, pt, pl = g
            cm = c_ * m_
            lanes = cuda.blockDim.x
            rows = cuda.blockDim.y
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            j0 = np.int64(cuda.blockIdx.y) * lanes
            j = j0 + tx
            taps = cuda.shared.array(0, acc_nb)  # [tap][lane]: this block's channels
            if staged:
                for i in range(ty * lanes + tx, kh_ * kw_ * lanes, lanes * rows):
                    t = i // lanes
                    jj = j0 + i - t * lanes
                    if jj < cm:
                        taps[i] = widen(w[_u(t * cm + jj)])
                cuda.syncthreads()
            if j < cm:
                c = j // m_
                if staged:
                    tap_w, tap_h, tap_0 = lanes, kw_ * lanes, tx
                else:
                    tap_w, tap_h, tap_0 = cm, kw_ * cm, j
                x_w = dw * c_  # x offset from one filter column to the next
                x_h = dh * w_ * c_
                first = np.int64(cuda.blockIdx.x) * chunk
                p = first + ty
                stop = min(first + chunk, np.int64(n_) * oh_ * ow_)
                n, oh, ow = split(p, oh_, ow_)
                while p < stop:
                    kh_lo, kh_hi = window(oh, sh, pt, dh, kh_, h_)
                    kw_lo, kw_hi = window(ow, sw, pl, dw, kw_, w_)
                    xo = ((n * h_ + oh * sh - pt + kh_lo * dh) * w_ + ow * sw - pl + kw_lo * dw) * c_ + c
                    to = kh_lo * tap_h + kw_lo * tap_w + tap_0
                    acc = acc_t(0)
                    for _ in range(kh_lo, kh_hi):
                        xi = xo
                        ti = to
                        for _ in range(kw_lo, kw_hi):
                            if staged:
                                acc += widen(x[_u(xi)]) * taps[_u(ti)]
                            else:
                                acc += widen(x[_u(xi)]) * widen(w[_u(ti)])
                            xi += x_w
                            ti += tap_w
                        xo += x_h
                        to += tap_h
                    out[_u(p * cm + j)] = narrow(epilogue(acc, bias, j, act_lo, act_hi))
                    p += rows
                    n, oh, ow = advance(n, oh, ow, rows, oh_, ow_)
    else:
        @cuda.jit
        def kernel(x, w, bias, act_lo, act_hi, out, g, chunk):
            """Block: threads over one output plane's pixels, row-major, so consecutive threads read
            consecutive columns; grid: (N * C*M planes, pixel chunks)."""
            n_, h_, w_, c_, m_, kh_, kw_, oh_, ow_, sh, sw, dh, dw, pt, pl = g
            cm = c_ * m_
            plane = np.int64(cuda.blockIdx.x)
            n = plane // cm
            j = plane - n * cm
            c = j // m_
            tid = cuda.threadIdx.x
            threads = cuda.blockDim.x
            taps = cuda.shared.array(0, acc_nb)  # [tap] of channel j
            if staged:
                for t in range(tid, kh_ * kw_, threads):
                    taps[t] = widen(w[_u(t * cm + j)])
                cuda.syncthreads()
                tap_w, tap_h, tap_0 = 1, kw_, 0
            else:
                tap_w, tap_h, tap_0 = cm, kw_ * cm, j
            x_plane = (n * c_ + c) * h_ * w_
            out_plane = plane * oh_ * ow_
            x_h = dh * w_
            first = np.int64(cuda.blockIdx.y) * chunk
            p = first + tid
            stop = min(first + chunk, np.int64(oh_) * ow_)
            _, oh, ow = split(p, oh_, ow_)
            while p < stop:
                kh_lo, kh_hi = window(oh, sh, pt, dh, kh_, h_)
                kw_lo, kw_hi = window(ow, sw, pl, dw, kw_, w_)
                xo = x_plane + (oh * sh - pt + kh_lo * dh) * w_ + ow * sw - pl + kw_lo * dw
                to = kh_lo * tap_h + kw_lo * tap_w + tap_0
                acc = acc_t(0)
                for _ in range(kh_lo, kh_hi):
                    xi = xo
                    ti = to
                    for _ in range(kw_lo, kw_hi):
                        if staged:
                            acc += widen(x[_u(xi)]) * taps[_u(ti)]
                        else:
                            acc += widen(x[_u(xi)]) * widen(w[_u(ti)])
                        xi += dw
                        ti += tap_w
                    xo += x_h
                    to += tap_h
                out[_u(out_plane + p)] = narrow(epilogue(acc, bias, j, act_lo, act_hi))
                p += threads
                _, oh, ow = advance(0, oh, ow, threads, oh_, ow_)

    return kernel


# Backprop input is a gather: one thread per input element sums the outputs it fed.
# Input row ih receives from output row oh through tap kh when ih + pt - kh * dh = oh * sh.
# Walking kh upwards lowers that left side by dh, so (oh, remainder) = divmod(ih + pt - kh * dh, sh)
# is updated with the precomputed divmod(dh, sh) instead of one division per tap; a tap
# contributes when the remainder is 0 and 0 <= oh < OH. Columns likewise.

@functools.lru_cache(maxsize=None)
def _backprop_input_kernel(data_format, dtype_name, staged):
    widen, narrow, acc_t, acc_nb = _kind(dtype_name)
    d = _device()
    advance, split, divmod_ = d["advance"], d["split"], d["divmod"]

    if data_format == "NHWC":
        @cuda.jit
        def kernel(dy, w, dx, g, chunk):
            """Block: lanes over input channels x rows over input pixels; grid: (pixel chunks, channel tiles)."""
            n_, h_, w_, c_, m_, kh_, kw_, oh_, ow_, sh, sw, dh, dw, pt, pl = g
            cm = c_ * m_
            lanes = cuda.blockDim.x
            rows = cuda.blockDim.y
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            c0 = np.int64(cuda.blockIdx.y) * lanes
            c = c0 + tx
            width = lanes * m_
            taps = cuda.shared.array(0, acc_nb)  # [tap][lane][q]: this block's channels
            if staged:
                for i in range(ty * lanes + tx, kh_ * kw_ * width, lanes * rows):
                    t = i // width
                    jj = c0 * m_ + i - t * width
                    if jj < cm:
                        taps[i] = widen(w[_u(t * cm + jj)])
                cuda.syncthreads()
            if c < c_:
                if staged:
                    tap_t, tap_0 = width, tx * m_
                else:
                    tap_t, tap_0 = cm, c * m_
                dhq, dhr = divmod_(dh, sh)
                dwq, dwr = divmod_(dw, sw)
                first = np.int64(cuda.blockIdx.x) * chunk
                p = first + ty
                stop = min(first + chunk, np.int64(n_) * h_ * w_)
                n, ih, iw = split(p, h_, w_)
                while p < stop:
                    acc = acc_t(0)
                    oh, rh = divmod_(ih + pt, sh)
                    ow0, rw0 = divmod_(iw + pl, sw)
                    for kh in range(kh_):
                        if oh < 0:
                            break
                        if rh == 0 and oh < oh_:
                            dy_row = (n * oh_ + oh) * ow_
                            ow = ow0
                            rw = rw0
                            for kw in range(kw_):
                                if ow < 0:
                                    break
                                if rw == 0 and ow < ow_:
                                    di = (dy_row + ow) * cm + c * m_
                                    ti = (kh * kw_ + kw) * tap_t + tap_0
                                    for q in range(m_):
                                        if staged:
                                            acc += widen(dy[_u(di + q)]) * taps[_u(ti + q)]
                                        else:
                                            acc += widen(dy[_u(di + q)]) * widen(w[_u(ti + q)])
                                ow -= dwq
                                rw -= dwr
                                if rw < 0:
                                    rw += sw
                                    ow -= 1
                        oh -= dhq
                        rh -= dhr
                        if rh < 0:
                            rh += sh
                            oh -= 1
                    dx[_u(p * c_ + c)] = narrow(acc)
                    p += rows
                    n, ih, iw = advance(n, ih, iw, rows, h_, w_)
    else:
        @cuda.jit
        def kernel(dy, w, dx, g, chunk):
            """Block: threads over one input plane's pixels; grid: (N * C planes, pixel chunks)."""
            n_, h_, w_, c_, m_, kh_, kw_, oh_, ow_, sh, sw, dh, dw, pt, pl = g
            cm = c_ * m_
            plane = np.int64(cuda.blockIdx.x)
            n = plane // c_
            c = plane - n * c_
            tid = cuda.threadIdx.x
            threads = cuda.blockDim.x
            taps = cuda.shared.array(0, acc_nb)  # [tap][q] of channel c
            if staged:
                for i in range(tid, kh_ * kw_ * m_, threads):
                    t = i // m_
                    taps[i] = widen(w[_u(t * cm + c * m_ + i - t * m_)])
                cuda.syncthreads()
                tap_t, tap_0 = m_, 0
            else:
                tap_t, tap_0 = cm, c * m_
            dhq, dhr = divmod_(dh, sh)
            dwq, dwr = divmod_(dw, sw)
            dy_planes = (n * cm + c * m_) * oh_ * ow_  # dy[n, c*M, 0, 0]
            dy_q = np.int64(oh_) * ow_  # from one multiplier plane to the next
            dx_plane = plane * h_ * w_
            first = np.int64(cuda.blockIdx.y) * chunk
            p = first + tid
            stop = min(first + chunk, np.int64(h_) * w_)
            _, ih, iw = split(p, h_, w_)
            while p < stop:
                acc = acc_t(0)
                oh, rh = divmod_(ih + pt, sh)
                ow0, rw0 = divmod_(iw + pl, sw)
                for kh in range(kh_):
                    if oh < 0:
                        break
                    if rh == 0 and oh < oh_:
                        ow = ow0
                        rw = rw0
                        for kw in range(kw_):
                            if ow < 0:
                                break
                            if rw == 0 and ow < ow_:
                                di = dy_planes + oh * ow_ + ow
                                ti = (kh * kw_ + kw) * tap_t + tap_0
                                for q in range(m_):
                                    if staged:
                                        acc += widen(dy[_u(di + q * dy_q)]) * taps[_u(ti + q)]
                                    else:
                                        acc += widen(dy[_u(di + q * dy_q)]) * widen(w[_u(ti + q)])
                            ow -= dwq
                            rw -= dwr
                            if rw < 0:
                                rw += sw
                                ow -= 1
                    oh -= dhq
                    rh -= dhr
                    if rh < 0:
                        rh += sh
                        oh -= 1
                dx[_u(dx_plane + p)] = narrow(acc)
                p += threads
                _, ih, iw = advance(0, ih, iw, threads, h_, w_)

    return kernel


# Backprop filter, stage 1: per-slice partial sums. Slice s covers output rows (batch x height)
# [s * R // S, (s + 1) * R // S); each (slice, tap, channel) sum is written by exactly one thread
# (NHWC) or one block after a fixed-order tree over its lanes (NCHW).

@functools.lru_cache(maxsize=None)
def _backprop_filter_kernel(data_format, dtype_name):
    widen, _, acc_t, acc_nb = _kind(dtype_name)
    output_range = _device()["output_range"]

    if data_format == "NHWC":
        @cuda.jit
        def kernel(x, dy, partial, g):
            """partial (S, KH*KW*C*M). Block: lanes over channels x rows over taps; grid: (slices, channel tiles)."""
            n_, h_, w_, c_, m_, kh_, kw_, oh_, ow_, sh, sw, dh, dw, pt, pl = g
            cm = c_ * m_
            slices = partial.shape[0]
            s = np.int64(cuda.blockIdx.x)
            j = np.int64(cuda.blockIdx.y) * cuda.blockDim.x + cuda.threadIdx.x
            if j < cm:
                c = j // m_
                rows = np.int64(n_) * oh_
                r0 = s * rows // slices
                r1 = (s + 1) * rows // slices
                x_w = sw * c_
                for t in range(cuda.threadIdx.y, kh_ * kw_, cuda.blockDim.y):
                    kh = t // kw_
                    kw = t - kh * kw_
                    lo, hi = output_range(kw, sw, pl, dw, ow_, w_)
                    acc = acc_t(0)
                    for r in range(r0, r1):
                        n = r // oh_
                        ih = (r - n * oh_) * sh - pt + kh * dh
                        if ih >= 0 and ih < h_:
                            xi = ((n * h_ + ih) * w_ + lo * sw + kw * dw - pl) * c_ + c
                            di = (r * ow_ + lo) * cm + j
                            for _ in range(lo, hi):
                                acc += widen(x[_u(xi)]) * widen(dy[_u(di)])
                                xi += x_w
                                di += cm
                    partial[s, t * cm + j] = acc
    else:
        @cuda.jit
        def kernel(x, dy, partial, g):
            """partial (S, KH*KW*C*M). Block: lanes over output columns x rows over taps, the lanes then
            summed by a shared-memory tree in a fixed order; grid: (C*M channels, slices)."""
            n_, h_, w_, c_, m_, kh_, kw_, oh_, ow_, sh, sw, dh, dw, pt, pl = g
            cm = c_ * m_
            taps = kh_ * kw_
            slices = partial.shape[0]
            j = np.int64(cuda.blockIdx.x)
            c = j // m_
            s = np.int64(cuda.blockIdx.y)
            lanes = cuda.blockDim.x
            tx = cuda.threadIdx.x
            ty = cuda.threadIdx.y
            red = cuda.shared.array(0, acc_nb)  # [tap row][lane]
            rows = np.int64(n_) * oh_
            r0 = s * rows // slices
            r1 = (s + 1) * rows // slices
            for t0 in range(0, taps, cuda.blockDim.y):  # the same trip count in every thread
                t = t0 + ty
                acc = acc_t(0)
                if t < taps:
                    kh = t // kw_
                    kw = t - kh * kw_
                    lo, hi = output_range(kw, sw, pl, dw, ow_, w_)
                    for r in range(r0, r1):
                        n = r // oh_
                        oh = r - n * oh_
                        ih = oh * sh - pt + kh * dh
                        if ih >= 0 and ih < h_:
                            xi = ((n * c_ + c) * h_ + ih) * w_ + (lo + tx) * sw + kw * dw - pl
                            di = ((n * cm + j) * oh_ + oh) * ow_ + lo + tx
                            for _ in range(lo + tx, hi, lanes):
                                acc += widen(x[_u(xi)]) * widen(dy[_u(di)])
                                xi += lanes * sw
                                di += lanes
                red[ty * lanes + tx] = acc
                cuda.syncthreads()
                half = lanes // 2
                while half > 0:
                    if tx < half:
                        red[ty * lanes + tx] += red[ty * lanes + tx + half]
                    cuda.syncthreads()
                    half //= 2
                if tx == 0 and t < taps:
                    partial[s, t * cm + j] = red[ty * lanes]
                cuda.syncthreads()

    return kernel


@functools.lru_cache(maxsize=None)
def _reduce_kernel(dtype_name):
    """Backprop filter, stage 2: out[i] = the sum over slices of partial[:, i], in a fixed order.

    Block: lanes over consecutive elements i x rows over slices. Row r adds slices r, r + rows, ...
    in turn, then a shared-memory tree adds the rows; one rounding to the output dtype at the end.
    """
    _, narrow, acc_t, acc_nb = _kind(dtype_name)

    @cuda.jit
    def kernel(partial, out):
        slices, size = partial.shape
        lanes = cuda.blockDim.x
        rows = cuda.blockDim.y
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        i = np.int64(cuda.blockIdx.x) * lanes + tx
        red = cuda.shared.array(0, acc_nb)  # [row][lane]
        acc = acc_t(0)
        if i < size:
            for s in range(ty, slices, rows):
                acc += partial[s, i]
        red[ty * lanes + tx] = acc
        cuda.syncthreads()
        half = rows // 2
        while half > 0:
            if ty < half:
                red[ty * lanes + tx] += red[(ty + half) * lanes + tx]
            cuda.syncthreads()
            half //= 2
        if ty == 0 and i < size:
            out[i] = narrow(red[tx])

    return kernel


# ---------------------------------------------------------------------------
# Small helper kernels: strided copies and the bias conversion
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _copy_kernel(ndim):
    if ndim == 4:
        @cuda.jit
        def kernel(src, dst):
            d0, d1, d2, d3 = dst.shape
            i = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
            step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
            total = np.int64(d0) * d1 * d2 * d3
            while i < total:
                r = i
                a3 = r % d3
                r //= d3
                a2 = r % d2
                r //= d2
                a1 = r % d1
                a0 = r // d1
                dst[a0, a1, a2, a3] = src[a0, a1, a2, a3]
                i += step
    else:
        @cuda.jit
        def kernel(src, dst):
            i = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
            step = np.int64(cuda.gridDim.x) * cuda.blockDim.x
            while i < dst.shape[0]:
                dst[i] = src[i]
                i += step
    return kernel


@functools.lru_cache(maxsize=None)
def _widen_kernel(dtype_name):
    """Bias of a supported float dtype -> accumulator dtype, on the device."""
    widen, _, _, _ = _kind(dtype_name)

    @cuda.jit
    def kernel(src, dst):
        i = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
        if i < dst.shape[0]:
            dst[i] = widen(src[i])

    return kernel


# ---------------------------------------------------------------------------
# Launch planning (pure Python: what the tests inspect)
# ---------------------------------------------------------------------------

_MAX_GRID_X = 2**31 - 1
_MAX_GRID_Y = 65535


def _ceil_div(a, b):
    return -(-a // b)


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Plan:
    """One kernel launch: grid, block, dynamic shared bytes, pixels per block (``chunk``), staging."""

    grid: tuple
    block: tuple
    shared_bytes: int = 0
    chunk: int = 0
    staged: bool = False
    slices: int = 0


def _gather_plan(layout_nhwc, pixels, planes, lanes_of, tile_values, acc_size, cfg):
    """Plan a forward / backprop-input gather.

    NHWC: ``pixels`` is N*rows*cols and ``lanes_of`` the channel count; NCHW: ``pixels`` is
    one plane's rows*cols and ``planes`` the number of planes. ``tile_values`` is the number
    of filter taps a block stages per lane (NHWC) or per block (NCHW).
    """
    if layout_nhwc:
        lanes = min(cfg.channel_lanes, _pow2_at_least(lanes_of))
        rows = max(1, cfg.block_threads // lanes)
        chunk = max(rows * cfg.pixels_per_thread, _ceil_div(pixels, _MAX_GRID_X))
        tile_bytes = tile_values * lanes * acc_size
        staged = tile_bytes <= cfg.max_shared_bytes
        return Plan(grid=(_ceil_div(pixels, chunk), _ceil_div(lanes_of, lanes)), block=(lanes, rows),
                    shared_bytes=tile_bytes if staged else 0, chunk=chunk, staged=staged)
    threads = max(1, min(cfg.block_threads, 32 * _ceil_div(pixels, 32)))  # no idle warps on small planes
    chunk = max(threads * cfg.pixels_per_thread, _ceil_div(pixels, _MAX_GRID_Y))
    tile_bytes = tile_values * acc_size
    staged = tile_bytes <= cfg.max_shared_bytes
    return Plan(grid=(planes, _ceil_div(pixels, chunk)), block=(threads,),
                shared_bytes=tile_bytes if staged else 0, chunk=chunk, staged=staged)


def forward_plan(geom, dtype, cfg=None) -> Plan:
    """Launch plan of the forward kernel for ``geom`` and ``dtype`` under ``cfg`` (default :data:`CONFIG`)."""
    cfg = cfg or CONFIG
    acc_size = spec.accumulator_dtype(dtype).itemsize
    taps = geom.filter_height * geom.filter_width
    if geom.data_format == "NHWC":
        return _gather_plan(True, geom.batch * geom.out_height * geom.out_width, 0, geom.out_channels,
                            taps, acc_size, cfg)
    return _gather_plan(False, geom.out_height * geom.out_width, geom.batch * geom.out_channels, 0,
                        taps, acc_size, cfg)


def backprop_input_plan(geom, dtype, cfg=None) -> Plan:
    """Launch plan of the backprop-input kernel."""
    cfg = cfg or CONFIG
    acc_size = spec.accumulator_dtype(dtype).itemsize
    taps = geom.filter_height * geom.filter_width * geom.multiplier
    if geom.data_format == "NHWC":
        return _gather_plan(True, geom.batch * geom.in_height * geom.in_width, 0, geom.channels,
                            taps, acc_size, cfg)
    return _gather_plan(False, geom.in_height * geom.in_width, geom.batch * geom.channels, 0,
                        taps, acc_size, cfg)


def backprop_filter_plan(geom, dtype, cfg=None) -> Plan:
    """Launch plan of backprop filter's stage 1; ``slices`` is the number of partial sums per tap and channel.

    It depends only on the shape and ``cfg``, never on the device, so the result is bitwise the
    same from run to run (and across GPU models, up to the compiler's contraction of multiply-adds).
    """
    cfg = cfg or CONFIG
    acc_size = spec.accumulator_dtype(dtype).itemsize
    taps = geom.filter_height * geom.filter_width
    tap_rows = _ceil_div(taps, _ceil_div(taps, cfg.filter_tap_rows))  # even passes: 9 taps -> 5 + 4, not 8 + 1
    cm = geom.out_channels
    rows = geom.batch * geom.out_height
    if geom.data_format == "NHWC":
        lanes = min(cfg.channel_lanes, _pow2_at_least(cm))
        tiles = _ceil_div(cm, lanes)
    else:
        lanes = min(cfg.width_lanes, _pow2_at_least(geom.out_width))
        tiles = cm
    slices = max(1, min(_ceil_div(cfg.filter_blocks, tiles), _ceil_div(rows, cfg.filter_min_rows), _MAX_GRID_Y))
    if geom.data_format == "NHWC":
        return Plan(grid=(slices, tiles), block=(lanes, tap_rows), slices=slices)
    return Plan(grid=(tiles, slices), block=(lanes, tap_rows), shared_bytes=lanes * tap_rows * acc_size,
                slices=slices)


def reduce_plan(size, slices, dtype, cfg=None) -> Plan:
    """Launch plan of backprop filter's stage 2 over ``size`` filter elements."""
    cfg = cfg or CONFIG
    rows = min(cfg.reduce_rows, _pow2_at_least(slices))
    lanes = cfg.reduce_lanes
    return Plan(grid=(_ceil_div(size, lanes),), block=(lanes, rows),
                shared_bytes=lanes * rows * spec.accumulator_dtype(dtype).itemsize)


# ---------------------------------------------------------------------------
# Host side: arrays in, arrays out
# ---------------------------------------------------------------------------

def _is_device_array(obj) -> bool:
    """Numba device arrays (real or simulated) and anything with ``__cuda_array_interface__``."""
    return bool(getattr(obj, "__cuda_ndarray__", False)) or hasattr(obj, "__cuda_array_interface__")


def _as_numba_device_array(obj):
    if getattr(obj, "__cuda_ndarray__", False):
        return obj
    return cuda.as_cuda_array(obj)  # a view: no copy


_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _copy_on_device(src, dst):
    """``dst[...] = src`` for same-shape 1-D or 4-D device arrays of any strides (bitwise)."""
    if dst.size == 0:
        return
    bits = _BITS[dst.dtype.itemsize]
    cfg = CONFIG
    blocks = max(1, min(_ceil_div(dst.size, cfg.copy_threads), 65535))
    _copy_kernel(dst.ndim)[blocks, cfg.copy_threads](src.view(bits), dst.view(bits))


def as_array(obj, name):
    """A NumPy array for host data, a C-contiguous Numba device array for GPU data.

    Objects with ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors, ...) are wrapped
    without a copy; non-contiguous ones get a contiguous device copy, so that the kernels'
    reads stay coalesced. Host data stays on the host until an op runs (see :func:`forward`).
    """
    if not _is_device_array(obj):
        return np.asarray(obj)
    array = _as_numba_device_array(obj)
    if array.is_c_contiguous() or array.ndim not in (1, 4) or array.dtype.itemsize not in _BITS:
        return array  # other ranks and dtypes are rejected by the spec checks that follow
    copy = cuda.device_array(array.shape, array.dtype)
    _copy_on_device(array, copy)
    return copy


def _flat_on_device(array, dtype):
    """``array`` (host or C-contiguous device, ``dtype`` data) as a flat device vector of kernel_dtype(dtype)."""
    kdtype = kernel_dtype(dtype)
    if isinstance(array, np.ndarray):
        array = cuda.to_device(np.ascontiguousarray(array).view(kdtype))
    elif array.dtype != kdtype:
        array = array.view(kdtype)
    return array.reshape(array.size)


def _byte_extent(array):
    """[lo, hi) device addresses an array's elements occupy."""
    iface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    lo = hi = iface["data"][0]
    for size, stride in zip(array.shape, array.strides):
        if size == 0:
            return lo, lo
        if stride > 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    return lo, hi + array.dtype.itemsize


def _overlaps(a, b) -> bool:
    (a0, a1), (b0, b1) = _byte_extent(a), _byte_extent(b)
    return a0 < b1 and b0 < a1


def _run(shape, dtype, out, host_result, inputs, launch):
    """Allocate (or reuse ``out``), call ``launch(result)`` and hand the result back.

    ``result`` is a C-contiguous device array of ``kernel_dtype(dtype)``. It is ``out`` itself when
    ``out`` is a contiguous device array that shares no memory with the device ``inputs``; otherwise
    a fresh buffer that is then copied into ``out`` (host or device, any strides). Without ``out``
    the result is a NumPy array when ``host_result`` (every input came from the host), else a device
    array.
    """
    kdtype = kernel_dtype(dtype)
    target = None
    if out is not None:
        if _is_device_array(out):
            out_device = _as_numba_device_array(out)
            if out_device.is_c_contiguous() and not any(
                    _is_device_array(a) and _overlaps(out_device, a) for a in inputs):
                target = out_device.view(kdtype)
        elif not out.flags.writeable:
            raise ValueError("out must be writeable, got a read-only array")
    result = target if target is not None else cuda.device_array(shape, kdtype)
    if result.size:
        launch(result)
    if out is None:
        if host_result:
            return result.copy_to_host().view(dtype)
        return result if kdtype == dtype else result.view(dtype)
    if target is not None:
        return out
    if _is_device_array(out):
        _copy_on_device(result, out_device.view(kdtype))
        return out
    out[...] = result.copy_to_host().view(dtype)
    return out


_SCRATCH = threading.local()


def _scratch(size, dtype):
    """A reusable device buffer of at least ``size`` elements (the partial sums of backprop filter).

    Reused from call to call, so the hot path makes no cudaMalloc. One per host thread: the calls
    of one thread go to one stream in order, so a later call's stage 1 runs only after this
    call's stage 2 has read the buffer.
    """
    dtype = np.dtype(dtype)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.size < size:
        buffer = buffers[dtype] = cuda.device_array(max(size, 2 * (0 if buffer is None else buffer.size)), dtype)
    return buffer[:size]


def _dims(geom):
    """The geometry tuple every kernel unpacks (see the Kernels section)."""
    return (geom.batch, geom.in_height, geom.in_width, geom.channels, geom.multiplier,
            geom.filter_height, geom.filter_width, geom.out_height, geom.out_width,
            geom.stride_h, geom.stride_w, geom.dilation_h, geom.dilation_w, geom.pad_top, geom.pad_left)


def _host_inputs(*arrays):
    return all(isinstance(a, np.ndarray) for a in arrays if a is not None)


def _device_bias(bias, dtype, size):
    """Bias as a device vector of the accumulator dtype (empty when there is none)."""
    acc = spec.accumulator_dtype(dtype)
    if bias is None:
        return cuda.device_array(0, acc)
    if isinstance(bias, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(bias, dtype=acc))
    if bias.dtype == acc:
        return bias
    if bias.dtype not in spec.SUPPORTED_DTYPES:
        raise TypeError(f"bias dtype must be one of float16, bfloat16, float32, float64, got {bias.dtype}")
    widened = cuda.device_array(size, acc)
    if size:
        threads = CONFIG.copy_threads
        _widen_kernel(bias.dtype.name)[_ceil_div(size, threads), threads](_flat_on_device(bias, bias.dtype), widened)
    return widened


def forward(x, f, geom, out=None, bias=None, activation="linear"):
    """Forward op on the GPU; ``bias`` (C*M,) and an activation from :data:`nbdw.spec.FUSED_ACTIVATIONS`
    are fused into the store of each output element.

    ``x``, ``f`` (and ``bias``) are what :func:`as_array` returned: NumPy arrays are copied to the
    device and, when every input was a NumPy array, the result comes back as one.
    """
    dtype = x.dtype
    plan = forward_plan(geom, dtype)
    kernel = _forward_kernel(geom.data_format, dtype.name, plan.staged)
    act_lo, act_hi = spec.activation_bounds(activation, dtype)
    host = _host_inputs(x, f, bias)

    def launch(result):
        kernel[plan.grid, plan.block, 0, plan.shared_bytes](
            _flat_on_device(x, dtype), _flat_on_device(f, dtype), _device_bias(bias, dtype, geom.out_channels),
            act_lo, act_hi, result.reshape(result.size), _dims(geom), plan.chunk)

    return _run(geom.output_shape, dtype, out, host, (x, f, bias), launch)


def backprop_input(f, dy, geom, out=None):
    """Backprop input on the GPU, in gather form (see :func:`forward` for host/device handling)."""
    dtype = dy.dtype
    plan = backprop_input_plan(geom, dtype)
    kernel = _backprop_input_kernel(geom.data_format, dtype.name, plan.staged)

    def launch(result):
        kernel[plan.grid, plan.block, 0, plan.shared_bytes](
            _flat_on_device(dy, dtype), _flat_on_device(f, dtype), result.reshape(result.size), _dims(geom), plan.chunk)

    return _run(geom.input_shape, dtype, out, _host_inputs(f, dy), (f, dy), launch)


def backprop_filter(x, dy, geom, out=None):
    """Backprop filter on the GPU, deterministic: per-slice partial sums, then a fixed-order reduction.

    Bitwise repeatable from run to run for a given shape and :data:`CONFIG` (see
    :func:`backprop_filter_plan`). Half types accumulate in float32, the reduction included.
    """
    dtype = x.dtype
    plan = backprop_filter_plan(geom, dtype)
    acc = spec.accumulator_dtype(dtype)
    stage1 = _backprop_filter_kernel(geom.data_format, dtype.name)
    stage2 = _reduce_kernel(dtype.name)
    kh, kw, cm = geom.filter_height, geom.filter_width, geom.out_channels

    def launch(result):
        size = kh * kw * cm
        partial = _scratch(plan.slices * size, acc).reshape(plan.slices, size)
        stage1[plan.grid, plan.block, 0, plan.shared_bytes](
            _flat_on_device(x, dtype), _flat_on_device(dy, dtype), partial, _dims(geom))
        plan2 = reduce_plan(size, plan.slices, dtype)
        stage2[plan2.grid, plan2.block, 0, plan2.shared_bytes](partial, result.reshape(size))

    return _run(geom.filter_shape, dtype, out, _host_inputs(x, dy), (x, dy), launch)
