"""The memory floor of each case of a peer-harness run, measured on this machine.

A depthwise op must read its operands and write its result at least once, so no library can
beat the time of a kernel that does only that. For every case of a saved
``benchmarks/peers.py`` JSON this tool times such a kernel (a Numba parallel loop that reads
every element of the op's array inputs and writes every element of its result, with the
run's thread count and the same sizes) and prints, per case, the floor, nbdw's and the peers'
times over it, and whether "3x faster than TensorFlow" is physically possible there (the
floor is at most a third of TensorFlow's time).

    python -m benchmarks.floors peers.json [--repeat 21] [--markdown]

The operands are reused call after call, as in the harness, so a case that fits in the last
level cache gets that cache's speed here too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numba
import numpy as np
from numba import njit, prange

from benchmarks import cases
from nbdw.simd import vadd, vlanes, vload, vsplat, vstore, vsum, vzero


@njit(cache=True)
def _read(arr, lo, hi, s0, s1, s2, s3):
    L = vlanes(arr)
    i = lo
    while i + 4 * L <= hi:
        s0 = vadd(s0, vload(arr, i))
        s1 = vadd(s1, vload(arr, i + L))
        s2 = vadd(s2, vload(arr, i + 2 * L))
        s3 = vadd(s3, vload(arr, i + 3 * L))
        i += 4 * L
    while i < hi:
        s0 = vadd(s0, vload(arr, i))
        i += L
    return s0, s1, s2, s3


@njit(parallel=True, cache=True)
def _touch(inputs_a, inputs_b, out, tasks):
    """Read every element of ``inputs_a`` and ``inputs_b`` and write every element of ``out``,
    in vectors (nbdw's explicit SIMD, :data:`nbdw.simd.VECTOR_BYTES` wide; a plain loop is not
    vectorised and runs at a tenth of the copy speed). A tail shorter than a vector is left out."""
    part = np.zeros(tasks, inputs_a.dtype)
    L = vlanes(out)
    for t in prange(tasks):
        s0 = vzero(out)
        s1, s2, s3 = s0, s0, s0
        for arr in (inputs_a, inputs_b):
            n = arr.size // L
            s0, s1, s2, s3 = _read(arr, t * n // tasks * L, (t + 1) * n // tasks * L, s0, s1, s2, s3)
        one = vsplat(out, 1.0)
        n = out.size // L
        for i in range(t * n // tasks * L, (t + 1) * n // tasks * L, L):
            vstore(out, i, one)
        part[t] = vsum(vadd(vadd(s0, s1), vadd(s2, s3)))
    return part.sum()


def _sizes(op, geom):
    """Elements (inputs a, inputs b, result) an op must move; the filter is negligible."""
    x, y = math.prod(geom.input_shape), math.prod(geom.output_shape)
    return {"forward": (x, 0, y), "backprop_input": (y, 0, x), "backprop_filter": (x, y, 0)}[op]


def floor_ms(op, geom, itemsize, repeat):
    a_n, b_n, out_n = _sizes(op, geom)
    dt = {4: np.float32, 8: np.float64}[max(itemsize, 4)]  # 16-bit data: the same bytes as float32
    a_n, b_n, out_n = (-(-v * itemsize // np.dtype(dt).itemsize) for v in (a_n, b_n, out_n))
    a, b, out = np.ones(a_n, dt), np.ones(b_n, dt), np.empty(out_n, dt)
    tasks = numba.get_num_threads()
    _touch(a, b, out, tasks)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        _touch(a, b, out, tasks)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), (a_n + b_n + out_n) * np.dtype(dt).itemsize


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a peers.py --json file")
    p.add_argument("--repeat", type=int, default=21, help="timed calls per case (median; default 21)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    with open(args.json) as fh:
        run = json.load(fh)
    if run.get("threads"):
        numba.set_num_threads(min(int(run["threads"]), numba.config.NUMBA_NUM_THREADS))
    rows = []
    for r in run["results"]:
        geom = cases.geometry(cases.LAYER_BY_NAME[r["layer"]], r["batch"], r["layout"])
        itemsize = cases.np_dtype(r["dtype"]).itemsize
        ms, nbytes = floor_ms(r["op"], geom, itemsize, args.repeat)
        tf = r["ms"].get("tf") if r["check"].get("tf") == "ok" else None
        rows.append(dict(op=r["op"], layer=r["layer"], layout=r["layout"], floor=ms, gbps=nbytes / ms / 1e6,
                         nbdw=r["ms"]["nbdw"] / ms, torch=r["ms"].get("torch", math.nan) / ms,
                         tf=(tf / ms) if tf else None))
    if args.markdown:
        print("| op | layer | layout | floor ms | GB/s at the floor | nbdw/floor | torch/floor | tf/floor | 3x TF possible |")
        print("|" + " --- |" * 9)
    for w in rows:
        tf = f"{w['tf']:.2f}" if w["tf"] else "n/a"
        possible = "n/a" if not w["tf"] else ("yes" if w["tf"] >= 3 else "no")
        cells = [w["op"], w["layer"], w["layout"], f"{w['floor']:.3f}", f"{w['gbps']:.1f}", f"{w['nbdw']:.2f}",
                 f"{w['torch']:.2f}", tf, possible]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(f"{c:>14s}" for c in cells))


if __name__ == "__main__":
    main()
