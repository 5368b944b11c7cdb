"""``python -m nbdw``: a self-check on built-in example data and a small timing table.

The self-check reproduces the examples of TensorFlow's documentation exactly, checks the
adjoint identities that tie the three ops together in float64, and checks every dtype and
layout against the float64 result within the dtype's rounding. The timing table shows the
three ops on a MobileNetV2-sized layer with the backend's achieved bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import (available_backends, depthwise_conv2d, depthwise_conv2d_native,
               depthwise_conv2d_native_backprop_filter, depthwise_conv2d_native_backprop_input, spec)

# tf.nn.depthwise_conv2d's documented usage example and its documented results.
DOC_X = np.array([[1., 2.], [3., 4.], [5., 6.]], dtype=np.float32).reshape((1, 3, 2, 1))
DOC_KERNEL = np.array([[1., 2.], [3., 4]], dtype=np.float32).reshape((2, 1, 1, 2))
DOC_VALID = np.array([[[[10., 14.], [14., 20.]], [[18., 26.], [22., 32.]]]], dtype=np.float32)
DOC_EXPLICIT = np.array([[[[0., 0.], [3., 4.], [6., 8.]],
                          [[0., 0.], [10., 14.], [14., 20.]],
                          [[0., 0.], [18., 26.], [22., 32.]]]], dtype=np.float32)

# A configuration that exercises every option at once: unequal strides with dilation,
# a multiplier, explicit asymmetric padding.
CASES = [
    dict(nhwc=(2, 17, 13, 5), taps=(3, 3), multiplier=2, strides=(2, 1), dilations=(1, 2), padding="SAME"),
    dict(nhwc=(1, 12, 15, 3), taps=(5, 2), multiplier=1, strides=(1, 3), dilations=(2, 1), padding="VALID"),
    dict(nhwc=(3, 9, 9, 4), taps=(3, 4), multiplier=3, strides=(2, 2), dilations=(1, 1),
         padding=((1, 2), (0, 3))),
]


def _case_args(case, fmt):
    n, h, w, c = case["nhwc"]
    (sh, sw), (dh, dw) = case["strides"], case["dilations"]
    if fmt == "NHWC":
        shape, strides, dil = (n, h, w, c), [1, sh, sw, 1], [1, dh, dw, 1]
    else:
        shape, strides, dil = (n, c, h, w), [1, 1, sh, sw], [1, 1, dh, dw]
    padding = case["padding"]
    if not isinstance(padding, str):
        pairs = [list(padding[0]), list(padding[1])]
        padding = [[0, 0], *pairs, [0, 0]] if fmt == "NHWC" else [[0, 0], [0, 0], *pairs]
    return shape, (*case["taps"], c, case["multiplier"]), strides, padding, dil


def _self_check(backend) -> list:
    failures = []

    def check(name, ok):
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)

    out = np.asarray(depthwise_conv2d(DOC_X, DOC_KERNEL, [1, 1, 1, 1], "VALID", backend=backend))
    check("TensorFlow doc example, VALID", np.array_equal(out, DOC_VALID))
    out = np.asarray(depthwise_conv2d(DOC_X, DOC_KERNEL, [1, 1, 1, 1], [[0, 0], [1, 0], [1, 0], [0, 0]],
                                      backend=backend))
    check("TensorFlow doc example, explicit padding", np.array_equal(out, DOC_EXPLICIT))

    rng = np.random.default_rng(0)
    for i, case in enumerate(CASES):
        for fmt in ("NHWC", "NCHW"):
            shape, fshape, strides, padding, dil = _case_args(case, fmt)
            args = (strides, padding, fmt, dil)
            x, f = rng.standard_normal(shape), rng.standard_normal(fshape)
            y = np.asarray(depthwise_conv2d_native(x, f, *args, backend=backend))
            dy = rng.standard_normal(y.shape)
            dx = np.asarray(depthwise_conv2d_native_backprop_input(shape, f, dy, *args, backend=backend))
            df = np.asarray(depthwise_conv2d_native_backprop_filter(x, fshape, dy, *args, backend=backend))
            inner = np.vdot(y, dy)
            scale = np.vdot(np.abs(y), np.abs(dy)) + 1
            check(f"case {i} {fmt}: adjoint identities <Fx,dy> = <x,dx> = <f,df> (float64)",
                  abs(inner - np.vdot(x, dx)) < 1e-12 * scale and abs(inner - np.vdot(f, df)) < 1e-12 * scale)
            for dtype in spec.SUPPORTED_DTYPES[:3]:
                # one rounding of the result plus a generous float32 accumulation allowance
                u = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24}[dtype.name]
                xd, fd, dyd = x.astype(dtype), f.astype(dtype), dy.astype(dtype)
                x64, f64, dy64 = (a.astype(np.float64) for a in (xd, fd, dyd))
                results = [
                    (depthwise_conv2d_native(xd, fd, *args, backend=backend),
                     depthwise_conv2d_native(x64, f64, *args, backend=backend),
                     depthwise_conv2d_native(np.abs(x64), np.abs(f64), *args, backend=backend)),
                    (depthwise_conv2d_native_backprop_input(shape, fd, dyd, *args, backend=backend),
                     depthwise_conv2d_native_backprop_input(shape, f64, dy64, *args, backend=backend),
                     depthwise_conv2d_native_backprop_input(shape, np.abs(f64), np.abs(dy64), *args, backend=backend)),
                    (depthwise_conv2d_native_backprop_filter(xd, fshape, dyd, *args, backend=backend),
                     depthwise_conv2d_native_backprop_filter(x64, fshape, dy64, *args, backend=backend),
                     depthwise_conv2d_native_backprop_filter(np.abs(x64), fshape, np.abs(dy64), *args,
                                                             backend=backend)),
                ]
                ok = all(np.asarray(r).dtype == dtype and
                         np.all(np.abs(np.asarray(r).astype(np.float64) - np.asarray(ref))
                                <= (4 * u + 1e-4) * np.asarray(bound) + 1e-6)
                         for r, ref, bound in results)
                check(f"case {i} {fmt}: {dtype.name} agrees with float64 on all three ops", ok)
    return failures


def _median_ms(fn, repeat):
    fn()  # compile / warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _timing_table(backend, repeat, shape):
    n, h, w, c = shape
    rng = np.random.default_rng(1)
    print(f"\nTiming ({backend}): {n}x{h}x{w}x{c}, 3x3, stride 1, SAME, median of {repeat} runs")
    print(f"  {'op':<16} {'layout':<6} {'dtype':<9} {'ms':>9} {'GB/s':>7}")
    for fmt in ("NHWC", "NCHW"):
        xs = (n, h, w, c) if fmt == "NHWC" else (n, c, h, w)
        for dtype in (np.dtype(np.float32), spec.bfloat16):
            x = rng.standard_normal(xs).astype(dtype)
            f = rng.standard_normal((3, 3, c, 1)).astype(dtype)
            dy = rng.standard_normal(xs).astype(dtype)
            args = ([1, 1, 1, 1], "SAME", fmt)
            nbytes = 2 * x.nbytes  # read the input (or gradient) once, write the result once
            ops = {
                "forward": lambda: depthwise_conv2d_native(x, f, *args, backend=backend),
                "backprop_input": lambda: depthwise_conv2d_native_backprop_input(xs, f, dy, *args, backend=backend),
                "backprop_filter": lambda: depthwise_conv2d_native_backprop_filter(x, f.shape, dy, *args,
                                                                                   backend=backend),
            }
            for name, fn in ops.items():
                ms = _median_ms(fn, repeat)
                print(f"  {name:<16} {fmt:<6} {dtype.name:<9} {ms:9.2f} {nbytes / ms / 1e6:7.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbdw", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cpu", help="backend to check (default: cpu)")
    parser.add_argument("--repeat", type=int, default=10, help="timing repeats (default: 10)")
    parser.add_argument("--shape", default="1,112,112,32", help="NHWC shape of the timed layer")
    parser.add_argument("--no-timing", action="store_true", help="self-check only")
    args = parser.parse_args(argv)
    print(f"nbdw self-check, backend {args.backend!r} (available here: {', '.join(available_backends())})")
    t0 = time.perf_counter()
    failures = _self_check(args.backend)
    print(f"self-check {'passed' if not failures else 'FAILED'} in {time.perf_counter() - t0:.1f} s "
          "(first run includes compilation)")
    if not args.no_timing:
        _timing_table(args.backend, args.repeat, tuple(int(s) for s in args.shape.split(",")))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
