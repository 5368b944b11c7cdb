"""nbdw: Numba-compiled depthwise 2-D convolution with TensorFlow's semantics.

The ops mirror ``tf.nn``: :func:`depthwise_conv2d`, :func:`depthwise_conv2d_native`,
:func:`depthwise_conv2d_native_backprop_input` and
:func:`depthwise_conv2d_native_backprop_filter`. NumPy arrays run on the CPU
backend; objects with ``__cuda_array_interface__`` run on the CUDA backend.
Importing nbdw compiles nothing: each kernel compiles on first use and is cached
on disk. :class:`nbdw.layers.DepthwiseConv2D` is a Keras-style layer built on the ops.
"""

from . import layers  # the Keras-style layer: nbdw.layers.DepthwiseConv2D (compiles nothing on import)
from .arrays import empty
from .backends import BackendUnavailableError, available_backends
from .ops import (
    depthwise_conv2d,
    depthwise_conv2d_bias_activation,
    depthwise_conv2d_native,
    depthwise_conv2d_native_backprop_filter,
    depthwise_conv2d_native_backprop_input,
)
from .spec import Geometry

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Geometry",
    "available_backends",
    "depthwise_conv2d",
    "depthwise_conv2d_bias_activation",
    "depthwise_conv2d_native",
    "depthwise_conv2d_native_backprop_filter",
    "depthwise_conv2d_native_backprop_input",
    "empty",
]
