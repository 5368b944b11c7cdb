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


# --------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["ptx"])
    parser.add_argument("--arch", action="append", help="ptx: sm architecture digits, e.g. 80, 90 (repeatable)")
    parser.add_argument("--only", help="ptx: only kernels whose name contains this")
    parser.add_argument("--out", default=None, help="directory for results")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.command == "ptx":
        rows = ptx(tuple(args.arch or ("80", "90")), args.out and os.path.join(args.out, "ptx"), args.only)
        if args.out:
            with open(os.path.join(args.out, "ptx.json"), "w") as fh:
                json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
