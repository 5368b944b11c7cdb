"""The shape table and the helpers shared by the asv suite and the peer harness.

One place for: which layers are benchmarked (:data:`LAYERS`), which of them the default
(2-core, few-minute) asv run covers (:data:`DEFAULT_LAYERS`), how a layer becomes a
:class:`nbdw.spec.Geometry`, the operands every library gets (:func:`make_operands`), how nbdw is
called (:func:`nbdw_call`) and how many bytes an op must move (:func:`bytes_moved`).

Set ``NBDW_BENCH_FULL=1`` to widen the asv parameter grid to the whole table, both batch sizes
and every dtype.

Nothing here may be named ``time_*``, ``track_*``, ``peakmem_*``, ``mem_*`` or ``timeraw_*``:
asv imports every module of this package and would take such names for benchmarks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from nbdw import spec

OPS = ("forward", "backprop_input", "backprop_filter")
LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("float32", "float16", "bfloat16", "float64")
BACKENDS = ("cpu", "cuda")
BATCHES = (1, 8)
#: All layers use TensorFlow's SAME padding, as the networks they come from do.
PADDING = "SAME"


@dataclass(frozen=True)
class Layer:
    """One depthwise layer of a real network, logical sizes (layout independent)."""

    name: str
    network: str
    height: int
    width: int
    channels: int
    kernel: int
    stride: int = 1
    multiplier: int = 1
    dilation: int = 1


#: The shape table: the layers of issue 6, named so that a name says the shape.
LAYERS = (
    Layer("mbv2-112x112x32", "MobileNetV2 block 1", 112, 112, 32, 3),
    Layer("mbv2-112x112x96-s2", "MobileNetV2 block 2", 112, 112, 96, 3, stride=2),
    Layer("mbv2-56x56x144", "MobileNetV2 block 3", 56, 56, 144, 3),
    Layer("mbv2-14x14x576", "MobileNetV2 block 13", 14, 14, 576, 3),
    Layer("effnet-28x28x240-k5", "EfficientNet-B0 stage 4", 28, 28, 240, 5),
    Layer("convnext-56x56x96-k7", "ConvNeXt-T stage 1", 56, 56, 96, 7),
    Layer("mult2-56x56x64", "channel multiplier 2", 56, 56, 64, 3, multiplier=2),
    Layer("deeplab-33x33x960-d2", "DeepLabV3 MobileNetV2 atrous, rate 2", 33, 33, 960, 3, dilation=2),
)
LAYER_BY_NAME = {layer.name: layer for layer in LAYERS}

#: The default asv run: 3x3 stride 1 and stride 2, a 7x7 filter and the multiplier-2 loops, at
#: batch 1 in float32. A few minutes on a 2-core machine (each parameter set is a new process).
DEFAULT_LAYERS = ("mbv2-112x112x32", "mbv2-112x112x96-s2", "convnext-56x56x96-k7", "mult2-56x56x64")


def full_run() -> bool:
    """True when ``NBDW_BENCH_FULL`` asks for the whole table."""
    return os.environ.get("NBDW_BENCH_FULL", "").strip().lower() not in ("", "0", "false", "no")


def asv_grid():
    """``(layers, batches, dtypes)`` for the asv parameter grid: default or full."""
    if full_run():
        return tuple(layer.name for layer in LAYERS), BATCHES, DTYPES
    return DEFAULT_LAYERS, (1,), ("float32",)


def np_dtype(name) -> np.dtype:
    """A dtype name as a NumPy dtype (``"bfloat16"`` is ``ml_dtypes.bfloat16``)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def layout_pair(layout, h, w):
    """A length-4 strides/dilations list in ``layout`` order, 1 for batch and channels."""
    return [1, h, w, 1] if layout == "NHWC" else [1, 1, h, w]


def strides(layer, layout):
    return layout_pair(layout, layer.stride, layer.stride)


def dilations(layer, layout):
    return layout_pair(layout, layer.dilation, layer.dilation)


def geometry(layer, batch, layout) -> spec.Geometry:
    """The layer's forward geometry, computed by nbdw's spec (the one place for these rules)."""
    shape = (batch, layer.height, layer.width, layer.channels)
    if layout == "NCHW":
        shape = (batch, layer.channels, layer.height, layer.width)
    return spec.forward_geometry(shape, (layer.kernel, layer.kernel, layer.channels, layer.multiplier),
                                 strides(layer, layout), PADDING, layout, dilations(layer, layout))


def make_operands(geom, dtype, seed=0):
    """Input ``x``, filter ``f`` and output gradient ``dy`` of ``geom``, C-contiguous in its layout.

    Uniform in [-1, 1), drawn in float32 and rounded to ``dtype``, so every library gets the same
    values.
    """
    rng = np.random.default_rng(seed)
    dtype = np_dtype(dtype)

    def draw(shape):
        return np.ascontiguousarray(rng.uniform(-1.0, 1.0, size=shape).astype(np.float32).astype(dtype))

    return {"x": draw(geom.input_shape), "f": draw(geom.filter_shape), "dy": draw(geom.output_shape)}


def bytes_moved(op, geom, dtype) -> int:
    """The bytes ``op`` must move at the least: read each operand once, write the result once.

    This is the floor a memory-bound kernel is measured against (achieved GB/s = this / time).
    forward reads x and the filter and writes y; backprop input reads dy and the filter and
    writes dx; backprop filter reads x and dy and writes the filter gradient.
    """
    n_x, n_y, n_f = (math.prod(s) for s in (geom.input_shape, geom.output_shape, geom.filter_shape))
    elements = {
        "forward": n_x + n_f + n_y,
        "backprop_input": n_y + n_f + n_x,
        "backprop_filter": n_x + n_y + n_f,
    }[op]
    return elements * np_dtype(dtype).itemsize


def backend_unavailable(backend):
    """Why ``backend`` cannot be benchmarked here, or None when it can."""
    from nbdw import backends

    if backend == "cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "the CUDA simulator is on; its timings mean nothing"
    try:
        backends.load(backend)
    except (backends.BackendUnavailableError, ImportError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def nbdw_call(op, layer, geom, data, backend="cpu", synchronize=True):
    """A no-argument callable that runs nbdw's ``op`` on ``data`` through the public API.

    For ``backend="cuda"`` the arrays in ``data`` must already be on the device; with
    ``synchronize`` the callable waits for the GPU, so that a wall-clock timer sees the kernel's
    time (the peer harness times with CUDA events instead and passes False).
    """
    import nbdw

    fmt = geom.data_format
    st, dil = strides(layer, fmt), dilations(layer, fmt)
    x, f, dy = data["x"], data["f"], data["dy"]
    if op == "forward":
        def run():
            return nbdw.depthwise_conv2d_native(x, f, st, PADDING, fmt, dil, backend=backend)
    elif op == "backprop_input":
        sizes = list(geom.input_shape)

        def run():
            return nbdw.depthwise_conv2d_native_backprop_input(sizes, f, dy, st, PADDING, fmt, dil, backend=backend)
    elif op == "backprop_filter":
        sizes = list(geom.filter_shape)

        def run():
            return nbdw.depthwise_conv2d_native_backprop_filter(x, sizes, dy, st, PADDING, fmt, dil, backend=backend)
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend != "cuda" or not synchronize:
        return run
    from numba import cuda

    def run_synchronized():
        result = run()
        cuda.synchronize()
        return result

    return run_synchronized
