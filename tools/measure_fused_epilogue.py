"""Fused versus unfused forward epilogue (bias add + relu) on one realistic depthwise layer.

    PYTHONPATH=. python tools/measure_fused_epilogue.py [--reps 21] [--shape 8 56 56 144]

Fused: ``nbdw.depthwise_conv2d_bias_activation(..., activation="relu")``, one pass over the
output. Unfused: the convolution, then the bias add, then relu, as separate NumPy passes,
both as a framework would run them (each op allocating its result) and in place. The
convolution alone is timed too, for context. All run interleaved, round after round, so that
machine noise hits them alike; medians are reported. Prints a Markdown table row for docs/layers.md.
"""

import argparse
import datetime
import platform
import time

import numba
import numpy as np

import nbdw


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 56, 56, 144], metavar=("N", "H", "W", "C"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, h, w, c = args.shape
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    k = rng.standard_normal((3, 3, c, 1), dtype=np.float32)
    b = rng.standard_normal(c, dtype=np.float32)
    conv = ([1, 1, 1, 1], "SAME", "NHWC", [1, 1, 1, 1])

    def fused():
        return nbdw.depthwise_conv2d_bias_activation(x, k, b, *conv, activation="relu")

    def unfused():
        y = nbdw.depthwise_conv2d_native(x, k, *conv)
        y = y + b
        return np.maximum(y, np.float32(0))

    def unfused_in_place():
        y = nbdw.depthwise_conv2d_native(x, k, *conv)
        y += b
        return np.maximum(y, np.float32(0), out=y)

    def conv_only():  # context: the convolution without any epilogue
        return nbdw.depthwise_conv2d_native(x, k, *conv)

    candidates = {"fused": fused, "unfused": unfused, "unfused_in_place": unfused_in_place, "conv_only": conv_only}
    reference = unfused()
    for name, fn in candidates.items():  # warm-up (compile) and agreement
        if name != "conv_only":
            np.testing.assert_array_equal(fn(), reference, err_msg=name)
        fn()
    times = {name: [] for name in candidates}
    for _ in range(args.reps):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:18s} median {med[name] * 1e3:8.2f} ms  (min {min(t) * 1e3:.2f}, max {max(t) * 1e3:.2f})")
    # Ratios within each round (the three ran back to back) are steadier than ratios of medians
    # when other work shares the machine.
    paired = {name: float(np.median(np.array(times[name]) / np.array(times["fused"]))) for name in times}
    print(f"per-round ratio medians: unfused/fused {paired['unfused']:.2f}, "
          f"unfused_in_place/fused {paired['unfused_in_place']:.2f}, conv_only/fused {paired['conv_only']:.2f}")
    machine = f"{cpu_model()}, {numba.get_num_threads()} Numba threads"
    print(f"\n| {datetime.date.today()} | {machine} | {n}x{h}x{w}x{c} 3x3 SAME float32 NHWC, relu | "
          f"{med['fused'] * 1e3:.2f} ms | {med['unfused'] * 1e3:.2f} ms "
          f"({med['unfused'] / med['fused']:.2f}x; per round {paired['unfused']:.2f}x) | "
          f"{med['unfused_in_place'] * 1e3:.2f} ms ({med['unfused_in_place'] / med['fused']:.2f}x; "
          f"per round {paired['unfused_in_place']:.2f}x) | {args.reps} |")


if __name__ == "__main__":
    main()
