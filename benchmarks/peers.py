"""Peer harness: nbdw against PyTorch and TensorFlow on the shape table, same machine, same run.

Run from the repository root (so that ``import nbdw`` and ``benchmarks.cases`` resolve)::

    python -m benchmarks.peers --batch 8 --threads 2 --layouts NHWC,NCHW --dtypes float32

For every case (op x layer x layout x dtype) each library gets the same operands (drawn once in
float32 by :func:`benchmarks.cases.make_operands`). The libraries are interleaved: round ``r``
times each of them once, in an order rotated every round, and the reported time is the median
over rounds. Each timed sample is ``number`` back-to-back calls (enough for ~20 ms), after a
15 ms pause and one untimed call of the same library, so that another library's spinning worker
threads and cold caches do not land in it. On a shared machine, a case timed while other
processes used more than ``--max-busy`` CPUs is timed again after a quiet second. Only the op
is timed: operands are built and converted beforehand.

Peers are optional; the script says which it found. What each peer runs:

* PyTorch: ``F.conv2d(groups=C)`` for forward and ``aten.convolution_backward`` (the op autograd
  runs for conv2d, with only the wanted gradient requested) for the two backprops; NHWC is
  PyTorch's ``channels_last`` memory format, NCHW its default one. PyTorch pads symmetrically:
  where TensorFlow's SAME padding is asymmetric (stride 2 on an even size) it gets the symmetric
  padding with the same output size, which is the same work on a shifted window (those cases are
  marked ``~`` and not value-checked).
* TensorFlow: ``tf.nn.depthwise_conv2d`` and ``tf.nn.depthwise_conv2d_backprop_input`` /
  ``_backprop_filter``, eagerly.

Before timing, every library's result (nbdw's included) is checked against the independent
float64 reference in ``tests/naive.py`` (``check`` in the JSON; ``WRONG`` in the table when a
result is off by more than :data:`TOLERANCE`).

With ``--device cuda`` (or ``auto`` on a machine with a GPU) nbdw's CUDA backend runs against
PyTorch CUDA, timed with CUDA events on the default stream (which Numba's launches use too);
nbdw gets Numba device arrays of the same operands.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` and the repo's nbdw importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np

from benchmarks import cases

TARGET_SAMPLE_SECONDS = 0.02
# After a parallel call, an OpenMP runtime's idle workers spin for a few ms (measured here: about
# 4 ms of CPU for both Numba's and PyTorch's). A pause this long before each sample lets the
# previous library's workers go to sleep, so that they do not compete with the next one's.
SETTLE_SECONDS = 0.015


class Unsupported(Exception):
    """A peer cannot run this case; the message says why."""


# ---------------------------------------------------------------------------
# Runners: prepare(op, layer, geom, data) -> (callable, result_to_numpy)
# ---------------------------------------------------------------------------

class NbdwRunner:
    name = "nbdw"

    def __init__(self, device):
        import nbdw

        self.device = device
        self.version = nbdw.__version__
        if device == "cuda":
            import torch

            self.torch = torch

    def describe(self):
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:  # chosen at the first parallel call
            layer = f"{numba.config.THREADING_LAYER} (not yet started)"
        return f"nbdw {self.version} (numba {numba.__version__}, {self.device} backend, " \
               f"{numba.get_num_threads()} threads, threading layer {layer})"

    def prepare(self, op, layer, geom, data):
        if self.device == "cpu":
            call = cases.nbdw_call(op, layer, geom, data, "cpu")
            return call, np.asarray
        from numba import cuda

        # Numba device arrays of the same values (PyTorch exports no __cuda_array_interface__
        # for bfloat16, so its tensors cannot carry every dtype into nbdw).
        dev = {k: cuda.to_device(v) for k, v in data.items()}
        call = cases.nbdw_call(op, layer, geom, dev, "cuda", synchronize=False)

        def to_numpy(result):  # a Numba device array, or any __cuda_array_interface__ object
            if hasattr(result, "copy_to_host"):
                return result.copy_to_host()
            return cuda.as_cuda_array(result).copy_to_host()

        return call, to_numpy


def _to_torch(torch, array):
    """A NumPy array as a CPU tensor sharing its memory (bfloat16 through its bit pattern)."""
    if array.dtype == cases.np_dtype("bfloat16"):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _torch_to_numpy(torch, tensor, dtype):
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(cases.np_dtype("bfloat16"))
    return tensor.numpy().astype(dtype, copy=False)


class TorchRunner:
    name = "torch"

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.version = torch.__version__

    def describe(self):
        extra = f"oneDNN {self.torch.backends.mkldnn.is_available()}, {self.torch.get_num_threads()} threads" \
            if self.device == "cpu" else f"CUDA {self.torch.version.cuda}, {self.torch.cuda.get_device_name()}"
        return f"torch {self.version} ({extra})"

    @staticmethod
    def symmetric_padding(geom):
        """Per axis, a symmetric padding giving TF's output size; ``exact`` when TF's is symmetric."""
        pads, exact = [], True
        for size, lo, hi, eff, stride, out in (
                (geom.in_height, geom.pad_top, geom.pad_bottom, geom.effective_filter_height, geom.stride_h,
                 geom.out_height),
                (geom.in_width, geom.pad_left, geom.pad_right, geom.effective_filter_width, geom.stride_w,
                 geom.out_width)):
            for p in (lo, hi) if lo == hi else (hi, lo):
                if (size + 2 * p - eff) // stride + 1 == out:
                    break
            else:
                raise Unsupported(f"no symmetric padding gives output size {out} for input {size}")
            pads.append(p)
            exact = exact and lo == hi
        return tuple(pads), exact

    def prepare(self, op, layer, geom, data):
        torch = self.torch
        fmt = geom.data_format
        nhwc = fmt == "NHWC"
        memory_format = torch.channels_last if nhwc else torch.contiguous_format
        device = "cuda" if self.device == "cuda" else "cpu"

        def tensor(array):  # logical NCHW; channels_last strides for NHWC data, no copy on CPU
            t = _to_torch(torch, array)
            if nhwc:
                t = t.permute(0, 3, 1, 2)
            return t.to(device).contiguous(memory_format=memory_format)

        kh, kw, c, m = geom.filter_shape
        w = _to_torch(torch, np.ascontiguousarray(data["f"].transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw)))
        w = w.to(device).contiguous(memory_format=memory_format)
        x, dy = tensor(data["x"]), tensor(data["dy"])
        padding, exact = self.symmetric_padding(geom)
        stride, dilation = (geom.stride_h, geom.stride_w), (geom.dilation_h, geom.dilation_w)
        F = torch.nn.functional
        backward = torch.ops.aten.convolution_backward
        dtype = data["x"].dtype

        if op == "forward":
            def call():
                return F.conv2d(x, w, None, stride, padding, dilation, c)

            def to_numpy(y):
                y = y.permute(0, 2, 3, 1) if nhwc else y
                return _torch_to_numpy(torch, y, dtype)
        elif op == "backprop_input":
            def call():
                return backward(dy, x, w, None, stride, padding, dilation, False, (0, 0), c,
                                (True, False, False))[0]

            def to_numpy(dx):
                dx = dx.permute(0, 2, 3, 1) if nhwc else dx
                return _torch_to_numpy(torch, dx, dtype)
        else:
            def call():
                return backward(dy, x, w, None, stride, padding, dilation, False, (0, 0), c,
                                (False, True, False))[1]

            def to_numpy(df):  # (C*M, 1, KH, KW) -> (KH, KW, C, M)
                return _torch_to_numpy(torch, df.reshape(c, m, kh, kw).permute(2, 3, 0, 1), dtype)
        call.exact = exact
        return call, to_numpy


class TensorFlowRunner:
    name = "tf"

    def __init__(self, device, threads):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if device != "cpu":
            raise Unsupported("the harness runs TensorFlow on the CPU only")
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.tf = tf
        self.version = tf.__version__

    def describe(self):
        threads = self.tf.config.threading.get_intra_op_parallelism_threads()
        return f"tensorflow {self.version} (CPU, eager, {threads} intra-op threads)"

    def prepare(self, op, layer, geom, data):
        tf = self.tf
        fmt = geom.data_format
        st, dil4 = cases.strides(layer, fmt), cases.dilations(layer, fmt)
        with tf.device("/CPU:0"):
            x, f, dy = (tf.constant(data[k]) for k in ("x", "f", "dy"))
        if op == "forward":
            rate = [layer.dilation, layer.dilation]

            def call():
                return tf.nn.depthwise_conv2d(x, f, st, cases.PADDING, data_format=fmt, dilations=rate)
        elif op == "backprop_input":
            sizes = tf.constant(list(geom.input_shape), tf.int32)

            def call():
                return tf.nn.depthwise_conv2d_backprop_input(sizes, f, dy, st, cases.PADDING, fmt, dil4)
        else:
            sizes = tf.constant(list(geom.filter_shape), tf.int32)

            def call():
                return tf.nn.depthwise_conv2d_backprop_filter(x, sizes, dy, st, cases.PADDING, fmt, dil4)
        return call, lambda t: t.numpy()


def find_peers(device, threads, wanted):
    """Instantiate the peers that import here; report the ones that do not."""
    runners, missing = [], {}
    for name in wanted:
        try:
            if name == "torch":
                runners.append(TorchRunner(device))
            elif name == "tf":
                runners.append(TensorFlowRunner(device, threads))
        except ImportError as exc:
            missing[name] = f"not installed ({exc})"
        except Unsupported as exc:
            missing[name] = str(exc)
    return runners, missing


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def _cpu_sample(call, number):
    time.sleep(SETTLE_SECONDS)
    call()  # untimed: wakes this library's workers and warms the caches for it
    t0 = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - t0) / number


def _cuda_sample(torch):
    def sample(call, number):
        call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number

    return sample


def interleaved_medians(calls, repeat, sample):
    """Median and minimum seconds per call of each entry of ``calls``, in rotated interleaved rounds."""
    names = list(calls)
    number = {}
    for name in names:  # warm up, then size each sample to about TARGET_SAMPLE_SECONDS
        calls[name]()
        one = sample(calls[name], 1)
        number[name] = max(1, min(1000, int(TARGET_SAMPLE_SECONDS / max(one, 1e-7))))
    times = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeat):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(sample(calls[name], number[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return ({name: statistics.median(ts) for name, ts in times.items()},
            {name: min(ts) for name, ts in times.items()}, number)


def _load_reference():
    """tests/naive.py, the independent float64 reference, when the repository's tests are here."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "naive.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("nbdw_tests_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_result(naive, op, layer, geom, data):
    """The op's float64 result from tests/naive.py, in the case's layout."""
    fmt = geom.data_format
    args = (cases.strides(layer, fmt), cases.PADDING, fmt, cases.dilations(layer, fmt))
    if op == "forward":
        return naive.tf_forward(data["x"], data["f"], *args)
    if op == "backprop_input":
        return naive.tf_backprop_input(geom.input_shape, data["f"], data["dy"], *args)
    return naive.tf_backprop_filter(data["x"], geom.filter_shape, data["dy"], *args)


#: Largest max|result - reference| / max|reference| of an accurate result, per dtype.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
#: Beyond this the result is not a rounding matter: it computes something else.
WRONG = 0.1


def _check(reference, result, dtype):
    """'ok', 'inexact (...)' or 'WRONG (...)': ``result`` against the float64 ``reference``."""
    a = np.asarray(reference).astype(np.float64)
    b = np.asarray(result).astype(np.float64)
    if a.shape != b.shape:
        return f"WRONG (shape {b.shape}, expected {a.shape})"
    err = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
    tol = TOLERANCE[dtype]
    if err <= tol:
        return "ok"
    return f"{'WRONG' if err > WRONG else 'inexact'} (rel. max diff {err:.2e} > {tol})"


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def machine_info():
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def geomean(values):
    values = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _csv(text, allowed, what):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"--{what} takes a comma-separated subset of {list(allowed)}, got {text!r}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(cases.OPS), type=lambda s: _csv(s, cases.OPS, "ops"),
                   help=f"comma-separated subset of {','.join(cases.OPS)} (default: all)")
    p.add_argument("--layouts", default="NHWC,NCHW", type=lambda s: _csv(s, cases.LAYOUTS, "layouts"),
                   help="NHWC, NCHW or both (default: both)")
    p.add_argument("--dtypes", default="float32", type=lambda s: _csv(s, cases.DTYPES, "dtypes"),
                   help=f"comma-separated subset of {','.join(cases.DTYPES)} (default: float32)")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: the whole table; "
                   "--quick: the asv default subset)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--threads", type=int, default=None, help="threads for every library (default: all cores "
                   "Numba may use)")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds per case (default 15, --quick 5)")
    p.add_argument("--quick", action="store_true", help="the asv default layers and 5 rounds")
    p.add_argument("--peers", default="torch,tf", type=lambda s: _csv(s, ("torch", "tf"), "peers"),
                   help="peers to look for (default: torch,tf); missing ones are reported and skipped")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="cpu; cuda (nbdw's CUDA backend against PyTorch CUDA); auto: cuda when available")
    p.add_argument("--max-busy", type=float, default=0.1, help="CPUs other processes may use while a case is "
                   "timed (from /proc/stat) before the case is timed again (default 0.1)")
    p.add_argument("--retries", type=int, default=3, help="times a disturbed case is timed again after waiting "
                   "for quiet (default 3); a case still disturbed is flagged")
    p.add_argument("--max-wait", type=float, default=900, help="seconds the whole run may spend waiting for "
                   "quiet (default 900); after that, disturbed cases are flagged, not retried")
    p.add_argument("--json", default=os.path.join(".asv", "peers.json"), help="where to write the results")
    p.add_argument("--markdown", metavar="JSON", default=None,
                   help="print the results saved in JSON as Markdown tables (for docs/performance.md) and exit")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = list(cases.DEFAULT_LAYERS) if args.quick else [layer.name for layer in cases.LAYERS]
    else:
        args.layers = _csv(args.layers, cases.LAYER_BY_NAME, "layers")
    if args.repeat is None:
        args.repeat = 5 if args.quick else 15
    if args.batch < 1 or args.repeat < 1:
        p.error("--batch and --repeat must be >= 1")
    return args


def resolve_device(device):
    if device == "cpu":
        return "cpu"
    reason = cases.backend_unavailable("cuda")
    if reason is None:
        try:
            import torch

            if not torch.cuda.is_available():
                reason = "PyTorch sees no CUDA device"
        except ImportError:
            reason = "the CUDA harness needs PyTorch with CUDA for its events and tensors"
    if reason is None:
        return "cuda"
    if device == "cuda":
        sys.exit(f"--device cuda: {reason}")
    print(f"device auto: running on the CPU ({reason})")
    return "cpu"


def set_threads(threads, device):
    import numba

    threads = threads or numba.config.NUMBA_NUM_THREADS
    if threads > numba.config.NUMBA_NUM_THREADS:
        sys.exit(f"--threads {threads} exceeds NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    numba.set_num_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    return threads


class Contention:
    """CPUs kept busy by other processes: from /proc/stat minus this process's own CPU time.

    On a shared machine this says how far to trust a timing. Every method returns None where
    /proc/stat is missing.
    """

    @staticmethod
    def _busy_seconds():
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def mark(self):
        return self._busy_seconds(), sum(os.times()[:4]), time.perf_counter()

    def others_since(self, mark):
        """Average number of CPUs other processes used since ``mark``."""
        busy0, own0, wall0 = mark
        busy = self._busy_seconds()
        if busy is None or busy0 is None:
            return None
        own = sum(os.times()[:4])
        return max(0.0, (busy - busy0) - (own - own0)) / max(time.perf_counter() - wall0, 1e-3)

    def start(self):
        mark = self.mark()
        time.sleep(1.0)
        self.before = self.others_since(mark)
        self._run_mark = self.mark()
        return self

    def stop(self):
        return self.others_since(self._run_mark)

    def wait_quiet(self, max_busy, timeout):
        """Wait (up to ``timeout`` s) for a second in which other processes stay under ``max_busy`` CPUs."""
        deadline = time.perf_counter() + timeout
        while True:
            mark = self.mark()
            time.sleep(1.0)
            busy = self.others_since(mark)
            if busy is None or busy <= max_busy or time.perf_counter() > deadline:
                return busy


def markdown(results):
    """Markdown tables of a saved run: one row per case, then the geometric means."""
    names = ["nbdw"] + [n for n in ("torch", "tf") if any(n in r["ms"] or n in r["unsupported"]
                                                         for r in results["results"])]
    lines = ["| op | layer | layout | " + " | ".join(f"{n} ms" for n in names) + " | "
             + " | ".join(f"nbdw/{n}" for n in names[1:]) + " |",
             "|" + " --- |" * (3 + 2 * len(names) - 1)]
    for r in results["results"]:
        wrong = {n for n, c in r["check"].items() if c.startswith("WRONG")}
        times = [f"{r['ms'][n]:.3f}" + (" (wrong)" if n in wrong else "") if n in r["ms"] else "n/a" for n in names]
        ratios = [f"{r['ratio'][n]:.2f}" if n in r["ratio"] else "n/a" for n in names[1:]]
        disturbed = (r.get("other_processes_cpus") or 0) > r.get("max_busy", 1e9)
        layer = r["layer"] + ("~" if not r.get("exact_padding", True) else "") + (" (!)" if disturbed else "")
        lines.append(f"| {r['op']} | {layer} | {r['layout']} | " + " | ".join(times + ratios) + " |")
    for key, what in (("geomean_ratio", "medians"), ("geomean_min_ratio", "minima")):
        if key not in results:
            continue
        lines += ["", f"Geometric mean of nbdw/peer ratios of {what} (a peer's n/a or wrong cases left out):", "",
                  "| op, dtype, layout | " + " | ".join(f"nbdw/{n}" for n in names[1:]) + " | cases |",
                  "|" + " --- |" * (len(names) + 1)]
        for label, g in results[key].items():
            cells = [(f"{g[n]:.2f}" if g.get(n) is not None else "n/a")
                     + (f" ({g['left_out'][n]} left out)" if g["left_out"].get(n) else "") for n in names[1:]]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {g['cases']} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.markdown:
        with open(args.markdown) as fh:
            print(markdown(json.load(fh)))
        return None
    contention = Contention().start()
    device = resolve_device(args.device)
    threads = set_threads(args.threads, device)
    nbdw_runner = NbdwRunner(device)
    peers, missing = find_peers(device, threads, args.peers)
    runners = [nbdw_runner] + peers
    print(f"device: {device}; threads: {threads}; batch: {args.batch}; rounds: {args.repeat}")
    for r in runners:
        print(f"found: {r.describe()}")
    for name, why in missing.items():
        print(f"not found: {name}: {why}")
    sample = _cpu_sample if device == "cpu" else _cuda_sample(nbdw_runner.torch)
    naive = _load_reference()
    print("results checked against " + ("tests/naive.py (float64)" if naive else "nbdw (tests/naive.py not found)"))

    records, waited = [], 0.0
    for op in args.ops:
        for dtype in args.dtypes:
            for layout in args.layouts:
                for layer_name in args.layers:
                    layer = cases.LAYER_BY_NAME[layer_name]
                    geom = cases.geometry(layer, args.batch, layout)
                    data = cases.make_operands(geom, dtype)
                    calls, converters, notes, exact = {}, {}, {}, True
                    for runner in runners:
                        try:
                            calls[runner.name], converters[runner.name] = runner.prepare(op, layer, geom, data)
                            exact = exact and getattr(calls[runner.name], "exact", True)
                        except Exception as exc:  # a peer that cannot run a case is reported, not fatal
                            if runner is nbdw_runner:
                                raise
                            notes[runner.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    if naive is not None:
                        reference = reference_result(naive, op, layer, geom, data)
                    else:
                        reference = converters["nbdw"](calls["nbdw"]())
                    checks = {}
                    for name in list(calls):
                        if naive is None and name == "nbdw":
                            continue
                        try:
                            result = converters[name](calls[name]())
                        except Exception as exc:
                            if name == "nbdw":
                                raise
                            notes[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                            del calls[name]
                            continue
                        checks[name] = _check(reference, result, dtype) if getattr(calls[name], "exact", True) \
                            else "not checked (symmetric padding stands in for asymmetric SAME)"
                    for attempt in range(args.retries + 1):
                        mark = contention.mark()
                        medians, minima, number = interleaved_medians(calls, args.repeat, sample)
                        busy = contention.others_since(mark)
                        if busy is None or busy <= args.max_busy or attempt == args.retries or waited >= args.max_wait:
                            break
                        print(f"    (other processes used {busy:.2f} CPUs while timing "
                              f"{op} {layer_name} {layout}: waiting for quiet, then again)", flush=True)
                        t0 = time.perf_counter()
                        contention.wait_quiet(args.max_busy, min(120, args.max_wait - waited))
                        waited += time.perf_counter() - t0
                    record = {
                        "op": op, "layer": layer_name, "layout": layout, "dtype": dtype, "batch": args.batch,
                        "device": device, "bytes": cases.bytes_moved(op, geom, dtype),
                        "ms": {name: medians[name] * 1e3 for name in medians},
                        "min_ms": {name: minima[name] * 1e3 for name in minima},
                        "calls_per_sample": number, "check": checks, "unsupported": notes,
                        "other_processes_cpus": busy, "attempts": attempt + 1, "max_busy": args.max_busy,
                        "exact_padding": exact,
                    }
                    record["ratio"] = {name: medians["nbdw"] / medians[name] for name in medians if name != "nbdw"}
                    record["min_ratio"] = {name: minima["nbdw"] / minima[name] for name in minima if name != "nbdw"}
                    records.append(record)
                    _print_row(record, [r.name for r in runners], first=len(records) == 1)
    summary = _summary(records, [r.name for r in peers])
    _print_summary(summary, "of medians")
    summary_min = _summary(records, [r.name for r in peers], "min_ratio")
    _print_summary(summary_min, "of minima (the least disturbed sample)")
    others = contention.stop()
    if others is not None:
        print(f"\nother processes kept {others:.2f} CPUs busy on average during the run, waits included "
              f"(before it: {contention.before:.2f}); cases timed while they used more than {args.max_busy} "
              f"CPUs: {sum(1 for r in records if (r['other_processes_cpus'] or 0) > args.max_busy)}")
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(), "device": device, "threads": threads, "batch": args.batch,
        "rounds": args.repeat, "found": [r.describe() for r in runners], "not_found": missing,
        "results": records, "geomean_ratio": summary, "geomean_min_ratio": summary_min,
        "other_processes_cpus": {"before": contention.before, "during": others},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {args.json}")
    return out


def _print_row(rec, names, first):
    if first:
        head = f"{'op':16}{'layer':22}{'layout':7}{'dtype':9}" + "".join(f"{n + ' ms':>11}" for n in names) \
            + "".join(f"{'nbdw/' + n:>12}" for n in names[1:])
        print("~ : PyTorch gets symmetric padding where TF's SAME is asymmetric (same work, shifted window,"
              " not value-checked)")
        print(head)
        print("-" * len(head))
    mark = "" if rec["exact_padding"] else "~"
    busy = rec.get("other_processes_cpus")
    flag = f"  [others used {busy:.2f} CPUs]" if busy is not None and busy > rec.get("max_busy", 1e9) else ""
    cells = "".join(f"{rec['ms'][n]:11.3f}" if n in rec["ms"] else f"{'n/a':>11}" for n in names)
    ratios = "".join(f"{rec['ratio'][n]:12.2f}" if n in rec["ratio"] else f"{'n/a':>12}" for n in names[1:])
    wrong = [f"{n} {c}" for n, c in rec["check"].items() if c != "ok" and not c.startswith("not checked")]
    print(f"{rec['op']:16}{rec['layer'] + mark:22}{rec['layout']:7}{rec['dtype']:9}{cells}{ratios}"
          + ("  " + "; ".join(wrong) if wrong else "") + flag, flush=True)
    for n, why in rec["unsupported"].items():
        print(f"    {n} n/a: {why}")


def _summary(records, peers, key="ratio"):
    """Geometric-mean nbdw/peer ratio per op (all layouts), and per op and layout.

    A peer's case counts only when its result was right (checked ok, inexact or unchecked):
    the time of a wrong result is no standard to compare with.
    """
    out = {}
    keys = sorted({(r["op"], r["dtype"]) for r in records}, key=lambda k: (cases.OPS.index(k[0]), k[1]))
    for op, dtype in keys:
        for layout in [None] + list(cases.LAYOUTS):
            sel = [r for r in records if r["op"] == op and r["dtype"] == dtype
                   and (layout is None or r["layout"] == layout)]
            if not sel:
                continue
            label = f"{op} {dtype} {layout or 'all layouts'}"
            out[label] = {p: geomean([r[key].get(p) for r in sel
                                      if not r["check"].get(p, "").startswith("WRONG")]) for p in peers}
            out[label]["cases"] = len(sel)
            out[label]["left_out"] = {p: sum(1 for r in sel if p not in r["ratio"]
                                             or r["check"].get(p, "").startswith("WRONG")) for p in peers}
    return out


def _print_summary(summary, what):
    if not summary:
        return
    peers = [k for k in next(iter(summary.values())) if k not in ("cases", "left_out")]
    print(f"\ngeometric mean of nbdw/peer time ratios {what} (below 1: nbdw faster); "
          "(-k): k cases left out, the peer being n/a or WRONG there")
    print(f"{'':36}" + "".join(f"{'nbdw/' + p:>14}" for p in peers) + f"{'cases':>7}")
    for label, ratios in summary.items():
        cells = ""
        for p in peers:
            left = f"(-{ratios['left_out'][p]})" if ratios["left_out"][p] else ""
            cells += f"{ratios[p]:9.2f}{left:>5}" if ratios[p] is not None else f"{'n/a':>14}"
        print(f"{label:36}{cells}{ratios['cases']:7d}")


if __name__ == "__main__":
    main()
