"""Depthwise convolution of Dask arrays, chunk by chunk, on Dask's own scheduler.

``nbdw.dask.depthwise_conv2d`` and ``nbdw.dask.depthwise_conv2d_native`` take a
``dask.array.Array`` (NumPy- or CuPy-backed chunks) and return a lazy
``dask.array.Array`` equal, element for element and bit for bit, to what
:func:`nbdw.depthwise_conv2d` returns on the computed input.

How the graph is built (see ``docs/dask.md`` for the full story):

* The batch axis maps block by block. The channel axis is merged into one chunk
  (rechunked, not refused): a depthwise filter mixes nothing across channels, but
  the in-memory op, whose result we must reproduce, wants all of them.
* Height and width are planned by :func:`plan_axis` from the spec module's
  :class:`~nbdw.spec.Geometry`: every internal chunk boundary is moved to an input
  row where an output window starts (padded index a multiple of the stride), so
  output chunk ``k`` holds exactly the outputs whose windows start in input chunk
  ``k``. Each output pixel is then computed once, the halo is one-sided
  (``effective filter extent - stride`` rows taken from the next chunk), and chunks
  smaller than the halo are merged with their neighbour.
* ``dask.array.overlap.overlap`` (the first half of ``map_overlap``) adds the halo
  with ``boundary="none"``; ``map_blocks`` then runs the in-memory op on each block
  with *explicit* per-block padding: the op's own pads at the array's borders and
  none at internal chunk edges. Tap ranges clipped by the input therefore match the
  whole-array call exactly, which is what makes the result bitwise equal.
* The filter enters the graph once, as one key that every block task depends on.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import dask
import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize

from . import backends, ops, spec

__all__ = ["depthwise_conv2d", "depthwise_conv2d_native", "plan_axis"]


def depthwise_conv2d(input, filter, strides, padding, data_format=None, dilations=None, name=None, *,
                     backend="auto"):
    """Depthwise 2-D convolution of a Dask array, as ``tf.nn.depthwise_conv2d``.

    Parameters
    ----------
    input : dask.array.Array
        4-D, NHWC or NCHW, with known chunk sizes; NumPy- or CuPy-backed chunks of float16,
        bfloat16, float32 or float64. Any chunking: the channel axis is merged into one chunk
        and height/width chunk boundaries are moved onto the stride grid (see Notes).
    filter : array_like or dask.array.Array
        ``[filter_height, filter_width, in_channels, channel_multiplier]``, same dtype as
        ``input``. It is put into the graph once and shared by every block task.
    strides, padding, data_format, dilations, name
        As in :func:`nbdw.depthwise_conv2d`. ``name`` prefixes the result's Dask keys.
    backend : {"auto", "cpu", "cuda"}, keyword-only
        Passed to the in-memory op for every block; ``"auto"`` runs CuPy-backed chunks on the GPU.

    Returns
    -------
    dask.array.Array
        Lazy result of shape ``[batch, out_height, out_width, channels * multiplier]`` (or its NCHW
        twin) and the input's dtype. Its batch chunks are the input's; its height/width chunks
        follow the (stride-aligned) input chunks; channels are one chunk.

    Raises
    ------
    TypeError
        If ``input`` is not a Dask array, or for bad dtypes.
    ValueError
        For bad shapes, strides, dilations, padding or data_format (the same checks and messages
        as the in-memory op), or when the input's chunk sizes are unknown.

    Notes
    -----
    Computing the result gives, bit for bit, ``nbdw.depthwise_conv2d(input.compute(), filter, ...)``.
    Every block runs that op on its slice of the input plus a one-sided halo of
    ``max(effective filter size - stride, 0)`` rows/columns, with the op's padding at the array's
    borders and none inside.

    Examples
    --------
    >>> import numpy as np, dask.array as da, nbdw.dask
    >>> x = da.ones((1, 6, 6, 1), dtype=np.float32, chunks=(1, 2, 3, 1))
    >>> k = np.ones((3, 3, 1, 1), dtype=np.float32)
    >>> y = nbdw.dask.depthwise_conv2d(x, k, [1, 1, 1, 1], "SAME")
    >>> y.compute()[0, :, :, 0]
    array([[4., 6., 6., 6., 6., 4.],
           [6., 9., 9., 9., 9., 6.],
           [6., 9., 9., 9., 9., 6.],
           [6., 9., 9., 9., 9., 6.],
           [6., 9., 9., 9., 9., 6.],
           [4., 6., 6., 6., 6., 4.]], dtype=float32)
    """
    data_format = spec.check_data_format(data_format)
    return depthwise_conv2d_native(input, filter, strides, padding, data_format,
                                   spec.dilations_from_rate(dilations, data_format), name, backend=backend)


def depthwise_conv2d_native(input, filter, strides, padding, data_format="NHWC", dilations=(1, 1, 1, 1),
                            name=None, *, backend="auto"):
    """Depthwise 2-D convolution of a Dask array, as ``tf.nn.depthwise_conv2d_native``.

    The same op as :func:`depthwise_conv2d`, with ``dilations`` of length 4 in ``data_format``
    order and ``data_format`` defaulting to ``"NHWC"``. See :func:`depthwise_conv2d` for the
    parameters, the result, the errors and how the work is split.
    """
    if not isinstance(input, da.Array):
        raise TypeError(f"input must be a dask.array.Array, got {type(input).__name__}; "
                        "use nbdw.depthwise_conv2d_native for in-memory arrays")
    if any(np.isnan(c) for chunks in input.chunks for c in chunks):
        raise ValueError(f"input must have known chunk sizes, got chunks {input.chunks}; "
                         "call input.compute_chunk_sizes() first")
    backends.select(backend)  # reject a bad backend name now, not inside a worker
    filter_node, filter_shape, filter_dtype = _shared_filter(filter, input._meta)
    dtype = spec.check_dtypes(input=input.dtype, filter=filter_dtype)
    geom = spec.forward_geometry(input.shape, filter_shape, strides, padding, data_format, dilations)

    n_axis, c_axis, h_axis, w_axis = (0, 3, 1, 2) if geom.data_format == "NHWC" else (0, 1, 2, 3)
    h_in, h_out, h_halo = plan_axis(input.chunks[h_axis], geom.in_height, geom.pad_top, geom.stride_h,
                                    geom.effective_filter_height, geom.out_height)
    w_in, w_out, w_halo = plan_axis(input.chunks[w_axis], geom.in_width, geom.pad_left, geom.stride_w,
                                    geom.effective_filter_width, geom.out_width)
    in_chunks = [None] * 4
    out_chunks = [None] * 4
    in_chunks[n_axis] = out_chunks[n_axis] = input.chunks[n_axis]
    in_chunks[c_axis], out_chunks[c_axis] = (geom.channels,), (geom.out_channels,)
    in_chunks[h_axis], out_chunks[h_axis] = h_in, h_out
    in_chunks[w_axis], out_chunks[w_axis] = w_in, w_out

    x = input.rechunk(tuple(in_chunks))  # a no-op when the chunks already fit
    # Halo only after each chunk (windows start inside their own chunk), none on a one-chunk axis.
    depth = {axis: (0, halo) for axis, halo in ((h_axis, h_halo), (w_axis, w_halo))
             if halo > 0 and len(x.chunks[axis]) > 1}
    if depth:
        x = da.overlap.overlap(x, depth=depth, boundary="none", allow_rechunk=False)

    return da.map_blocks(
        _forward_block, x, filter_node, geom=geom, backend=backend,
        chunks=tuple(out_chunks), dtype=dtype, meta=meta_from_array(input._meta, ndim=4, dtype=dtype),
        name=f"{name or 'depthwise_conv2d'}-{tokenize(input, filter_node.key, geom, backend)}")


def plan_axis(chunks, size, pad, stride, eff, out_size):
    """Stride-aligned input chunks, matching output chunks and halo for one spatial axis.

    Output ``o`` reads input rows ``[o * stride - pad, o * stride - pad + eff)``. Each internal
    boundary of ``chunks`` is moved to the nearest row ``b`` with ``(b + pad) % stride == 0``, the
    first row of output ``(b + pad) // stride``; boundaries that would leave a chunk shorter than
    the halo (or empty), or an output chunk empty, are dropped (the chunks merge). Output chunk
    ``k`` then holds exactly the outputs whose windows start in input chunk ``k`` (windows that
    start in the padding belong to the first or last chunk), and reads at most
    ``halo = max(eff - stride, 0)`` rows past its chunk's end, all inside the next chunk.

    Parameters
    ----------
    chunks : tuple of int
        The input's chunk sizes along the axis.
    size, pad, stride, eff, out_size : int
        Input size, padding before, stride, effective filter size and output size along the axis,
        as in :class:`nbdw.spec.Geometry`.

    Returns
    -------
    input_chunks, output_chunks : tuple of int
    halo : int

    Examples
    --------
    >>> plan_axis((5, 5, 5, 5), size=20, pad=1, stride=2, eff=3, out_size=10)
    ((5, 6, 4, 5), (3, 3, 2, 2), 1)
    """
    halo = max(eff - stride, 0)
    min_chunk = max(halo, 1)
    bounds = []
    position = 0
    for c in chunks[:-1]:
        position += c
        q, r = divmod(position + pad, stride)
        b = (q + (2 * r >= stride)) * stride - pad  # nearest window start
        if b - (bounds[-1] if bounds else 0) >= min_chunk and b < size and (b + pad) // stride < out_size:
            bounds.append(b)
    while bounds and size - bounds[-1] < min_chunk:
        bounds.pop()
    edges_in = [0, *bounds, size]
    edges_out = [0, *((b + pad) // stride for b in bounds), out_size]
    return (tuple(b - a for a, b in zip(edges_in, edges_in[1:])),
            tuple(b - a for a, b in zip(edges_out, edges_out[1:])), halo)


# ---------------------------------------------------------------------------
# Graph pieces
# ---------------------------------------------------------------------------

def _shared_filter(filter, meta):
    """The filter as one graph node (a Delayed), with its shape and dtype known up front.

    For device-backed input chunks a host filter is copied to the device once, in its own task,
    rather than by every block.
    """
    if isinstance(filter, da.Array):
        shape, dtype = filter.shape, filter.dtype
        node = filter.rechunk(filter.shape).to_delayed().ravel()[0]
    else:
        if not (isinstance(filter, np.ndarray) or hasattr(filter, "__cuda_array_interface__")):
            filter = np.asarray(filter)
        shape, dtype = filter.shape, filter.dtype
        node = dask.delayed(filter, name=f"depthwise-filter-{tokenize(filter)}")
    if hasattr(meta, "__cuda_array_interface__") and not hasattr(filter, "__cuda_array_interface__"):
        node = dask.delayed(_like, pure=True)(node, meta)
    return node, shape, dtype


def _like(array, like):
    """``array`` as the array type of ``like`` (NEP 35), e.g. a host filter as a CuPy array."""
    return np.asarray(array, like=like)


def _forward_block(x, f, *, geom, backend, block_info=None):
    """One output block: the in-memory op on this block's rows with its own explicit padding.

    ``x`` is input chunk ``k`` plus its halo. It starts at the first input row the block's first
    output reads (row 0 for the first chunk, whose windows may start in the padding), see
    :func:`plan_axis`.
    """
    location = block_info[None]["array-location"]
    h_axis, w_axis = (1, 2) if geom.data_format == "NHWC" else (2, 3)
    index = [slice(None)] * 4
    padding = [[0, 0] for _ in range(4)]
    for axis, stride, pad, eff, size in (
            (h_axis, geom.stride_h, geom.pad_top, geom.effective_filter_height, geom.in_height),
            (w_axis, geom.stride_w, geom.pad_left, geom.effective_filter_width, geom.in_width)):
        o_lo, o_hi = location[axis]
        start = o_lo * stride - pad  # input rows [start, end) hold every window of the block
        end = (o_hi - 1) * stride - pad + eff
        lo, hi = max(start, 0), min(end, size)
        if hi > lo:
            padding[axis] = [lo - start, end - hi]
        else:  # every window lies in the padding: an empty slice, all padding
            lo = hi = 0
            padding[axis] = [end - start, 0]
        if hi - lo > x.shape[axis]:
            raise RuntimeError(f"internal error: block needs {hi - lo} rows on axis {axis}, has {x.shape[axis]}")
        index[axis] = slice(0, hi - lo)
    strides = [1, 1, 1, 1]
    dilations = [1, 1, 1, 1]
    strides[h_axis], strides[w_axis] = geom.stride_h, geom.stride_w
    dilations[h_axis], dilations[w_axis] = geom.dilation_h, geom.dilation_w
    block = x[tuple(index)]
    on_device = hasattr(block, "__cuda_array_interface__")
    with nullcontext() if on_device or _numba_is_threadsafe() else _serial_cpu:
        result = ops.depthwise_conv2d_native(block, f, strides, padding, geom.data_format, dilations,
                                             backend=backend)
    if on_device and type(result) is not type(block):
        result = _like(result, block)  # e.g. a Numba device array into the chunks' CuPy type
    return result


# Numba's "workqueue" threading layer (used when neither TBB nor OpenMP is available) aborts the
# process if two threads launch parallel kernels at once; Dask's default scheduler uses threads.
_serial_cpu = threading.Lock()


def _numba_is_threadsafe():
    import numba

    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel kernel has run in this process yet: play safe
        return False
