"""The CPU kernels' internal paths against the float64 reference (tests/naive.py).

The public-op suites sweep the options; this module makes sure every path inside
nbdw/cpu.py is taken: the NHWC pixel blocks (8 with an overlapping last block, 4, single
pixels; 7 for rows of 7k pixels), channel tails (masked vectors), several channel groups per stage (forced by a small
STAGE_BYTES), non-temporal stores (forced by STREAM_BYTES = 0), the NCHW row blocks (8, 7, 4, 1),
stride-phase staging (vector paths for strides 1 and 2, scalar for 3), the multiplier's
staging (lane shuffles for 2, 4 and 8, lane selects otherwise), the flat-row forward for fewer channels
than lanes, the exact backprop-input kernel for non-finite filters, float64's vectors (half
as many lanes as float32's), zero sizes, and the fused bias/clamp epilogue.
"""

import ml_dtypes
import numba
import numpy as np
import pytest

import naive
import nbdw
import nbdw.cpu as cpu

DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64)]
OPS = ["forward", "backprop_input", "backprop_filter"]


def _config(rng, fmt, small=False):
    """A random valid configuration; sizes span the kernels' block and tail cases."""
    n = int(rng.integers(0 if small else 1, 3))
    h, w = (int(v) for v in rng.integers(1, 12 if small else 30, 2))
    c = int(rng.choice([1, 2, 3, 5, 16, 17, 33]))
    m = int(rng.integers(1, 4))
    kh, kw = (int(v) for v in rng.integers(1, 8, 2))
    sh, sw = (int(v) for v in rng.integers(1, 4, 2))
    dh, dw = (int(v) for v in rng.integers(1, 4, 2))
    kind = ["SAME", "VALID", "EXPLICIT"][rng.integers(3)]
    pads = [[int(a) for a in rng.integers(0, 4, 2)] for _ in range(2)]
    eff_h, eff_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if kind == "VALID":
        h, w = max(h, eff_h), max(w, eff_w)
    if kind == "EXPLICIT":
        h, w = max(h, eff_h - sum(pads[0])), max(w, eff_w - sum(pads[1]))
    return _make(fmt, (n, h, w, c), (kh, kw, c, m), (sh, sw), (dh, dw), kind, pads)


def _make(fmt, nhwc, filter_shape, strides, dilations, kind="SAME", pads=((0, 0), (0, 0))):
    n, h, w, c = nhwc
    (sh, sw), (dh, dw) = strides, dilations
    if fmt == "NHWC":
        shape, s4, d4 = (n, h, w, c), [1, sh, sw, 1], [1, dh, dw, 1]
        padding = kind if kind != "EXPLICIT" else [[0, 0], list(pads[0]), list(pads[1]), [0, 0]]
    else:
        shape, s4, d4 = (n, c, h, w), [1, 1, sh, sw], [1, 1, dh, dw]
        padding = kind if kind != "EXPLICIT" else [[0, 0], [0, 0], list(pads[0]), list(pads[1])]
    return dict(shape=shape, filter_shape=tuple(filter_shape), args=(s4, padding, fmt, d4))


def _check(op, cfg, dtype, rng, bias=None, activation="linear"):
    """Run ``op`` on random data for ``cfg`` and compare with the reference within the dtype's bound."""
    shape, fshape, args = cfg["shape"], cfg["filter_shape"], cfg["args"]
    kh, kw, c, m = fshape
    x = rng.standard_normal(shape).astype(dtype)
    f = rng.standard_normal(fshape).astype(dtype)
    x64, f64 = x.astype(np.float64), f.astype(np.float64)
    y_ref = naive.tf_forward(x64, f64, *args)
    what = f"{op} {dtype.name} {shape} {fshape} {args}"
    if op == "forward":
        y = nbdw.depthwise_conv2d_bias_activation(x, f, bias, *args, activation=activation)
        ref, abs_terms = y_ref, naive.tf_forward(np.abs(x64), np.abs(f64), *args)
        if bias is not None:
            b = np.asarray(bias, np.float64)
            b = b if args[2] == "NHWC" else b[:, None, None]
            ref, abs_terms = ref + b, abs_terms + np.abs(b)
        lo, hi = {"linear": (-np.inf, np.inf), "relu": (0, np.inf), "relu6": (0, 6)}[activation]
        ref = np.clip(ref, lo, hi)
        naive.assert_close(y, ref, abs_terms, dtype, terms=kh * kw + 1, what=what)
        return
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dy64 = dy.astype(np.float64)
    if op == "backprop_input":
        got = nbdw.depthwise_conv2d_native_backprop_input(shape, f, dy, *args)
        ref = naive.tf_backprop_input(shape, f64, dy64, *args)
        abs_terms = naive.tf_backprop_input(shape, np.abs(f64), np.abs(dy64), *args)
        naive.assert_close(got, ref, abs_terms, dtype, terms=kh * kw * m, what=what)
    else:
        got = nbdw.depthwise_conv2d_native_backprop_filter(x, fshape, dy, *args)
        ref = naive.tf_backprop_filter(x64, fshape, dy64, *args)
        abs_terms = naive.tf_backprop_filter(np.abs(x64), fshape, np.abs(dy64), *args)
        naive.assert_close(got, ref, abs_terms, dtype, terms=y_ref.size // (c * m) + 1, what=what)


# --------------------------------------------------------------------------- random sweeps

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", OPS)
def test_random_configurations(op, fmt, dtype):
    rng = np.random.default_rng([OPS.index(op), fmt == "NCHW", DTYPES.index(dtype)])
    for _ in range(30):
        _check(op, _config(rng, fmt, small=True), dtype, rng)
    for _ in range(6):
        _check(op, _config(rng, fmt), dtype, rng)


# Shapes chosen to take each block path: widths and heights of 1-3, 4-7 and >= 8 output
# columns/rows with a tail, channel counts below, at and above one vector with a tail.
PATH_CASES = [
    ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1), (1, 1)),
    ((2, 3, 2, 5), (3, 3, 5, 1), (1, 1), (1, 1)),
    ((1, 6, 6, 17), (3, 3, 17, 1), (1, 1), (1, 1)),
    ((1, 9, 13, 16), (3, 3, 16, 2), (1, 1), (1, 1)),
    ((1, 19, 21, 33), (5, 5, 33, 1), (1, 1), (1, 1)),
    ((2, 20, 40, 8), (3, 3, 8, 1), (2, 2), (1, 1)),
    ((1, 17, 35, 3), (3, 5, 3, 2), (3, 3), (1, 2)),
    ((1, 24, 18, 9), (7, 7, 9, 1), (1, 1), (2, 1)),
    ((1, 40, 3, 20), (2, 1, 20, 3), (2, 1), (3, 1)),
    ((2, 7, 11, 5), (3, 3, 5, 4), (1, 2), (1, 1)),  # multipliers staged by lane shuffles
    ((1, 6, 9, 3), (2, 3, 3, 8), (1, 1), (1, 1)),
    ((1, 5, 8, 2), (3, 2, 2, 16), (2, 1), (1, 1)),
    ((1, 6, 9, 7), (3, 3, 7, 5), (1, 1), (1, 1)),  # other multipliers: channels broadcast into lanes
    ((2, 5, 10, 3), (2, 3, 3, 6), (1, 2), (1, 1)),
    # column stride 2 with an odd width, with column dilation 2 (every tap of one column parity),
    # with an even filter width
    ((1, 9, 37, 5), (3, 5, 5, 2), (2, 2), (1, 2)),
    ((1, 6, 17, 3), (2, 4, 3, 1), (1, 2), (1, 1)),
    # rows of 7k pixels go in blocks of seven (NHWC): 7, 14 and 28 wide, a channel tail, a
    # multiplier, and column stride 2 (backprop input's phases are 14 wide)
    ((1, 6, 7, 16), (3, 3, 16, 1), (1, 1), (1, 1)),
    ((2, 5, 14, 20), (3, 3, 20, 1), (1, 1), (1, 1)),
    ((1, 4, 28, 18), (5, 5, 18, 2), (1, 1), (1, 1)),
    ((1, 8, 28, 16), (3, 3, 16, 1), (1, 2), (1, 1)),
    # and NCHW planes of 7k rows: 7, 14 (also as stride-2 phases of 28 rows in backprop input), 28
    ((1, 7, 20, 4), (3, 3, 4, 1), (1, 1), (1, 1)),
    ((1, 14, 9, 5), (3, 3, 5, 1), (1, 1), (1, 1)),
    ((2, 28, 6, 3), (5, 5, 3, 2), (1, 1), (1, 1)),
    ((1, 28, 10, 3), (3, 3, 3, 1), (2, 1), (1, 1)),
    # NCHW rows of whole cache lines (32 and 16 float32 columns) are streamed straight from
    # registers when STREAM_BYTES allows: forward output and backprop input's stride-2 rows
    ((1, 24, 32, 3), (3, 3, 3, 1), (2, 2), (1, 1)),
    # other NCHW rows go through a row buffer, whose copy is streamed where a block of rows spans
    # whole lines: 8 rows of 6 columns in 16-row planes (every block), in 9-row planes (some)
    ((2, 16, 6, 3), (3, 3, 3, 2), (1, 1), (1, 1)),
    ((2, 9, 6, 3), (3, 3, 3, 1), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", OPS)
def test_block_and_tail_paths(op, fmt):
    rng = np.random.default_rng(1)
    for nhwc, fshape, strides, dilations in PATH_CASES:
        fits = all((k - 1) * d + 1 <= size for k, d, size in zip(fshape[:2], dilations, nhwc[1:3]))
        for kind in ("SAME", "VALID") if fits else ("SAME",):
            _check(op, _make(fmt, nhwc, fshape, strides, dilations, kind), np.dtype(np.float32), rng)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", OPS)
def test_channel_groups_and_streaming_stores(op, fmt, monkeypatch):
    """A stage budget of one channel block per group, and non-temporal stores for every size."""
    monkeypatch.setattr(cpu, "STAGE_BYTES", 1)
    monkeypatch.setattr(cpu, "NCHW_STAGE_BYTES", 1)  # NCHW: one block of rows per work unit
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", 0)  # the row kernel, not channel tiles
    monkeypatch.setattr(cpu, "NCHW_FILTER_TILE_BYTES", 0)
    monkeypatch.setattr(cpu, "STREAM_BYTES", 0)
    rng = np.random.default_rng(2)
    for dtype in (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)):
        for nhwc, fshape, strides, dilations in PATH_CASES[2:]:
            _check(op, _make(fmt, nhwc, fshape, strides, dilations), dtype, rng)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "cached"])
@pytest.mark.parametrize("run", [0, 1, 37, 512])
def test_nchw_forward_gathers_blocks_into_runs(run, stream, monkeypatch):
    """NCHW forward gathers the blocks of rows that are not whole lines into runs of at least
    ``run`` elements and writes their whole lines out (``_drain``): after every block (0), a
    partial line kept between blocks (1, 37), whole planes (512), blocks that overlap the run
    (33 rows in blocks of eight), 16-bit data (two vectors per line), the fused epilogue, and
    work units of one block whose multiplier slices are not contiguous (a new run per slice,
    also where the next block lies just behind the run, in the previous slice)."""
    monkeypatch.setattr(cpu, "RUN_ELEMENTS", run)
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", 0)  # the row kernel, not channel tiles
    monkeypatch.setattr(cpu, "NCHW_FILTER_TILE_BYTES", 0)
    monkeypatch.setattr(cpu, "STREAM_BYTES", 0 if stream else 1 << 40)
    rng = np.random.default_rng(7)
    for dtype in (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)):
        _check("forward", _make("NCHW", (2, 33, 14, 3), (3, 3, 3, 1), (1, 1), (2, 2)), dtype, rng,
               bias=rng.standard_normal(3), activation="relu6")
        _check("forward", _make("NCHW", (1, 14, 28, 5), (5, 5, 5, 2), (1, 1), (1, 1)), dtype, rng)
    monkeypatch.setattr(cpu, "NCHW_STAGE_BYTES", 1)
    for nhwc, fshape in (((2, 19, 11, 3), (3, 3, 3, 3)),
                         ((1, 9, 13, 4), (3, 3, 4, 2))):  # a block back to the previous slice, within reach
        _check("forward", _make("NCHW", nhwc, fshape, (1, 1), (1, 1)), np.dtype(np.float32), rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nchw_forward_through_channel_tiles(dtype, monkeypatch):
    """NCHW forward with column stride 1 on small planes transposes a vector of planes into a
    (pixel, channel) tile (``_forward_nchw_tiled``): channel counts of whole and partial vectors
    (1, lanes - 1, lanes, 2 lanes + 1), rows shorter than, as long as and longer than a vector
    (last plane's rows read through the masked path), row widths for every pixel block (1 to 3,
    4 to 6, sevens, eights with an overlapping last block), multipliers, dilations, row strides
    with input rows VALID leaves out, explicit padding, and the fused epilogue. The same cases
    with the tiles switched off take the row kernel, and column strides always do."""
    calls = []
    tiled = cpu._forward_nchw_tiled
    monkeypatch.setattr(cpu, "_forward_nchw_tiled", lambda *a: calls.append(1) or tiled(*a))
    monkeypatch.setattr(cpu, "_tasks", lambda units: max(1, min(units, 3)))  # uneven splits too
    rng = np.random.default_rng(11)
    lanes = cpu._lanes(cpu.spec.accumulator_dtype(dtype))
    cases = [((2, 14, 14, lanes), (3, 3, 1), (1, 1), (1, 1), "SAME"),
             ((1, 7, 7, 2 * lanes + 1), (3, 3, 2), (1, 1), (1, 1), "SAME"),
             ((2, 10, 20, lanes - 1), (5, 5, 1), (2, 1), (1, 1), "VALID"),
             ((1, 9, 3, lanes), (2, 3, 3), (1, 1), (2, 1), "EXPLICIT"),
             ((1, 6, 5, 1), (3, 3, 1), (1, 1), (1, 2), "SAME"),
             ((2, 12, 37, lanes), (7, 7, 1), (1, 1), (1, 1), "SAME"),
             ((1, 11, 2, 3), (1, 1, 2), (3, 1), (1, 1), "VALID")]
    for tile_bytes in (1 << 30, 0):
        monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", tile_bytes)
        calls.clear()
        for nhwc, (kh, kw, m), strides, dilations, kind in cases:
            c = nhwc[3]
            cfg = _make("NCHW", nhwc, (kh, kw, c, m), strides, dilations, kind, ((2, 0), (1, 3)))
            _check("forward", cfg, dtype, rng)
            bias = (3 * rng.standard_normal(c * m)).astype(dtype)
            _check("forward", cfg, dtype, rng, bias=bias, activation="relu6")
        assert len(calls) == (2 * len(cases) if tile_bytes else 0)
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", 1 << 30)
    _check("forward", _make("NCHW", (1, 8, 9, 3), (3, 3, 3, 1), (1, 2), (1, 1)), dtype, rng)
    assert not calls


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nchw_backprop_input_through_channel_tiles(dtype, monkeypatch):
    """NCHW backprop input without strides or a multiplier is the forward of dy with the filter
    turned half round, through channel tiles: SAME, VALID, explicit padding beyond the filter's
    reach (negative padding for the forward: dy rows and columns that feed no input element),
    dilations, partial channel vectors. A multiplier or a stride takes the row kernel."""
    calls = []
    tiled = cpu._forward_nchw_tiled
    monkeypatch.setattr(cpu, "_forward_nchw_tiled", lambda *a: calls.append(1) or tiled(*a))
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", 1 << 30)
    rng = np.random.default_rng(12)
    lanes = cpu._lanes(cpu.spec.accumulator_dtype(dtype))
    cases = [((2, 14, 14, lanes), (3, 3), (1, 1), "SAME", ((0, 0), (0, 0))),
             ((1, 9, 20, lanes + 3), (5, 3), (1, 2), "VALID", ((0, 0), (0, 0))),
             ((2, 6, 7, 5), (3, 2), (2, 1), "EXPLICIT", ((5, 0), (1, 4))),
             ((1, 4, 3, 1), (1, 1), (1, 1), "EXPLICIT", ((2, 1), (0, 3)))]
    for nhwc, (kh, kw), dilations, kind, pads in cases:
        cfg = _make("NCHW", nhwc, (kh, kw, nhwc[3], 1), (1, 1), dilations, kind, pads)
        _check("backprop_input", cfg, dtype, rng)
    assert len(calls) == len(cases)
    for fshape, strides in (((3, 3, 4, 2), (1, 1)), ((3, 3, 4, 1), (2, 1)), ((3, 3, 4, 1), (1, 2))):
        _check("backprop_input", _make("NCHW", (1, 8, 9, 4), fshape, strides, (1, 1)), dtype, rng)
    assert len(calls) == len(cases)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_nchw_backprop_filter_through_channel_tiles(dtype, monkeypatch):
    """NCHW backprop filter with column stride 1 on small planes sums its products in channel
    tiles (``_backprop_filter_nchw_tiled``): partial channel vectors (dy lanes past the planes
    are zero), multipliers, row widths for blocks of seven, of eight with a 4- and 1-pixel tail,
    rows strides, dilations, VALID and explicit padding; with more tasks than threads, so that
    partial sums of one channel come from several tasks. Column strides take the row kernel."""
    calls = []
    tiled = cpu._backprop_filter_nchw_tiled
    monkeypatch.setattr(cpu, "_backprop_filter_nchw_tiled", lambda *a: calls.append(1) or tiled(*a))
    monkeypatch.setattr(cpu, "_tasks", lambda units: max(1, min(units, 3)))
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", 1 << 30)
    rng = np.random.default_rng(13)
    lanes = cpu._lanes(cpu.spec.accumulator_dtype(dtype))
    cases = [((3, 14, 14, lanes), (3, 3, 1), (1, 1), (1, 1), "SAME"),
             ((2, 7, 13, lanes + 3), (5, 3, 2), (2, 1), (1, 1), "VALID"),
             ((1, 9, 21, 5), (3, 2, 3), (1, 1), (2, 3), "EXPLICIT"),
             ((2, 5, 2, 2 * lanes), (1, 1, 1), (1, 1), (1, 1), "SAME")]
    for nhwc, (kh, kw, m), strides, dilations, kind in cases:
        cfg = _make("NCHW", nhwc, (kh, kw, nhwc[3], m), strides, dilations, kind, ((1, 2), (0, 3)))
        _check("backprop_filter", cfg, dtype, rng)
    assert len(calls) == len(cases)
    _check("backprop_filter", _make("NCHW", (1, 8, 9, 4), (3, 3, 4, 1), (1, 2), (1, 1)), dtype, rng)
    assert len(calls) == len(cases)
    # tiles past NCHW_TILE_BYTES (up to NCHW_FILTER_TILE_BYTES) only where channels fill whole vectors
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", 0)
    monkeypatch.setattr(cpu, "NCHW_FILTER_TILE_BYTES", 1 << 30)
    for c, in_tiles in ((lanes, True), (2 * lanes, True), (lanes + 3, False), (5, False)):
        before = len(calls)
        _check("backprop_filter", _make("NCHW", (2, 9, 11, c), (3, 3, c, 2), (1, 1), (1, 1)), dtype, rng)
        assert len(calls) == before + in_tiles, c


def test_nchw_backprop_input_row_phases_share_work_units(monkeypatch):
    """NCHW backprop input with a row stride: a work unit computes its rows of every row phase
    from dy rows staged once. Units of one block each (a tiny stage budget), where a phase's run
    is shorter than its block: it reaches forward into the next unit's rows (27 rows, stride 2:
    phases of 14 rows in sevens and 13 in eights) or back at the end of the plane (29 rows), and
    strides 3 with phases no tap reaches (1x1 filter)."""
    assert cpu._bpi_rows.py_func(0, 7, 27, 2, 1) == (0, 8, 8)  # forward
    assert cpu._bpi_rows.py_func(8, 15, 29, 2, 1) == (7, 14, 7)  # back
    assert cpu._bpi_rows.py_func(7, 14, 27, 2, 1) == (5, 13, 8)  # back, at the end of the plane
    assert cpu._bpi_rows.py_func(14, 15, 29, 2, 1) == (0, 0, 7)  # phase 1 ended in the previous unit
    monkeypatch.setattr(cpu, "NCHW_STAGE_BYTES", 1)
    monkeypatch.setattr(cpu, "_tasks", lambda units: max(1, min(units, 3)))
    rng = np.random.default_rng(21)
    for h, fshape, strides, dilations in ((27, (3, 3, 2, 1), (2, 2), (1, 1)), (29, (3, 3, 2, 2), (2, 1), (1, 1)),
                                          (31, (5, 3, 2, 1), (3, 2), (2, 1)), (25, (1, 1, 2, 1), (3, 3), (1, 1))):
        for dtype in (np.dtype(np.float32), np.dtype(np.float16)):
            _check("backprop_input", _make("NCHW", (2, h, 19, 2), fshape, strides, dilations), dtype, rng)


@pytest.mark.parametrize("op", OPS)
def test_nchw_work_units_of_several_blocks(op, monkeypatch):
    """NCHW work units of two 8-row blocks over 37 output rows: three units, the last one short
    (5 rows), so it overlaps the previous unit (forward) or ends in a short block (backprop
    filter); backprop input sizes its units from its own staged rows, a few blocks each here.
    Strides 1 and 2 and a dilated filter."""
    rng = np.random.default_rng(4)
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", 0)  # the row kernel, not channel tiles
    monkeypatch.setattr(cpu, "NCHW_FILTER_TILE_BYTES", 0)
    for strides, dilations in (((1, 1), (1, 1)), ((2, 1), (1, 1)), ((1, 2), (2, 1))):
        cfg = _make("NCHW", (2, 37 * strides[0], 20, 3), (3, 3, 3, 2), strides, dilations)
        sw, ow = strides[1], -(-20 // strides[1])  # SAME
        wq = -(-((ow - 1) * sw + 2 * dilations[1] + 1) // sw)
        lanes = cpu._lanes(np.float32)
        rowlen = sw * ((wq + 2 * lanes - 1) // lanes * lanes)  # a staged row, as the kernel lays it out
        staged = (16 - 1) * strides[0] + 2 * dilations[0] + 1
        monkeypatch.setattr(cpu, "NCHW_STAGE_BYTES", staged * rowlen * 4)
        assert cpu._chunk_rows.py_func(37, 8, strides[0], 2 * dilations[0] + 1, rowlen, staged * rowlen) == 16
        _check(op, cfg, np.dtype(np.float32), rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_forward_with_fewer_channels_than_lanes(dtype, monkeypatch):
    """NHWC forward with C below the lane count and multiplier 1 runs on flat rows
    (``_forward_nhwc_narrow``): channel counts whose pattern phases number 1 (C divides the
    lanes) to C, rows long enough for its 8-vector blocks (>= 128 pixels) and short ones (4-vector
    blocks, single vectors, a partial last vector), row strides, dilations, explicit padding and
    the fused epilogue."""
    calls = []
    narrow = cpu._forward_nhwc_narrow
    monkeypatch.setattr(cpu, "_forward_nhwc_narrow", lambda *a: calls.append(1) or narrow(*a))
    rng = np.random.default_rng(7)
    lanes = cpu._lanes(cpu.spec.accumulator_dtype(dtype))
    cases = [((2, 5, 131, 3), (3, 3), (1, 1), (1, 1), "SAME"),
             ((1, 4, 140, 1), (1, 5), (2, 1), (1, 2), "SAME"),
             ((2, 7, 29, 5), (3, 2), (1, 1), (2, 3), "EXPLICIT"),
             ((1, 3, 150, 12), (2, 3), (1, 1), (1, 1), "VALID"),
             ((1, 6, 9, lanes - 1), (5, 5), (2, 1), (1, 1), "SAME"),
             ((3, 2, 2, 2), (3, 3), (1, 1), (1, 1), "SAME")]
    for nhwc, (kh, kw), strides, dilations, kind in cases:
        c = nhwc[3]
        cfg = _make("NHWC", nhwc, (kh, kw, c, 1), strides, dilations, kind, ((1, 2), (3, 0)))
        _check("forward", cfg, dtype, rng)
        _check("forward", cfg, dtype, rng, bias=(3 * rng.standard_normal(c)).astype(dtype), activation="relu6")
    # fewer channels than lanes only (with 64-byte vectors, 5 of 6 cases for float64's 8 lanes;
    # with 32-byte ones, 4 for its 4 lanes)
    narrow_cases = sum(nhwc[3] < lanes for nhwc, *_ in cases)
    assert narrow_cases >= min(5, lanes) and len(calls) == 2 * narrow_cases
    # more channels than lanes, a multiplier, or a column stride take the general kernel
    for cfg in (_make("NHWC", (1, 4, 20, lanes + 1), (3, 3, lanes + 1, 1), (1, 1), (1, 1)),
                _make("NHWC", (1, 4, 20, 3), (3, 3, 3, 2), (1, 1), (1, 1)),
                _make("NHWC", (1, 4, 20, 3), (3, 3, 3, 1), (1, 2), (1, 1))):
        _check("forward", cfg, dtype, rng)
    assert len(calls) == 2 * narrow_cases


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("activation", ["linear", "relu", "relu6"])
def test_fused_epilogue(fmt, activation):
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        for _ in range(4):
            cfg = _config(rng, fmt, small=True)
            kh, kw, c, m = cfg["filter_shape"]
            bias = (3 * rng.standard_normal(c * m)).astype(dtype)
            _check("forward", cfg, dtype, rng, bias=bias, activation=activation)


# --------------------------------------------------------------------------- special values

@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_filter_takes_the_exact_backprop_input(fmt, bad):
    """Padding zeros times NaN/Inf would be NaN; the reference never multiplies them."""
    rng = np.random.default_rng(4)
    for strides in ((1, 1), (2, 2), (3, 1)):
        cfg = _make(fmt, (1, 9, 11, 3), (3, 3, 3, 2), strides, (1, 1), "SAME")
        f = rng.standard_normal(cfg["filter_shape"])
        f[0, 2, 1, 1] = bad
        s4, padding, fmt_, d4 = cfg["args"]
        out_shape = nbdw.spec.forward_geometry(cfg["shape"], f.shape, s4, padding, fmt_, d4).output_shape
        dy = rng.standard_normal(out_shape)
        ref = naive.tf_backprop_input(cfg["shape"], f, dy, *cfg["args"])
        for dtype in (np.float32, np.float16):
            got = nbdw.depthwise_conv2d_native_backprop_input(
                cfg["shape"], f.astype(dtype), dy.astype(dtype), *cfg["args"]).astype(np.float64)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
            np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
            assert np.isfinite(ref).any() and not np.isfinite(ref).all()


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("op", OPS)
def test_nan_in_data_propagates_like_the_reference(op, fmt):
    rng = np.random.default_rng(5)
    cfg = _make(fmt, (2, 13, 12, 18), (3, 3, 18, 2), (1, 2), (2, 1), "SAME")
    x = rng.standard_normal(cfg["shape"])
    f = rng.standard_normal(cfg["filter_shape"])
    y = naive.tf_forward(x, f, *cfg["args"])
    dy = rng.standard_normal(y.shape)
    index = (1, 4, 5, 7) if fmt == "NHWC" else (1, 7, 4, 5)
    if op == "forward":
        x[index] = np.nan
        ref = naive.tf_forward(x, f, *cfg["args"])
        got = nbdw.depthwise_conv2d_native(x.astype(np.float32), f.astype(np.float32), *cfg["args"])
    elif op == "backprop_input":
        dy[index] = np.nan
        ref = naive.tf_backprop_input(cfg["shape"], f, dy, *cfg["args"])
        got = nbdw.depthwise_conv2d_native_backprop_input(cfg["shape"], f.astype(np.float32), dy.astype(np.float32),
                                                          *cfg["args"])
    else:
        x[index] = np.nan
        ref = naive.tf_backprop_filter(x, cfg["filter_shape"], dy, *cfg["args"])
        got = nbdw.depthwise_conv2d_native_backprop_filter(x.astype(np.float32), cfg["filter_shape"],
                                                           dy.astype(np.float32), *cfg["args"])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(ref).any() and not np.isnan(ref).all()


def test_zero_sizes():
    for fmt in ("NHWC", "NCHW"):
        for nhwc in ((0, 5, 5, 3), (2, 0, 5, 3), (1, 4, 0, 3)):
            cfg = _make(fmt, nhwc, (3, 3, 3, 2), (1, 1), (1, 1), "SAME")
            x = np.zeros(cfg["shape"], np.float32)
            f = np.ones(cfg["filter_shape"], np.float32)
            y = nbdw.depthwise_conv2d_native(x, f, *cfg["args"])
            assert y.shape == naive.tf_forward(x, f, *cfg["args"]).shape
            dx = nbdw.depthwise_conv2d_native_backprop_input(cfg["shape"], f, y, *cfg["args"])
            assert dx.shape == x.shape and not dx.any()
            df = nbdw.depthwise_conv2d_native_backprop_filter(x, f.shape, y, *cfg["args"])
            assert df.shape == f.shape and not df.any()
    # an empty input with explicit padding still has padding-only outputs: bias, nothing else
    x = np.zeros((1, 0, 4, 2), np.float32)
    padding = [[0, 0], [2, 2], [0, 0], [0, 0]]
    y = nbdw.depthwise_conv2d_bias_activation(x, np.ones((3, 1, 2, 1), np.float32), np.array([1., -2.], np.float32),
                                              [1, 1, 1, 1], padding)
    np.testing.assert_array_equal(y, np.broadcast_to(np.array([1., -2.], np.float32), (1, 2, 4, 2)))


# --------------------------------------------------------------------------- threads and determinism

@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_backprop_filter_bitwise_repeatable_at_batch_one(fmt):
    """Per-task partial sums over a balanced split, reduced in task order: the same bits every
    run for a thread count, and every thread count within the float32 accumulation bound."""
    rng = np.random.default_rng(6)
    cfg = _make(fmt, (1, 37, 29, 20), (5, 3, 20, 2), (1, 2), (2, 1), "SAME")
    x = rng.standard_normal(cfg["shape"]).astype(np.float32)
    dy = rng.standard_normal(naive.tf_forward(x.astype(np.float64), np.ones(cfg["filter_shape"]),
                                              *cfg["args"]).shape).astype(np.float32)
    before = numba.get_num_threads()
    results = {}
    try:
        for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            first = nbdw.depthwise_conv2d_native_backprop_filter(x, cfg["filter_shape"], dy, *cfg["args"])
            for _ in range(3):
                again = nbdw.depthwise_conv2d_native_backprop_filter(x, cfg["filter_shape"], dy, *cfg["args"])
                np.testing.assert_array_equal(again.view(np.uint32), first.view(np.uint32))
            results[threads] = first
    finally:
        numba.set_num_threads(before)
    ref = naive.tf_backprop_filter(x.astype(np.float64), cfg["filter_shape"], dy.astype(np.float64), *cfg["args"])
    abs_terms = naive.tf_backprop_filter(np.abs(x.astype(np.float64)), cfg["filter_shape"],
                                         np.abs(dy.astype(np.float64)), *cfg["args"])
    for threads, df in results.items():
        naive.assert_close(df, ref, abs_terms, np.float32, terms=37 * 15, what=f"{threads} threads")


@pytest.mark.parametrize("op", ["forward", "backprop_input"])
@pytest.mark.parametrize("tile_bytes", [0, 1 << 30], ids=["rows", "tiles"])
@pytest.mark.parametrize("stage_bytes", [1, 1 << 20])
def test_nchw_row_tails_with_more_tasks_than_threads(op, stage_bytes, tile_bytes, monkeypatch):
    """NCHW blocks whose rows end mid-vector, under many tasks over few planes: work units of one
    block (several per plane, the planes of a unit interleaving with the next unit's in memory)
    and of whole planes, multipliers 1 and 3, 1 to 9 columns. Every lane must hold its own
    result, whichever task wrote next to it. Forward also through channel tiles."""
    monkeypatch.setattr(cpu, "_tasks", lambda units: max(1, min(units, 7)))
    monkeypatch.setattr(cpu, "NCHW_STAGE_BYTES", stage_bytes)
    monkeypatch.setattr(cpu, "NCHW_TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(11)
    for nhwc, fshape in (((2, 9, 5, 3), (3, 3, 3, 1)), ((1, 13, 3, 2), (3, 2, 2, 3)), ((3, 4, 1, 2), (1, 1, 2, 1)),
                         ((1, 6, 9, 4), (5, 5, 4, 3))):
        for dtype in (np.dtype(np.float32), np.dtype(np.float16)):
            _check(op, _make("NCHW", nhwc, fshape, (1, 1), (1, 1)), dtype, rng)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
def test_forward_and_backprop_input_do_not_depend_on_the_split(fmt):
    """Each output element is computed whole by one task, so the thread count changes no bit."""
    rng = np.random.default_rng(7)
    cfg = _make(fmt, (1, 23, 31, 19), (3, 3, 19, 2), (2, 1), (1, 2), "SAME")
    x = rng.standard_normal(cfg["shape"]).astype(np.float32)
    f = rng.standard_normal(cfg["filter_shape"]).astype(np.float32)
    before = numba.get_num_threads()
    try:
        out = []
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            y = nbdw.depthwise_conv2d_native(x, f, *cfg["args"])
            out.append((y, nbdw.depthwise_conv2d_native_backprop_input(cfg["shape"], f, y, *cfg["args"])))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(out[0], out[-1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", ["NHWC", "NCHW"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_backprop_filter_ignores_non_finite_input_no_output_reads(fmt, bad):
    """VALID padding with stride 2 leaves the last input row and column unread (and rows of
    dy fewer than a block, a row shorter than a vector): NaN or Inf there must not reach the
    filter gradient through masked-off lanes or padding rows of a block."""
    rng = np.random.default_rng(11)
    for h, w in ((14, 14), (22, 36), (8, 17)):
        cfg = _make(fmt, (2, h, w, 5), (3, 3, 5, 1), (2, 2), (1, 1), "VALID")
        x = rng.standard_normal(cfg["shape"])
        y = naive.tf_forward(x, rng.standard_normal(cfg["filter_shape"]), *cfg["args"])
        dy = rng.standard_normal(y.shape)
        oh, ow = (y.shape[1], y.shape[2]) if fmt == "NHWC" else (y.shape[2], y.shape[3])
        unread_rows, unread_cols = range(2 * (oh - 1) + 3, h), range(2 * (ow - 1) + 3, w)
        assert len(unread_rows) or len(unread_cols)
        for r in unread_rows:
            x[(slice(None), r) if fmt == "NHWC" else (slice(None), slice(None), r)] = bad
        for col in unread_cols:
            x[(slice(None), slice(None), col) if fmt == "NHWC" else (Ellipsis, col)] = bad
        ref = naive.tf_backprop_filter(x, cfg["filter_shape"], dy, *cfg["args"])
        assert np.isfinite(ref).all()
        got = nbdw.depthwise_conv2d_native_backprop_filter(x.astype(np.float32), cfg["filter_shape"],
                                                           dy.astype(np.float32), *cfg["args"])
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("storage", [np.uint16, np.int16, np.float32, np.float64])
def test_prefetch_steps_one_cache_line(storage):
    """``_prefetch_some`` walks whole 64-byte lines (a compile-time step per dtype) and stops at
    ``end``: the position it returns is where the next call goes on."""
    walk = numba.njit(lambda a, pf, end, count: cpu._prefetch_some(a, pf, end, count))
    arr = np.zeros(4096, storage)
    line = 64 // arr.itemsize
    assert walk(arr, 0, arr.size, 3) == 3 * line
    assert walk(arr, 5, 5 + line + 1, 10) == 5 + 2 * line  # two lines reach past end, then stop
    assert walk(arr, 7, 7, 4) == 7
