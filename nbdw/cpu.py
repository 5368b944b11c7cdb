"""CPU backend: ``@njit(parallel=True)`` kernels for the three depthwise ops.

Every kernel works natively in its layout (no transposed copies of a tensor) and splits its work
over batch x rows, so a batch of one still uses every thread; ``numba.set_num_threads`` is
honoured. Small NCHW planes (a tile within :data:`NCHW_TILE_BYTES`, or
:data:`NCHW_FILTER_TILE_BYTES` for backprop filter; column stride 1) are the exception
inside a task: one vector of planes at a time is transposed into a (pixel, channel)
tile in cache and computed as NHWC (:func:`_forward_nchw_tiled`,
:func:`_backprop_filter_nchw_tiled`; backprop input without strides or a multiplier is the
former on dy), since a 7- or 14-wide row leaves a vector along the width mostly overhead.

How the kernels are fast (issue 7)
----------------------------------
Depthwise convolution does about two flops per byte it must move, so the kernels aim at the
speed of memory. Each task works through its rows in three steps:

1. **Stage.** The input rows a row of output needs are copied, widened to the accumulator dtype
   (16-bit floats stay 16-bit in memory and are widened in registers on the way), into a small
   per-task buffer that stays in cache. The copy carries the zero padding (so border pixels need
   no bounds checks), splits columns by stride phase (so strided taps become unit-stride reads),
   expands channels for a multiplier > 1 (lane shuffles for 2, 4 and 8, lane selects
   otherwise), and lays each vector's channel block out contiguously. NHWC rows are kept in a
   ring and staged once per task, not once per tap; an NCHW work unit is a run of row blocks of
   one plane (a whole small plane) staged at once.
   The next rows' input (and in NHWC backprop filter the next row of ``dy``) is prefetched
   while the current ones compute; results that are not streamed have their next row
   fetched for ownership.
2. **Compute.** A tap table lists, for the row, each tap's offset in the stage and in the
   filter. A register-blocked micro-kernel accumulates eight vectors at once (eight
   output pixels along the row in NHWC, eight output rows in NCHW) from one base address with
   constant displacements. Taps whose inputs lie one vector apart (a stride-1 filter row in
   NHWC, a filter column in NCHW) form runs, along which the eight input vectors slide in
   registers (:func:`_slide8`): one load and one weight load per eight FMAs. That takes 17
   vector registers, so only AVX-512 slides (:data:`SLIDE`). NHWC rows of 7k
   pixels (7, 14, 28) take blocks of seven instead, so that no block overlaps the previous
   one. Because the tap loop is a runtime loop over the table, one compiled kernel serves
   every filter size, stride, dilation and multiplier; only the sliding run's length has
   compiled variants (3 and 5, :func:`_slide`).
3. **Store**, with the fused bias/clamp epilogue of the forward op and one rounding to the
   output dtype. Large NHWC outputs of 32/64-bit data are written with non-temporal stores
   (no read-for-ownership of lines that are about to be overwritten) when a vector is a whole
   cache line (AVX-512; with 32-byte vectors streaming half lines measured slower, in both
   layouts). NCHW rows that are not whole lines go to a row buffer as whole vectors (a
   masked store costs about 70 cycles on this hardware); the forward op gathers its blocks
   there into a run that goes out in whole lines (:func:`_drain`), streamed when large.

Large results reuse the memory of dropped earlier ones (:class:`_ResultPool`), which spares
the operating system's zeroing of fresh pages.

The vectors are explicit (:mod:`nbdw.simd`), as wide as the target's registers: 64 bytes with
AVX-512 (16 float32 or 8 float64 lanes), 32 with AVX2; over channels in NHWC and over width in
NCHW. An NHWC forward with fewer channels than lanes (multiplier 1, column stride 1) treats
each row as one flat run of width x channels values instead, with the filter as a pattern
repeating every C lanes (:func:`_forward_nhwc_narrow`): 3 channels would otherwise leave 13 of
16 lanes (5 of 8 with AVX2) idle. Backprop filter keeps per-task partial sums (one per tap and
channel) in cache, adds eight pixels per tap per load/store of the accumulator, and reduces
the per-task partials once, in task order: bitwise repeatable for a given thread count.
Backprop input stays a gather: each input element is computed whole by one task.

Zero padding is multiplied like data, as TensorFlow's and the reference's formula does. For
backprop input, whose formula has no padding, those zeros add exact zeros as long as the filter
is finite; a filter holding NaN or Inf takes an exact gather kernel that skips them.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import arrays, spec
from .simd import (prefetch, prefetch_write, store_fence, vadd, vbroadcast, vclamp, veven, vfma, vlanes, vload,
                   vload_lanes, vload_n, vodd, vrepeat2, vrepeat4, vrepeat8, vselect_lanes, vsplat, vstore, vstore_n,
                   vstream, vsum, vtranspose, vzero, vzip_hi, vzip_lo, VECTOR_BYTES, VECTOR_REGISTERS, vload_at,
                   vmul)

# Like fastmath=True but keeping NaN and Inf semantics (no nnan/ninf), so NaNs propagate.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: Bytes of staged input a task keeps per channel group. Channels beyond it are split into
#: groups, each staging every row again and without prefetch of the next rows; one group for all
#: channels measured faster even past L2 (2 MiB against 192 KiB: 0.51x on DeepLab's 960 channels,
#: 0.65x backprop input 56x56x144), so only very wide rows are split.
STAGE_BYTES = 2 * 1024 * 1024

#: Bytes of staged input rows an NCHW work unit may use (it should sit in L1).
NCHW_STAGE_BYTES = 24 * 1024

#: NCHW forward with column stride 1 (and backprop input without strides or a multiplier) goes
#: through channel tiles (:func:`_forward_nchw_tiled`) when the tile of one vector of planes fits
#: in this many bytes. Zen 5, forward against the row kernel: 7x7 planes 0.40, 14x14 0.68,
#: 28x28 0.81, 37x37 (DeepLab's, dilated) 0.91; 58x58 (56x56 planes) 1.15, so left out.
NCHW_TILE_BYTES = 128 * 1024

#: Backprop filter takes tiles up to this size when the channels fill whole vectors: it
#: transposes no results back. Zen 4 against the row kernel, 56x56 planes (tile 58x58):
#: 64 channels 0.93, multiplier 2 0.82, dilation 2 0.74, 7x7 0.88; with padded vectors
#: (40 channels 1.22, 24 channels 1.35) and 114x114 tiles (1.30) the rows stay faster.
NCHW_FILTER_TILE_BYTES = 256 * 1024

#: Output pixels (NHWC) or rows (NCHW) computed together by the micro-kernel.
BLOCK = 8

#: Whether runs of taps slide their input vectors in registers (:func:`_slide8`,
#: :func:`_grad_slide8`). The window holds BLOCK inputs beside BLOCK accumulators and the weight,
#: 2 * BLOCK + 1 registers. With AVX2's 16, LLVM spills, and where it spills depends on the
#: compile: Numba links a kernel's parallel loop into the kernel and optimises it again, so the
#: copy run from the on-disk cache is not the one a first call runs, and the same source gave
#: NCHW forward 4-5 ms or 12 ms (8x96x56x56, 7x7), accumulators stored and reloaded every tap.
#: Loading each tap's inputs instead (:func:`_mac8`) needs 10 registers and measured equal or
#: faster on a Zen 3 (all 48 table cases, both from the cache: geomean 0.99, 0.86 at best).
SLIDE = VECTOR_REGISTERS > 2 * BLOCK

#: Results at least this large are written with non-temporal stores: bypassing the caches saves
#: the read-for-ownership of every line (a third of the memory traffic of a streaming kernel).
#: It pays here from about 0.7 MiB on, even when the next op reads the result at once (two
#: chained forwards: 1.7 MiB 0.41 -> 0.29 ms, 0.8 MiB 0.185 -> 0.153 ms; mixed at 0.4 MiB), and
#: lowering this from 4 MiB to 1 MiB took the batch-1 table's ops to 0.94x (0.66x to 1.01x).
#: Later code on the same Zen 4 (seventh pass of issue 7, docs/performance.md) split it by where
#: the buffer's lines are: below 8 MiB, cached stores won 0.81-1.00 in chained ops whose buffers
#: stay in L3, and lost 1.22-1.32 on flushed calls. It is left at 1 MiB until that is settled.
STREAM_BYTES = 1024 * 1024

#: Output elements an NCHW forward task gathers behind its blocks before it writes their whole
#: lines out (:func:`_drain`): 2 KiB of float32. On 14x14 planes (seven-row blocks of 98
#: elements) draining after every block measured 1.04-1.07x the time of the per-block copy
#: it replaced, 512 elements 0.91-1.07x (A/B, batch 8, warm and flushed).
RUN_ELEMENTS = 512


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


@intrinsic
def _index(typingctx, i):
    """A non-negative integer as an unsigned index: Numba then skips the negative-index
    wraparound select, which otherwise stops LLVM from vectorising a loop that indexes with it."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], signature.args[0], types.intp)

    return types.uintp(i), codegen


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


# ---------------------------------------------------------------------------
# Building blocks shared by the kernels
# ---------------------------------------------------------------------------

@njit(cache=True)
def _aligned_zeros(size, like):
    """A zeroed 1-D buffer of ``like``'s dtype whose data starts on a 64-byte boundary, so that
    full-vector accesses at multiples of the lane count never straddle two cache lines."""
    raw = np.zeros(size + 16, like.dtype)  # 16 elements of 4 or 8 bytes: room to align
    skip = (64 - raw.ctypes.data % 64) % 64 // raw.itemsize
    return raw[skip:skip + size]


@njit(cache=True)
def _split(task, tasks, units):
    """The task's share ``[lo, hi)`` of ``units``: a balanced split, fixed for a given task count."""
    return task * units // tasks, (task + 1) * units // tasks


@njit(cache=True, fastmath=FASTMATH)
def _mac8(src, p0, bs, soff, wts, woff, wb, ntaps, bcast, nb=8):
    """Eight accumulators ``a_b = sum_t src[p0 + b * bs + soff[t]:][:L] * w_t`` for b = 0..7.

    ``w_t`` is the vector ``wts[woff[t] + wb:][:L]`` or, with ``bcast``, the scalar
    ``wts[woff[t] + wb]`` in every lane. One base address per tap, constant displacements
    (``bs`` is a compile-time constant for NHWC), so the loop is eight FMAs with memory operands
    and one weight load. ``nb`` (8, 7 or 4; a constant at the call site, so LLVM drops the rest)
    accumulators are computed, the others stay zero and nothing is read for them: 7 for rows of
    7k pixels, which then need no overlapping last block, 4 for short rows.
    """
    a0 = vzero(src)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    for t in range(ntaps):
        p = p0 + soff[t]
        wv = vbroadcast(wts, woff[t] + wb) if bcast else vload(wts, woff[t] + wb)
        a0 = vfma(vload(src, p), wv, a0)
        a1 = vfma(vload_at(src, p, bs), wv, a1)
        a2 = vfma(vload_at(src, p, 2 * bs), wv, a2)
        a3 = vfma(vload_at(src, p, 3 * bs), wv, a3)
        if nb > 4:
            a4 = vfma(vload_at(src, p, 4 * bs), wv, a4)
            a5 = vfma(vload_at(src, p, 5 * bs), wv, a5)
            a6 = vfma(vload_at(src, p, 6 * bs), wv, a6)
        if nb == 8:
            a7 = vfma(vload_at(src, p, 7 * bs), wv, a7)
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(cache=True, fastmath=FASTMATH)
def _slide8(src, p0, bs, runs, nruns, wts, wb, bcast, nb=8, fixed=0):
    """:func:`_mac8` over runs of taps whose inputs lie one vector (``bs``) apart: the eight
    input vectors slide along a run, so each further tap of the run costs one load instead of
    eight (NHWC: the taps of a filter row; NCHW: of a filter column, as the block runs down
    rows). ``runs[r]`` = (stage offset, weight offset, weight step, length); ``bcast`` and
    ``nb`` as in :func:`_mac8`. ``fixed``, when not 0, is every run's length, a constant at the
    call site (see :func:`_slide`)."""
    a0 = vzero(src)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    for r in range(nruns):
        p = p0 + runs[r, 0]
        w = runs[r, 1] + wb
        x0 = vload(src, p)
        x1 = vload(src, p + bs)
        x2 = vload(src, p + 2 * bs)
        x3 = vload(src, p + 3 * bs)
        x4 = vload(src, p + 4 * bs)
        x5 = vload(src, p + 5 * bs)
        x6 = vload(src, p + 6 * bs) if nb == 8 else x5
        for k in range(runs[r, 3] if fixed == 0 else fixed):
            if nb == 8:
                x7 = vload(src, p + (7 + k) * bs)
            else:  # seven vectors: the new one is x6
                x6 = vload(src, p + (6 + k) * bs)
                x7 = x6
            wv = vbroadcast(wts, w) if bcast else vload(wts, w)
            a0 = vfma(x0, wv, a0)
            a1 = vfma(x1, wv, a1)
            a2 = vfma(x2, wv, a2)
            a3 = vfma(x3, wv, a3)
            a4 = vfma(x4, wv, a4)
            a5 = vfma(x5, wv, a5)
            a6 = vfma(x6, wv, a6)
            if nb == 8:
                a7 = vfma(x7, wv, a7)
            x0 = x1
            x1 = x2
            x2 = x3
            x3 = x4
            x4 = x5
            x5 = x6
            x6 = x7
            w += runs[r, 2]
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit(cache=True)
def _run_length(runs, nruns):
    """The length all ``nruns`` runs share when :func:`_slide` has a specialisation for it
    (3 or 5: the common filter widths; for 7 the unrolled run measured slower), else 0."""
    n = runs[0, 3] if nruns > 0 else 0
    if n != 3 and n != 5:
        return 0
    for r in range(1, nruns):
        if runs[r, 3] != n:
            return 0
    return n


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call would pass 8 vectors back in memory
def _slide(src, p0, bs, runs, nruns, wts, wb, bcast, nb, fixed):
    """:func:`_slide8` with the run length ``fixed`` (from :func:`_run_length`) a compile-time
    constant in each branch, so that LLVM unrolls the run and keeps the sliding window in
    registers. A run length read from ``runs`` leaves a loop of 2 to 7 trips with its setup and
    spills: 14x14x576 NHWC forward 0.78 to 0.82 of the time with the length fixed to 3."""
    if fixed == 3:
        return _slide8(src, p0, bs, runs, nruns, wts, wb, bcast, nb, 3)
    if fixed == 5:
        return _slide8(src, p0, bs, runs, nruns, wts, wb, bcast, nb, 5)
    return _slide8(src, p0, bs, runs, nruns, wts, wb, bcast, nb, 0)


@njit(cache=True)
def _sevens(width):
    """Whether an NHWC row of ``width`` pixels goes in blocks of seven (14, 28, ...: no
    overlapping last block, no 4- and 1-pixel tail) rather than eight."""
    return width % BLOCK != 0 and width % 7 == 0


@njit(cache=True)
def _runs(soff, woff, ntaps, step, runs):
    """Group consecutive table entries whose stage offsets advance by ``step`` (and weights by a
    constant) into runs for :func:`_slide8`; returns the number of runs, 0 without
    :data:`SLIDE` (nothing else reads them, and the tables of NHWC kernels are redone per row)."""
    if not SLIDE:
        return 0
    n = 0
    for t in range(ntaps):
        if n > 0:
            length = runs[n - 1, 3]
            if soff[t] == runs[n - 1, 0] + length * step and (
                    length == 1 or woff[t] == runs[n - 1, 1] + length * runs[n - 1, 2]):
                if length == 1:
                    runs[n - 1, 2] = woff[t] - runs[n - 1, 1]
                runs[n - 1, 3] = length + 1
                continue
        runs[n, 0] = soff[t]
        runs[n, 1] = woff[t]
        runs[n, 2] = 0
        runs[n, 3] = 1
        n += 1
    return n


@njit(cache=True, fastmath=FASTMATH)
def _mac1(src, p0, soff, wts, woff, wb, ntaps, bcast):
    """:func:`_mac8` for one accumulator."""
    a0 = vzero(src)
    for t in range(ntaps):
        wv = vbroadcast(wts, woff[t] + wb) if bcast else vload(wts, woff[t] + wb)
        a0 = vfma(vload(src, p0 + soff[t]), wv, a0)
    return a0


@njit(cache=True, fastmath=FASTMATH)
def _grad8(src, p0, bs, soff, aoff, ntaps, acc, a0, d0, d1, d2, d3, d4, d5, d6, d7, nb=8):
    """Backprop filter: ``acc[a0 + aoff[t]:][:L] += sum_b src[p0 + b * bs + soff[t]:][:L] * d_b``.

    The eight output-gradient vectors stay in registers across the taps; each tap's
    accumulator is loaded and stored once per eight products. With ``nb`` 7 or 4 (see
    :func:`_mac8`) only the first ``nb`` vectors count and nothing is read for the others.
    """
    for t in range(ntaps):
        p = p0 + soff[t]
        o = a0 + aoff[t]
        a = vload(acc, o)
        a = vfma(vload(src, p), d0, a)
        a = vfma(vload(src, p + bs), d1, a)
        a = vfma(vload(src, p + 2 * bs), d2, a)
        a = vfma(vload(src, p + 3 * bs), d3, a)
        if nb > 4:
            a = vfma(vload(src, p + 4 * bs), d4, a)
            a = vfma(vload(src, p + 5 * bs), d5, a)
            a = vfma(vload(src, p + 6 * bs), d6, a)
        if nb == 8:
            a = vfma(vload(src, p + 7 * bs), d7, a)
        vstore(acc, o, a)


@njit(cache=True, fastmath=FASTMATH)
def _grad_slide8(src, p0, bs, runs, nruns, acc, a0, d0, d1, d2, d3, d4, d5, d6, d7, nb=8):
    """:func:`_grad8` over runs of taps (see :func:`_slide8`): ``runs[r]`` = (stage offset,
    accumulator offset, accumulator step, length); one new input load per further tap. The
    eight products of a tap go into two chains of FMAs, not one, which halves the latency from
    the accumulator's load to its store: NHWC 0.90-0.97 of the time (14x14x576, 28x28 5x5,
    112x112x32, stride 2, ConvNeXt), NCHW 1.00-1.02."""
    for r in range(nruns):
        p = p0 + runs[r, 0]
        o = a0 + runs[r, 1]
        x0 = vload(src, p)
        x1 = vload(src, p + bs)
        x2 = vload(src, p + 2 * bs)
        x3 = vload(src, p + 3 * bs)
        x4 = vload(src, p + 4 * bs)
        x5 = vload(src, p + 5 * bs)
        x6 = vload(src, p + 6 * bs) if nb == 8 else x5
        for k in range(runs[r, 3]):
            if nb == 8:
                x7 = vload(src, p + (7 + k) * bs)
            else:  # seven vectors: the new one is x6
                x6 = vload(src, p + (6 + k) * bs)
                x7 = x6
            a = vfma(x0, d0, vload(acc, o))  # two chains of FMAs: half the latency per tap
            b = vmul(x1, d1)
            a = vfma(x2, d2, a)
            b = vfma(x3, d3, b)
            a = vfma(x4, d4, a)
            b = vfma(x5, d5, b)
            a = vfma(x6, d6, a)
            if nb == 8:
                b = vfma(x7, d7, b)
            vstore(acc, o, vadd(a, b))
            x0 = x1
            x1 = x2
            x2 = x3
            x3 = x4
            x4 = x5
            x5 = x6
            x6 = x7
            o += runs[r, 2]


@njit(cache=True, fastmath=FASTMATH)
def _grad1(src, p0, soff, aoff, ntaps, acc, a0, d, count):
    """:func:`_grad8` for one vector; only the first ``count`` lanes of ``src`` are read
    (the others count as zero), so data past a row's end cannot leak in as NaN."""
    L = vlanes(acc)
    for t in range(ntaps):
        o = a0 + aoff[t]
        x = vload(src, p0 + soff[t]) if count >= L else vload_n(src, p0 + soff[t], count)
        vstore(acc, o, vfma(x, d, vload(acc, o)))


@njit(cache=True, fastmath=FASTMATH)
def _put(dst, o, v, count):
    """Store the first ``count`` lanes of ``v`` (narrowed to ``dst``'s storage) at ``o``."""
    if count >= vlanes(dst):
        vstore(dst, o, v)
    else:
        vstore_n(dst, o, v, count)


@njit(cache=True, fastmath=FASTMATH)
def _store8(dst, o, step, r, count, stream, bv, has_bias, lov, hiv, clamp, nb=8):
    """Store the eight vectors ``r`` at ``o + b * step`` (first ``count`` lanes), after the
    forward epilogue (bias add when ``has_bias``, clamp to [lo, hi] when ``clamp``); with
    ``stream``, full vectors at aligned offsets bypass the caches. The conditions are tested
    once for the eight stores. ``nb = 7`` stores the first seven only."""
    a0, a1, a2, a3, a4, a5, a6, a7 = r
    if has_bias:
        a0 = vadd(a0, bv)
        a1 = vadd(a1, bv)
        a2 = vadd(a2, bv)
        a3 = vadd(a3, bv)
        a4 = vadd(a4, bv)
        a5 = vadd(a5, bv)
        a6 = vadd(a6, bv)
        a7 = vadd(a7, bv)
    if clamp:
        a0 = vclamp(a0, lov, hiv)
        a1 = vclamp(a1, lov, hiv)
        a2 = vclamp(a2, lov, hiv)
        a3 = vclamp(a3, lov, hiv)
        a4 = vclamp(a4, lov, hiv)
        a5 = vclamp(a5, lov, hiv)
        a6 = vclamp(a6, lov, hiv)
        a7 = vclamp(a7, lov, hiv)
    L = vlanes(dst)
    if count < L:
        vstore_n(dst, o, a0, count)
        vstore_n(dst, o + step, a1, count)
        vstore_n(dst, o + 2 * step, a2, count)
        vstore_n(dst, o + 3 * step, a3, count)
        vstore_n(dst, o + 4 * step, a4, count)
        vstore_n(dst, o + 5 * step, a5, count)
        vstore_n(dst, o + 6 * step, a6, count)
        if nb == 8:
            vstore_n(dst, o + 7 * step, a7, count)
    elif stream and o % L == 0 and step % L == 0:
        vstream(dst, o, a0)
        vstream(dst, o + step, a1)
        vstream(dst, o + 2 * step, a2)
        vstream(dst, o + 3 * step, a3)
        vstream(dst, o + 4 * step, a4)
        vstream(dst, o + 5 * step, a5)
        vstream(dst, o + 6 * step, a6)
        if nb == 8:
            vstream(dst, o + 7 * step, a7)
    else:
        vstore(dst, o, a0)
        vstore(dst, o + step, a1)
        vstore(dst, o + 2 * step, a2)
        vstore(dst, o + 3 * step, a3)
        vstore(dst, o + 4 * step, a4)
        vstore(dst, o + 5 * step, a5)
        vstore(dst, o + 6 * step, a6)
        if nb == 8:
            vstore(dst, o + 7 * step, a7)


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates dst's shared reference count
def _copy_out(dst, o, src, s, count, stream):
    """``dst[o:o + count] = src[s:s + count]`` (accumulator values narrowed to ``dst``'s storage).

    With ``stream``, the 64-byte-aligned middle is written with non-temporal stores, in address
    order so that the halves of a line written by 32-byte vectors (16-bit data) are combined.
    """
    L = vlanes(dst)
    i = 0
    if stream:
        head = min(-o % _line_elements(dst), count)
        while i + L <= head:
            vstore(dst, o + i, vload(src, s + i))
            i += L
        if i < head:
            vstore_n(dst, o + i, vload_n(src, s + i, head - i), head - i)
            i = head
        while i + L <= count:
            vstream(dst, o + i, vload(src, s + i))
            i += L
    while i + L <= count:
        vstore(dst, o + i, vload(src, s + i))
        i += L
    if i < count:
        vstore_n(dst, o + i, vload_n(src, s + i, count - i), count - i)


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates dst's shared reference count
def _join(dst, buf, margin, begin, start, count, o, stream):
    """The pending run of a task's output (see :func:`_drain`), which began at ``begin``, once a
    block for ``dst[o:]`` is next: unchanged when the block continues the run or overlaps it
    (an overlapping block recomputes equal values, and may reach ``margin`` elements back into
    what the run has written), else the run is written out whole and a new one starts at
    ``o``. Returns ``(begin, start, count)``."""
    if max(begin, start - margin) <= o <= start + count:
        return begin, start, count
    if count > 0:
        _drain(dst, start, count, buf, margin, stream, True)
    return o, o, 0


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _drain(dst, start, count, buf, b0, stream, final):
    """Software write-combining: ``buf[b0:b0 + count]`` holds ``dst[start:start + count]``, the
    pending run of a task whose blocks follow each other in ``dst``. Write out the run's whole
    cache lines (all of it when ``final``) and move the rest, less than a line, to ``b0``;
    returns the new ``(start, count)``. A block's partial last line thus waits for the next
    block instead of going out with a masked store and a read of the line, and the lines stream
    (``stream``) even when the blocks do not end on line boundaries. NCHW forward on planes
    whose blocks are not whole lines, batch 8, A/B in one process, warm and flushed: 33x33
    (dilation 2) 0.88-0.99, 28x28 (5x5) 0.90-1.03. The same in backprop input
    measured 1.13-1.23x slower on 14x14 planes, for reasons not found; it is not used there."""
    end = start + count
    keep = end if final else max(start, end - end % _line_elements(dst))
    n = keep - start
    if n > 0:
        _copy_out(dst, start, buf, b0, n, stream)
        L = vlanes(buf)
        for i in range(0, end - keep, L):  # forward, each vector read before it is overwritten
            vstore(buf, b0 + i, vload(buf, b0 + n + i))
    return keep, end - keep


@njit(cache=True, inline="always")
def _whole_lines(arr, o, count):
    """Whether ``arr[o:o + count]`` starts and ends on cache-line boundaries (``arr`` 64-byte aligned)."""
    return o % _line_elements(arr) == 0 and count % _line_elements(arr) == 0


def _line_elements(array):
    """Elements of ``array`` in one 64-byte cache line, a compile-time constant."""


@overload(_line_elements)
def _line_elements_impl(array):
    n = 512 // array.dtype.bitwidth
    return lambda array: n


@njit(cache=True, inline="always")  # no call: passing a shared array costs atomics (_prefetch_some)
def _per_call(arr, pf, end, calls):
    """Cache lines of ``arr[pf:end]`` to prefetch per call so that ``calls`` calls cover them."""
    return (end - pf) // _line_elements(arr) // calls + 1


@njit(cache=True, inline="always")
def _prefetch_some(arr, pf, end, count, write=False):
    """Prefetch up to ``count`` cache lines of ``arr`` from element ``pf`` (below ``end``),
    for writing with ``write``; returns where to continue. Spread over a row's blocks, this
    overlaps the next row's memory traffic with the current row's arithmetic. Inlined in Numba's
    IR: a call would update ``arr``'s reference count, an atomic on a line all threads share,
    in every block."""
    step = _line_elements(arr)
    for _ in range(count):
        if pf >= end:
            break
        if write:
            prefetch_write(arr, pf)
        else:
            prefetch(arr, pf)
        pf += step
    return pf


@njit(cache=True, fastmath=FASTMATH)
def _finish(v, bv, has_bias, lov, hiv):
    """The forward epilogue on a vector: bias add (only when there is a bias, so that -0.0
    stays -0.0) and the activation clamp (comparisons, so NaN lanes stay NaN)."""
    if has_bias:
        v = vadd(v, bv)
    return vclamp(v, lov, hiv)


@njit(cache=True, inline="always")  # a call updates x's shared reference count
def _next_rows_nhwc(x, n, oh, oh_, sh, pt, reach, new, enabled):
    """Element range of NHWC ``x`` holding the ``new`` input rows that output row ``oh + 1``
    of image ``n`` adds to the ring (its last taps reach ``reach`` rows below its first); empty
    when not ``enabled`` or when that row is past the image."""
    h_ = x.shape[1]
    if not enabled or oh + 1 >= oh_:
        return 0, 0
    last = min((oh + 1) * sh - pt + reach, h_ - 1)
    first = max(last - new + 1, 0)
    if last < first:
        return 0, 0
    per_row = x.shape[2] * x.shape[3]
    return (n * h_ + first) * per_row, (n * h_ + last + 1) * per_row


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates x's shared reference count
def _stage_row_nhwc(stage, x, n, ih, m_, g0, g1, dst0, cbstride, sw, wq, pl):
    """Copy row ``(n, ih)`` of NHWC ``x`` into the stage, channel blocks ``g0..g1`` (of the
    output channels ``j = c * m_ + q``, which read input channel ``c``).

    Stage layout per channel block: ``[phase][column][lane]`` starting at
    ``dst0 + (cb - g0) * cbstride``; padded column ``pc`` lives in phase ``pc % sw`` at column
    ``pc // sw``. Only columns holding data are written: padding stays zero.
    """
    h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
    L = vlanes(stage)
    cm = c_ * m_
    row = (n * h_ + ih) * w_
    for ph in range(sw):
        # padded columns pc = col * sw + ph with pl <= pc < pl + w_, and col < wq
        lo = (pl - ph + sw - 1) // sw
        if lo < 0:
            lo = 0
        hi = (pl + w_ - ph + sw - 1) // sw
        if hi > wq:
            hi = wq
        if hi <= lo:
            continue
        first = lo * sw + ph - pl  # input column of stage column lo
        if m_ == 1:
            # pixel by pixel, so that x is read sequentially (the blocks go to separate regions)
            full = min(g1, c_ // L)  # blocks without a channel tail
            for col in range(hi - lo):
                src = (row + first + col * sw) * c_
                dst = dst0 + (ph * wq + lo + col) * L
                for cb in range(g0, full):
                    vstore(stage, dst + (cb - g0) * cbstride, vload(x, src + cb * L))
                if full < g1:
                    vstore(stage, dst + (full - g0) * cbstride, vload_n(x, src + full * L, c_ - full * L))
        elif (m_ == 2 or m_ == 4 or m_ == 8) and m_ <= L:
            # block cb holds input channels cb * L / m_ .. (cb + 1) * L / m_, each repeated m_ times
            per = L // m_
            for col in range(hi - lo):
                src = (row + first + col * sw) * c_
                dst = dst0 + (ph * wq + lo + col) * L
                for cb in range(g0, g1):
                    c0 = cb * per
                    v = vload_n(x, src + c0, min(per, c_ - c0))
                    if m_ == 2:
                        v = vrepeat2(v)
                    elif m_ == 4:
                        v = vrepeat4(v)
                    else:
                        v = vrepeat8(v)
                    vstore(stage, dst + (cb - g0) * cbstride, v)
        else:
            # any other multiplier: each input channel of the block broadcast into the lanes of
            # its m_ copies (a per-element copy with a division per lane cost 3x the whole
            # kernel: 28x28x24, m_ = 3, forward 0.78 ms against 0.25 for m_ = 2 or 4)
            for col in range(hi - lo):
                src = (row + first + col * sw) * c_
                dst = dst0 + (ph * wq + lo + col) * L
                for cb in range(g0, g1):
                    j0 = cb * L
                    j1 = min(j0 + L, cm)
                    v = vzero(stage)
                    for c in range(j0 // m_, (j1 - 1) // m_ + 1):
                        v = vselect_lanes(v, c * m_ - j0, (c + 1) * m_ - j0, vbroadcast(x, src + c))
                    vstore(stage, dst + (cb - g0) * cbstride, v)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@njit(cache=True)
def _ring_slot(held, r, key):
    """Ring slot of staged row ``r`` (``r % len(held)``) and whether the row must be staged there:
    ``held`` records which row (``key``, unique across images) each slot holds, and is updated."""
    slot = r % held.shape[0]
    if held[slot] == key:
        return slot, False
    held[slot] = key
    return slot, True


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates x's shared reference count
def _stage_taps_nhwc(stage, x, held, soff, woff, n, oh, sh, pt, dh, dw, kh_, kw_, eff_h, m_, g0, g1,
                     slotlen, cbstride, sw, wq, pl, cp, L):
    """Stage the input rows output row ``oh`` reads (ring slots in ``held``; out-of-range rows map
    to the zero slot) and fill its tap table: stage offsets ``soff`` and weight offsets ``woff``.
    Shared by forward and backprop filter in NHWC; returns the number of taps.

    Inlined in Numba's IR, as are the helpers it calls with ``x``: as calls, each updated the
    reference count of ``x``, an atomic on a line both threads share, once per output row, and
    perf put 7-9% of the DRAM-bound forward (32x112x112x32) on those atomics. Inlined: that
    case 0.87-0.92x, 112x112x32 forward 0.81-0.91x, backprop input 0.90-0.95x (A/B, batch 8,
    warm and flushed)."""
    h_ = x.shape[1]
    zero_slot = eff_h
    t = 0
    for kh in range(kh_):
        ih = oh * sh - pt + kh * dh
        slot = zero_slot
        if 0 <= ih < h_:
            slot, fresh = _ring_slot(held, ih, n * h_ + ih)
            if fresh:
                _stage_row_nhwc(stage, x, n, ih, m_, g0, g1, slot * slotlen, cbstride, sw, wq, pl)
        for ph in range(sw):  # by phase, so that a filter row's taps form runs
            for kw in range(kw_):
                off = kw * dw
                if off % sw == ph:
                    soff[t] = slot * slotlen + (ph * wq + off // sw) * L
                    woff[t] = (kh * kw_ + kw) * cp
                    t += 1
    return t


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_nhwc(x, wts, bias, has_bias, lo, hi, out, kh_, kw_, sh, sw, dh, dw, pt, pl, tasks, group, stream):
    """x (N, H, W, C); wts (KH*KW*CP,) widened filter, tap-major, channels padded to CP lanes;
    bias (CP,); clamp [lo, hi]; out (N, OH, OW, C*M). Storage dtypes (16-bit as bit patterns).
    ``stream``: write ``out`` with non-temporal stores."""
    n_, h_ = x.shape[0], x.shape[1]
    oh_, ow_, cm = out.shape[1], out.shape[2], out.shape[3]
    cp = bias.shape[0]
    L = vlanes(wts)
    blocks = cp // L
    eff_h = (kh_ - 1) * dh + 1
    wq = ((ow_ - 1) * sw + (kw_ - 1) * dw + 1 + sw - 1) // sw  # stage columns per phase
    slotlen = sw * wq * L
    cbstride = (eff_h + 1) * slotlen + L  # ring of eff_h rows + a zero row; +L breaks 4K aliasing
    rows = n_ * oh_
    sevens = _sevens(ow_)
    for task in prange(tasks):
        r0, r1 = _split(task, tasks, rows)
        stage = _aligned_zeros(group * cbstride, wts)
        held = np.empty(eff_h, np.int64)  # which input row each ring slot holds
        soff = np.empty(kh_ * kw_, np.int64)
        woff = np.empty(kh_ * kw_, np.int64)
        runs = np.empty((kh_ * kw_, 4), np.int64)
        lov = vsplat(wts, lo)
        hiv = vsplat(wts, hi)
        clamp = not (lo == -np.inf and hi == np.inf)
        for g0 in range(0, blocks, group):
            g1 = min(g0 + group, blocks)
            held[:] = -1
            for row in range(r0, r1):
                n = row // oh_
                oh = row - n * oh_
                t = _stage_taps_nhwc(stage, x, held, soff, woff, n, oh, sh, pt, dh, dw, kh_, kw_, eff_h,
                                     cm // x.shape[3], g0, g1, slotlen, cbstride, sw, wq, pl, cp, L)
                nruns = _runs(soff, woff, t, L, runs)
                slide = SLIDE and 2 * nruns <= t  # runs of two taps or more on average: sliding pays
                fixed = _run_length(runs, nruns)
                orow = (n * oh_ + oh) * ow_
                # the input rows the output row after next will stage, prefetched while this one
                # computes (two rows ahead measured better than one: 3.2 -> 3.0 ms on 32x112x112x32)
                pf, pf_end = _next_rows_nhwc(x, n, oh + 1, oh_, sh, pt, (kh_ - 1) * dh, min(sh, eff_h),
                                             row + 2 < r1 and g1 - g0 == blocks)
                per = _per_call(x, pf, pf_end, (ow_ + BLOCK - 1) // BLOCK * (g1 - g0))
                # unless streaming, the next output row is fetched for ownership while this one
                # computes; each store would wait on it (8x56x56x144, one thread: 3.6 -> 2.2 ms)
                wf = (orow + ow_) * cm
                wf_end = wf + ow_ * cm if not stream and row + 1 < r1 and g1 - g0 == blocks else wf
                wper = _per_call(out, wf, wf_end, (ow_ + BLOCK - 1) // BLOCK * (g1 - g0))
                for cb in range(g0, g1):
                    sb = (cb - g0) * cbstride
                    wb = cb * L
                    count = cm - wb
                    bv = vload(bias, wb)
                    ow = 0
                    while ow < ow_:
                        if sevens or ow_ >= BLOCK:
                            o = (orow + ow) * cm + wb
                            if sevens:
                                if slide:
                                    r = _slide(stage, sb + ow * L, L, runs, nruns, wts, wb, False, 7, fixed)
                                else:
                                    r = _mac8(stage, sb + ow * L, L, soff, wts, woff, wb, t, False, 7)
                                _store8(out, o, cm, r, count, stream, bv, has_bias, lov, hiv, clamp, 7)
                            else:
                                if ow + BLOCK > ow_:
                                    ow = ow_ - BLOCK  # last block overlaps the previous one
                                    o = (orow + ow) * cm + wb
                                if slide:
                                    r = _slide(stage, sb + ow * L, L, runs, nruns, wts, wb, False, 8, fixed)
                                else:
                                    r = _mac8(stage, sb + ow * L, L, soff, wts, woff, wb, t, False)
                                _store8(out, o, cm, r, count, stream, bv, has_bias, lov, hiv, clamp)
                            pf = _prefetch_some(x, pf, pf_end, per)
                            wf = _prefetch_some(out, wf, wf_end, wper, True)
                            ow += 7 if sevens else BLOCK
                        elif ow_ >= 4:
                            if ow + 4 > ow_:
                                ow = ow_ - 4
                            r4 = _mac8(stage, sb + ow * L, L, soff, wts, woff, wb, t, False, 4)
                            o = (orow + ow) * cm + wb
                            for b in range(4):
                                _put(out, o + b * cm, _finish(r4[b], bv, has_bias, lov, hiv), count)
                            ow += 4
                        else:
                            a = _mac1(stage, sb + ow * L, soff, wts, woff, wb, t, False)
                            _put(out, (orow + ow) * cm + wb, _finish(a, bv, has_bias, lov, hiv), count)
                            ow += 1
        if stream:
            store_fence()


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_nhwc_narrow(x, wpat, bpat, has_bias, lo, hi, out, kh_, kw_, sh, dh, dw, pt, pl, tasks):
    """NHWC forward for fewer channels than a vector has lanes (multiplier 1, column stride 1),
    with every lane at work: a row of C channels per pixel is one flat run of W * C values.

    Output element ``j = ow * C + c`` of a row reads element ``j + kw * dw * C`` of a staged input
    row (``pl * C`` zeros in front of the data), times the filter of channel ``j % C``. For the
    vector starting at ``j0 = v * L`` that channel pattern is phase ``(j0 % C) // g`` of
    ``P = C / g`` (``g = gcd(L, C)``): ``wpat`` (P, KH*KW, L) and ``bpat`` (P, L) hold the
    patterns. Vectors ``P`` apart share a phase, so the micro-kernels block them: eight, then
    four, then single vectors; a short last vector is stored by its live lanes only.
    """
    n_, h_, w_, c_ = x.shape
    oh_, ow_ = out.shape[1], out.shape[2]
    L = vlanes(wpat)
    P = wpat.shape[0]
    g = c_ // P
    taps = kh_ * kw_
    eff_h = (kh_ - 1) * dh + 1
    R = ow_ * c_  # one output row, flat
    nfull = R // L  # whole vectors of a row; a partial one may follow
    reach = max((nfull + 1) * L + (kw_ - 1) * dw * c_, pl * c_ + (w_ * c_ + L - 1) // L * L)
    slotlen = (reach + L - 1) // L * L + L  # a staged row, whole vectors, +L against 4K aliasing
    flat_x = x.reshape(-1)
    flat_out = out.reshape(-1)
    rows = n_ * oh_
    for task in prange(tasks):
        r0, r1 = _split(task, tasks, rows)
        stage = _aligned_zeros((eff_h + 1) * slotlen, wpat)  # a ring of eff_h rows and a zero row
        held = np.empty(eff_h, np.int64)
        held[:] = -1
        soff = np.empty(taps, np.int64)
        woff = np.empty(taps, np.int64)
        lov = vsplat(wpat, lo)
        hiv = vsplat(wpat, hi)
        clamp = not (lo == -np.inf and hi == np.inf)
        for row in range(r0, r1):
            n = row // oh_
            oh = row - n * oh_
            t = 0
            for kh in range(kh_):
                ih = oh * sh - pt + kh * dh
                slot = eff_h
                if 0 <= ih < h_:
                    slot, fresh = _ring_slot(held, ih, n * h_ + ih)
                    if fresh:
                        src = (n * h_ + ih) * w_ * c_
                        dst = slot * slotlen + pl * c_
                        for i in range(0, w_ * c_, L):
                            vstore(stage, dst + i, _load_count(flat_x, src + i, w_ * c_ - i))
                for kw in range(kw_):
                    soff[t] = slot * slotlen + kw * dw * c_
                    woff[t] = (kh * kw_ + kw) * L
                    t += 1
            o = row * R
            v = 0
            while v + 8 * P <= nfull:
                for q in range(P):
                    ph = (((v + q) * L) % c_) // g
                    r = _mac8(stage, (v + q) * L, P * L, soff, wpat, woff, ph * taps * L, taps, False)
                    _store8(flat_out, o + (v + q) * L, P * L, r, L, False, vload(bpat, ph * L), has_bias, lov, hiv,
                            clamp)
                v += 8 * P
            while v + 4 * P <= nfull:
                for q in range(P):
                    ph = (((v + q) * L) % c_) // g
                    bv = vload(bpat, ph * L)
                    r4 = _mac8(stage, (v + q) * L, P * L, soff, wpat, woff, ph * taps * L, taps, False, 4)
                    for b in range(4):
                        _put(flat_out, o + (v + q + b * P) * L, _finish(r4[b], bv, has_bias, lov, hiv), L)
                v += 4 * P
            while v * L < R:
                ph = ((v * L) % c_) // g
                a = _mac1(stage, v * L, soff, wpat, woff, ph * taps * L, taps, False)
                _put(flat_out, o + v * L, _finish(a, vload(bpat, ph * L), has_bias, lov, hiv), R - v * L)
                v += 1


@njit(cache=True)
def _next_unit_nchw(x, enabled, unit, groups, rb, sh, pt, nrows):
    """Element range of NCHW ``x`` that work unit ``unit`` (plane, group of ``rb`` output rows)
    will stage; empty when not ``enabled``."""
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    if not enabled:
        return 0, 0
    plane = unit // groups
    oh0 = (unit - plane * groups) * rb
    first = max(oh0 * sh - pt, 0)
    last = min(oh0 * sh - pt + nrows, h_)
    if last <= first:
        return 0, 0
    return (plane * h_ + first) * w_, (plane * h_ + last) * w_


@njit(cache=True, fastmath=FASTMATH)
def _load_span(flat, src, first, size):
    """Elements ``first .. first + L`` of the row ``flat[src:src + size]``, zero outside it."""
    L = vlanes(flat)
    if first >= 0 and first + L <= size:
        return vload(flat, src + first)
    return vload_lanes(flat, src + first, max(-first, 0), min(size - first, L))


@njit(cache=True, fastmath=FASTMATH)
def _stage_rows_nchw(stage, flat, base, h_, w_, ih0, nrows, seg, sw, pl):
    """Rows ``ih0 .. ih0 + nrows`` of one NCHW plane (``flat[base:]``, (H, W)) into the stage:
    row ``r`` at ``r * sw * seg``, stride phase ``ph`` (padded columns ``col * sw + ph``) at
    ``ph * seg``; ``seg`` is a multiple of the lane count, so every store is a whole aligned
    vector. Rows outside the plane and the padding are written as zeros; columns past the end
    of the padded row may hold data (only lanes that are dropped read them). The plane comes as
    a flat array and an offset: a per-plane view would cost a reshape call and two atomic
    reference-count updates on a line both threads share."""
    L = vlanes(stage)
    for r in range(nrows):
        ih = ih0 + r
        dst = r * sw * seg
        if ih < 0 or ih >= h_:
            for i in range(0, sw * seg, L):
                vstore(stage, dst + i, vzero(stage))
            continue
        src = base + ih * w_
        # Vectors holding only padding columns are skipped: no row ever writes data there, so
        # they keep the zeros of the fresh stage (or of a padding row).
        if sw == 1:  # stage column c holds input column c - pl
            for c0 in range(0, min(seg, pl + w_), L):
                vstore(stage, dst + c0, _load_span(flat, src, c0 - pl, w_))
        elif sw == 2:  # load 2 L consecutive input columns, split them into even and odd
            for c0 in range(0, min(seg, (pl + w_ + 1) // 2), L):
                first = 2 * c0 - pl
                a = _load_span(flat, src, first, w_)
                b = _load_span(flat, src, first + L, w_)
                vstore(stage, dst + c0, veven(a, b))
                vstore(stage, dst + seg + c0, vodd(a, b))
        else:
            for ph in range(sw):
                d = dst + ph * seg
                for col in range(seg):
                    ic = col * sw + ph - pl
                    if 0 <= ic < w_:
                        stage[_index(d + col)] = widen(flat[_index(src + ic)])
                    else:
                        stage[_index(d + col)] = 0


@njit(cache=True)
def _chunk_rows(oh_, rb, sh, eff_h, rowlen, budget):
    """Output rows of an NCHW work unit: whole blocks of ``rb`` rows whose staged input rows fit
    in ``budget`` elements (the whole plane when it fits). One unit stages its rows once, so the
    halo rows between its blocks are not staged twice and small planes are one unit each."""
    fit = (budget // rowlen - eff_h) // sh + 1
    rows = max(rb, fit // rb * rb)
    return oh_ if rows >= oh_ else rows


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_nchw(x, wts, bias, has_bias, lo, hi, out, kh_, kw_, sh, sw, dh, dw, pt, pl, tasks, stream, budget, run):
    """x (N, C, H, W); wts (C*M*KH*KW,) widened, plane-major; bias (C*M,); out (N, C*M, OH, OW).

    Vectors run along the width; the micro-kernel blocks eight output rows at the same columns.
    A work unit is a run of blocks of one plane (:func:`_chunk_rows`), staged at once. Rows
    that are not whole lines are gathered into runs of at least ``run`` elements (:func:`_drain`).
    """
    n_, c_ = x.shape[0], x.shape[1]
    cm, oh_, ow_ = out.shape[1], out.shape[2], out.shape[3]
    m_ = cm // c_
    taps = kh_ * kw_
    L = vlanes(wts)
    rb = _rows_per_block(oh_)
    eff_h = (kh_ - 1) * dh + 1
    wq = ((ow_ - 1) * sw + (kw_ - 1) * dw + 1 + sw - 1) // sw
    seg = (wq + 2 * L - 1) // L * L  # a phase of a staged row: whole vectors, room for one past the end
    rowlen = sw * seg
    crows = _chunk_rows(oh_, rb, sh, eff_h, rowlen, budget)
    chunks = (oh_ + crows - 1) // crows
    nrows = (crows - 1) * sh + eff_h
    units = n_ * c_ * chunks
    h_, w_ = x.shape[2], x.shape[3]
    vecs = (ow_ + L - 1) // L
    flat_x = x.reshape(-1)
    flat_out = out.reshape(-1)
    direct = stream and rb >= 7 and _whole_lines(flat_out, 0, ow_)  # rows of whole lines: from registers
    for task in prange(tasks):
        u0, u1 = _split(task, tasks, units)
        stage = _aligned_zeros(nrows * rowlen + L, wts)
        margin = rb * ow_  # an overlapping block reaches up to rb - 1 rows back
        obuf = _aligned_zeros(2 * margin + run + 2 * _line_elements(flat_out) + L, wts)
        wbegin, wstart, wcount = 0, 0, 0  # the run of output being written (_join, _drain)
        soff = np.empty(taps, np.int64)
        woff = np.empty(taps, np.int64)
        runs = np.empty((taps, 4), np.int64)
        t = 0
        for kw in range(kw_):  # a filter column's taps read rows dh apart: runs when dh == sh
            for kh in range(kh_):
                off = kw * dw
                soff[t] = kh * dh * rowlen + (off % sw) * seg + off // sw
                woff[t] = kh * kw_ + kw
                t += 1
        nruns = _runs(soff, woff, taps, sh * rowlen, runs)
        slide = SLIDE and 2 * nruns <= taps and rb >= 7
        fixed = _run_length(runs, nruns)
        lov = vsplat(wts, lo)
        hiv = vsplat(wts, hi)
        clamp = not (lo == -np.inf and hi == np.inf)
        for unit in range(u0, u1):
            plane = unit // chunks
            k = unit - plane * chunks
            n = plane // c_
            c = plane - n * c_
            a = k * crows  # output rows [a, b) of this unit
            b = min(a + crows, oh_)
            if b - a < rb:
                a = b - rb  # a short last unit overlaps the previous one
            _stage_rows_nchw(stage, flat_x, plane * h_ * w_, h_, w_, a * sh - pt, (b - a - 1) * sh + eff_h, seg, sw, pl)
            pf, pf_end = _next_unit_nchw(x, unit + 1 < u1, unit + 1, chunks, crows, sh, pt, nrows)
            per = _per_call(x, pf, pf_end, m_ * ((b - a + rb - 1) // rb) * vecs)
            for q in range(m_):
                j = c * m_ + q
                wb = j * taps
                bv = vsplat(wts, bias[j])
                o0 = a
                while o0 < b:
                    if o0 + rb > b:
                        o0 = b - rb  # the last block overlaps the previous one
                    so = (o0 - a) * sh * rowlen
                    obase = ((n * cm + j) * oh_ + o0) * ow_
                    # rows are computed into obuf (in cache) behind the pending run, then written
                    # out in whole lines
                    if not direct:
                        wbegin, wstart, wcount = _join(flat_out, obuf, margin, wbegin, wstart, wcount, obase, stream)
                    ob = margin + obase - wstart
                    ow = 0
                    while ow < ow_:
                        count = ow_ - ow
                        if count < L and ow_ >= L:
                            ow = ow_ - L  # last vector overlaps the previous one
                            count = L
                        if rb == BLOCK:
                            if slide:
                                r = _slide(stage, so + ow, sh * rowlen, runs, nruns, wts, wb, True, 8, fixed)
                            else:
                                r = _mac8(stage, so + ow, sh * rowlen, soff, wts, woff, wb, taps, True)
                            if direct:  # line-aligned rows: straight to the output, bypassing the caches
                                _store8(flat_out, obase + ow, ow_, r, count, True, bv, has_bias, lov, hiv, clamp)
                            else:  # whole vectors: a short row's extra lanes land on the next row, stored after it
                                _store8(obuf, ob + ow, ow_, r, L, False, bv, has_bias, lov, hiv, clamp)
                        elif rb == 7:  # planes of 7k rows: blocks of seven, none overlapping
                            if slide:
                                r = _slide(stage, so + ow, sh * rowlen, runs, nruns, wts, wb, True, 7, fixed)
                            else:
                                r = _mac8(stage, so + ow, sh * rowlen, soff, wts, woff, wb, taps, True, 7)
                            if direct:
                                _store8(flat_out, obase + ow, ow_, r, count, True, bv, has_bias, lov, hiv, clamp, 7)
                            else:
                                _store8(obuf, ob + ow, ow_, r, L, False, bv, has_bias, lov, hiv, clamp, 7)
                        elif rb == 4:
                            r4 = _mac8(stage, so + ow, sh * rowlen, soff, wts, woff, wb, taps, True, 4)
                            for i in range(4):
                                _put(obuf, ob + i * ow_ + ow, _finish(r4[i], bv, has_bias, lov, hiv), count)
                        else:
                            r1 = _mac1(stage, so + ow, soff, wts, woff, wb, taps, True)
                            _put(obuf, ob + ow, _finish(r1, bv, has_bias, lov, hiv), count)
                        pf = _prefetch_some(x, pf, pf_end, per)
                        ow += L
                    if not direct:
                        wcount = max(wcount, obase - wstart + rb * ow_)
                        if wcount >= run:
                            wstart, wcount = _drain(flat_out, wstart, wcount, obuf, margin, stream, False)
                    o0 += rb
        if wcount > 0:
            _drain(flat_out, wstart, wcount, obuf, margin, stream, True)
        if stream:
            store_fence()


@njit(cache=True)
def _tile_shape(oh_, ow_, kh_, kw_, sh, sw, dh, dw):
    """A channel tile's rows, columns per phase and row length (in pixels): the input an
    output of ``oh_`` x ``ow_`` reads, columns split into ``sw`` phases so taps stay one vector
    apart."""
    th = (oh_ - 1) * sh + (kh_ - 1) * dh + 1
    wq = ((ow_ - 1) * sw + (kw_ - 1) * dw + 1 + sw - 1) // sw
    return th, wq, sw * wq


@njit(cache=True)
def _tile_taps(soff, woff, wstep, kh_, kw_, dh, dw, sw, wq, tw, L):
    """Each tap's offset in a channel tile and its weight (or accumulator) offset, ``wstep`` a tap."""
    t = 0
    for kh in range(kh_):
        for kw in range(kw_):
            off = kw * dw
            soff[t] = (kh * dh * tw + (off % sw) * wq + off // sw) * L
            woff[t] = t * wstep
            t += 1


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates src's shared reference count
def _gather_square(scratch, src, s0, stride, nc, cnt):
    """A square to transpose, in ``scratch``: row ``lane`` holds ``cnt`` elements of ``src`` from
    ``s0 + lane * stride`` for the ``nc`` planes there, zero past them (nothing is read there:
    other planes' NaN must not reach the padded lanes)."""
    L = vlanes(scratch)
    for lane in range(L):
        if lane < nc:
            vstore(scratch, lane * L, vload_n(src, s0 + lane * stride, cnt))
        else:
            vstore(scratch, lane * L, vzero(scratch))


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates x's shared reference count
def _tile_in_nchw(tile, scratch, flat_x, base, h_, w_, nc, pt, pl, th, sw, wq):
    """Transpose the ``nc`` planes (H, W) from ``flat_x[base:]`` into ``tile`` (row, phase-major
    column, lane), lanes past ``nc`` zero; input outside the tile (VALID's unused rows and
    columns, input before negative pads) is left out. With column stride 1 and a whole vector
    of planes, each square of a row goes straight to its place; otherwise through ``scratch``."""
    L = vlanes(tile)
    tw = sw * wq
    hw = h_ * w_
    cols = min(w_, tw - pl)
    for ih in range(max(0, -pt), min(h_, th - pt)):  # pads < 0: backprop input's flipped filter
        src = base + ih * w_
        dst = (ih + pt) * tw
        for iw in range(max(0, -pl), cols, L):
            cnt = min(L, cols - iw)
            # the last plane's read of L elements stays inside x (it may run into the next row)
            if sw == 1 and nc == L and src + (L - 1) * hw + iw + L <= flat_x.size:
                vtranspose(flat_x, src + iw, hw, tile, (dst + pl + iw) * L, L, cnt)
                continue
            _gather_square(scratch, flat_x, src + iw, hw, nc, cnt)
            vtranspose(scratch, 0, L, scratch, 0, L, L)
            for i in range(cnt):
                j = iw + i + pl
                vstore(tile, (dst + (j % sw) * wq + j // sw) * L, vload(scratch, i * L))


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_nchw_tiled(x, wts, bias, has_bias, lo, hi, out, kh_, kw_, sh, sw, dh, dw, pt, pl, tasks):
    """x (N, C, H, W); wts (M, KH*KW, CP) widened, channels padded to CP lanes; bias (M, CP);
    out (N, C*M, OH, OW).

    For small planes: a work unit takes ``lanes`` planes of one image, transposes them into a
    zero-padded tile of (pixel, channel) vectors in cache (:func:`_tile_in_nchw`), computes there
    as the NHWC kernel does (vectors across channels, eight pixels of a row in registers), and
    transposes the results back, ``lanes`` pixels of ``lanes`` planes at a time.
    """
    n_, c_, h_, w_ = x.shape
    cm, oh_, ow_ = out.shape[1], out.shape[2], out.shape[3]
    m_ = cm // c_
    cp = bias.shape[1]
    taps = kh_ * kw_
    L = vlanes(wts)
    groups = cp // L
    th, wq, tw = _tile_shape(oh_, ow_, kh_, kw_, sh, sw, dh, dw)
    hw = h_ * w_
    ohw = oh_ * ow_
    units = n_ * groups
    sevens = _sevens(ow_)
    flat_x = x.reshape(-1)
    flat_out = out.reshape(-1)
    for task in prange(tasks):
        u0, u1 = _split(task, tasks, units)
        tile = _aligned_zeros(th * tw * L + L, wts)  # its padding stays zero: no unit writes there
        res = _aligned_zeros((ohw + L) * L, wts)  # (pixel, lane), room for a last partial square
        scratch = _aligned_zeros(L * L, wts)
        soff = np.empty(taps, np.int64)
        woff = np.empty(taps, np.int64)
        runs = np.empty((taps, 4), np.int64)
        _tile_taps(soff, woff, cp, kh_, kw_, dh, dw, sw, wq, tw, L)
        nruns = _runs(soff, woff, taps, L, runs)
        slide = SLIDE and 2 * nruns <= taps
        fixed = _run_length(runs, nruns)
        lov = vsplat(wts, lo)
        hiv = vsplat(wts, hi)
        clamp = not (lo == -np.inf and hi == np.inf)
        for unit in range(u0, u1):
            n = unit // groups
            c0 = (unit - n * groups) * L
            nc = min(L, c_ - c0)
            _tile_in_nchw(tile, scratch, flat_x, (n * c_ + c0) * hw, h_, w_, nc, pt, pl, th, sw, wq)
            # planes are too short for the hardware prefetcher: fetch the next unit's input (the
            # next planes of x) and this unit's output lines while computing
            pf = (n * c_ + c0 + nc) * hw
            pf_end = min(pf + L * hw, flat_x.size) if unit + 1 < u1 else pf
            wf = (n * cm + c0 * m_) * ohw
            wf_end = wf + nc * m_ * ohw
            calls = m_ * oh_ * ((ow_ + 6) // 7)
            per = _per_call(x, pf, pf_end, calls)
            wper = _per_call(out, wf, wf_end, calls)
            for q in range(m_):
                wb = q * taps * cp + c0
                bv = vload(bias, q * cp + c0)
                for oh in range(oh_):
                    sb = oh * sh * tw * L
                    orow = oh * ow_ * L
                    ow = 0
                    while ow < ow_:
                        pf = _prefetch_some(x, pf, pf_end, per)
                        wf = _prefetch_some(out, wf, wf_end, wper, True)
                        if sevens or ow_ >= BLOCK:
                            if sevens:
                                if slide:
                                    r = _slide(tile, sb + ow * L, L, runs, nruns, wts, wb, False, 7, fixed)
                                else:
                                    r = _mac8(tile, sb + ow * L, L, soff, wts, woff, wb, taps, False, 7)
                                _store8(res, orow + ow * L, L, r, L, False, bv, has_bias, lov, hiv, clamp, 7)
                            else:
                                if ow + BLOCK > ow_:
                                    ow = ow_ - BLOCK  # last block overlaps the previous one
                                if slide:
                                    r = _slide(tile, sb + ow * L, L, runs, nruns, wts, wb, False, 8, fixed)
                                else:
                                    r = _mac8(tile, sb + ow * L, L, soff, wts, woff, wb, taps, False)
                                _store8(res, orow + ow * L, L, r, L, False, bv, has_bias, lov, hiv, clamp)
                            ow += 7 if sevens else BLOCK
                        elif ow_ >= 4:
                            if ow + 4 > ow_:
                                ow = ow_ - 4
                            r4 = _mac8(tile, sb + ow * L, L, soff, wts, woff, wb, taps, False, 4)
                            for b in range(4):
                                vstore(res, orow + (ow + b) * L, _finish(r4[b], bv, has_bias, lov, hiv))
                            ow += 4
                        else:
                            a = _mac1(tile, sb + ow * L, soff, wts, woff, wb, taps, False)
                            vstore(res, orow + ow * L, _finish(a, bv, has_bias, lov, hiv))
                            ow += 1
                obase = (n * cm + c0 * m_ + q) * ohw
                for p0 in range(0, ohw, L):
                    cnt = min(L, ohw - p0)
                    if nc == L and cnt == L:
                        vtranspose(res, p0 * L, L, flat_out, obase + p0, m_ * ohw, L)
                    else:
                        vtranspose(res, p0 * L, L, scratch, 0, L, L)
                        for lane in range(nc):
                            vstore_n(flat_out, obase + lane * m_ * ohw + p0, vload(scratch, lane * L), cnt)


# ---------------------------------------------------------------------------
# Backprop input (gather: each input element sums the outputs it fed)
# ---------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_input_nhwc(dy, wts, dx, kh_, kw_, sh, sw, dh, dw, pt, pl, tasks, group, stream):
    """dy (N, OH, OW, C*M); wts (KH*KW*M*CP,) widened, [tap][q][channel padded to CP]; dx (N, H, W, C).

    Input columns are handled by stride phase (iw = r + sw * i): within a phase, consecutive
    i read consecutive output columns, so the micro-kernel runs unchanged. The staged rows of
    ``dy`` carry zero columns on both sides, which add exact zeros for a finite filter.
    """
    n_, oh_, ow_, cm = dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3]
    h_, w_, c_ = dx.shape[1], dx.shape[2], dx.shape[3]
    m_ = cm // c_
    L = vlanes(wts)
    cp = wts.shape[0] // (kh_ * kw_ * m_)
    blocks = cp // L
    # output columns read by phase r, tap kw: e(r, kw) + i for i < ceil((w_ - r) / sw)
    padl = 0
    padr = 0
    for r in range(min(sw, w_)):
        ni = (w_ - r + sw - 1) // sw
        for kw in range(kw_):
            u = r + pl - kw * dw
            if u % sw == 0:
                e = u // sw
                padl = max(padl, -e)
                padr = max(padr, e + ni - ow_)
    owp = padl + ow_ + padr
    slots = ((kh_ - 1) * dh) // sh + 1  # output rows one input row can need
    slotlen = m_ * owp * L
    cbstride = slots * slotlen + L
    rows = n_ * h_
    for task in prange(tasks):
        r0, r1 = _split(task, tasks, rows)
        stage = _aligned_zeros(group * cbstride, wts)
        held = np.empty(slots, np.int64)
        ntab = kh_ * kw_ * m_
        soff = np.empty(ntab, np.int64)
        woff = np.empty(ntab, np.int64)
        runs = np.empty((ntab, 4), np.int64)
        kslot = np.empty(kh_, np.int64)
        zero = vzero(wts)
        for g0 in range(0, blocks, group):
            g1 = min(g0 + group, blocks)
            held[:] = -1
            for row in range(r0, r1):
                n = row // h_
                ih = row - n * h_
                for kh in range(kh_):
                    kslot[kh] = -1
                    u = ih + pt - kh * dh
                    if u < 0 or u % sh != 0 or u // sh >= oh_:
                        continue
                    oh = u // sh
                    slot, fresh = _ring_slot(held, oh, n * oh_ + oh)
                    kslot[kh] = slot
                    if fresh:
                        _stage_dy_row_nhwc(stage, dy, n, oh, c_, m_, g0, g1, slot * slotlen, cbstride, owp, padl)
                xrow = (n * h_ + ih) * w_
                # the dy row the next input row adds (its kh = 0 tap), prefetched during this row
                pf = 0
                pf_end = 0
                u = ih + 1 + pt
                if row + 1 < r1 and ih + 1 < h_ and u % sh == 0 and u // sh < oh_ and g1 - g0 == blocks:
                    pf = (n * oh_ + u // sh) * ow_ * cm
                    pf_end = pf + ow_ * cm
                per = _per_call(dy, pf, pf_end, ((w_ + BLOCK - 1) // BLOCK) * (g1 - g0))
                # unless streaming, the next dx row is fetched for ownership (as in the forward)
                wf = (xrow + w_) * c_
                wf_end = wf + w_ * c_ if not stream and row + 1 < r1 and g1 - g0 == blocks else wf
                wper = _per_call(dx, wf, wf_end, ((w_ + BLOCK - 1) // BLOCK) * (g1 - g0))
                for r in range(min(sw, w_)):
                    t = 0
                    for kh in range(kh_):
                        if kslot[kh] < 0:
                            continue
                        for q in range(m_):
                            for kw in range(kw_ - 1, -1, -1):  # columns ascend: the taps form runs
                                u = r + pl - kw * dw
                                if u % sw != 0:
                                    continue
                                soff[t] = kslot[kh] * slotlen + (q * owp + u // sw + padl) * L
                                woff[t] = ((kh * kw_ + kw) * m_ + q) * cp
                                t += 1
                    nruns = _runs(soff, woff, t, L, runs)
                    slide = SLIDE and 2 * nruns <= t
                    fixed = _run_length(runs, nruns)
                    ni = (w_ - r + sw - 1) // sw
                    sevens = _sevens(ni)
                    for cb in range(g0, g1):
                        sb = (cb - g0) * cbstride
                        wb = cb * L
                        count = c_ - wb
                        step = sw * c_
                        i = 0
                        while i < ni:
                            if sevens or ni >= BLOCK:
                                if not sevens and i + BLOCK > ni:
                                    i = ni - BLOCK
                                o = (xrow + r + i * sw) * c_ + wb
                                res = (zero, zero, zero, zero, zero, zero, zero, zero)
                                if sevens:
                                    if t > 0 and slide:
                                        res = _slide(stage, sb + i * L, L, runs, nruns, wts, wb, False, 7, fixed)
                                    elif t > 0:
                                        res = _mac8(stage, sb + i * L, L, soff, wts, woff, wb, t, False, 7)
                                    _store8(dx, o, step, res, count, stream, zero, False, zero, zero, False, 7)
                                else:
                                    if t > 0 and slide:
                                        res = _slide(stage, sb + i * L, L, runs, nruns, wts, wb, False, 8, fixed)
                                    elif t > 0:
                                        res = _mac8(stage, sb + i * L, L, soff, wts, woff, wb, t, False)
                                    _store8(dx, o, step, res, count, stream, zero, False, zero, zero, False)
                                pf = _prefetch_some(dy, pf, pf_end, per)
                                wf = _prefetch_some(dx, wf, wf_end, wper, True)
                                i += 7 if sevens else BLOCK
                            else:
                                a = _mac1(stage, sb + i * L, soff, wts, woff, wb, t, False)
                                _put(dx, (xrow + r + i * sw) * c_ + wb, a, count)
                                i += 1
        if stream:
            store_fence()


@njit(cache=True, fastmath=FASTMATH)
def _load_count(arr, offset, count):
    """The first ``count`` (clipped to 0..L) elements of ``arr`` at ``offset``; the rest zero."""
    if count >= vlanes(arr):
        return vload(arr, offset)
    if count <= 0:
        return vzero(arr)
    return vload_n(arr, offset, count)


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates dy's shared reference count
def _stage_dy_row_nhwc(stage, dy, n, oh, c_, m_, g0, g1, dst0, cbstride, owp, padl):
    """Row ``(n, oh)`` of NHWC ``dy`` into the stage, laid out per input-channel block as
    ``[q][column + padl][lane = c]`` (channel ``j = c * m_ + q`` of ``dy``)."""
    ow_, cm = dy.shape[2], dy.shape[3]
    L = vlanes(stage)
    row = (n * dy.shape[1] + oh) * ow_
    if m_ == 1:
        full = min(g1, c_ // L)  # blocks without a channel tail
        for ow in range(ow_):
            src = (row + ow) * cm
            dst = dst0 + (padl + ow) * L
            for cb in range(g0, full):
                vstore(stage, dst + (cb - g0) * cbstride, vload(dy, src + cb * L))
            if full < g1:
                vstore(stage, dst + (full - g0) * cbstride, vload_n(dy, src + full * L, c_ - full * L))
        return
    if m_ == 2 or m_ == 4:
        # channels j = c * m_ + q of a block are m_ * L consecutive values: split them by q
        for ow in range(ow_):
            src = (row + ow) * cm
            dst = dst0 + (padl + ow) * L
            for cb in range(g0, g1):
                j0 = cb * L * m_
                d = dst + (cb - g0) * cbstride
                a = _load_count(dy, src + j0, cm - j0)
                b = _load_count(dy, src + j0 + L, cm - j0 - L)
                if m_ == 2:
                    vstore(stage, d, veven(a, b))
                    vstore(stage, d + owp * L, vodd(a, b))
                else:
                    e = _load_count(dy, src + j0 + 2 * L, cm - j0 - 2 * L)
                    f = _load_count(dy, src + j0 + 3 * L, cm - j0 - 3 * L)
                    lo_ev, lo_od, hi_ev, hi_od = veven(a, b), vodd(a, b), veven(e, f), vodd(e, f)
                    vstore(stage, d, veven(lo_ev, hi_ev))
                    vstore(stage, d + owp * L, veven(lo_od, hi_od))
                    vstore(stage, d + 2 * owp * L, vodd(lo_ev, hi_ev))
                    vstore(stage, d + 3 * owp * L, vodd(lo_od, hi_od))
        return
    flat = dy.reshape(-1)
    for cb in range(g0, g1):
        dst = dst0 + (cb - g0) * cbstride + padl * L
        c0 = cb * L
        c1 = min(c0 + L, c_)
        for q in range(m_):
            for ow in range(ow_):
                src = (row + ow) * cm + q
                base = dst + (q * owp + ow) * L - c0
                for c in range(c0, c1):
                    stage[_index(base + c)] = widen(flat[_index(src + c * m_)])


@njit(cache=True)
def _rows_per_block(rows):
    """Rows the NCHW micro-kernel blocks together for a run of ``rows`` rows: seven for 7k rows
    (7, 14, 28: no overlapping last block; see :func:`_sevens`), else eight, four or one."""
    if _sevens(rows):
        return 7
    return BLOCK if rows >= BLOCK else (4 if rows >= 4 else 1)


@njit(cache=True, fastmath=FASTMATH)
def _stage_dy_rows_nchw(stage, flat, base, oh_, ow_, oh0, nrows, dst0, rowlen, sw, padu):
    """Rows ``oh0 .. oh0 + nrows`` of one NCHW ``dy`` plane (``flat[base:]``, (OH, OW)) into the
    stage, upsampled by the column stride: output column ``ow`` lands at ``ow * sw + padu``,
    every other position is zero. Rows outside the plane are zero. ``rowlen`` leaves room for
    whole vectors."""
    L = vlanes(stage)
    zero = vzero(stage)
    for k in range(nrows):
        oh = oh0 + k
        d = dst0 + k * rowlen
        if oh < 0 or oh >= oh_:
            for i in range(0, rowlen, L):
                vstore(stage, d + i, zero)
            continue
        src = base + oh * ow_
        for ow in range(0, ow_, L):
            v = vload(flat, src + ow) if ow + L <= ow_ else vload_n(flat, src + ow, ow_ - ow)
            if sw == 1:
                vstore(stage, d + padu + ow, v)
            elif sw == 2:
                vstore(stage, d + padu + 2 * ow, vzip_lo(v, zero))
                vstore(stage, d + padu + 2 * ow + L, vzip_hi(v, zero))
            else:
                for i in range(min(L, ow_ - ow)):
                    stage[_index(d + padu + (ow + i) * sw)] = widen(flat[_index(src + ow + i)])


@njit(cache=True)
def _bpi_reach(r, pt, kh_, sh, dh):
    """``(amin, amax)``: input row ``r + sh * i`` (row phase ``r``) reads dy rows ``i + amin`` to
    ``i + amax``; ``amax < amin`` when no tap reaches the phase."""
    amin = 1 << 62
    amax = -amin
    for kh in range(kh_):
        u = r + pt - kh * dh
        if u % sh == 0:
            amin = min(amin, u // sh)
            amax = max(amax, u // sh)
    return amin, amax


@njit(cache=True)
def _bpi_rows(ua, ub, h_, sh, r):
    """``(ia, ib, rb)``: rows ``[ia, ib)`` of row phase ``r`` that the work unit of rows
    ``[ua, ub)`` computes, ``rb`` rows to a block (empty when the phase's rows end before ``ua``):
    at least one block, so a short run reaches forward into the next unit's rows or, at the end of
    the plane, back into the previous one's."""
    ni = (h_ - r + sh - 1) // sh
    rb = _rows_per_block(ni)
    ib = min(ub, ni)
    if ib <= ua:
        return 0, 0, rb
    if ib - ua >= rb:
        return ua, ib, rb
    if ua + rb <= ni:
        return ua, ua + rb, rb
    return ni - rb, ni, rb


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_input_nchw(dy, wts, dx, kh_, kw_, sh, sw, dh, dw, pt, pl, tasks, stream, budget):
    """dy (N, C*M, OH, OW); wts (C*M*KH*KW,) widened, plane-major; dx (N, C, H, W).

    Vectors run along the input width over ``dy`` rows upsampled by the column stride (zeros
    between columns, exact for a finite filter); input rows are taken by stride phase
    (ih = r + sh * i), so that eight consecutive i of one phase share one tap table. A work
    unit is a run of i of one plane, for every phase: the dy rows they read are staged once.
    """
    n_, cm, oh_, ow_ = dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3]
    c_, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
    m_ = cm // c_
    taps = kh_ * kw_
    L = vlanes(wts)
    padu = max(0, (kw_ - 1) * dw - pl)
    # staged dy row: upsampled columns from padu on, whole vectors, room for reads past the end
    rowlen = (max(max(w_, L) + pl + L, sw * ((ow_ + L - 1) // L) * L) + padu + L - 1) // L * L
    phases = min(sh, h_)
    alo = 1 << 62  # input rows i of every phase read dy rows i + alo to i + ahi
    ahi = -alo
    for r in range(phases):
        amin, amax = _bpi_reach(r, pt, kh_, sh, dh)
        alo = min(alo, amin)
        ahi = max(ahi, amax)
    if ahi < alo:  # no tap reaches any input row
        alo, ahi = 0, 0
    ni0 = (h_ + sh - 1) // sh  # rows of phase 0, the most
    crows = _chunk_rows(ni0, _rows_per_block(ni0), 1, ahi - alo + 1, m_ * rowlen, budget)
    per_plane = (ni0 + crows - 1) // crows
    maxrows = crows + ahi - alo + 2 * BLOCK  # a phase's short run reaches past the unit (_bpi_rows)
    units = n_ * c_ * per_plane
    flat_dy = dy.reshape(-1)
    flat_dx = dx.reshape(-1)
    for task in prange(tasks):
        u0, u1 = _split(task, tasks, units)
        stage = _aligned_zeros(m_ * maxrows * rowlen + L, wts)
        obuf = _aligned_zeros(BLOCK * w_ + L, wts)
        soff = np.empty(taps * m_, np.int64)
        woff = np.empty(taps * m_, np.int64)
        runs = np.empty((taps * m_, 4), np.int64)
        table_r, table_a, table_rows = -1, 0, 0
        t, nruns, slide, fixed = 0, 0, False, 0
        zero = vzero(wts)
        for unit in range(u0, u1):
            plane = unit // per_plane
            n = plane // c_
            c = plane - n * c_
            ua = (unit - plane * per_plane) * crows  # rows i in [ua, ub) of every phase
            ub = min(ua + crows, ni0)
            lo = 1 << 62  # dy rows lo .. hi, read by this unit's rows of every phase
            hi = -lo
            for r in range(phases):
                ia, ib, _ = _bpi_rows(ua, ub, h_, sh, r)
                amin, amax = _bpi_reach(r, pt, kh_, sh, dh)
                if ia < ib and amin <= amax:
                    lo = min(lo, ia + amin)
                    hi = max(hi, ib - 1 + amax)
            nrows = max(0, hi - lo + 1)
            for q in range(m_):
                _stage_dy_rows_nchw(stage, flat_dy, (n * cm + c * m_ + q) * oh_ * ow_, oh_, ow_, lo, nrows,
                                    q * nrows * rowlen, rowlen, sw, padu)
            # prefetch the dy rows after the staged ones (the next unit's, or the next plane's first
            # ones at the end of this plane) while this unit computes
            plane_dy = oh_ * ow_
            pf = plane * m_ * plane_dy + max(0, lo + nrows) * ow_
            if pf >= (plane * m_ + 1) * plane_dy:
                pf = (plane + 1) * m_ * plane_dy
            pf_end = min(pf + m_ * nrows * ow_, dy.size) if unit + 1 < u1 else pf
            per = _per_call(dy, pf, pf_end, phases * ((ub - ua + BLOCK - 1) // BLOCK) * ((w_ + L - 1) // L))
            for r in range(phases):
                ia, ib, rb = _bpi_rows(ua, ub, h_, sh, r)
                if ia == ib:
                    continue
                amin, amax = _bpi_reach(r, pt, kh_, sh, dh)
                if amax < amin:  # no tap reaches these rows
                    for i in range(ia, ib):
                        for iw in range(0, w_, L):
                            _put(flat_dx, ((n * c_ + c) * h_ + r + sh * i) * w_ + iw, zero, w_ - iw)
                    continue
                if r != table_r or ia - lo != table_a or nrows != table_rows:  # the table depends on these only
                    table_r, table_a, table_rows = r, ia - lo, nrows
                    t = 0
                    for q in range(m_):
                        for kw in range(kw_):
                            for kh in range(kh_ - 1, -1, -1):  # dy rows ascend: runs when dh == sh
                                u = r + pt - kh * dh
                                if u % sh != 0:
                                    continue
                                soff[t] = (q * nrows + u // sh + ia - lo) * rowlen + pl - kw * dw + padu
                                woff[t] = q * taps + kh * kw_ + kw
                                t += 1
                    nruns = _runs(soff, woff, t, rowlen, runs)
                    slide = SLIDE and 2 * nruns <= t
                    fixed = _run_length(runs, nruns)
                wb = c * m_ * taps
                ostep = sh * w_
                direct = stream and rb >= 7 and _whole_lines(flat_dx, 0, w_)  # rows of whole lines
                i0 = ia
                while i0 < ib:
                    if i0 + rb > ib:
                        i0 = ib - rb  # the last block overlaps the previous one
                    so = (i0 - ia) * rowlen
                    obase = ((n * c_ + c) * h_ + r + sh * i0) * w_
                    iw = 0
                    while iw < w_:
                        pf = _prefetch_some(dy, pf, pf_end, per)
                        count = w_ - iw
                        if count < L and w_ >= L:
                            iw = w_ - L
                            count = L
                        if rb == BLOCK:
                            if slide:
                                res = _slide(stage, so + iw, rowlen, runs, nruns, wts, wb, True, 8, fixed)
                            else:
                                res = _mac8(stage, so + iw, rowlen, soff, wts, woff, wb, t, True)
                            if direct:  # line-aligned rows: straight to dx, bypassing the caches
                                _store8(flat_dx, obase + iw, ostep, res, count, True, zero, False, zero, zero, False)
                            else:  # whole vectors: a short row's extra lanes land on the next row, stored after it
                                _store8(obuf, iw, w_, res, L, False, zero, False, zero, zero, False)
                        elif rb == 7:  # 7k rows in this phase: blocks of seven, none overlapping
                            if slide:
                                res = _slide(stage, so + iw, rowlen, runs, nruns, wts, wb, True, 7, fixed)
                            else:
                                res = _mac8(stage, so + iw, rowlen, soff, wts, woff, wb, t, True, 7)
                            if direct:
                                _store8(flat_dx, obase + iw, ostep, res, count, True, zero, False, zero, zero, False, 7)
                            else:
                                _store8(obuf, iw, w_, res, L, False, zero, False, zero, zero, False, 7)
                        elif rb == 4:
                            r4 = _mac8(stage, so + iw, rowlen, soff, wts, woff, wb, t, True, 4)
                            for b in range(4):
                                _put(obuf, b * w_ + iw, r4[b], count)
                        else:
                            _put(obuf, iw, _mac1(stage, so + iw, soff, wts, woff, wb, t, True), count)
                        iw += L
                    if direct:
                        pass
                    elif sh == 1:  # the block's rows are consecutive in dx: one copy, no masked tail per row
                        _copy_out(flat_dx, obase, obuf, 0, rb * w_, stream and _whole_lines(flat_dx, obase, rb * w_))
                    else:
                        for b in range(rb):
                            _copy_out(flat_dx, obase + b * ostep, obuf, b * w_, w_, False)
                    i0 += rb
        if stream:
            store_fence()


output_range = njit(cache=True)(spec.output_range)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_input_exact_nhwc(dy, w, dx, sh, sw, dh, dw, pt, pl):
    """Gather without padding zeros, for filters holding NaN or Inf.
    dy (N, OH, OW, C*M), w (KH, KW, C*M) widened, dx (N, H, W, C)."""
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
                    for c in range(c_):
                        s = acc[c]
                        for q in range(m_):
                            s += widen(dy[n, oh, ow, c * m_ + q]) * w[kh, kw, c * m_ + q]
                        acc[c] = s
            for c in range(c_):
                dx[n, ih, iw, c] = narrow(acc[c], dx)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_input_exact_nchw(dy, w, dx, sh, sw, dh, dw, pt, pl):
    """:func:`_backprop_input_exact_nhwc` for dy (N, C*M, OH, OW), dx (N, C, H, W)."""
    n_, c_, h_, w_ = dx.shape
    kh_, kw_, cm = w.shape
    m_ = cm // c_
    oh_, ow_ = dy.shape[2], dy.shape[3]
    for row in prange(n_ * h_):
        n = row // h_
        ih = row - n * h_
        acc = np.empty(w_, w.dtype)
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

@njit(cache=True, fastmath=FASTMATH)
def _dy_block(dy, d, cm, count, nb):
    """The ``dy`` vectors of ``nb`` (8, 7 or 4) consecutive NHWC pixels from element ``d``, pixels
    ``cm`` apart, first ``count`` lanes, as eight vectors: the ones past ``nb`` are zero and not
    read."""
    z = vzero(dy)
    wide = nb > 4
    return (_load_count(dy, d, count), _load_count(dy, d + cm, count), _load_count(dy, d + 2 * cm, count),
            _load_count(dy, d + 3 * cm, count), _load_count(dy, d + 4 * cm, count) if wide else z,
            _load_count(dy, d + 5 * cm, count) if wide else z, _load_count(dy, d + 6 * cm, count) if wide else z,
            _load_count(dy, d + 7 * cm, count) if nb == 8 else z)


@njit(cache=True, fastmath=FASTMATH, inline="always")  # a call updates the arrays' shared reference counts
def _grad_row(stage, sb, runs, nruns, slide, soff, aoff, taps, acc, wb, dsrc, d, dstep, count, ow_, sevens,
              x, pf, pf_end, per, dy, qf, qf_end, qper):
    """Backprop filter over one output row of (pixel, channel) vectors: the stage row from
    ``sb`` (pixels one vector apart), dy vectors of ``dsrc`` from ``d``, ``dstep`` apart (first
    ``count`` lanes), into ``acc`` at ``wb``; blocks of eight (or seven for rows of 7k pixels),
    then four, then single pixels. Prefetches ``x`` and ``dy`` on the way; returns where they
    continue."""
    L = vlanes(acc)
    ow = 0
    if sevens:  # rows of 7k pixels: blocks of seven, no 4- and 1-pixel tail
        while ow + 7 <= ow_:
            pf = _prefetch_some(x, pf, pf_end, per)
            qf = _prefetch_some(dy, qf, qf_end, qper)
            d0, d1, d2, d3, d4, d5, d6, d7 = _dy_block(dsrc, d + ow * dstep, dstep, count, 7)
            if slide:
                _grad_slide8(stage, sb + ow * L, L, runs, nruns, acc, wb, d0, d1, d2, d3, d4, d5, d6, d7, 7)
            else:
                _grad8(stage, sb + ow * L, L, soff, aoff, taps, acc, wb, d0, d1, d2, d3, d4, d5, d6, d7, 7)
            ow += 7
    while ow + BLOCK <= ow_:
        pf = _prefetch_some(x, pf, pf_end, per)
        qf = _prefetch_some(dy, qf, qf_end, qper)
        d0, d1, d2, d3, d4, d5, d6, d7 = _dy_block(dsrc, d + ow * dstep, dstep, count, 8)
        if slide:
            _grad_slide8(stage, sb + ow * L, L, runs, nruns, acc, wb, d0, d1, d2, d3, d4, d5, d6, d7)
        else:
            _grad8(stage, sb + ow * L, L, soff, aoff, taps, acc, wb, d0, d1, d2, d3, d4, d5, d6, d7)
        ow += BLOCK
    if ow + 4 <= ow_:  # the end of the row: four pixels, then single ones
        d0, d1, d2, d3, d4, d5, d6, d7 = _dy_block(dsrc, d + ow * dstep, dstep, count, 4)
        _grad8(stage, sb + ow * L, L, soff, aoff, taps, acc, wb, d0, d1, d2, d3, d4, d5, d6, d7, 4)
        ow += 4
    while ow < ow_:
        _grad1(stage, sb + ow * L, soff, aoff, taps, acc, wb, _load_count(dsrc, d + ow * dstep, count), L)
        ow += 1
    return pf, qf


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_filter_nhwc(x, dy, partial, kh_, kw_, sh, sw, dh, dw, pt, pl, budget):
    """x (N, H, W, C); dy (N, OH, OW, C*M); partial (T, KH*KW*CP) zeroed, accumulator dtype:
    task t adds its rows' products into partial[t], tap-major, channels padded to CP lanes."""
    tasks = partial.shape[0]
    taps = kh_ * kw_
    cp = partial.shape[1] // taps
    n_, h_ = x.shape[0], x.shape[1]
    oh_, ow_, cm = dy.shape[1], dy.shape[2], dy.shape[3]
    L = vlanes(partial)
    blocks = cp // L
    eff_h = (kh_ - 1) * dh + 1
    wq = ((ow_ - 1) * sw + (kw_ - 1) * dw + 1 + sw - 1) // sw
    slotlen = sw * wq * L
    cbstride = (eff_h + 1) * slotlen + L
    group = max(1, min(blocks, budget // cbstride))
    rows = n_ * oh_
    sevens = _sevens(ow_)
    for task in prange(tasks):
        r0, r1 = _split(task, tasks, rows)
        acc = partial[task]
        stage = _aligned_zeros(group * cbstride, partial)
        held = np.empty(eff_h, np.int64)
        soff = np.empty(taps, np.int64)
        aoff = np.empty(taps, np.int64)
        runs = np.empty((taps, 4), np.int64)
        for g0 in range(0, blocks, group):
            g1 = min(g0 + group, blocks)
            held[:] = -1
            for row in range(r0, r1):
                n = row // oh_
                oh = row - n * oh_
                t = _stage_taps_nhwc(stage, x, held, soff, aoff, n, oh, sh, pt, dh, dw, kh_, kw_, eff_h,
                                     cm // x.shape[3], g0, g1, slotlen, cbstride, sw, wq, pl, cp, L)
                nruns = _runs(soff, aoff, taps, L, runs)
                slide = SLIDE and 2 * nruns <= taps
                drow = (n * oh_ + oh) * ow_
                ahead = row + 1 < r1 and g1 - g0 == blocks
                pf, pf_end = _next_rows_nhwc(x, n, oh, oh_, sh, pt, (kh_ - 1) * dh, min(sh, eff_h), ahead)
                per = _per_call(x, pf, pf_end, ow_ // BLOCK * (g1 - g0) + 1)
                # the next row of dy too: the hardware prefetcher does not keep up with two streams
                # (8x56x56x144, 2 threads: 3.7 -> 1.6 ms)
                qf = (drow + ow_) * cm
                qf_end = (drow + 2 * ow_) * cm if ahead else qf
                qper = _per_call(dy, qf, qf_end, ow_ // BLOCK * (g1 - g0) + 1)
                for cb in range(g0, g1):
                    sb = (cb - g0) * cbstride
                    wb = cb * L
                    count = cm - wb
                    pf, qf = _grad_row(stage, sb, runs, nruns, slide, soff, aoff, taps, acc, wb, dy, drow * cm + wb, cm,
                                       count, ow_, sevens, x, pf, pf_end, per, dy, qf, qf_end, qper)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_filter_nchw(x, dy, partial, kh_, kw_, sh, sw, dh, dw, pt, pl, budget):
    """x (N, C, H, W); dy (N, C*M, OH, OW); partial (T, KH*KW*C*M) zeroed, accumulator dtype,
    [tap][output channel]. Vectors run along the width; eight rows of dy share each tap's
    accumulator load/store; a work unit is a run of 8-row blocks of one plane
    (:func:`_chunk_rows`), staged at once; lanes are summed when a unit ends."""
    tasks = partial.shape[0]
    taps = kh_ * kw_
    n_, c_ = x.shape[0], x.shape[1]
    cm, oh_, ow_ = dy.shape[1], dy.shape[2], dy.shape[3]
    m_ = cm // c_
    L = vlanes(partial)
    eff_h = (kh_ - 1) * dh + 1
    wq = ((ow_ - 1) * sw + (kw_ - 1) * dw + 1 + sw - 1) // sw
    seg = (wq + 2 * L - 1) // L * L  # a phase of a staged row: whole vectors, room for one past the end
    rowlen = sw * seg
    crows = _chunk_rows(oh_, BLOCK, sh, eff_h, rowlen, budget)
    chunks = (oh_ + crows - 1) // crows
    nrows = ((crows + BLOCK - 1) // BLOCK * BLOCK - 1) * sh + eff_h  # a short last block reads zero rows
    units = n_ * c_ * chunks
    h_, w_ = x.shape[2], x.shape[3]
    vecs = (ow_ + L - 1) // L
    tail = ow_ % L
    flat_x = x.reshape(-1)
    flat_dy = dy.reshape(-1)
    for task in prange(tasks):
        u0, u1 = _split(task, tasks, units)
        stage = _aligned_zeros(nrows * rowlen + L, partial)
        accv = _aligned_zeros(2 * taps * L, partial)  # full vectors, then a row's short last vector
        zero = vzero(partial)
        soff = np.empty(taps, np.int64)
        aoff = np.empty(taps, np.int64)
        runs = np.empty((taps, 4), np.int64)
        t = 0
        for kw in range(kw_):  # a filter column's taps read rows dh apart: runs when dh == sh
            for kh in range(kh_):
                off = kw * dw
                soff[t] = kh * dh * rowlen + (off % sw) * seg + off // sw
                aoff[t] = (kh * kw_ + kw) * L
                t += 1
        nruns = _runs(soff, aoff, taps, sh * rowlen, runs)
        slide = SLIDE and 2 * nruns <= taps
        for unit in range(u0, u1):
            plane = unit // chunks
            k = unit - plane * chunks
            n = plane // c_
            c = plane - n * c_
            a = k * crows  # dy rows [a, b) of this unit
            b = min(a + crows, oh_)
            needed = (b - a - 1) * sh + eff_h
            _stage_rows_nchw(stage, flat_x, plane * h_ * w_, h_, w_, a * sh - pt, needed, seg, sw, pl)
            reach = ((b - a + BLOCK - 1) // BLOCK * BLOCK - 1) * sh + eff_h  # rows the last block reads
            for i in range(needed * rowlen, reach * rowlen, L):
                vstore(stage, i, zero)
            # the next unit's input rows and dy rows, prefetched while this one computes (without
            # it the reads wait on memory: 5.3 -> 2.2 ms on 8x32x112x112, one thread)
            more = unit + 1 < u1
            pf, pf_end = _next_unit_nchw(x, more, unit + 1, chunks, crows, sh, pt, nrows)
            nplane = (unit + 1) // chunks
            na = (unit + 1 - nplane * chunks) * crows
            qf = (nplane * m_ * oh_ + na) * ow_
            qf_end = min(qf + min(crows, oh_ - na) * ow_, dy.size) if more else qf
            calls = m_ * ((b - a + BLOCK - 1) // BLOCK) * vecs
            per = _per_call(x, pf, pf_end, calls)
            perq = _per_call(dy, qf, qf_end, calls)
            for q in range(m_):
                j = c * m_ + q
                accv[:] = 0
                for o0 in range(a, b, BLOCK):
                    nr = min(BLOCK, b - o0)
                    so = (o0 - a) * sh * rowlen
                    dbase = ((n * cm + j) * oh_ + o0) * ow_
                    for ow in range(0, ow_, L):
                        count = min(L, ow_ - ow)
                        d = dbase + ow
                        pf = _prefetch_some(x, pf, pf_end, per)
                        qf = _prefetch_some(dy, qf, qf_end, perq)
                        # Missing rows (nr < 8) have zero dy against zeroed stage rows; a short last
                        # vector has zero dy lanes and goes to its own accumulator, whose lanes past
                        # ``count`` (products with whatever the stage holds there) are never summed.
                        a0 = 0 if count == L else taps * L
                        d0 = _load_count(flat_dy, d, count)
                        d1 = _load_count(flat_dy, d + ow_, count) if nr > 1 else zero
                        d2 = _load_count(flat_dy, d + 2 * ow_, count) if nr > 2 else zero
                        d3 = _load_count(flat_dy, d + 3 * ow_, count) if nr > 3 else zero
                        d4 = _load_count(flat_dy, d + 4 * ow_, count) if nr > 4 else zero
                        d5 = _load_count(flat_dy, d + 5 * ow_, count) if nr > 5 else zero
                        d6 = _load_count(flat_dy, d + 6 * ow_, count) if nr > 6 else zero
                        d7 = _load_count(flat_dy, d + 7 * ow_, count) if nr > 7 else zero
                        p0 = so + ow
                        if slide:
                            _grad_slide8(stage, p0, sh * rowlen, runs, nruns, accv, a0, d0, d1, d2, d3, d4, d5, d6, d7)
                        else:
                            _grad8(stage, p0, sh * rowlen, soff, aoff, taps, accv, a0, d0, d1, d2, d3, d4, d5, d6, d7)
                for t in range(taps):
                    s = vsum(vload(accv, t * L))
                    if tail:
                        s += vsum(vload_n(accv, (taps + t) * L, tail))
                    partial[task, t * cm + j] += s


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backprop_filter_nchw_tiled(x, dy, partial, kh_, kw_, sh, sw, dh, dw, pt, pl):
    """x (N, C, H, W); dy (N, C*M, OH, OW); partial (T, KH*KW*M*CP) zeroed, accumulator dtype,
    [tap][multiplier][channel padded to CP lanes].

    For small planes, as :func:`_forward_nchw_tiled`: ``lanes`` planes of x and, per multiplier,
    of dy are transposed into (pixel, channel) tiles, and the products are summed there as the
    NHWC kernel does (eight dy pixels in registers, each tap's accumulator loaded once per eight
    products). dy lanes past the planes are zero, so padded channels add nothing.
    """
    tasks = partial.shape[0]
    taps = kh_ * kw_
    n_, c_, h_, w_ = x.shape
    cm, oh_, ow_ = dy.shape[1], dy.shape[2], dy.shape[3]
    m_ = cm // c_
    cp = partial.shape[1] // (taps * m_)
    L = vlanes(partial)
    groups = cp // L
    th, wq, tw = _tile_shape(oh_, ow_, kh_, kw_, sh, sw, dh, dw)
    hw = h_ * w_
    ohw = oh_ * ow_
    units = n_ * groups
    sevens = _sevens(ow_)
    flat_x = x.reshape(-1)
    flat_dy = dy.reshape(-1)
    for task in prange(tasks):
        u0, u1 = _split(task, tasks, units)
        acc = partial[task]
        tile = _aligned_zeros(th * tw * L + L, partial)
        dtile = _aligned_zeros(ohw * L, partial)
        scratch = _aligned_zeros(L * L, partial)
        soff = np.empty(taps, np.int64)
        aoff = np.empty(taps, np.int64)
        runs = np.empty((taps, 4), np.int64)
        _tile_taps(soff, aoff, m_ * cp, kh_, kw_, dh, dw, sw, wq, tw, L)
        nruns = _runs(soff, aoff, taps, L, runs)
        slide = SLIDE and 2 * nruns <= taps
        for unit in range(u0, u1):
            n = unit // groups
            c0 = (unit - n * groups) * L
            nc = min(L, c_ - c0)
            _tile_in_nchw(tile, scratch, flat_x, (n * c_ + c0) * hw, h_, w_, nc, pt, pl, th, sw, wq)
            # the next unit's planes of x and dy, fetched while computing (see _forward_nchw_tiled)
            more = unit + 1 < u1
            pf = (n * c_ + c0 + nc) * hw
            pf_end = min(pf + L * hw, flat_x.size) if more else pf
            qf = (n * cm + (c0 + nc) * m_) * ohw
            qf_end = min(qf + L * m_ * ohw, flat_dy.size) if more else qf
            calls = m_ * oh_ * ((ow_ + 6) // 7)
            per = _per_call(x, pf, pf_end, calls)
            qper = _per_call(dy, qf, qf_end, calls)
            for q in range(m_):
                dbase = (n * cm + c0 * m_ + q) * ohw
                for p0 in range(0, ohw, L):
                    cnt = min(L, ohw - p0)
                    if nc == L and cnt == L:
                        vtranspose(flat_dy, dbase + p0, m_ * ohw, dtile, p0 * L, L, L)
                    else:
                        _gather_square(scratch, flat_dy, dbase + p0, m_ * ohw, nc, cnt)
                        vtranspose(scratch, 0, L, dtile, p0 * L, L, cnt)
                wb = q * cp + c0
                for oh in range(oh_):
                    sb = oh * sh * tw * L
                    drow = oh * ow_ * L
                    pf, qf = _grad_row(tile, sb, runs, nruns, slide, soff, aoff, taps, acc, wb, dtile, drow, L, L,
                                       ow_, sevens, x, pf, pf_end, per, dy, qf, qf_end, qper)


_KERNELS = {
    ("forward", "NHWC"): _forward_nhwc,
    ("forward", "NCHW"): _forward_nchw,
    ("backprop_input", "NHWC"): _backprop_input_nhwc,
    ("backprop_input", "NCHW"): _backprop_input_nchw,
    ("backprop_input_exact", "NHWC"): _backprop_input_exact_nhwc,
    ("backprop_input_exact", "NCHW"): _backprop_input_exact_nchw,
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


def _lanes(acc):
    return VECTOR_BYTES // np.dtype(acc).itemsize


def _kernel_view(array, dtype):
    """A C-contiguous array of ``dtype`` data as the kernel sees it (16-bit floats as bit patterns)."""
    return np.ascontiguousarray(array, dtype=dtype).view(spec.storage_dtype(dtype))


class _ResultPool:
    """Recycles the memory of large results once the caller has dropped them.

    A fresh NumPy result of more than a few MiB is new memory from the operating system, which
    zeroes every page on first touch: for a streaming kernel that costs about as much as the
    kernel itself (a 51 MB result: 2.46x against 1.23x the copy floor with ``out=``). Like the
    caching allocators of GPU frameworks, the pool keeps the buffers of recent large results
    and hands one out again when nothing else refers to it any more: no array, view or
    exported buffer of it is alive (its reference count is the pool's alone). At most
    ``NBDW_RESULT_POOL_MB`` MiB (default 256; 0 turns the pool off) and 8 buffers are kept;
    :func:`release_result_pool` drops them.
    """

    MIN_BYTES = 4 * 1024 * 1024
    MAX_BUFFERS = 8

    def __init__(self):
        self._lock = threading.Lock()
        self._buffers = []  # owners (1-D uint8 arrays), least recently used first
        try:
            self.max_bytes = int(float(os.environ.get("NBDW_RESULT_POOL_MB", "256")) * 2**20)
        except ValueError:
            raise ValueError("NBDW_RESULT_POOL_MB must be a number of MiB, got "
                             f"{os.environ['NBDW_RESULT_POOL_MB']!r}") from None

    def take(self, nbytes):
        """An owner of ``nbytes`` bytes, recycled when one is idle."""
        if nbytes < self.MIN_BYTES or nbytes > self.max_bytes:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            for i in range(len(self._buffers)):
                raw = self._buffers[i]
                # references: the list, ``raw`` and getrefcount's argument; any more is a user's
                if raw.nbytes == nbytes and sys.getrefcount(raw) == 3:
                    self._buffers.append(self._buffers.pop(i))
                    return raw
            raw = np.empty(nbytes, np.uint8)
            self._buffers.append(raw)
            while len(self._buffers) > self.MAX_BUFFERS or sum(b.nbytes for b in self._buffers) > self.max_bytes:
                self._buffers.pop(0)  # forgotten; a caller still holding it keeps it alive
            return raw

    def release(self):
        with self._lock:
            self._buffers.clear()


_POOL = _ResultPool()


def release_result_pool():
    """Drop the large result buffers the CPU backend keeps for reuse (see :class:`_ResultPool`)."""
    _POOL.release()


def _empty_aligned(shape, dtype):
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary; large ones
    reuse the memory of a dropped earlier result (:class:`_ResultPool`)."""
    dtype = np.dtype(dtype)
    return arrays.aligned_view(_POOL.take(math.prod(shape) * dtype.itemsize + arrays.CACHE_LINE), shape, dtype)


def _stream(result):
    """Whether a kernel should write ``result`` with non-temporal stores: large, 64-byte
    aligned, 32- or 64-bit data, and only when one stored vector is a whole cache line (64-byte
    vectors). A smaller one is half a line whose other half (the next channel block) is written
    much later: streaming it measured slower, for 16-bit data, and with AVX2's 32-byte vectors
    (Zen 3, NHWC backprop input 112x112x32: 1.6x, stride 2: 2.9x; NCHW forward 8x32x112x112:
    6.9 against 3.5 ms). Through a row buffer streamed out in address order it did not pay
    either (Zen 3: forward 1.10x, backprop input 1.04x the time of ordinary stores).

    The NCHW kernels stream only whole lines (:func:`_whole_lines`): rows of whole lines
    straight from registers, and a row buffer's copy where its block of rows spans whole lines
    (56-wide planes on a Zen 4: forward 0.60-0.67x, backprop input 0.71x), and the whole lines
    of the forward's gathered run (:func:`_drain`). Streaming the middle of each block with
    cached partial lines at its ends ran 1.15-1.9x slower (14-, 28-, 33-wide)."""
    return (VECTOR_BYTES >= 64 and result.itemsize >= 4 and result.nbytes >= STREAM_BYTES
            and result.ctypes.data % 64 == 0)


def _tasks(units):
    return max(1, min(numba.get_num_threads(), units))


def _padded_taps(matrix, width, acc):
    """(taps, K) -> (taps, width) in the accumulator dtype, zero beyond K (``matrix`` itself
    when it needs no padding and is already C-contiguous in that dtype)."""
    taps, k = matrix.shape
    if k == width and matrix.dtype == acc and matrix.flags.c_contiguous:
        return matrix
    padded = np.zeros((taps, width), acc)
    padded[:, :k] = matrix
    return padded


def _result(geom, dtype, out, inputs, shape):
    """The array the kernel writes (``out`` itself when it can be written directly) and ``out``."""
    if out is not None and not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    direct = (out is not None and out.flags.c_contiguous
              and not any(np.may_share_memory(out, a) for a in inputs))
    return out if direct else _empty_aligned(shape, dtype)


def _deliver(result, out):
    if out is not None and result is not out:
        out[...] = result
        return out
    return result


def forward(x, f, geom, out=None, bias=None, activation="linear"):
    """Forward op; ``bias`` (C*M,) and an activation from :data:`nbdw.spec.FUSED_ACTIVATIONS`
    are fused into the store of each output element (one pass over the output)."""
    dtype = x.dtype
    acc = spec.accumulator_dtype(dtype)
    lo, hi = spec.activation_bounds(activation, dtype)
    result = _result(geom, dtype, out, (x, f), geom.output_shape)
    if result.size:
        cm, taps = geom.out_channels, geom.filter_height * geom.filter_width
        filt = np.asarray(f).reshape(taps, cm).astype(acc)
        b = np.zeros(cm, acc) if bias is None else np.asarray(bias).astype(acc)
        xs, ys = _kernel_view(x, dtype), result.view(spec.storage_dtype(dtype))
        geo = (geom.filter_height, geom.filter_width, geom.stride_h, geom.stride_w,
               geom.dilation_h, geom.dilation_w, geom.pad_top, geom.pad_left)
        if geom.data_format == "NHWC" and cm == geom.channels and geom.stride_w == 1 and cm < _lanes(acc):
            # fewer channels than lanes: whole rows as flat vectors, channel patterns as weights
            lanes = _lanes(acc)
            g = math.gcd(lanes, cm)
            phases = (np.arange(cm // g)[:, None] * g + np.arange(lanes)[None, :]) % cm
            wpat = np.ascontiguousarray(filt[:, phases].transpose(1, 0, 2))  # (P, taps, L)
            _forward_nhwc_narrow(xs, wpat, np.ascontiguousarray(b[phases]), bias is not None, lo, hi, ys,
                                 geom.filter_height, geom.filter_width, geom.stride_h, geom.dilation_h,
                                 geom.dilation_w, geom.pad_top, geom.pad_left, _tasks(geom.batch * geom.out_height))
        elif geom.data_format == "NHWC":
            cp = -(-cm // _lanes(acc)) * _lanes(acc)
            wts = _padded_taps(filt, cp, acc).ravel()
            bp = _padded_taps(b[None], cp, acc)[0]
            group = _nhwc_group(geom, cp, acc, geom.out_height, geom.out_width)
            _forward_nhwc(xs, wts, bp, bias is not None, lo, hi, ys, *geo,
                          _tasks(geom.batch * geom.out_height), group, _stream(ys))
        elif (geom.stride_w == 1
              and _nchw_tile_bytes(geom, geom.out_height, geom.out_width, geom.stride_h) <= NCHW_TILE_BYTES):
            c, m, lanes = geom.channels, cm // geom.channels, _lanes(acc)
            cp = -(-c // lanes) * lanes
            wts = np.zeros((m, taps, cp), acc)
            wts[:, :, :c] = filt.reshape(taps, c, m).transpose(2, 0, 1)
            bp = np.zeros((m, cp), acc)
            bp[:, :c] = b.reshape(c, m).T
            _forward_nchw_tiled(xs, wts.ravel(), bp, bias is not None, lo, hi, ys, *geo,
                                _tasks(geom.batch * (cp // lanes)))
        else:
            rows = 8 if geom.out_height >= 8 else (4 if geom.out_height >= 4 else 1)
            units = geom.batch * geom.channels * -(-geom.out_height // rows)
            _forward_nchw(xs, np.ascontiguousarray(filt.T).ravel(), b, bias is not None, lo, hi, ys, *geo,
                          _tasks(units), _stream(ys), NCHW_STAGE_BYTES // np.dtype(acc).itemsize, RUN_ELEMENTS)
    return _deliver(result, out)


def _nchw_tile_bytes(geom, out_height, out_width, stride_h):
    """The tile of :func:`_forward_nchw_tiled` for an output of ``out_height`` x ``out_width``
    (column stride 1), a vector of channels per pixel (:func:`_tile_shape`)."""
    rows, _, cols = _tile_shape.py_func(out_height, out_width, geom.filter_height, geom.filter_width, stride_h, 1,
                                        geom.dilation_h, geom.dilation_w)
    return rows * cols * VECTOR_BYTES


def _nhwc_group(geom, cp, acc, out_height, out_width):
    """Channel blocks staged together so the stage stays within :data:`STAGE_BYTES`."""
    lanes = _lanes(acc)
    eff_h = (geom.filter_height - 1) * geom.dilation_h + 1
    wq = -(-((out_width - 1) * geom.stride_w + (geom.filter_width - 1) * geom.dilation_w + 1) // geom.stride_w)
    cbstride = (eff_h + 1) * geom.stride_w * wq * lanes + lanes
    return max(1, min(cp // lanes, STAGE_BYTES // (cbstride * np.dtype(acc).itemsize)))


def backprop_input(f, dy, geom, out=None):
    dtype = dy.dtype
    acc = spec.accumulator_dtype(dtype)
    result = _result(geom, dtype, out, (f, dy), geom.input_shape)
    if result.size:
        ys, xs = _kernel_view(dy, dtype), result.view(spec.storage_dtype(dtype))
        kh, kw, c, m = geom.filter_shape
        filt = np.asarray(f).astype(acc)
        geo = (geom.stride_h, geom.stride_w, geom.dilation_h, geom.dilation_w, geom.pad_top, geom.pad_left)
        if dy.size == 0:
            xs[...] = 0
        elif not np.isfinite(filt).all():
            # padding zeros times NaN/Inf would not be zero: gather only real terms
            _KERNELS["backprop_input_exact", geom.data_format](ys, filt.reshape(kh, kw, c * m), xs, *geo)
        elif (geom.data_format == "NCHW" and m == 1 and geom.stride_h == geom.stride_w == 1
              and _nchw_tile_bytes(geom, geom.in_height, geom.in_width, 1) <= NCHW_TILE_BYTES):
            # without strides or a multiplier, the forward of dy with the filter turned half round
            lanes = _lanes(acc)
            wts = np.zeros((1, kh * kw, -(-c // lanes) * lanes), acc)
            wts[0, :, :c] = filt[::-1, ::-1].reshape(kh * kw, c)
            eff_h, eff_w = geom.effective_filter_height, geom.effective_filter_width
            lo, hi = spec.activation_bounds("linear", dtype)  # the forward's types: no compile of its own
            _forward_nchw_tiled(ys, wts.ravel(), np.zeros((1, wts.shape[2]), acc), False, lo, hi, xs,
                                kh, kw, 1, 1, geom.dilation_h, geom.dilation_w, eff_h - 1 - geom.pad_top,
                                eff_w - 1 - geom.pad_left, _tasks(geom.batch * (wts.shape[2] // lanes)))
        elif geom.data_format == "NHWC":
            lanes = _lanes(acc)
            cp = -(-c // lanes) * lanes
            # [tap][q][channel]: the weights of one multiplier slice are contiguous over channels
            wts = np.zeros((kh * kw, m, cp), acc)
            wts[:, :, :c] = filt.reshape(kh * kw, c, m).transpose(0, 2, 1)
            budget = STAGE_BYTES // np.dtype(acc).itemsize
            _backprop_input_nhwc(ys, wts.ravel(), xs, kh, kw, *geo, _tasks(geom.batch * geom.in_height),
                                 _bpi_group(geom, cp, lanes, budget), _stream(xs))
        else:
            wts = np.ascontiguousarray(filt.reshape(kh * kw, c * m).T).ravel()
            _backprop_input_nchw(ys, wts, xs, kh, kw, *geo, _tasks(geom.batch * geom.channels * geom.in_height),
                                 _stream(xs), NCHW_STAGE_BYTES // np.dtype(acc).itemsize)
    return _deliver(result, out)


def _bpi_group(geom, cp, lanes, budget):
    sw = geom.stride_w
    padl = max(0, -(-((geom.filter_width - 1) * geom.dilation_w - geom.pad_left) // sw))
    owp = geom.out_width + padl + geom.in_width // sw + geom.filter_width + 2  # generous bound
    slots = ((geom.filter_height - 1) * geom.dilation_h) // geom.stride_h + 1
    cbstride = slots * geom.multiplier * owp * lanes + lanes
    return max(1, min(cp // lanes, budget // cbstride))


def backprop_filter(x, dy, geom, out=None):
    dtype = x.dtype
    acc = spec.accumulator_dtype(dtype)
    if out is not None and not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    kh, kw, c, m = geom.filter_shape
    taps, cm = kh * kw, c * m
    if x.size == 0 or dy.size == 0:
        total = np.zeros((taps, cm), acc)
    else:
        xs, ys = _kernel_view(x, dtype), _kernel_view(dy, dtype)
        geo = (kh, kw, geom.stride_h, geom.stride_w, geom.dilation_h, geom.dilation_w, geom.pad_top, geom.pad_left)
        tiled = geom.data_format == "NCHW" and geom.stride_w == 1
        if tiled:
            tile_bytes = _nchw_tile_bytes(geom, geom.out_height, geom.out_width, geom.stride_h)
            tiled = (tile_bytes <= NCHW_TILE_BYTES
                     or (tile_bytes <= NCHW_FILTER_TILE_BYTES and c % _lanes(acc) == 0))
        if geom.data_format == "NHWC":
            lanes = _lanes(acc)
            cp = -(-cm // lanes) * lanes
            partial = np.zeros((_tasks(geom.batch * geom.out_height), taps * cp), acc)
            _backprop_filter_nhwc(xs, ys, partial, *geo, STAGE_BYTES // np.dtype(acc).itemsize)
        elif tiled:
            lanes = _lanes(acc)
            cp = -(-c // lanes) * lanes
            partial = np.zeros((_tasks(geom.batch * (cp // lanes)), taps * m * cp), acc)
            _backprop_filter_nchw_tiled(xs, ys, partial, *geo)
        else:
            cp = cm
            units = geom.batch * geom.channels * -(-geom.out_height // 8)
            partial = np.zeros((_tasks(units), taps * cp), acc)
            _backprop_filter_nchw(xs, ys, partial, *geo, NCHW_STAGE_BYTES // np.dtype(acc).itemsize)
        # Fixed-order reduction over tasks, still in the accumulator dtype; one rounding at the end.
        total = partial[0].copy()
        for t in range(1, partial.shape[0]):
            total += partial[t]
        if tiled:  # [tap][multiplier][padded channel] -> [tap][channel][multiplier]
            total = total.reshape(taps, m, cp)[:, :, :c].transpose(0, 2, 1).reshape(taps, cm)
        else:
            total = total.reshape(taps, cp)[:, :cm]
    result = total.reshape(geom.filter_shape).astype(dtype)
    if out is None:
        return result
    out[...] = result
    return out
