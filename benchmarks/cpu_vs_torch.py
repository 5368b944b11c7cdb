"""Side-by-side timing of nbdw's CPU kernels against PyTorch (oneDNN), interleaved.

A tool for kernel work (issue 7); the official peer harness is ``benchmarks/peers.py``. For
each shape, op, layout and dtype it warms nbdw and PyTorch up, then alternates single calls
``--repeats`` times and reports the medians and the ratio nbdw/torch. PyTorch runs
``conv2d(groups=C)`` in channels_last for NHWC and contiguous for NCHW, and
``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` for the backprops, in float32 only. nbdw
gets explicit padding equal to PyTorch's symmetric padding and its float32 results are
compared with PyTorch's (a wrong fast kernel fails loudly here). Summaries: nbdw/torch per op
(geometric mean and worst shape), NCHW/NHWC and half/float32 time ratios of nbdw.

``--dram`` adds the DRAM-bound case of issue 7 (batch 32, 112x112x32, 3x3, float32 NHWC):
nbdw with a fresh and a preallocated output against the machine's copy speed measured in the
same run (a parallel Numba copy of the input into a preallocated and a fresh buffer, and
NumPy's single-threaded copy).

``--cpu-time`` measures process CPU time instead of wall time: steadier on a shared machine,
meaningful with one thread only.

    python benchmarks/cpu_vs_torch.py --threads 2 --batch 8 --repeats 21
    python benchmarks/cpu_vs_torch.py --threads 1 --cpu-time --layouts NHWC,NCHW --dtypes float32,float16,bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    # name: (H, W, C, K, stride, dilation, multiplier), batch from --batch
    "mbv2_112x32": (112, 112, 32, 3, 1, 1, 1),
    "mbv2_112x96_s2": (112, 112, 96, 3, 2, 1, 1),
    "mbv2_56x144": (56, 56, 144, 3, 1, 1, 1),
    "mbv2_14x576": (14, 14, 576, 3, 1, 1, 1),
    "effnet_28x240_k5": (28, 28, 240, 5, 1, 1, 1),
    "convnext_56x96_k7": (56, 56, 96, 7, 1, 1, 1),
    "mult2_56x32": (56, 56, 32, 3, 1, 1, 2),
    "dilated2_56x64": (56, 56, 64, 3, 1, 2, 1),
}
#: Other options that must stay fast (issue 7): odd channel counts (select with --shapes).
EXTRA_SHAPES = {
    "odd_56x33": (56, 56, 33, 3, 1, 1, 1),
    "odd_28x100_k5": (28, 28, 100, 5, 1, 1, 1),
    "odd_112x3": (112, 112, 3, 3, 1, 1, 1),
    "mult3_28x24": (28, 28, 24, 3, 1, 1, 3),
}
OPS = ("forward", "backprop_input", "backprop_filter")


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _timer(cpu_time):
    return time.process_time if cpu_time else time.perf_counter


def _interleaved(calls, repeats, clock):
    """Median seconds of each zero-argument callable, calls alternating round by round.

    The order is shuffled every round: a parallel call right after another library's runs
    while that library's OpenMP threads still spin, so a fixed order would always charge the
    same entry for it.
    """
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    order = list(calls)
    shuffle = np.random.default_rng(12345).permutation
    for _ in range(repeats):
        for i in shuffle(len(order)):
            name = order[i]
            start = clock()
            calls[name]()
            samples[name].append(clock() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def _dtype(name):
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def run_table(args, torch):
    import torch.nn.functional as F

    import nbdw

    clock = _timer(args.cpu_time)
    rng = np.random.default_rng(0)
    rows = []
    for shape_name in args.shapes.split(","):
        h, w, c, k, s, d, m = {**SHAPES, **EXTRA_SHAPES}[shape_name]
        pad = (k - 1) * d // 2
        n = args.batch
        oh = (h + 2 * pad - (k - 1) * d - 1) // s + 1
        ow = (w + 2 * pad - (k - 1) * d - 1) // s + 1
        x32 = rng.standard_normal((n, h, w, c)).astype(np.float32)
        f32 = rng.standard_normal((k, k, c, m)).astype(np.float32)
        dy32 = rng.standard_normal((n, oh, ow, c * m)).astype(np.float32)
        tw = torch.from_numpy(f32).reshape(k, k, c * m).permute(2, 0, 1).unsqueeze(1).contiguous()
        conv = dict(stride=s, padding=pad, dilation=d, groups=c)
        for layout in args.layouts.split(","):
            mf = torch.channels_last if layout == "NHWC" else torch.contiguous_format
            tx = torch.from_numpy(x32).permute(0, 3, 1, 2).contiguous(memory_format=mf)
            tdy = torch.from_numpy(dy32).permute(0, 3, 1, 2).contiguous(memory_format=mf)
            if layout == "NHWC":
                strides, dil, in_sizes = [1, s, s, 1], [1, d, d, 1], [n, h, w, c]
                padding = [[0, 0], [pad, pad], [pad, pad], [0, 0]]
                to_layout = np.ascontiguousarray
            else:
                strides, dil, in_sizes = [1, 1, s, s], [1, 1, d, d], [n, c, h, w]
                padding = [[0, 0], [0, 0], [pad, pad], [pad, pad]]

                def to_layout(a):
                    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
            theirs = {
                "forward": lambda: F.conv2d(tx, tw, **conv),
                "backprop_input": lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tdy, **conv),
                "backprop_filter": lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tdy, **conv),
            }
            for op in args.ops.split(","):
                calls = {}
                if not args.no_torch:
                    calls["torch"] = theirs[op]
                for dtype_name in args.dtypes.split(","):
                    dtype = _dtype(dtype_name)
                    x, dy, f = to_layout(x32).astype(dtype), to_layout(dy32).astype(dtype), f32.astype(dtype)
                    calls[dtype_name] = {
                        "forward": lambda x=x, f=f: nbdw.depthwise_conv2d_native(x, f, strides, padding, layout, dil),
                        "backprop_input": lambda f=f, dy=dy: nbdw.depthwise_conv2d_native_backprop_input(
                            in_sizes, f, dy, strides, padding, layout, dil),
                        "backprop_filter": lambda x=x, f=f, dy=dy: nbdw.depthwise_conv2d_native_backprop_filter(
                            x, f.shape, dy, strides, padding, layout, dil),
                    }[op]
                if "torch" in calls and "float32" in calls:
                    with torch.no_grad():
                        _compare(op, layout, calls["float32"](), theirs[op]().numpy(), k, c, m)
                with torch.no_grad():
                    medians = _interleaved(calls, args.repeats, clock)
                for name, seconds in medians.items():
                    if name != "torch":
                        row = dict(shape=shape_name, op=op, layout=layout, dtype=name, nbdw_ms=1e3 * seconds,
                                   torch_ms=1e3 * medians["torch"] if "torch" in medians else None)
                        row["ratio"] = row["nbdw_ms"] / row["torch_ms"] if row["torch_ms"] else None
                        rows.append(row)
                        print(f"{shape_name:18s} {op:16s} {layout} {name:8s} nbdw {row['nbdw_ms']:8.3f} ms"
                              + (f"  torch {row['torch_ms']:8.3f} ms  ratio {row['ratio']:.2f}" if row["ratio"] else ""),
                              flush=True)
    _summaries(rows, args)
    return rows


def _summaries(rows, args):
    def find(**kv):
        for r in rows:
            if all(r[k] == v for k, v in kv.items()):
                return r
        return None

    print()
    for layout in args.layouts.split(","):
        for op in args.ops.split(","):
            ratios = [r["ratio"] for r in rows if r["op"] == op and r["layout"] == layout
                      and r["dtype"] == "float32" and r["ratio"]]
            if ratios:
                print(f"nbdw/torch {layout} float32 {op:16s}: geomean {_geomean(ratios):.3f}, worst {max(ratios):.2f}")
    layouts, dtypes = args.layouts.split(","), args.dtypes.split(",")
    if "NHWC" in layouts and "NCHW" in layouts:
        for op in args.ops.split(","):
            ratios = [find(shape=r["shape"], op=op, layout="NCHW", dtype=r["dtype"])["nbdw_ms"] / r["nbdw_ms"]
                      for r in rows if r["op"] == op and r["layout"] == "NHWC" and r["dtype"] == dtypes[0]]
            print(f"nbdw NCHW/NHWC {dtypes[0]} {op:16s}: geomean {_geomean(ratios):.3f}, worst {max(ratios):.2f}")
    if "float32" in dtypes:
        for half in ("float16", "bfloat16"):
            if half not in dtypes:
                continue
            for op in args.ops.split(","):
                ratios = [find(shape=r["shape"], op=op, layout=r["layout"], dtype=half)["nbdw_ms"] / r["nbdw_ms"]
                          for r in rows if r["op"] == op and r["dtype"] == "float32"]
                print(f"nbdw {half}/float32 {op:16s}: geomean {_geomean(ratios):.3f}, worst {max(ratios):.2f}")


def run_dram(args, torch):
    """Issue 7's DRAM-bound forward against the copy speed measured in the same run."""
    import numba
    from numba import njit, prange

    import nbdw
    import nbdw.cpu

    @njit(parallel=True)
    def parallel_copy(src, dst, tasks):
        n = src.size
        for t in prange(tasks):
            lo, hi = t * n // tasks, (t + 1) * n // tasks
            a, b = src[lo:hi], dst[lo:hi]
            for i in range(hi - lo):
                b[i] = a[i]

    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 112, 112, 32)).astype(np.float32)
    f = rng.standard_normal((3, 3, 32, 1)).astype(np.float32)
    flat = x.reshape(-1)
    dst = np.empty_like(flat)
    out = nbdw.cpu._empty_aligned(x.shape, np.float32)
    tasks = numba.get_num_threads()
    calls = {
        "numba copy": lambda: parallel_copy(flat, dst, tasks),
        "numba copy, fresh dst": lambda: parallel_copy(flat, np.empty_like(flat), tasks),
        "numpy copy": lambda: np.copyto(dst, flat),
        "nbdw forward": lambda: nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME"),
        "nbdw forward, out=": lambda: nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", out=out),
    }
    if torch is not None:
        tx = torch.from_numpy(x).permute(0, 3, 1, 2)
        tw = torch.from_numpy(f).reshape(9, 32).T.reshape(32, 1, 3, 3).contiguous()
        calls["torch forward"] = lambda: torch.nn.functional.conv2d(tx, tw, padding=1, groups=32)
    medians = _interleaved(calls, args.repeats, time.perf_counter)
    moved = 2 * x.nbytes
    floor = min(medians["numba copy"], medians["numpy copy"])
    fresh_floor = medians["numba copy, fresh dst"]
    print(f"\nDRAM-bound forward 32x112x112x32 3x3 float32 NHWC, {numba.get_num_threads()} threads, "
          f"{moved / 1e6:.1f} MB in+out")
    for name, seconds in medians.items():
        print(f"  {name:24s} {1e3 * seconds:8.3f} ms  {moved / seconds / 1e9:6.1f} GB/s")
    print(f"  nbdw forward, out= / copy floor          {medians['nbdw forward, out='] / floor:.2f}")
    print(f"  nbdw forward / copy floor                {medians['nbdw forward'] / floor:.2f}")
    print(f"  nbdw forward / copy into a fresh buffer  {medians['nbdw forward'] / fresh_floor:.2f}")
    return {name: 1e3 * s for name, s in medians.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--layouts", default="NHWC", help="comma list of NHWC, NCHW")
    p.add_argument("--dtypes", default="float32", help="comma list of float32, float16, bfloat16, float64")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="process CPU time (use with --threads 1)")
    p.add_argument("--dram", action="store_true", help="also run the DRAM-bound case against the copy floor")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)

    import numba
    numba.set_num_threads(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
        args.no_torch = True
    print(f"threads {args.threads}, batch {args.batch}, repeats {args.repeats}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, torch {getattr(torch, '__version__', 'absent')}, "
          f"numba {numba.__version__}")
    results = {"rows": run_table(args, torch) if args.shapes else []}
    if args.dram:
        results["dram"] = run_dram(args, torch)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


def _compare(op, layout, ours, theirs, k, c, m):
    ours = np.asarray(ours, np.float64)
    if op == "backprop_filter":  # torch (C*M, 1, K, K) -> (K, K, C, M)
        theirs = theirs.reshape(c, m, k, k).transpose(2, 3, 0, 1)
    elif layout == "NHWC":
        theirs = theirs.transpose(0, 2, 3, 1)
    err = np.max(np.abs(ours - theirs)) / max(1.0, np.max(np.abs(theirs)))
    if err > 1e-3:
        sys.exit(f"nbdw and torch disagree on {op} {layout}: relative error {err:.2e}")


if __name__ == "__main__":
    main()
