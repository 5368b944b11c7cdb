"""The public ops, with TensorFlow's signatures.

Each op validates its arguments once through :mod:`nbdw.spec`, picks a backend
through :mod:`nbdw.backends` and hands the backend a :class:`~nbdw.spec.Geometry`.
No geometry or padding rule lives here.
"""

from __future__ import annotations

from . import backends, spec

__all__ = [
    "depthwise_conv2d",
    "depthwise_conv2d_native",
    "depthwise_conv2d_native_backprop_input",
    "depthwise_conv2d_native_backprop_filter",
    "depthwise_conv2d_bias_activation",
]


def _backend(backend, *arrays):
    return backends.load(backends.select(backend, *arrays))


def _check_out(out, shape, dtype):
    if out is not None:
        iface = getattr(out, "__cuda_array_interface__", None)
        if iface is not None and not _has_numpy_dtype(out):
            # PyTorch tensors (torch dtypes are not NumPy's) and bare interface objects
            spec.check_out(iface["shape"], iface["typestr"], shape, dtype)
            return
        if not (hasattr(out, "shape") and hasattr(out, "dtype")):
            raise TypeError(f"out must be an array or None, got {type(out).__name__}")
        spec.check_out(out.shape, out.dtype, shape, dtype)


def _has_numpy_dtype(array):
    try:
        return type(array.dtype).__module__.startswith("numpy")
    except AttributeError:
        return False


def depthwise_conv2d(input, filter, strides, padding, data_format=None, dilations=None, name=None,
                     *, backend="auto", out=None):
    """Depthwise 2-D convolution, as ``tf.nn.depthwise_conv2d`` (TensorFlow 2).

    ``output[b, i, j, k * M + q] = sum_{di, dj} filter[di, dj, k, q] *
    input[b, strides[1] * i + dilations[0] * di - pad_top, strides[2] * j + dilations[1] * dj - pad_left, k]``
    (written for NHWC), where ``M`` is the channel multiplier ``filter.shape[3]``.

    Parameters
    ----------
    input : array_like
        4-D, ``[batch, height, width, channels]`` (NHWC) or ``[batch, channels, height, width]`` (NCHW).
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64. Any memory layout.
        An object with ``__cuda_array_interface__`` runs on the GPU.
    filter : array_like
        ``[filter_height, filter_width, in_channels, channel_multiplier]``, same dtype as ``input``.
    strides : sequence of 4 ints
        In ``data_format`` order; 1 for the batch and channel dimensions. Strides above 1 may be
        combined with dilations above 1, and row and column strides may differ.
    padding : {"SAME", "VALID"} or list of four [before, after] pairs
        Explicit pairs are in ``data_format`` order; the batch and channel pairs must be ``[0, 0]``.
    data_format : {"NHWC", "NCHW"} or None
        ``None`` means ``"NHWC"``.
    dilations : sequence of 2 ints or None
        The dilation rate ``[rate_height, rate_width]``.
    name : str, optional
        Accepted for compatibility; unused.
    backend : {"auto", "cpu", "cuda"}, keyword-only
        ``"auto"`` picks ``"cuda"`` for GPU arrays and ``"cpu"`` otherwise.
    out : array, optional, keyword-only
        Preallocated output of the result's shape and dtype. On the CPU, a large result is
        written fastest into a 64-byte-aligned array (:func:`nbdw.empty`; see its docstring).

    Returns
    -------
    array
        ``[batch, out_height, out_width, channels * multiplier]`` (NHWC) or its NCHW twin, with the
        input's dtype. Half types accumulate in float32.

    Raises
    ------
    ValueError, TypeError
        For bad shapes, strides, dilations, padding, data_format, dtypes or ``out``; the message
        names the argument, the value and what was expected.

    Examples
    --------
    >>> import numpy as np, nbdw
    >>> x = np.arange(1., 7., dtype=np.float32).reshape(1, 3, 2, 1)
    >>> k = np.array([1., 2., 3., 4.], dtype=np.float32).reshape(2, 1, 1, 2)
    >>> nbdw.depthwise_conv2d(x, k, [1, 1, 1, 1], "VALID")[0, :, :, 0]
    array([[10., 14.],
           [18., 22.]], dtype=float32)
    """
    data_format = spec.check_data_format(data_format)
    return depthwise_conv2d_native(input, filter, strides, padding, data_format,
                                   spec.dilations_from_rate(dilations, data_format), name,
                                   backend=backend, out=out)


def depthwise_conv2d_native(input, filter, strides, padding, data_format="NHWC", dilations=(1, 1, 1, 1),
                            name=None, *, backend="auto", out=None):
    """Depthwise 2-D convolution, as ``tf.nn.depthwise_conv2d_native``.

    The same op as :func:`depthwise_conv2d`, with ``dilations`` of length 4 in ``data_format``
    order (1 for the batch and channel dimensions) and ``data_format`` defaulting to ``"NHWC"``.
    See :func:`depthwise_conv2d` for the parameters, the result and the errors.
    """
    impl = _backend(backend, input, filter)
    x = impl.as_array(input, "input")
    f = impl.as_array(filter, "filter")
    dtype = spec.check_dtypes(input=x.dtype, filter=f.dtype)
    geom = spec.forward_geometry(x.shape, f.shape, strides, padding, data_format, dilations)
    _check_out(out, geom.output_shape, dtype)
    return impl.forward(x, f, geom, out)


def depthwise_conv2d_native_backprop_input(input_sizes, filter, out_backprop, strides, padding,
                                           data_format="NHWC", dilations=(1, 1, 1, 1), name=None,
                                           *, backend="auto", out=None):
    """Gradient of the depthwise convolution with respect to its input.

    As ``tf.nn.depthwise_conv2d_native_backprop_input``: returns ``dx`` of shape ``input_sizes``
    such that ``<forward(x, filter), out_backprop> = <x, dx>`` for every ``x``.

    Parameters
    ----------
    input_sizes : sequence of 4 ints or 1-D integer array
        The shape of the forward input, in ``data_format`` order.
    filter : array_like
        ``[filter_height, filter_width, in_channels, channel_multiplier]``.
    out_backprop : array_like
        Gradient with respect to the forward output; its shape must equal the forward output shape
        for ``input_sizes`` and ``filter``. Same dtype as ``filter``.
    strides, padding, data_format, dilations, name, backend, out
        As in :func:`depthwise_conv2d_native`.

    Returns
    -------
    array
        Shape ``input_sizes``, dtype of ``filter``; half types accumulate in float32.

    Raises
    ------
    ValueError, TypeError
        As the forward op, and when ``out_backprop``'s shape does not match (the message names
        both shapes).
    """
    impl = _backend(backend, filter, out_backprop)
    f = impl.as_array(filter, "filter")
    dy = impl.as_array(out_backprop, "out_backprop")
    dtype = spec.check_dtypes(filter=f.dtype, out_backprop=dy.dtype)
    geom = spec.backprop_input_geometry(input_sizes, f.shape, dy.shape, strides, padding, data_format, dilations)
    _check_out(out, geom.input_shape, dtype)
    return impl.backprop_input(f, dy, geom, out)


def depthwise_conv2d_native_backprop_filter(input, filter_sizes, out_backprop, strides, padding,
                                            data_format="NHWC", dilations=(1, 1, 1, 1), name=None,
                                            *, backend="auto", out=None):
    """Gradient of the depthwise convolution with respect to its filter.

    As ``tf.nn.depthwise_conv2d_native_backprop_filter``: returns ``df`` of shape ``filter_sizes``
    such that ``<forward(input, f), out_backprop> = <f, df>`` for every ``f``. The result is
    deterministic: for a given thread count (CPU) or launch configuration (CUDA) it is bitwise
    identical from run to run.

    Parameters
    ----------
    input : array_like
        The forward input, in ``data_format`` layout.
    filter_sizes : sequence of 4 ints or 1-D integer array
        ``[filter_height, filter_width, in_channels, channel_multiplier]``.
    out_backprop : array_like
        Gradient with respect to the forward output; same dtype as ``input``.
    strides, padding, data_format, dilations, name, backend, out
        As in :func:`depthwise_conv2d_native`.

    Returns
    -------
    array
        Shape ``filter_sizes``, dtype of ``input``; half types accumulate in float32, the final
        reduction included.

    Raises
    ------
    ValueError, TypeError
        As the forward op, and when ``out_backprop``'s shape does not match (the message names
        both shapes).
    """
    impl = _backend(backend, input, out_backprop)
    x = impl.as_array(input, "input")
    dy = impl.as_array(out_backprop, "out_backprop")
    dtype = spec.check_dtypes(input=x.dtype, out_backprop=dy.dtype)
    geom = spec.backprop_filter_geometry(x.shape, filter_sizes, dy.shape, strides, padding, data_format, dilations)
    _check_out(out, geom.filter_shape, dtype)
    return impl.backprop_filter(x, dy, geom, out)


def depthwise_conv2d_bias_activation(input, filter, bias, strides, padding, data_format="NHWC",
                                     dilations=(1, 1, 1, 1), activation="linear", *, backend="auto", out=None):
    """Forward op with a bias add and a cheap activation fused into the output store.

    ``activation(depthwise_conv2d_native(input, filter, ...) + bias)`` in one pass over the
    output, for ``activation`` in ``"linear"``, ``"relu"``, ``"relu6"``
    (:data:`nbdw.spec.FUSED_ACTIVATIONS`). ``bias`` has shape ``(channels * multiplier,)`` or is
    ``None``. The other arguments are those of :func:`depthwise_conv2d_native`.
    """
    impl = _backend(backend, input, filter)
    x = impl.as_array(input, "input")
    f = impl.as_array(filter, "filter")
    dtype = spec.check_dtypes(input=x.dtype, filter=f.dtype)
    geom = spec.forward_geometry(x.shape, f.shape, strides, padding, data_format, dilations)
    spec.activation_bounds(activation, dtype)
    if bias is not None:
        b = impl.as_array(bias, "bias")
        if tuple(b.shape) != (geom.out_channels,):
            raise ValueError(f"bias must have shape ({geom.out_channels},) (channels * multiplier), got {tuple(b.shape)}")
        bias = b
    _check_out(out, geom.output_shape, dtype)
    return impl.forward(x, f, geom, out, bias=bias, activation=activation)
