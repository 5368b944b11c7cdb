"""Explicit SIMD vectors for the CPU kernels (a small Numba extension).

LLVM's loop vectoriser only vectorises innermost loops and, with runtime strides, keeps one
address register per stream, so register-blocked depthwise loops either stay scalar or spill.
These intrinsics let a kernel hold vectors in variables instead, as wide as the target's
registers (:data:`VECTOR_BYTES`): with AVX-512, 64 bytes, 16 float32 lanes (the accumulator of
float16, bfloat16 and float32 data) or 8 float64 lanes; with AVX2, 32 bytes, 8 or 4 lanes.
LLVM would also lower 64-byte vectors to pairs of ymm registers on AVX2, but the kernels keep
eight accumulators and up to eight inputs live, which then no longer fit in 16 registers: on a
Zen 3 (AVX2) machine, forward ran 1.6-2.5x slower with 64-byte vectors than with 32-byte ones.

Loads and stores take an array and a flat element offset into its data (the caller does the
index arithmetic, so a block of pixels shares one base address and constant displacements).
16-bit storage (float16 as uint16 bits, bfloat16 as int16 bits, see :func:`nbdw.spec.storage_dtype`)
is widened to float32 on load and rounded to nearest even on store, in registers. Arithmetic
carries the same fast-math flags as :data:`nbdw.cpu.FASTMATH`: no ``nnan``/``ninf``, so NaN and
Inf propagate.

Numba's on-disk cache keys a kernel on its own source file only: after editing this module,
clear ``nbdw/__pycache__`` so that cached kernels are rebuilt with the new intrinsics.
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model


def target_vector_bytes(features=None):
    """The vector size, in bytes, for a target with LLVM feature string ``features`` (default:
    the one Numba compiles for, ``NUMBA_CPU_FEATURES`` or the host's): 64 with AVX-512F, 32 with
    AVX or AVX2, 16 on other x86 targets; 64 elsewhere (not measured: LLVM splits it).

    ``NBDW_VECTOR_BYTES`` (16, 32 or 64) overrides it, for tests and experiments. Numba's on-disk
    cache does not see this setting: give such a process a ``NUMBA_CACHE_DIR`` of its own.
    """
    forced = os.environ.get("NBDW_VECTOR_BYTES", "").strip()
    if forced:
        if forced not in ("16", "32", "64"):
            raise ValueError(f"NBDW_VECTOR_BYTES must be 16, 32 or 64, got {forced!r}")
        return int(forced)
    if features is None:
        features = config.CPU_FEATURES
    if features is None:
        try:
            from llvmlite import binding

            features = binding.get_host_cpu_features().flatten()
        except RuntimeError:  # LLVM cannot read this host's features
            return 64
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    if "avx512f" in enabled:
        return 64
    if "avx2" in enabled or "avx" in enabled:
        return 32
    return 16 if "sse2" in enabled else 64


#: Vector size in bytes, fixed at import (:func:`target_vector_bytes`); the lanes of a vector
#: are ``VECTOR_BYTES // 4`` for float32 accumulators and ``VECTOR_BYTES // 8`` for float64.
VECTOR_BYTES = target_vector_bytes()

#: Vector registers the kernels may count on at :data:`VECTOR_BYTES`: 32 with 64-byte vectors
#: (AVX-512's zmm0-31), 16 otherwise (AVX2's ymm0-15, SSE's xmm0-15).
VECTOR_REGISTERS = 32 if VECTOR_BYTES == 64 else 16

# Same set as nbdw.cpu.FASTMATH (kept here to avoid an import cycle): NaN/Inf semantics kept.
_FLAGS = ("nsz", "arcp", "contract", "afn", "reassoc")


class Vector(types.Type):
    """A SIMD vector of ``lanes`` values of ``dtype`` (float32 or float64)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = VECTOR_BYTES // (8 if dtype == types.float64 else 4)
        super().__init__(name=f"Vector({dtype} x {self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = ir.DoubleType() if fe_type.dtype == types.float64 else ir.FloatType()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


_F32 = Vector(types.float32)
_F64 = Vector(types.float64)
_I32 = ir.IntType(32)


def vector_type(dtype):
    """The accumulator vector for arrays of ``dtype`` (storage dtypes included), or None."""
    if dtype == types.float64:
        return _F64
    if dtype in (types.float32, types.uint16, types.int16):
        return _F32
    return None


def _widen(builder, raw, storage):
    """Stored vector (raw element type) -> accumulator vector."""
    n = raw.type.count
    if storage == types.uint16:  # IEEE half: fpext is exact
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), n)), ir.VectorType(ir.FloatType(), n))
    if storage == types.int16:  # bfloat16 is the top half of a float32
        wide = builder.zext(raw, ir.VectorType(_I32, n))
        wide = builder.shl(wide, ir.Constant(ir.VectorType(_I32, n), [16] * n))
        return builder.bitcast(wide, ir.VectorType(ir.FloatType(), n))
    return raw


def _narrow(builder, value, storage):
    """Accumulator vector -> stored vector (raw element type), rounding to nearest even."""
    n = value.type.count
    if storage == types.uint16:
        return builder.bitcast(builder.fptrunc(value, ir.VectorType(ir.HalfType(), n)), ir.VectorType(ir.IntType(16), n))
    if storage == types.int16:
        i32 = ir.VectorType(_I32, n)

        def const(v):
            return ir.Constant(i32, [v] * n)

        bits = builder.bitcast(value, i32)
        high = builder.lshr(bits, const(16))
        bias = builder.add(const(0x7FFF), builder.and_(high, const(1)))
        rounded = builder.lshr(builder.add(bits, bias), const(16))
        quiet_nan = builder.or_(high, const(0x40))
        is_nan = builder.fcmp_unordered("uno", value, value)
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.VectorType(ir.IntType(16), n))
    return value


def _pointer(context, builder, arrty, arr, offset, vt, disp=None):
    """Pointer to ``vt.lanes`` stored elements at flat element ``offset`` of ``arr``'s data, or
    ``disp`` elements past it (a second address step, see :func:`vload_at`)."""
    ary = context.make_array(arrty)(context, builder, arr)
    element = context.get_data_type(arrty.dtype)
    ptr = builder.gep(ary.data, [offset], inbounds=True)
    if disp is not None:
        ptr = builder.gep(ptr, [disp], inbounds=True)
    return builder.bitcast(ptr, ir.PointerType(ir.VectorType(element, vt.lanes))), element


def _align(arrty):
    return 2 if arrty.dtype in (types.uint16, types.int16) else (8 if arrty.dtype == types.float64 else 4)


def _lane_mask(builder, count, lanes):
    """<lanes x i1>: lane < count."""
    count = builder.trunc(count, _I32) if count.type.width > 32 else count
    splat = cgutils.get_null_value(ir.VectorType(_I32, lanes))
    splat = builder.insert_element(splat, count, ir.Constant(_I32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))
    return builder.icmp_signed("<", ir.Constant(ir.VectorType(_I32, lanes), list(range(lanes))), splat)


def _is_array(arr):
    # flat offsets address the data buffer directly, so only C-contiguous arrays are accepted
    return isinstance(arr, types.Array) and arr.layout == "C" and vector_type(arr.dtype) is not None


@intrinsic
def vlanes(typingctx, like):
    """The number of lanes of the accumulator vector of array ``like`` (a compile-time constant)."""
    if not _is_array(like):
        return None
    vt = vector_type(like.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(64), vt.lanes)

    return types.intp(like), codegen


@intrinsic
def vzero(typingctx, like):
    """A zero vector of the accumulator type of array ``like``."""
    if not _is_array(like):
        return None
    vt = vector_type(like.dtype)

    def codegen(context, builder, sig, args):
        return cgutils.get_null_value(context.get_value_type(vt))

    return vt(like), codegen


@intrinsic
def vsplat(typingctx, like, value):
    """``value`` (a scalar) in every lane of the accumulator vector of array ``like``."""
    if not _is_array(like) or not isinstance(value, types.Float):
        return None
    vt = vector_type(like.dtype)

    def codegen(context, builder, sig, args):
        scalar = context.cast(builder, args[1], sig.args[1], vt.dtype)
        vty = context.get_value_type(vt)
        v = builder.insert_element(cgutils.get_null_value(vty), scalar, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vt.lanes), [0] * vt.lanes))

    return vt(like, value), codegen


@intrinsic
def vbroadcast(typingctx, arr, offset):
    """Element ``offset`` of ``arr`` (widened) in every lane."""
    if not _is_array(arr) or not isinstance(offset, types.Integer):
        return None
    vt = vector_type(arr.dtype)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        raw = builder.load(builder.gep(ary.data, [args[1]], inbounds=True), align=_align(arr))
        vec = builder.insert_element(cgutils.get_null_value(ir.VectorType(raw.type, vt.lanes)), raw, ir.Constant(_I32, 0))
        vec = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, vt.lanes), [0] * vt.lanes))
        return _widen(builder, vec, arr.dtype)

    return vt(arr, offset), codegen


@intrinsic
def vload(typingctx, arr, offset):
    """``lanes`` consecutive elements of ``arr`` from flat element ``offset``, widened."""
    if not _is_array(arr) or not isinstance(offset, types.Integer):
        return None
    vt = vector_type(arr.dtype)

    def codegen(context, builder, sig, args):
        ptr, _ = _pointer(context, builder, sig.args[0], args[0], args[1], vt)
        return _widen(builder, builder.load(ptr, align=_align(arr)), arr.dtype)

    return vt(arr, offset), codegen


@intrinsic
def vload_at(typingctx, arr, offset, disp):
    """:func:`vload` at ``offset + disp``, addressed as ``disp`` elements past ``offset``'s
    element: with ``disp`` a constant, loads that share ``offset`` share one base register
    (an integer ``offset + disp`` lets LLVM hoist each sum as a loop invariant of its own)."""
    if not _is_array(arr) or not isinstance(offset, types.Integer) or not isinstance(disp, types.Integer):
        return None
    vt = vector_type(arr.dtype)

    def codegen(context, builder, sig, args):
        ptr, _ = _pointer(context, builder, sig.args[0], args[0], args[1], vt, args[2])
        return _widen(builder, builder.load(ptr, align=_align(arr)), arr.dtype)

    return vt(arr, offset, disp), codegen


@intrinsic
def vload_n(typingctx, arr, offset, count):
    """Like :func:`vload` for the first ``count`` lanes only; the other lanes are zero and their
    memory is not touched."""
    if not _is_array(arr) or not isinstance(offset, types.Integer) or not isinstance(count, types.Integer):
        return None
    vt = vector_type(arr.dtype)

    def codegen(context, builder, sig, args):
        ptr, element = _pointer(context, builder, sig.args[0], args[0], args[1], vt)
        vty = ir.VectorType(element, vt.lanes)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [ptr.type, _I32, ir.VectorType(ir.IntType(1), vt.lanes), vty]),
            f"llvm.masked.load.v{vt.lanes}{_suffix(element)}.p0")
        mask = _lane_mask(builder, context.cast(builder, args[2], sig.args[2], types.int64), vt.lanes)
        raw = builder.call(fn, [ptr, ir.Constant(_I32, _align(arr)), mask, cgutils.get_null_value(vty)])
        return _widen(builder, raw, arr.dtype)

    return vt(arr, offset, count), codegen


def _suffix(element):
    if isinstance(element, ir.DoubleType):
        return "f64"
    if isinstance(element, ir.FloatType):
        return "f32"
    return f"i{element.width}"


@intrinsic
def vstore(typingctx, arr, offset, value):
    """Store ``value`` (narrowed to ``arr``'s storage type) at flat element ``offset``."""
    if not _is_array(arr) or not isinstance(offset, types.Integer) or value != vector_type(arr.dtype):
        return None
    vt = value

    def codegen(context, builder, sig, args):
        ptr, _ = _pointer(context, builder, sig.args[0], args[0], args[1], vt)
        builder.store(_narrow(builder, args[2], arr.dtype), ptr, align=_align(arr))
        return context.get_dummy_value()

    return types.none(arr, offset, value), codegen


@intrinsic
def vstore_n(typingctx, arr, offset, value, count):
    """Like :func:`vstore` for the first ``count`` lanes only; memory past them is not touched."""
    if (not _is_array(arr) or not isinstance(offset, types.Integer) or value != vector_type(arr.dtype)
            or not isinstance(count, types.Integer)):
        return None
    vt = value

    def codegen(context, builder, sig, args):
        ptr, element = _pointer(context, builder, sig.args[0], args[0], args[1], vt)
        vty = ir.VectorType(element, vt.lanes)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [vty, ptr.type, _I32, ir.VectorType(ir.IntType(1), vt.lanes)]),
            f"llvm.masked.store.v{vt.lanes}{_suffix(element)}.p0")
        mask = _lane_mask(builder, context.cast(builder, args[3], sig.args[3], types.int64), vt.lanes)
        builder.call(fn, [_narrow(builder, args[2], arr.dtype), ptr, ir.Constant(_I32, _align(arr)), mask])
        return context.get_dummy_value()

    return types.none(arr, offset, value, count), codegen


def _binary(name, op):
    def typer(typingctx, a, b):
        if not isinstance(a, Vector) or a != b:
            return None

        def codegen(context, builder, sig, args):
            return op(builder, args[0], args[1])

        return a(a, b), codegen

    typer.__name__ = name
    return intrinsic(typer)


vadd = _binary("vadd", lambda b, x, y: b.fadd(x, y, flags=_FLAGS))
vmul = _binary("vmul", lambda b, x, y: b.fmul(x, y, flags=_FLAGS))


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` (fused where the target has FMA)."""
    if not isinstance(a, Vector) or not (a == b == c):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FLAGS), args[2], flags=_FLAGS)

    return a(a, b, c), codegen


@intrinsic
def vclamp(typingctx, v, lo, hi):
    """``v`` clamped to ``[lo, hi]`` by comparisons, so NaN lanes stay NaN."""
    if not isinstance(v, Vector) or not (v == lo == hi):
        return None

    def codegen(context, builder, sig, args):
        x, low, high = args
        x = builder.select(builder.fcmp_ordered("<", x, low), low, x)
        return builder.select(builder.fcmp_ordered(">", x, high), high, x)

    return v(v, lo, hi), codegen


@intrinsic
def vsum(typingctx, v):
    """Sum of the lanes, in a fixed (pairwise) order."""
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        n = v.lanes
        while n > 1:  # fold the upper half onto the lower half: deterministic tree order
            half = n // 2
            lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
            hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, half), list(range(half, n))))
            x = builder.fadd(lo, hi)
            n = half
        return builder.extract_element(x, ir.Constant(_I32, 0))

    return v.dtype(v), codegen


def _prefetch_intrinsic(name, write, doc):
    def typer(typingctx, arr, offset):
        if not isinstance(arr, types.Array) or arr.layout != "C" or not isinstance(offset, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.PointerType(ir.IntType(8)))
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32]), "llvm.prefetch.p0")
            builder.call(fn, [ptr, ir.Constant(_I32, int(write)), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
            return context.get_dummy_value()

        return types.none(arr, offset), codegen

    typer.__name__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


prefetch = _prefetch_intrinsic(
    "prefetch", False, "Hint that element ``offset`` of ``arr`` will be read soon (fetched into all cache levels).")
prefetch_write = _prefetch_intrinsic(
    "prefetch_write", True,
    "Hint that element ``offset`` of ``arr`` will be written soon: its line is fetched for ownership "
    "ahead of time, so that the store that follows does not wait for it.")


@intrinsic
def vstream(typingctx, arr, offset, value):
    """:func:`vstore` that bypasses the caches (a non-temporal store). The address must be
    aligned to the stored vector's size (64 bytes for 32-bit storage, 32 for 16-bit)."""
    if not _is_array(arr) or not isinstance(offset, types.Integer) or value != vector_type(arr.dtype):
        return None
    vt = value

    def codegen(context, builder, sig, args):
        ptr, element = _pointer(context, builder, sig.args[0], args[0], args[1], vt)
        raw = _narrow(builder, args[2], arr.dtype)
        store = builder.store(raw, ptr, align=vt.lanes * context.get_abi_sizeof(element))
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I32, 1)]))
        return context.get_dummy_value()

    return types.none(arr, offset, value), codegen


@intrinsic
def store_fence(typingctx):
    """Order earlier non-temporal stores before later memory operations (a full fence)."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def vload_lanes(typingctx, arr, offset, first, stop):
    """Like :func:`vload` for lanes ``first <= lane < stop`` only: the other lanes are zero and
    their memory is not touched (so ``offset`` may point before the array as long as those lanes
    are masked off)."""
    ints = (offset, first, stop)
    if not _is_array(arr) or not all(isinstance(v, types.Integer) for v in ints):
        return None
    vt = vector_type(arr.dtype)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        element = context.get_data_type(arr.dtype)
        vty = ir.VectorType(element, vt.lanes)
        # no inbounds: the base may lie before the buffer for masked-off lanes
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.PointerType(vty))
        lo = _lane_mask(builder, context.cast(builder, args[2], sig.args[2], types.int64), vt.lanes)
        hi = _lane_mask(builder, context.cast(builder, args[3], sig.args[3], types.int64), vt.lanes)
        mask = builder.and_(hi, builder.not_(lo))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [ptr.type, _I32, ir.VectorType(ir.IntType(1), vt.lanes), vty]),
            f"llvm.masked.load.v{vt.lanes}{_suffix(element)}.p0")
        raw = builder.call(fn, [ptr, ir.Constant(_I32, _align(arr)), mask, cgutils.get_null_value(vty)])
        return _widen(builder, raw, arr.dtype)

    return vt(arr, offset, first, stop), codegen


@intrinsic
def vselect_lanes(typingctx, v, first, stop, w):
    """``v`` with lanes ``first <= lane < stop`` taken from ``w`` (a select: no arithmetic, so
    every value, NaN, Inf and -0.0 included, passes unchanged)."""
    if not isinstance(v, Vector) or v != w or not all(isinstance(a, types.Integer) for a in (first, stop)):
        return None

    def codegen(context, builder, sig, args):
        lo = _lane_mask(builder, context.cast(builder, args[1], sig.args[1], types.int64), v.lanes)
        hi = _lane_mask(builder, context.cast(builder, args[2], sig.args[2], types.int64), v.lanes)
        return builder.select(builder.and_(hi, builder.not_(lo)), args[3], args[0])

    return v(v, first, stop, w), codegen


def _shuffle(name, pick):
    """An intrinsic ``name(a, b)`` returning lanes ``pick(lanes)`` of the concatenation a ++ b."""
    def typer(typingctx, a, b):
        if not isinstance(a, Vector) or a != b:
            return None

        def codegen(context, builder, sig, args):
            idx = pick(a.lanes)
            return builder.shuffle_vector(args[0], args[1], ir.Constant(ir.VectorType(_I32, len(idx)), idx))

        return a(a, b), codegen

    typer.__name__ = name
    return intrinsic(typer)


#: Even / odd lanes of a ++ b (de-interleave a stride-2 sequence).
veven = _shuffle("veven", lambda n: list(range(0, 2 * n, 2)))
vodd = _shuffle("vodd", lambda n: list(range(1, 2 * n, 2)))
#: Lanes of a and b interleaved, lower / upper half: a0 b0 a1 b1 ...
vzip_lo = _shuffle("vzip_lo", lambda n: [i // 2 + (i % 2) * n for i in range(n)])
vzip_hi = _shuffle("vzip_hi", lambda n: [n // 2 + i // 2 + (i % 2) * n for i in range(n)])


def _repeat(name, times):
    """An intrinsic ``name(v)``: the first lanes/times lanes of v, each repeated ``times`` times."""
    def typer(typingctx, v):
        if not isinstance(v, Vector):
            return None

        def codegen(context, builder, sig, args):
            idx = [i // times for i in range(v.lanes)]
            return builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_I32, v.lanes), idx))

        return v(v), codegen

    typer.__name__ = name
    return intrinsic(typer)


vrepeat2 = _repeat("vrepeat2", 2)
vrepeat4 = _repeat("vrepeat4", 4)
vrepeat8 = _repeat("vrepeat8", 8)


@intrinsic
def vtranspose(typingctx, src, s0, sstride, dst, d0, dstride, count):
    """Transpose a square of vectors: load ``lanes`` vectors of ``src`` at ``s0 + i * sstride``
    (widened), and store vector ``i`` of the transpose (narrowed to ``dst``'s storage) at
    ``d0 + i * dstride`` for ``i < count``. All loads come before the stores, so ``dst`` may be
    ``src``. Built from log2(lanes) rounds of two-input shuffles, each swapping the off-diagonal
    blocks of a size."""
    ints = (s0, sstride, d0, dstride, count)
    if (not _is_array(src) or not _is_array(dst) or vector_type(src.dtype) != vector_type(dst.dtype)
            or not all(isinstance(v, types.Integer) for v in ints)):
        return None
    vt = vector_type(src.dtype)
    n = vt.lanes

    def codegen(context, builder, sig, args):
        s0_, ss = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2))
        d0_, ds = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (4, 5))
        rows = []
        for i in range(n):
            offset = builder.add(s0_, builder.mul(ss, ir.Constant(ss.type, i)))
            ptr, _ = _pointer(context, builder, sig.args[0], args[0], offset, vt)
            rows.append(_widen(builder, builder.load(ptr, align=_align(src)), src.dtype))
        b = n // 2
        while b:
            lo = ir.Constant(ir.VectorType(_I32, n), [k if not k & b else n + k - b for k in range(n)])
            hi = ir.Constant(ir.VectorType(_I32, n), [k + b if not k & b else n + k for k in range(n)])
            for i in range(n):
                if not i & b:
                    rows[i], rows[i + b] = (builder.shuffle_vector(rows[i], rows[i + b], lo),
                                            builder.shuffle_vector(rows[i], rows[i + b], hi))
            b //= 2
        count_ = context.cast(builder, args[6], sig.args[6], types.int64)
        for i in range(n):
            with builder.if_then(builder.icmp_signed(">", count_, ir.Constant(count_.type, i)), likely=True):
                offset = builder.add(d0_, builder.mul(ds, ir.Constant(ds.type, i)))
                ptr, _ = _pointer(context, builder, sig.args[3], args[3], offset, vt)
                builder.store(_narrow(builder, rows[i], dst.dtype), ptr, align=_align(dst))
        return context.get_dummy_value()

    return types.none(src, s0, sstride, dst, d0, dstride, count), codegen
