"""Cold-start benchmarks: ``import nbdw`` and the first call in a fresh process.

Each sample is a new Python process (asv's ``timeraw_*``). The first call is timed with the
on-disk Numba cache warm (the user's default cache location, warmed by ``setup``) and without
it (``NUMBA_CACHE_DIR`` pointed at a new empty directory, so the kernel compiles from scratch).
Only the first call is timed; building the operands and ``import nbdw`` happen in the untimed
part of the child process.
"""

import subprocess
import sys
import textwrap

from . import cases

# A mid-sized layer at batch 1, so that the kernel's own run time is small next to loading it.
_LAYER, _LAYOUT, _DTYPE = "mbv2-56x56x144", "NHWC", "float32"


def _first_call_source(op, cache):
    """``(stmt, setup)`` for a child process: setup builds the operands, stmt is the first call."""
    layer = cases.LAYER_BY_NAME[_LAYER]
    geom = cases.geometry(layer, 1, _LAYOUT)
    fresh_cache = textwrap.dedent("""
        import atexit, os, shutil, tempfile
        _cache_dir = tempfile.mkdtemp(prefix="nbdw-numba-cache-")
        atexit.register(shutil.rmtree, _cache_dir, True)
        os.environ["NUMBA_CACHE_DIR"] = _cache_dir
    """) if cache == "no cache" else ""
    setup = fresh_cache + textwrap.dedent(f"""
        import numpy as np
        import nbdw
        _x = np.random.default_rng(0).uniform(-1, 1, {geom.input_shape}).astype(np.{_DTYPE})
        _f = np.random.default_rng(1).uniform(-1, 1, {geom.filter_shape}).astype(np.{_DTYPE})
        _dy = np.random.default_rng(2).uniform(-1, 1, {geom.output_shape}).astype(np.{_DTYPE})
        _args = ([1, {layer.stride}, {layer.stride}, 1], "{cases.PADDING}", "{_LAYOUT}")
    """)
    stmt = {
        "forward": "nbdw.depthwise_conv2d_native(_x, _f, *_args)",
        "backprop_input": f"nbdw.depthwise_conv2d_native_backprop_input({list(geom.input_shape)}, _f, _dy, *_args)",
        "backprop_filter": f"nbdw.depthwise_conv2d_native_backprop_filter(_x, {list(geom.filter_shape)}, _dy, *_args)",
    }[op]
    return stmt, setup


class ColdStart:
    """First call of each op in a fresh process, with and without the on-disk cache."""

    params = (list(cases.OPS), ["cache", "no cache"])
    param_names = ("op", "cache")
    # Each sample is a new process and, without the cache, a full compile: a few samples suffice.
    number = 1
    repeat = 3
    rounds = 1
    warmup_time = 0
    timeout = 600

    def setup(self, op, cache):
        if cache == "cache":  # populate the default on-disk cache once, in a process of its own
            stmt, setup = _first_call_source(op, cache)
            subprocess.run([sys.executable, "-c", setup + "\n" + stmt], check=True)

    def timeraw_first_call(self, op, cache):
        return _first_call_source(op, cache)


class Import:
    """``import nbdw`` in a fresh interpreter (numpy and ml_dtypes included: the user pays them)."""

    number = 1
    repeat = 10
    rounds = 1
    warmup_time = 0

    def timeraw_import_nbdw(self):
        return "import nbdw"
