"""asv benchmarks of the three depthwise ops: time, peak memory and achieved bandwidth.

Parameters come from :mod:`benchmarks.cases` (set ``NBDW_BENCH_FULL=1`` for the whole table).
``setup`` builds the operands and makes one warm-up call, so JIT compilation (or loading the
on-disk cache) stays out of the measurements. An unavailable backend (``cuda`` without a GPU or
without numba-cuda) is skipped by raising ``NotImplementedError`` in ``setup``.
"""

import time
import tracemalloc

from . import cases

# Import Numba and the CPU kernels' module once here, in asv's fork server, rather than in every
# forked benchmark process (about 0.3 s each on a 2-core machine).
cases.backend_unavailable("cpu")

_LAYERS, _BATCHES, _DTYPES = cases.asv_grid()


class _OpBenchmark:
    """Shared body; subclasses set ``op``."""

    op = None
    params = (list(_LAYERS), list(_BATCHES), list(cases.LAYOUTS), list(_DTYPES), list(cases.BACKENDS))
    param_names = ("layer", "batch", "layout", "dtype", "backend")
    timeout = 300  # a cold JIT compile in setup on a busy 2-core machine
    # asv's default of 2 rounds (two processes per parameter set) only for the full run.
    rounds = 2 if cases.full_run() else 1

    def setup(self, layer, batch, layout, dtype, backend):
        reason = cases.backend_unavailable(backend)
        if reason:
            raise NotImplementedError(reason)
        spec_layer = cases.LAYER_BY_NAME[layer]
        geom = cases.geometry(spec_layer, batch, layout)
        data = cases.make_operands(geom, dtype)
        if backend == "cuda":
            from numba import cuda

            data = {name: cuda.to_device(array) for name, array in data.items()}
        self.bytes = cases.bytes_moved(self.op, geom, dtype)
        self.call = cases.nbdw_call(self.op, spec_layer, geom, data, backend)
        self.call()  # warm-up: compile or load from the cache, outside the timings

    def time_op(self, *params):
        self.call()

    def peakmem_op(self, *params):
        self.call()

    def track_gbps(self, *params):
        """Achieved bandwidth: :func:`cases.bytes_moved` over the median time of a few calls."""
        samples = []
        start = time.perf_counter()
        while len(samples) < 5 or (len(samples) < 50 and time.perf_counter() - start < 0.3):
            t0 = time.perf_counter()
            self.call()
            samples.append(time.perf_counter() - t0)
        samples.sort()
        return self.bytes / samples[len(samples) // 2] / 1e9

    track_gbps.unit = "GB/s"


class Forward(_OpBenchmark):
    op = "forward"


class BackpropInput(_OpBenchmark):
    op = "backprop_input"


class BackpropFilter(_OpBenchmark):
    op = "backprop_filter"


class HostTemporaries:
    """Bytes the CPU backend allocates through NumPy beyond its result, at peak.

    A guard against im2col-sized (or any operand-sized) temporaries: expect about 0 for float32
    and float64 in a C-contiguous layout; a backend-side copy of an operand shows up here at once.
    Counts NumPy allocations only (tracemalloc), not the small per-thread buffers Numba's runtime
    allocates inside kernels.
    """

    # One mid-sized layer by default (the guard is about code paths, not shapes); all in full.
    params = (list(cases.OPS), list(_LAYERS) if cases.full_run() else ["mbv2-56x56x144"],
              list(cases.LAYOUTS), list(_DTYPES))
    param_names = ("op", "layer", "layout", "dtype")
    timeout = 300

    def setup(self, op, layer, layout, dtype):
        spec_layer = cases.LAYER_BY_NAME[layer]
        geom = cases.geometry(spec_layer, _BATCHES[-1], layout)
        self.call = cases.nbdw_call(op, spec_layer, geom, cases.make_operands(geom, dtype))
        self.call()

    def track_extra_bytes(self, *params):
        tracemalloc.start()
        try:
            result = self.call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak - result.nbytes

    track_extra_bytes.unit = "bytes"
