"""Reproduce the numbers in docs/dask.md: nbdw.dask out of core, and its throughput.

    python examples/dask_out_of_core.py outofcore [--side 16384] [--chunk 2048] [--channels 4]
    python examples/dask_out_of_core.py throughput [--side 4096] [--chunk 1024] [--rounds 3]

``outofcore`` convolves an input generated chunk by chunk (``dask.array.random``, never held
whole) and streams the result into a ``.npy`` file with positioned writes (no memory map, so
written pages do not count towards this process's RSS). A sampler thread records the resident
set size every 20 ms; the report gives the peak next to the input size and the chunk size.
A band of output rows that crosses a chunk boundary is then checked bit for bit against the
in-memory op run on the same input rows.

``throughput`` times, on one in-memory array, the in-memory op against the Dask path with the
threaded scheduler and with a LocalCluster of worker processes; configurations are interleaved
round by round and the median is reported. Each configuration runs in a fresh process so that
``NUMBA_NUM_THREADS`` (Numba's pool size, fixed at import) can differ between them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 2.0**30
MIB = 2.0**20


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import dask
    import numba
    import psutil

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "dask": dask.__version__, "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()]}


class RssSampler(threading.Thread):
    """Peak resident set size of this process, sampled every ``interval`` seconds."""

    def __init__(self, interval=0.02):
        super().__init__(daemon=True)
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._done = threading.Event()
        self.peak = self._process.memory_info().rss

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def stop(self):
        self._done.set()
        self.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        return self.peak


class NpyWriter:
    """A ``da.store`` target that writes each block into a C-order ``.npy`` file with ``os.pwrite``.

    Blocks span whole rows of the last axes (the result is chunked along batch and height only),
    so each (batch, row range) of a block is one contiguous run of bytes in the file.
    """

    def __init__(self, path, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})
            self.offset = fh.tell()
            fh.truncate(self.offset + int(np.prod(self.shape)) * self.dtype.itemsize)
        self.fd = os.open(path, os.O_WRONLY)

    def __setitem__(self, index, block):
        (bn, bh, bw, bc) = index
        assert bw == slice(0, self.shape[2], None) or (bw.start in (0, None) and bw.stop == self.shape[2])
        row_bytes = self.shape[2] * self.shape[3] * self.dtype.itemsize
        block = np.ascontiguousarray(block, self.dtype)
        for i, n in enumerate(range(bn.start, bn.stop)):
            position = self.offset + (n * self.shape[1] + bh.start) * row_bytes
            os.pwrite(self.fd, memoryview(block[i]).cast("B"), position)  # no copy

    def close(self):
        os.close(self.fd)


def outofcore(args):
    import dask
    import dask.array as da

    import nbdw
    import nbdw.dask

    side, chunk, channels = args.side, args.chunk, args.channels
    shape = (1, side, side, channels)
    x = da.random.default_rng(42).standard_normal(shape, chunks=(1, chunk, side, channels), dtype=np.float32)
    f = np.random.default_rng(0).standard_normal((3, 3, channels, 1)).astype(np.float32)
    y = nbdw.dask.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")
    # Warm the kernel (compile or load from cache) outside the measurement.
    nbdw.depthwise_conv2d(np.zeros((1, 8, 8, channels), np.float32), f, [1, 1, 1, 1], "SAME")

    path = os.path.join(args.workdir or tempfile.gettempdir(), "nbdw_dask_out_of_core.npy")
    writer = NpyWriter(path, y.shape, y.dtype) if args.sink == "npy" else None
    sampler = RssSampler()
    baseline = sampler.peak
    sampler.start()
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        if writer is not None:
            da.store(y, writer, lock=False)
        else:
            total = float(y.sum(dtype=np.float64).compute())
    elapsed = time.perf_counter() - start
    peak = sampler.stop()

    # Spot check: output rows [r0, r1) straddling the first chunk boundary, against the
    # in-memory op on input rows [r0 - 1, r1 + 1) (SAME 3x3, stride 1: one row of halo each side).
    r0, r1 = chunk - 8, chunk + 8
    band = x[:, r0 - 1:r1 + 1].compute()
    want = nbdw.depthwise_conv2d(band, f, [1, 1, 1, 1], [[0, 0], [0, 0], [1, 1], [0, 0]])
    if writer is not None:
        writer.close()
        got = np.load(path, mmap_mode="r")[:, r0:r1]
        os.remove(path)
    else:  # the same rows, recomputed through the Dask path
        got = y[:, r0:r1].compute()
    exact = bool(np.array_equal(want.view(np.uint32), np.ascontiguousarray(got).view(np.uint32)))

    report = {
        "machine": machine(),
        "input": {"shape": _dims(shape), "dtype": "float32", "gib": round(x.nbytes / GIB, 2)},
        "chunk": {"shape": _dims(x.chunksize), "mib": round(np.prod(x.chunksize) * 4 / MIB, 1), "count": x.npartitions},
        "filter": "3x3, multiplier 1, SAME, stride 1",
        "scheduler": f"threads, num_workers={args.workers}",
        "sink": "npy file (os.pwrite)" if writer is not None else f"sum = {total!r}",
        "numba_threads": _numba_threads(),
        "seconds": round(elapsed, 2),
        "rss_before_mib": round(baseline / MIB),
        "rss_peak_mib": round(peak / MIB),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_over_input": round(peak / x.nbytes, 3),
        "band_check_bitwise": exact,
    }
    print(json.dumps(report, indent=2))


def _dims(shape):
    return "x".join(str(int(s)) for s in shape)


def _numba_threads():
    import numba

    return numba.get_num_threads()


# ---------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------

def _throughput_worker(args):
    """One timed run of one configuration, in this (fresh) process; prints seconds as JSON."""
    import dask
    import dask.array as da

    import nbdw
    import nbdw.dask

    shape = (args.batch, args.side, args.side, args.channels)
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    f = np.random.default_rng(2).standard_normal((3, 3, args.channels, 1)).astype(np.float32)
    conv = dict(strides=[1, 1, 1, 1], padding="SAME")
    nbdw.depthwise_conv2d(x[:1, :64], f, **conv)  # compile / load from cache
    chunks = (1, args.chunk, args.chunk, args.channels)
    config = args.config
    out = np.zeros(x.shape, x.dtype)  # preallocated and touched: no page faults in the timed part
    if config == "in-memory":  # a fresh result array, as a plain call returns
        start = time.perf_counter()
        nbdw.depthwise_conv2d(x, f, **conv)
        seconds = time.perf_counter() - start
    elif config == "in-memory-out":
        start = time.perf_counter()
        nbdw.depthwise_conv2d(x, f, **conv, out=out)
        seconds = time.perf_counter() - start
    elif config in ("threads-compute", "threads-store"):
        y = nbdw.dask.depthwise_conv2d(da.from_array(x, chunks=chunks), f, **conv)
        start = time.perf_counter()
        if config == "threads-compute":  # blocks concatenated into a fresh array
            y.compute(scheduler="threads", num_workers=args.workers)
        else:  # blocks written into the preallocated array
            da.store(y, out, lock=False, scheduler="threads", num_workers=args.workers)
        seconds = time.perf_counter() - start
    elif config == "cluster":
        import distributed

        with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            # The same kind of input, generated on the workers (shipping x through the graph would
            # time the transfer, not the convolution), kept there.
            xd = client.persist(da.random.default_rng(1).standard_normal(shape, chunks=chunks, dtype=np.float32))
            distributed.wait(xd)
            client.run(lambda: nbdw.depthwise_conv2d(np.zeros((1, 8, 8, args.channels), np.float32), f, **conv))
            y = nbdw.dask.depthwise_conv2d(xd, f, **conv)
            start = time.perf_counter()
            distributed.wait(y.persist())  # result stays on the workers
            seconds = time.perf_counter() - start
            threads = sorted(set(client.run(_numba_threads).values()))
        print(json.dumps({"seconds": seconds, "worker_numba_threads": threads}))
        return
    else:
        raise ValueError(config)
    print(json.dumps({"seconds": seconds, "numba_threads": _numba_threads()}))


CONFIGS = [
    # (label, config, NUMBA_NUM_THREADS, dask workers)
    ("in-memory op, new result, 2 Numba threads", "in-memory", 2, 0),
    ("in-memory op, out=preallocated, 2 Numba threads", "in-memory-out", 2, 0),
    ("in-memory op, out=preallocated, 1 Numba thread", "in-memory-out", 1, 0),
    ("dask threads x2 .compute(), 2 Numba threads each", "threads-compute", 2, 2),
    ("dask threads x2 da.store(preallocated), 2 Numba threads each", "threads-store", 2, 2),
    ("dask threads x2 da.store(preallocated), 1 Numba thread each", "threads-store", 1, 2),
    ("LocalCluster 2 procs x 1 thread .persist(), 1 Numba thread", "cluster", 1, 2),
]


def throughput(args):
    load_before = [round(v, 2) for v in os.getloadavg()]
    times = {label: [] for label, *_ in CONFIGS}
    extra = {}
    for _ in range(args.rounds):
        for label, config, numba_threads, workers in CONFIGS:
            env = {**os.environ, "NUMBA_NUM_THREADS": str(numba_threads), "PYTHONPATH": ROOT}
            cmd = [sys.executable, __file__, "_worker", "--config", config, "--workers", str(workers),
                   "--side", str(args.side), "--chunk", str(args.chunk), "--batch", str(args.batch),
                   "--channels", str(args.channels)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            times[label].append(result.pop("seconds"))
            extra[label] = result
    shape = (args.batch, args.side, args.side, args.channels)
    macs = int(np.prod(shape)) * 9
    rows = []
    for label, *_ in CONFIGS:
        median = float(np.median(times[label]))
        rows.append({"config": label, "median_s": round(median, 3), "gmac_per_s": round(macs / median / 1e9, 3),
                     "gb_in_per_s": round(np.prod(shape) * 4 / median / 1e9, 3),
                     "runs_s": [round(t, 3) for t in times[label]], **extra[label]})
    print(json.dumps({"machine": {**machine(), "load_average_before": load_before},
                      "input": {"shape": _dims(shape), "dtype": "float32", "gib": round(np.prod(shape) * 4 / GIB, 2)},
                      "chunks": _dims((1, args.chunk, args.chunk, args.channels)),
                      "filter": "3x3, multiplier 1, SAME, stride 1", "rounds": args.rounds, "results": rows},
                     indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["outofcore", "throughput", "_worker"])
    parser.add_argument("--side", type=int, default=None, help="height = width of the input")
    parser.add_argument("--chunk", type=int, default=None, help="chunk height (and width for throughput)")
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="Dask threads / worker processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default=None)
    parser.add_argument("--sink", choices=["npy", "sum"], default="npy",
                        help="outofcore: stream the result into a .npy file, or reduce it to its sum")
    parser.add_argument("--workdir", default=None, help="where outofcore writes its temporary .npy")
    args = parser.parse_args()
    if args.mode == "outofcore":
        args.side, args.chunk, args.channels = args.side or 16384, args.chunk or 256, args.channels or 4
        outofcore(args)
    else:
        args.side, args.chunk, args.channels = args.side or 4096, args.chunk or 1024, args.channels or 8
        (throughput if args.mode == "throughput" else _throughput_worker)(args)


if __name__ == "__main__":
    main()
