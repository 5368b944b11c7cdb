"""Checks of the CUDA backend that the simulator cannot make.

Run from the repository root. One call runs everything a GPU session should record::

    python benchmarks/gpu_check.py all --out gpu_results      # needs a GPU (and torch for `bench`)

Subcommands (each also runs on its own):

``ptx``
    Compile every CUDA kernel specialisation (op x layout x dtype x staging) to PTX with NVVM and
    assemble it with ``ptxas -v`` for the given architectures; prints registers, spills and shared
    memory. Needs NVVM, libdevice and ptxas (a CUDA toolkit) but NO GPU: it catches typing and
    lowering errors on the paths the simulator never compiles (native float16, libdevice bit casts).
``test``
    The CUDA test suite on the real GPU (``pytest tests/test_cuda.py``, ``gpu`` marker included).
``sanitize``
    ``compute-sanitizer`` memcheck, racecheck and synccheck on a small run of every kernel.
``bench``
    nbdw against PyTorch's depthwise convolution (``conv2d`` with ``groups=C``) on the issue's shapes,
    forward / backprop input / backprop filter, float32 and float16, CUDA events, median of many runs
    after warm-up, plus the device's measured copy bandwidth; writes a Markdown table.
``all``
    ``ptx``, ``test``, ``sanitize`` and ``bench``, results under ``--out``.

Nothing here is imported by nbdw or by the test suite; heavy imports stay inside functions so that
tools which import every module under ``benchmarks/`` (asv discovery) pay nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------- ptx


def _compile_without_gpu(cc):
    """Let numba-cuda compile for compute capability ``cc`` on a machine without a GPU or NVRTC.

    numba-cuda asks the driver for the current device's capability when it compiles a device
    function, and NVRTC only for the list of supported architectures and the libdevice path. This
    replaces those three look-ups (for this process only); code generation itself is untouched.
    """
    import numba.cuda.dispatcher as dispatcher
    from numba.cuda.cudadrv import libs, nvrtc, nvvm

    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    nvrtc.get_arch_option = lambda major, minor: f"compute_{major}{minor}"
    try:
        libs.get_libdevice()
    except Exception:
        found = _find_toolkit_file(os.path.join("nvvm", "libdevice", "libdevice.10.bc"))
        if found is None:
            raise SystemExit("ptx: libdevice.10.bc not found; set CUDA_HOME to a CUDA toolkit")
        libs.get_libdevice = nvvm.get_libdevice = lambda: found


def _toolkit_roots():
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted((os.path.join("/usr/local", d) for d in os.listdir("/usr/local") if d.startswith("cuda-")),
                    reverse=True)
    return [r for r in roots if r and os.path.isdir(r)]


def _find_toolkit_file(relative):
    for root in _toolkit_roots():
        path = os.path.join(root, relative)
        if os.path.exists(path):
            return path
    return None


def _kernel_cases():
    """(name, kernel dispatcher, argument types) for every kernel specialisation nbdw launches."""
    import numpy as np
    from numba.cuda.typing.typeof import typeof

    from nbdw import cuda as nc

    def arr(ndim, dtype):
        return typeof(np.zeros((1,) * ndim, dtype))

    g = typeof((1,) * 15)  # the geometry tuple, nbdw.cuda._dims
    cases = []
    for name in ("float16", "bfloat16", "float32", "float64"):
        k = nc.kernel_dtype(np.dtype(name) if name != "bfloat16" else nc._BFLOAT16)
        acc = np.float64 if name == "float64" else np.float32
        a = typeof(acc(0))
        for fmt in ("NHWC", "NCHW"):
            for staged in (True, False):
                tag = f"{fmt}/{name}/{'shared' if staged else 'global'}-taps"
                cases.append((f"forward {tag}", nc._forward_kernel(fmt, name, staged),
                              (arr(1, k), arr(1, k), arr(1, acc), a, a, arr(1, k), g, typeof(1))))
                cases.append((f"backprop_input {tag}", nc._backprop_input_kernel(fmt, name, staged),
                              (arr(1, k), arr(1, k), arr(1, k), g, typeof(1))))
            cases.append((f"backprop_filter {fmt}/{name}", nc._backprop_filter_kernel(fmt, name),
                          (arr(1, k), arr(1, k), arr(2, acc), g)))
        cases.append((f"reduce {name}", nc._reduce_kernel(name), (arr(2, acc), arr(1, k))))
        cases.append((f"widen bias {name}", nc._widen_kernel(name), (arr(1, k), arr(1, acc))))
    for bits in (np.uint8, np.uint16, np.uint32, np.uint64):
        for ndim in (1, 4):
            cases.append((f"copy {ndim}-D {np.dtype(bits).name}", nc._copy_kernel(ndim),
                          (arr(ndim, bits), arr(ndim, bits))))
    return cases


def ptx(archs=("80", "90"), out_dir=None, only=None):
    """Compile every kernel to PTX and assemble it with ptxas; returns rows of resource usage."""
    import tempfile

    from numba import cuda

    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise SystemExit("ptx: unset NUMBA_ENABLE_CUDASIM (the simulator compiles nothing)")
    ptxas = shutil.which("ptxas") or _find_toolkit_file(os.path.join("bin", "ptxas"))
    if ptxas is None:
        raise SystemExit("ptx: ptxas not found; set CUDA_HOME to a CUDA toolkit")
    rows = []
    work = out_dir or tempfile.mkdtemp(prefix="nbdw_ptx_")
    os.makedirs(work, exist_ok=True)
    for arch in archs:
        cc = (int(arch[:-1]), int(arch[-1]))
        _compile_without_gpu(cc)
        for name, kernel, argtypes in _kernel_cases():
            if only and only not in name:
                continue
            code, _ = cuda.compile_ptx(kernel.py_func, argtypes, cc=cc)
            path = os.path.join(work, re.sub(r"[^A-Za-z0-9]+", "_", f"{name}_sm{arch}") + ".ptx")
            with open(path, "w") as fh:
                fh.write(code)
            done = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", path, "-o", path[:-4] + ".cubin"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"ptxas failed for {name} (sm_{arch}):\n{done.stderr}")
            info = done.stderr
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            stack = re.search(r"(\d+) bytes stack frame", info)
            rows.append(dict(kernel=name, arch=f"sm_{arch}", registers=int(regs.group(1)) if regs else None,
                             spill_stores=int(spill.group(1)) if spill else None,
                             spill_loads=int(spill.group(2)) if spill else None,
                             stack=int(stack.group(1)) if stack else None))
            print(f"{name:48s} sm_{arch}  regs {rows[-1]['registers']:>3}  stack {rows[-1]['stack']:>3}  "
                  f"spill {rows[-1]['spill_stores']}/{rows[-1]['spill_loads']}", flush=True)
    return rows


# -------------------------------------------------------------------------------------------- test


def _env_without_simulator():
    return {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}


def test(out_dir):
    """The CUDA test file on the real GPU, gpu-marked tests included; returns pytest's exit code."""
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env_without_simulator(), capture_output=True, text=True)
    report = done.stdout + done.stderr
    print(report[-6000:], flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "test.txt"), "w") as fh:
            fh.write(" ".join(cmd) + "\n\n" + report)
    return done.returncode


# ---------------------------------------------------------------------------------------- sanitize


def small_run():
    """Every kernel once on small shapes, with the default and with tiny launch configurations."""
    import ml_dtypes
    import numpy as np
    from numba import cuda

    import nbdw
    from nbdw import cuda as nc

    rng = np.random.default_rng(0)
    tiny = dict(block_threads=32, channel_lanes=8, width_lanes=8, pixels_per_thread=2, filter_tap_rows=4,
                filter_blocks=64, filter_min_rows=1, reduce_lanes=8, reduce_rows=4, copy_threads=32)
    for config in ({}, tiny, dict(tiny, max_shared_bytes=4)):
        with nc.launch_config(**config):
            for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
                for fmt, shape, strides, dil in (("NHWC", (2, 9, 11, 5), [1, 2, 1, 1], [1, 1, 2, 1]),
                                                 ("NCHW", (2, 5, 9, 11), [1, 1, 1, 2], [1, 1, 2, 1])):
                    x = rng.standard_normal(shape).astype(dtype)
                    f = rng.standard_normal((3, 2, 5, 2)).astype(dtype)
                    xd = cuda.to_device(x)
                    y = nbdw.depthwise_conv2d_native(xd, cuda.to_device(f), strides, "SAME", fmt, dil)
                    b = nbdw.depthwise_conv2d_bias_activation(xd[:, :, ::-1], f, cuda.to_device(np.ones(10, dtype)),
                                                              strides, [[0, 0], [1, 2], [0, 1], [0, 0]]
                                                              if fmt == "NHWC" else [[0, 0], [0, 0], [1, 2], [0, 1]],
                                                              fmt, dil, "relu6")
                    dx = nbdw.depthwise_conv2d_native_backprop_input(shape, f, y, strides, "SAME", fmt, dil)
                    df = nbdw.depthwise_conv2d_native_backprop_filter(xd, f.shape, y, strides, "SAME", fmt, dil)
                    cuda.synchronize()
                    assert np.isfinite(df.copy_to_host().astype(np.float32)).all()
                    del b, dx
    print("small run done", flush=True)


def sanitize(out_dir):
    """compute-sanitizer memcheck, racecheck (shared memory), synccheck and initcheck on small_run."""
    tool = shutil.which("compute-sanitizer") or _find_toolkit_file(os.path.join("bin", "compute-sanitizer"))
    if tool is None:
        print("sanitize: compute-sanitizer not found (CUDA toolkit); skipped", flush=True)
        return None
    results = {}
    for check in ("memcheck", "racecheck", "synccheck", "initcheck"):
        cmd = [tool, "--tool", check, "--error-exitcode", "99", "--target-processes", "all",
               sys.executable, os.path.abspath(__file__), "small-run"]
        done = subprocess.run(cmd, cwd=ROOT, env=_env_without_simulator(), capture_output=True, text=True)
        summary = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR SUMMARY" in line
                   or "RACECHECK SUMMARY" in line]
        results[check] = dict(returncode=done.returncode, summary=summary)
        print(f"{check}: exit {done.returncode}; {' | '.join(summary) or '(no summary line)'}", flush=True)
        if out_dir:
            with open(os.path.join(out_dir, f"sanitize_{check}.txt"), "w") as fh:
                fh.write(" ".join(cmd) + "\n\n" + done.stdout + done.stderr)
    return results


# ------------------------------------------------------------------------------------------- bench

#: The issue's target shapes, batch 64: (name, H, W, C, M, K, stride).
SHAPES = [
    ("MobileNetV2 112x112x32", 112, 112, 32, 1, 3, 1),
    ("MobileNetV2 112x112x96 s2", 112, 112, 96, 1, 3, 2),
    ("MobileNetV2 56x56x144", 56, 56, 144, 1, 3, 1),
    ("MobileNetV2 14x14x576", 14, 14, 576, 1, 3, 1),
    ("EfficientNet 28x28x240 5x5", 28, 28, 240, 1, 5, 1),
    ("ConvNeXt 56x56x96 7x7", 56, 56, 96, 1, 7, 1),
    ("multiplier 2, 56x56x64", 56, 56, 64, 2, 3, 1),
]


def _spin_kernel():
    from numba import cuda

    @cuda.jit
    def spin(microseconds):
        """Keeps the GPU busy while the host enqueues the timed work (so host overhead is not timed)."""
        for _ in range(microseconds):
            cuda.nanosleep(1000)

    return spin


def _median_ms(run, record, repeats, warmup, spin=None):
    """Median of ``repeats`` CUDA-event timings of ``run()`` after ``warmup`` calls.

    ``record()`` returns an (start, end) event pair. With ``spin`` the device first sleeps ~2 ms,
    so the events bracket device time only; without it they also catch host-side launch gaps.
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if spin is not None:
            spin()
        start, end = record()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(out_dir, repeats=50, warmup=5, shapes=None, batch=64):
    """nbdw (NHWC and NCHW) against torch.nn.functional.conv2d(groups=C) on the same device."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from numba import cuda

    import nbdw

    if not torch.cuda.is_available():
        raise SystemExit("bench: torch has no CUDA device")
    spin_kernel = _spin_kernel()

    def spin():
        spin_kernel[1, 1](2000)

    def torch_events():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def numba_events():
        return cuda.event(timing=True), cuda.event(timing=True)

    # the device's copy bandwidth: read + write of a 1 GiB buffer
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), torch_events, 20, 3, spin)
    copy_bw = 2 * src.numel() * 4 / (copy_ms * 1e-3)
    del src, dst
    device = torch.cuda.get_device_name()
    rows = []
    torch.backends.cudnn.benchmark = True
    for name, h, w, c, m, k, stride in shapes or SHAPES:
        for dtype, tdtype in ((np.float32, torch.float32), (np.float16, torch.float16)):
            pad = (k - 1) // 2
            x_nchw = torch.randn(batch, c, h, w, device="cuda", dtype=tdtype)
            weight = torch.randn(c * m, 1, k, k, device="cuda", dtype=tdtype)
            y_nchw = F.conv2d(x_nchw, weight, stride=stride, padding=pad, groups=c)
            dy_nchw = torch.randn_like(y_nchw)
            x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
            dy_cl = dy_nchw.contiguous(memory_format=torch.channels_last)
            w_cl = weight.contiguous(memory_format=torch.channels_last)
            f_hwcm = weight.reshape(c, m, k, k).permute(2, 3, 0, 1).contiguous()  # (KH, KW, C, M)
            f_dev = cuda.as_cuda_array(f_hwcm)
            pads = {"NHWC": [[0, 0], [pad, pad], [pad, pad], [0, 0]], "NCHW": [[0, 0], [0, 0], [pad, pad], [pad, pad]]}
            strides = {"NHWC": [1, stride, stride, 1], "NCHW": [1, 1, stride, stride]}
            tensors = {"NHWC": (x_nchw.permute(0, 2, 3, 1).contiguous(), dy_nchw.permute(0, 2, 3, 1).contiguous()),
                       "NCHW": (x_nchw, dy_nchw)}
            # each op reads one of (input, out_backprop) and reads or writes the other: the minimum traffic
            moved = (x_nchw.numel() + y_nchw.numel()) * np.dtype(dtype).itemsize
            torch_ops = {
                "forward": {
                    "NCHW": lambda: F.conv2d(x_nchw, weight, stride=stride, padding=pad, groups=c),
                    "NHWC": lambda: F.conv2d(x_cl, w_cl, stride=stride, padding=pad, groups=c)},
                "backprop_input": {
                    "NCHW": lambda: torch.nn.grad.conv2d_input(x_nchw.shape, weight, dy_nchw, stride, pad, 1, c),
                    "NHWC": lambda: torch.nn.grad.conv2d_input(x_cl.shape, w_cl, dy_cl, stride, pad, 1, c)},
                "backprop_filter": {
                    "NCHW": lambda: torch.nn.grad.conv2d_weight(x_nchw, weight.shape, dy_nchw, stride, pad, 1, c),
                    "NHWC": lambda: torch.nn.grad.conv2d_weight(x_cl, weight.shape, dy_cl, stride, pad, 1, c)},
            }
            for fmt in ("NHWC", "NCHW"):
                xt, dyt = tensors[fmt]
                xd, dyd = cuda.as_cuda_array(xt), cuda.as_cuda_array(dyt)
                outs = {"forward": cuda.device_array(dyd.shape, dtype),
                        "backprop_input": cuda.device_array(xd.shape, dtype),
                        "backprop_filter": cuda.device_array(f_dev.shape, dtype)}
                ours = {
                    "forward": lambda: nbdw.depthwise_conv2d_native(
                        xd, f_dev, strides[fmt], pads[fmt], fmt, out=outs["forward"]),
                    "backprop_input": lambda: nbdw.depthwise_conv2d_native_backprop_input(
                        xd.shape, f_dev, dyd, strides[fmt], pads[fmt], fmt, out=outs["backprop_input"]),
                    "backprop_filter": lambda: nbdw.depthwise_conv2d_native_backprop_filter(
                        xd, f_dev.shape, dyd, strides[fmt], pads[fmt], fmt, out=outs["backprop_filter"]),
                }
                for op in ("forward", "backprop_input", "backprop_filter"):
                    ours[op]()
                    theirs = torch_ops[op][fmt]()
                    got = torch.as_tensor(outs[op], device="cuda")
                    if op == "forward":
                        want = theirs if fmt == "NCHW" else theirs.permute(0, 2, 3, 1)
                    elif op == "backprop_input":
                        want = theirs if fmt == "NCHW" else theirs.permute(0, 2, 3, 1)
                    else:
                        want = theirs.reshape(c, m, k, k).permute(2, 3, 0, 1)
                    scale = want.abs().max().item() or 1.0
                    err = ((got.float() - want.float()).abs().max().item()) / scale
                    t_dev = _median_ms(ours[op], numba_events, repeats, warmup, spin)
                    t_e2e = _median_ms(ours[op], numba_events, repeats, warmup)
                    t_torch = _median_ms(torch_ops[op][fmt], torch_events, repeats, warmup, spin)
                    t_torch_e2e = _median_ms(torch_ops[op][fmt], torch_events, repeats, warmup)
                    repeat_ok = None
                    if op == "backprop_filter":
                        first = outs[op].copy_to_host()
                        ours[op]()
                        repeat_ok = bool((outs[op].copy_to_host().view(np.uint8) == first.view(np.uint8)).all())
                    row = dict(shape=name, dtype=np.dtype(dtype).name, layout=fmt, op=op, nbdw_ms=t_dev,
                               nbdw_e2e_ms=t_e2e, torch_ms=t_torch, torch_e2e_ms=t_torch_e2e,
                               speedup=t_torch / t_dev, bandwidth_fraction=moved / (t_dev * 1e-3) / copy_bw,
                               max_rel_err=err, bitwise_repeatable=repeat_ok)
                    rows.append(row)
                    print(f"{name:28s} {row['dtype']:8s} {fmt} {op:16s} nbdw {t_dev:8.3f} ms (e2e {t_e2e:8.3f}) "
                          f"torch {t_torch:8.3f} ms (e2e {t_torch_e2e:8.3f})  x{row['speedup']:.2f}  "
                          f"bw {row['bandwidth_fraction']:.0%}  err {err:.1e}", flush=True)
    header = (f"# nbdw CUDA vs PyTorch depthwise conv2d\n\n{datetime.date.today().isoformat()}, {device}, "
              f"torch {torch.__version__} (cuDNN {torch.backends.cudnn.version()}), batch {batch}, "
              f"median of {repeats} runs after {warmup} warm-up, CUDA events. Measured copy bandwidth "
              f"{copy_bw / 1e9:.0f} GB/s (1 GiB device-to-device, read + write).\n\n"
              "`ms`: device time (the GPU is kept busy while the host enqueues, so host overhead is excluded); "
              "`e2e`: events around a lone call, host-side launch overhead included. torch runs NCHW for the "
              "NCHW rows and channels_last for the NHWC rows, symmetric padding (K-1)/2. `bw`: "
              "(input + output bytes) / nbdw time / copy bandwidth.\n\n"
              "| shape | dtype | layout | op | nbdw ms | nbdw e2e ms | torch ms | torch e2e ms | torch/nbdw | bw | "
              "max rel err | bitwise repeatable |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = "".join(
        f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['op']} | {r['nbdw_ms']:.3f} | {r['nbdw_e2e_ms']:.3f} | "
        f"{r['torch_ms']:.3f} | {r['torch_e2e_ms']:.3f} | {r['speedup']:.2f} | {r['bandwidth_fraction']:.0%} | "
        f"{r['max_rel_err']:.1e} | {'' if r['bitwise_repeatable'] is None else r['bitwise_repeatable']} |\n"
        for r in rows)
    if out_dir:
        with open(os.path.join(out_dir, "bench.md"), "w") as fh:
            fh.write(header + table)
        with open(os.path.join(out_dir, "bench.json"), "w") as fh:
            json.dump(dict(device=device, copy_bandwidth=copy_bw, rows=rows), fh, indent=1)
    return rows


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["ptx", "test", "sanitize", "bench", "all", "small-run"])
    parser.add_argument("--arch", action="append", help="ptx: sm architecture digits, e.g. 80, 90 (repeatable)")
    parser.add_argument("--only", help="ptx: only kernels whose name contains this")
    parser.add_argument("--repeats", type=int, default=50, help="bench: timed runs per case")
    parser.add_argument("--quick", action="store_true", help="bench: 10 runs, first two shapes only")
    parser.add_argument("--out", default=None, help="directory for results (created)")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    failures = []
    if args.command == "small-run":
        small_run()
        return
    if args.command in ("ptx", "all"):
        archs = tuple(args.arch or ("80", "90"))
        if args.command == "all" and not args.arch:
            from numba import cuda

            if cuda.is_available():
                major, minor = cuda.get_current_device().compute_capability
                archs = (f"{major}{minor}",)
        try:
            rows = ptx(archs, args.out and os.path.join(args.out, "ptx"), args.only)
            if args.out:
                with open(os.path.join(args.out, "ptx.json"), "w") as fh:
                    json.dump(rows, fh, indent=1)
        except SystemExit as error:
            if args.command != "all":
                raise
            print(f"ptx skipped: {error}", flush=True)
    if args.command in ("test", "all") and test(args.out):
        failures.append("test")
    if args.command in ("sanitize", "all"):
        results = sanitize(args.out)
        if results and any(r["returncode"] for r in results.values()):
            failures.append("sanitize")
    if args.command in ("bench", "all"):
        bench(args.out, repeats=10 if args.quick else args.repeats, shapes=SHAPES[:2] if args.quick else None)
    if failures:
        raise SystemExit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
