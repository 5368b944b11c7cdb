"""nbdw.dask: lazy Dask results bitwise equal to the in-memory op, for every option and chunking."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import nbdw  # noqa: E402
import nbdw.dask as nd  # noqa: E402
from nbdw import spec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [np.dtype(np.float16), spec.bfloat16, np.dtype(np.float32), np.dtype(np.float64)]


def bits(a):
    """The raw bit patterns of ``a``, so equality is bitwise (signed zeros and NaNs included)."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def compute_checking_chunks(y):
    """Compute ``y`` block by block, checking every block has the shape its chunks declare."""
    delayed = y.to_delayed()
    blocks = dask.compute(*delayed.ravel(), scheduler="sync")
    assert [b.shape for b in blocks] == list(itertools.product(*y.chunks))
    nested = np.empty(len(blocks), dtype=object)
    nested[:] = blocks
    return np.block(nested.reshape(delayed.shape).tolist())


def random_array(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------
# Chunk planning
# ---------------------------------------------------------------------------

def partitions(size):
    """Chunkings of ``size``: one chunk, all ones (smaller than any halo), or random cuts."""
    if size <= 1:
        return st.just((size,))
    cuts = st.sets(st.integers(1, size - 1)).map(sorted)
    random_cuts = cuts.map(lambda c: tuple(b - a for a, b in zip([0, *c], [*c, size])))
    return st.one_of(st.just((size,)), st.just((1,) * size), random_cuts)


@st.composite
def axis_plans(draw):
    stride = draw(st.integers(1, 4))
    eff = draw(st.integers(1, 9))
    pad_before, pad_after = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    size = draw(st.integers(max(0, eff - pad_before - pad_after), 40))
    out_size = (size + pad_before + pad_after - eff) // stride + 1
    chunks = draw(partitions(size))
    return chunks, size, pad_before, stride, eff, out_size


@given(axis_plans())
def test_plan_axis_computes_each_output_once_from_its_own_chunk_plus_halo(case):
    chunks, size, pad, stride, eff, out_size = case
    in_chunks, out_chunks, halo = nd.plan_axis(chunks, size, pad, stride, eff, out_size)
    assert sum(in_chunks) == size and sum(out_chunks) == out_size
    assert halo == max(eff - stride, 0)
    assert len(in_chunks) == len(out_chunks)
    assert all(c > 0 for c in out_chunks)
    if len(in_chunks) > 1:  # every chunk can lend the halo to its predecessor
        assert min(in_chunks) >= max(halo, 1)
    in_edges = np.cumsum((0, *in_chunks))
    out_edges = np.cumsum((0, *out_chunks))
    for k in range(len(in_chunks)):
        first, last = out_edges[k], out_edges[k + 1] - 1
        if k > 0:  # internal boundaries sit where an output window starts
            assert first * stride - pad == in_edges[k]
        if k < len(in_chunks) - 1:  # the last window ends within the halo
            assert last * stride - pad + eff <= in_edges[k + 1] + halo
            assert (last + 1) * stride - pad == in_edges[k + 1]


def test_plan_axis_keeps_aligned_chunks():
    assert nd.plan_axis((4, 4, 4), 12, 0, 2, 3, 6) == ((4, 4, 4), (2, 2, 2), 1)


# ---------------------------------------------------------------------------
# Bitwise equality with the in-memory op
# ---------------------------------------------------------------------------

@st.composite
def conv_cases(draw):
    data_format = draw(st.sampled_from(["NHWC", "NCHW"]))
    dtype = draw(st.sampled_from(DTYPES))
    n, c, m = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    pads = [[draw(st.integers(0, 4)), draw(st.integers(0, 4))] for _ in range(2)] if kind == "explicit" \
        else [[0, 0], [0, 0]]
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - sum(pads[0])), 18))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - sum(pads[1])), 18))
    if data_format == "NHWC":
        shape, strides, dilations = (n, h, w, c), [1, sh, sw, 1], [1, dh, dw, 1]
        padding = [[0, 0], *pads, [0, 0]] if kind == "explicit" else kind
    else:
        shape, strides, dilations = (n, c, h, w), [1, 1, sh, sw], [1, 1, dh, dw]
        padding = [[0, 0], [0, 0], *pads] if kind == "explicit" else kind
    chunks = tuple(draw(partitions(s)) for s in shape)  # the channel axis may be split too
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(shape=shape, filter_shape=(kh, kw, c, m), dtype=dtype, strides=strides, padding=padding,
                data_format=data_format, dilations=dilations, chunks=chunks, seed=seed)


@settings(max_examples=150)
@given(conv_cases())
def test_native_matches_in_memory_op_bitwise(case):
    rng = np.random.default_rng(case["seed"])
    x = random_array(rng, case["shape"], case["dtype"])
    f = random_array(rng, case["filter_shape"], case["dtype"])
    args = (case["strides"], case["padding"], case["data_format"], case["dilations"])
    want = nbdw.depthwise_conv2d_native(x, f, *args)

    y = nd.depthwise_conv2d_native(da.from_array(x, chunks=case["chunks"]), f, *args)
    assert isinstance(y, da.Array)
    assert y.shape == want.shape and y.dtype == want.dtype
    c_axis = 3 if case["data_format"] == "NHWC" else 1
    assert y.chunks[0] == case["chunks"][0] and len(y.chunks[c_axis]) == 1
    got = compute_checking_chunks(y)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_depthwise_conv2d_rate_form_matches_in_memory_op_on_threads(data_format):
    rng = np.random.default_rng(7)
    shape = (3, 29, 23, 5) if data_format == "NHWC" else (3, 5, 29, 23)
    x = random_array(rng, shape, np.float32)
    f = random_array(rng, (3, 5, 5, 2), np.float32)
    want = nbdw.depthwise_conv2d(x, f, [1, 2, 2, 1] if data_format == "NHWC" else [1, 1, 2, 2], "SAME",
                                 data_format, dilations=[2, 1])
    xd = da.from_array(x, chunks=(2, 7, 6, 5) if data_format == "NHWC" else (2, 5, 7, 6))
    y = nd.depthwise_conv2d(xd, f, [1, 2, 2, 1] if data_format == "NHWC" else [1, 1, 2, 2], "SAME",
                            data_format, dilations=[2, 1], name="my_conv")
    assert y.name.startswith("my_conv-")
    got = y.compute(scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(bits(got), bits(want))


def test_filter_may_be_a_dask_array_or_a_list():
    rng = np.random.default_rng(3)
    x = random_array(rng, (1, 12, 12, 2), np.float64)
    f = random_array(rng, (3, 3, 2, 1), np.float64)
    want = nbdw.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")
    xd = da.from_array(x, chunks=(1, 5, 5, 2))
    for filt in (da.from_array(f, chunks=(2, 1, 1, 1)), f.tolist()):
        got = nd.depthwise_conv2d(xd, filt, [1, 1, 1, 1], "SAME").compute()
        np.testing.assert_array_equal(bits(got), bits(want))


# ---------------------------------------------------------------------------
# The graph: one filter node, size set by the number of chunks
# ---------------------------------------------------------------------------

def _graph(y):
    (optimized,) = dask.optimize(y)
    return dict(optimized.__dask_graph__())


def test_filter_is_one_graph_node_shared_by_every_block():
    cloudpickle = pytest.importorskip("cloudpickle")
    from dask._task_spec import DataNode

    f = np.random.default_rng(0).standard_normal((7, 7, 64, 4))  # 100 KiB
    x = da.zeros((2, 64, 64, 64), chunks=(1, 16, 16, 64))  # no data embedded in the graph
    y = nd.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME")
    graph = _graph(y)
    holders = [k for k, v in graph.items()
               if isinstance(v, DataNode) and isinstance(v.value, np.ndarray) and v.value.shape == f.shape]
    assert len(holders) == 1
    filter_key = holders[0]
    blocks = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(blocks) == np.prod(y.numblocks) == 32
    assert all(filter_key in graph[k].dependencies for k in blocks)
    # Serialized one task at a time (as a scheduler may ship them), nothing but the filter's own
    # node carries the filter's bytes.
    sizes = {k: len(cloudpickle.dumps(v)) for k, v in graph.items()}
    assert sizes[filter_key] >= f.nbytes
    assert max(s for k, s in sizes.items() if k != filter_key) < f.nbytes // 10


def test_graph_grows_with_chunk_count_not_with_data():
    f = np.ones((3, 3, 8, 1))

    def size(shape, chunks):
        return len(_graph(nd.depthwise_conv2d(da.zeros(shape, chunks=chunks), f, [1, 1, 1, 1], "SAME")))

    small = size((2, 32, 32, 8), (1, 16, 16, 8))
    assert size((2, 256, 256, 8), (1, 128, 128, 8)) == small  # 64x the data, same chunk grid
    finer = size((2, 64, 64, 8), (1, 16, 16, 8))  # 4x the chunks
    assert 3 * small <= finer <= 5 * small


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

def test_rejects_non_dask_input():
    with pytest.raises(TypeError, match="input must be a dask.array.Array, got ndarray"):
        nd.depthwise_conv2d(np.ones((1, 4, 4, 1)), np.ones((1, 1, 1, 1)), [1, 1, 1, 1], "SAME")


def test_rejects_unknown_chunk_sizes():
    v = da.ones(8, chunks=4)
    x = v[v > 0][None, :, None, None]  # boolean indexing leaves chunk sizes unknown
    assert np.isnan(x.shape[1])
    with pytest.raises(ValueError, match="known chunk sizes"):
        nd.depthwise_conv2d(x, np.ones((1, 1, 1, 1)), [1, 1, 1, 1], "SAME")


def test_bad_arguments_raise_the_in_memory_ops_errors_before_computing():
    x = da.ones((1, 8, 8, 2), chunks=4, dtype=np.float32)
    f = np.ones((3, 3, 2, 1), np.float32)
    with pytest.raises(ValueError, match="padding must be"):
        nd.depthwise_conv2d(x, f, [1, 1, 1, 1], "FULL")
    with pytest.raises(ValueError, match="strides must be 1 in the batch and channel"):
        nd.depthwise_conv2d(x, f, [2, 1, 1, 1], "SAME")
    with pytest.raises(TypeError, match="filter dtype float64 must equal input dtype float32"):
        nd.depthwise_conv2d(x, f.astype(np.float64), [1, 1, 1, 1], "SAME")
    with pytest.raises(ValueError, match="filter in_channels"):
        nd.depthwise_conv2d(x, np.ones((3, 3, 3, 1), np.float32), [1, 1, 1, 1], "SAME")
    with pytest.raises(ValueError, match="backend must be"):
        nd.depthwise_conv2d(x, f, [1, 1, 1, 1], "SAME", backend="tpu")


# ---------------------------------------------------------------------------
# Processes: import isolation, Numba's workqueue layer, a LocalCluster
# ---------------------------------------------------------------------------

def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_import_nbdw_does_not_import_dask():
    proc = _run_python("import sys, nbdw; print(sorted(m for m in sys.modules if m.split('.')[0] == 'dask'"
                       " or m == 'nbdw.dask'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_threaded_scheduler_is_safe_with_numbas_workqueue_layer():
    # workqueue aborts the process on concurrent parallel launches; nbdw.dask serialises them.
    code = """
import numpy as np, numba, dask.array as da, nbdw.dask as nd
x = da.ones((4, 64, 64, 4), chunks=(1, 16, 16, 4), dtype=np.float32)
y = nd.depthwise_conv2d(x, np.ones((3, 3, 4, 1), np.float32), [1, 1, 1, 1], "SAME")
r = y.compute(scheduler="threads", num_workers=4)
print(numba.threading_layer(), float(r.sum()))
"""
    proc = _run_python(code, NUMBA_THREADING_LAYER="workqueue")
    assert proc.returncode == 0, proc.stderr
    layer, total = proc.stdout.split()
    assert layer == "workqueue"
    assert float(total) == 4 * 4 * (62 * 62 * 9 + 4 * 62 * 6 + 4 * 4)  # interior, edges, corners


def test_local_cluster_with_worker_processes():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(11)
    x = random_array(rng, (4, 40, 36, 3), np.float32)
    f = random_array(rng, (3, 3, 3, 2), np.float32)
    want = nbdw.depthwise_conv2d(x, f, [1, 2, 2, 1], "SAME")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        y = nd.depthwise_conv2d(da.from_array(x, chunks=(1, 12, 12, 3)), f, [1, 2, 2, 1], "SAME")
        got = client.compute(y).result()
        ran_on = client.run(lambda: os.getpid())
    assert len(set(ran_on.values()) - {os.getpid()}) == 2  # two worker processes, not this one
    np.testing.assert_array_equal(bits(got), bits(want))


def test_host_chunks_on_the_cuda_backend_in_the_simulator():
    pytest.importorskip("numba.cuda")
    # Blocks of host chunks run on the GPU backend (copied in and out per block); the simulator must
    # be switched on before Numba is imported, hence a process of its own.
    code = """
import numpy as np, dask.array as da, nbdw, nbdw.dask as nd
from nbdw import backends
cuda_backend = backends.load("cuda")
calls = []
launch = cuda_backend.forward
cuda_backend.forward = lambda *a, **k: calls.append(1) or launch(*a, **k)
rng = np.random.default_rng(4)
for fmt, shape, chunks, strides, dtype in [("NHWC", (2, 9, 8, 3), (1, 4, 3, 2), [1, 2, 1, 1], np.float32),
                                           ("NCHW", (1, 3, 7, 9), (1, 3, 2, 4), [1, 1, 1, 2], np.float16)]:
    x = rng.standard_normal(shape).astype(dtype)
    f = rng.standard_normal((3, 2, 3, 2)).astype(dtype)
    want = nbdw.depthwise_conv2d_native(x, f, strides, "SAME", fmt, backend="cuda")
    y = nd.depthwise_conv2d_native(da.from_array(x, chunks=chunks), f, strides, "SAME", fmt, backend="cuda")
    calls.clear()
    got = y.compute(scheduler="sync")
    assert len(calls) == y.npartitions > 1, (len(calls), y.npartitions)  # every block ran on the backend
    assert type(got) is np.ndarray and got.dtype == want.dtype
    assert np.array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}")), fmt
print("ok")
"""
    proc = _run_python(code, NUMBA_ENABLE_CUDASIM="1")
    if "BackendUnavailableError" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ---------------------------------------------------------------------------
# CuPy-backed chunks (real GPU only)
# ---------------------------------------------------------------------------

@pytest.mark.gpu
def test_cupy_chunks_run_on_the_gpu_and_match_the_in_memory_op():
    cupy = pytest.importorskip("cupy")
    try:
        nbdw.backends.load("cuda")
    except (nbdw.BackendUnavailableError, ImportError, KeyError) as exc:
        pytest.skip(f"no usable CUDA backend: {exc}")
    rng = np.random.default_rng(5)
    x = cupy.asarray(random_array(rng, (2, 30, 26, 4), np.float32))
    f = random_array(rng, (3, 3, 4, 2), np.float32)
    want = nbdw.depthwise_conv2d(x, cupy.asarray(f), [1, 2, 1, 1], "SAME")
    y = nd.depthwise_conv2d(da.from_array(x, chunks=(1, 8, 9, 4)), f, [1, 2, 1, 1], "SAME")
    assert isinstance(y._meta, cupy.ndarray)
    got = y.compute()
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_array_equal(bits(cupy.asnumpy(got)), bits(cupy.asnumpy(cupy.asarray(want))))
