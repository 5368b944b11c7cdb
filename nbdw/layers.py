"""A Keras-style ``DepthwiseConv2D`` layer that trains without TensorFlow.

The layer holds its weights as NumPy arrays, runs the convolution through :mod:`nbdw.ops`
(so on the CPU for NumPy inputs and on the GPU for device inputs), and computes its own
gradients with the backprop ops. See :class:`DepthwiseConv2D`.
"""

from __future__ import annotations

import itertools
import numbers

import numpy as np

from . import activations, constraints, initializers, keras_objects, ops, regularizers, spec
from .arrays import kind_of

__all__ = ["DepthwiseConv2D"]

_PADDINGS = ("valid", "same")

# Keys of a Keras get_config() that describe Keras's bookkeeping, not the convolution.
_KERAS_ONLY_KEYS = ("batch_input_shape", "batch_shape", "input_shape")


def _pair(name, value):
    """Keras's ``standardize_tuple``: an int or 2 ints, each >= 1, as a tuple."""
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool):
        values = (int(value),) * 2
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a tuple/list of 2 ints, got {value!r}") from None
        if len(values) != 2 or not all(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)
                                       for v in values):
            raise ValueError(f"{name} must be an int or a tuple/list of 2 ints, got {value!r}")
        values = tuple(int(v) for v in values)
    if min(values) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return values


def _dtype(value):
    """The layer's dtype from a name, a NumPy dtype, ``None`` (Keras's floatx) or a Keras dtype policy."""
    if value is None:
        value = keras_objects.floatx()
    if isinstance(value, dict):  # Keras 3 DTypePolicy serialization
        value = value.get("config", {}).get("name", value)
    if isinstance(value, str) and value.startswith("mixed_"):
        raise ValueError(f"dtype {value!r} is a Keras mixed-precision policy; nbdw layers compute and store weights "
                         "in one dtype, give that dtype (for example 'float16')")
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype not in spec.SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, float64, got {value!r}")
    return dtype


class DepthwiseConv2D:
    """Depthwise 2-D convolution layer with the arguments, weights and configs of Keras's.

    ``y = activation(depthwise_conv2d(x, depthwise_kernel) + bias)``, each input channel
    convolved with its own ``depth_multiplier`` filters (``tf.keras.layers.DepthwiseConv2D``).

    Parameters
    ----------
    kernel_size : int or tuple of 2 ints
        Height and width of the filters.
    strides : int or tuple of 2 ints, default (1, 1)
        A stride above 1 cannot be combined with a dilation rate above 1 (Keras's rule).
    padding : {"valid", "same"}, case-insensitive, default "valid"
    depth_multiplier : int, default 1
        Output channels per input channel; the output has ``channels * depth_multiplier``.
    data_format : {"channels_last", "channels_first"} or None
        ``None`` means ``image_data_format`` in Keras's ``keras.json`` (``$KERAS_HOME``, default
        ``~/.keras``) if that file exists and sets it, else ``"channels_last"``.
    dilation_rate : int or tuple of 2 ints, default (1, 1)
    activation : None, str, Keras config dict or callable
        ``None`` is linear. Built-ins: :data:`nbdw.activations.ACTIVATIONS`. ``linear``, ``relu``
        and ``relu6`` are fused with the bias into the forward kernel (one pass over the output).
        A callable needs a ``gradient(x, y, dy)`` attribute for :meth:`backward`.
    use_bias : bool, default True
    depthwise_initializer, bias_initializer : str, dict, Initializer or callable
        Defaults ``"glorot_uniform"`` and ``"zeros"``; see :mod:`nbdw.initializers`. A callable is
        called as ``f(shape, dtype)``.
    depthwise_regularizer, bias_regularizer, activity_regularizer : None, str, dict or callable
        See :mod:`nbdw.regularizers`. The activity penalty is divided by the batch size (Keras 3).
        A callable needs a ``gradient(x)`` attribute for :meth:`backward`.
    depthwise_constraint, bias_constraint : None, str, dict or callable
        See :mod:`nbdw.constraints`; applied after each :meth:`apply_gradients` step.
    name : str, optional
        Defaults to ``"depthwise_conv2d"``, ``"depthwise_conv2d_1"``, ...
    dtype : str or dtype, default "float32"
        float16, bfloat16, float32 or float64, for the weights and the computation (``None``:
        Keras's ``floatx``). Inputs of another dtype are cast, as Keras casts them.
    trainable : bool, default True
        A layer that is not trainable has no weight penalties and :meth:`apply_gradients` leaves
        its weights alone (Keras: only trainable weights are regularized and updated).
    backend : {"auto", "cpu", "cuda"}, keyword-only
        Passed to the ops; ``"auto"`` picks by the input's kind.

    Attributes
    ----------
    depthwise_kernel : numpy.ndarray
        ``(kh, kw, channels, depth_multiplier)``, after :meth:`build`. ``kernel`` is an alias
        (Keras 3's name for it).
    bias : numpy.ndarray or None
        ``(channels * depth_multiplier,)``.
    losses : list of float
        The activity penalty of the last call (divided by its batch size), then the kernel and
        bias penalties of the current weights, in Keras 3's order.
    gradients : dict
        After :meth:`backward`: ``{"depthwise_kernel": ..., "bias": ...}``.

    Examples
    --------
    >>> import numpy as np
    >>> from nbdw.layers import DepthwiseConv2D
    >>> layer = DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu")
    >>> x = np.random.default_rng(0).standard_normal((4, 10, 10, 3)).astype(np.float32)
    >>> layer(x).shape
    (4, 10, 10, 6)
    >>> dx = layer.backward(np.ones((4, 10, 10, 6), np.float32))
    >>> dx.shape, layer.gradients["depthwise_kernel"].shape
    ((4, 10, 10, 3), (3, 3, 3, 2))
    >>> layer.apply_gradients(0.01)
    """

    _names = {}

    def __init__(self, kernel_size, strides=(1, 1), padding="valid", depth_multiplier=1, data_format=None,
                 dilation_rate=(1, 1), activation=None, use_bias=True, depthwise_initializer="glorot_uniform",
                 bias_initializer="zeros", depthwise_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, depthwise_constraint=None, bias_constraint=None, name=None,
                 dtype="float32", trainable=True, *, backend="auto"):
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.strides = _pair("strides", strides)
        self.dilation_rate = _pair("dilation_rate", dilation_rate)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(f"strides > 1 cannot be combined with dilation_rate > 1 (Keras's rule), got "
                             f"strides={self.strides} and dilation_rate={self.dilation_rate}")
        if not isinstance(padding, str) or padding.lower() not in _PADDINGS:
            raise ValueError(f"padding must be 'valid' or 'same' (case-insensitive), got {padding!r}")
        self.padding = padding.lower()
        if (not isinstance(depth_multiplier, (numbers.Integral, np.integer)) or isinstance(depth_multiplier, bool)
                or depth_multiplier < 1):
            raise ValueError(f"depth_multiplier must be a positive integer, got {depth_multiplier!r}")
        self.depth_multiplier = int(depth_multiplier)
        if data_format is None:
            data_format = keras_objects.image_data_format()
        if not isinstance(data_format, str) or data_format.lower() not in keras_objects.DATA_FORMATS:
            raise ValueError(f"data_format must be one of {keras_objects.DATA_FORMATS} or None, got {data_format!r}")
        self.data_format = data_format.lower()
        self.activation = activations.get(activation)
        if not callable(self.activation):
            raise TypeError(f"activation must be callable, got {self.activation!r}")
        if not isinstance(use_bias, (bool, np.bool_)):
            raise TypeError(f"use_bias must be a bool, got {use_bias!r}")
        self.use_bias = bool(use_bias)
        self.depthwise_initializer = initializers.get(
            "glorot_uniform" if depthwise_initializer is None else depthwise_initializer)
        self.bias_initializer = initializers.get("zeros" if bias_initializer is None else bias_initializer)
        self.depthwise_regularizer = regularizers.get(depthwise_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.activity_regularizer = regularizers.get(activity_regularizer)
        self.depthwise_constraint = constraints.get(depthwise_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.dtype = _dtype(dtype)
        self.trainable = bool(trainable)
        if backend != "auto" and backend not in ("cpu", "cuda"):
            raise ValueError(f"backend must be 'auto', 'cpu' or 'cuda', got {backend!r}")
        self.backend = backend
        self.name = self._unique_name() if name is None else name
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string or None, got {name!r}")

        self.built = False
        self.depthwise_kernel = None
        self.bias = None
        self.input_channels = None
        self.gradients = {}
        self._saved = None  # what backward needs from the last call
        self._activity_loss = None

    @classmethod
    def _unique_name(cls):
        count = cls._names.setdefault("depthwise_conv2d", itertools.count())
        n = next(count)
        return "depthwise_conv2d" if n == 0 else f"depthwise_conv2d_{n}"

    # ------------------------------------------------------------------
    # Geometry (the rules themselves live in nbdw.spec)
    # ------------------------------------------------------------------

    @property
    def _tf_format(self):
        return "NHWC" if self.data_format == "channels_last" else "NCHW"

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def _op_args(self):
        """strides, padding, data_format, dilations as the native ops take them."""
        sh, sw = self.strides
        dh, dw = self.dilation_rate
        if self.data_format == "channels_last":
            return [1, sh, sw, 1], self.padding.upper(), "NHWC", [1, dh, dw, 1]
        return [1, 1, sh, sw], self.padding.upper(), "NCHW", [1, 1, dh, dw]

    def compute_output_shape(self, input_shape):
        """The output shape for ``input_shape`` (``None`` allowed for batch and spatial sizes), as Keras's."""
        shape = tuple(input_shape)
        if len(shape) != 4:
            raise ValueError(f"{self.name}: expected a 4-D input shape, got {shape}")
        channels = shape[self._channel_axis]
        if channels is None:
            raise ValueError(f"{self.name}: the channel dimension of input_shape {shape} must be known")
        sizes_at = (1, 2) if self.data_format == "channels_last" else (2, 3)
        probe = list(shape)
        probe[0] = 1 if shape[0] is None else shape[0]
        for axis, k, d in zip(sizes_at, self.kernel_size, self.dilation_rate):
            if shape[axis] is None:  # any size does for an unknown axis; its output stays unknown
                probe[axis] = (k - 1) * d + 1
        strides, padding, data_format, dilations = self._op_args()
        geom = spec.forward_geometry(probe, (*self.kernel_size, channels, self.depth_multiplier),
                                     strides, padding, data_format, dilations)
        out = list(geom.output_shape)
        out[0] = shape[0]
        for axis in sizes_at:
            if shape[axis] is None:
                out[axis] = None
        return tuple(out)

    # ------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------

    def build(self, input_shape):
        """Create the weights for inputs of ``input_shape`` (only its channel count matters)."""
        shape = tuple(input_shape)
        if len(shape) != 4:
            raise ValueError(f"{self.name}: expected a 4-D input shape, got {shape}")
        channels = shape[self._channel_axis]
        if channels is None or int(channels) < 1:
            raise ValueError(f"{self.name}: the channel dimension of input_shape {shape} must be a positive integer "
                             f"({self.data_format})")
        channels = int(channels)
        kernel_shape = (*self.kernel_size, channels, self.depth_multiplier)
        self.depthwise_kernel = self._initial("depthwise_initializer", self.depthwise_initializer, kernel_shape)
        self.bias = (self._initial("bias_initializer", self.bias_initializer, (channels * self.depth_multiplier,))
                     if self.use_bias else None)
        self.input_channels = channels
        self.built = True

    def _initial(self, what, initializer, shape):
        values = np.asarray(initializer(shape, self.dtype))
        if values.shape != shape:
            raise ValueError(f"{self.name}: {what} returned shape {values.shape}, expected {shape}")
        return np.array(values, dtype=self.dtype, copy=True)

    @property
    def kernel(self):
        """Keras 3's name for :attr:`depthwise_kernel`."""
        return self.depthwise_kernel

    @property
    def weights(self):
        """The weights in Keras's order: ``[depthwise_kernel, bias]`` (``bias`` only with ``use_bias``)."""
        if not self.built:
            return []
        return [self.depthwise_kernel] + ([self.bias] if self.use_bias else [])

    def get_weights(self):
        """Copies of :attr:`weights`, in Keras's order."""
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        """Set ``[depthwise_kernel, bias]`` (Keras's order; ``[depthwise_kernel]`` without bias).

        An unbuilt layer is built from the kernel's channel count first. Shapes must match exactly;
        values are cast to the layer's dtype.
        """
        weights = list(weights)
        expected = 2 if self.use_bias else 1
        if len(weights) != expected:
            raise ValueError(f"{self.name}: set_weights expects {expected} arrays "
                             f"({'[depthwise_kernel, bias]' if self.use_bias else '[depthwise_kernel]'}), "
                             f"got {len(weights)}")
        kernel = np.asarray(weights[0])
        if not self.built:
            if kernel.ndim != 4:
                raise ValueError(f"{self.name}: depthwise_kernel must be 4-D (kh, kw, channels, depth_multiplier), "
                                 f"got shape {kernel.shape}")
            self.build(self._input_shape_for(kernel.shape[2]))
        for i, (name, current, new) in enumerate(zip(("depthwise_kernel", "bias"), self.weights, weights)):
            new = np.asarray(new)
            if new.shape != current.shape:
                raise ValueError(f"{self.name}: weight {i} ({name}) must have shape {current.shape}, got {new.shape}")
        self.depthwise_kernel = np.array(weights[0], dtype=self.dtype, copy=True)
        if self.use_bias:
            self.bias = np.array(weights[1], dtype=self.dtype, copy=True)

    def _input_shape_for(self, channels):
        return (None, None, None, channels) if self.data_format == "channels_last" else (None, channels, None, None)

    # ------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------

    def _check_input(self, x):
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise ValueError(f"{self.name}: expected a 4-D input ({self.data_format}), got shape {shape}")
        if shape[self._channel_axis] != self.input_channels:
            raise ValueError(
                f"{self.name}: input has {shape[self._channel_axis]} channels (axis {self._channel_axis} of shape "
                f"{shape}, {self.data_format}), but the layer was built for {self.input_channels}")

    def __call__(self, inputs):
        """Apply the layer; the result is of the input's kind (NumPy in, NumPy out; device in, device out)."""
        kind = kind_of(inputs)
        x = inputs if kind.device else np.asarray(inputs)
        if not self.built:
            self.build(x.shape)
        self._check_input(x)
        if x.dtype != self.dtype:  # Keras casts inputs to the layer's compute dtype
            x = kind.result(kind.work(x).astype(self.dtype))
        kernel = kind.operand(self.depthwise_kernel)
        bias = kind.operand(self.bias) if self.use_bias else None
        strides, padding, data_format, dilations = self._op_args()
        fused = activations.is_fusable(self.activation)
        out = ops.depthwise_conv2d_bias_activation(
            x, kernel, bias, strides, padding, data_format, dilations,
            activation=self.activation.name if fused else "linear", backend=self.backend)
        acc = spec.accumulator_dtype(self.dtype)
        if fused:
            pre, y = None, out  # the fused activations' derivatives are read off their outputs
            result = kind.result(out)
        else:
            pre = kind.work(out).astype(acc, copy=False)  # half types: elementwise work in float32
            y = self.activation(pre)
            result = kind.result(y.astype(self.dtype, copy=False))
        self._activity_loss = None
        if self.activity_regularizer is not None:
            batch = x.shape[0]
            penalty = float(self.activity_regularizer(kind.work(y).astype(acc, copy=False)))
            self._activity_loss = penalty / batch if batch else 0.0  # Keras 3: divide_no_nan by the batch size
        self._saved = (kind, x, pre, y)
        return result

    @property
    def losses(self):
        """Penalties in Keras 3's order: activity (last call, per batch), then kernel and bias (current weights)."""
        losses = [] if self._activity_loss is None else [self._activity_loss]
        if self.built and self.trainable:
            for weight, regularizer in ((self.depthwise_kernel, self.depthwise_regularizer),
                                        (self.bias, self.bias_regularizer)):
                if weight is not None and regularizer is not None:
                    losses.append(float(regularizer(weight)))
        return losses

    # ------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------

    def backward(self, dy):
        """Gradients of ``sum(y * dy) + sum(self.losses)`` for the last call.

        Parameters
        ----------
        dy : array
            Gradient with respect to the last output, of its shape and kind.

        Returns
        -------
        array
            The gradient with respect to the last input (its kind, the layer's dtype). The
            weight gradients go to ``self.gradients`` as NumPy arrays of the layer's dtype.

        Raises
        ------
        RuntimeError
            Without a previous call.
        ValueError
            When ``dy`` has the wrong shape.
        TypeError
            When the activation or a regularizer is a callable without a ``gradient`` attribute
            (see :mod:`nbdw.activations`, :mod:`nbdw.regularizers`).
        """
        if self._saved is None:
            raise RuntimeError(f"{self.name}: backward() needs a forward call first")
        kind, x, pre, y = self._saved
        acc = spec.accumulator_dtype(self.dtype)
        y_work = kind.work(y).astype(acc, copy=False)
        dy = kind.work(dy)
        if tuple(dy.shape) != tuple(y_work.shape):
            raise ValueError(
                f"{self.name}: dy must have the output's shape {tuple(y_work.shape)}, got {tuple(dy.shape)}")
        grad = dy.astype(acc, copy=False)
        if self.activity_regularizer is not None and x.shape[0]:
            grad = grad + _gradient_of(self.activity_regularizer, "activity_regularizer", y_work) / acc.type(x.shape[0])
        if pre is None:  # fused linear/relu/relu6: y > 0 (and y < 6) exactly where z is, so y gives the derivative
            dz = self.activation.gradient(y_work, y_work, grad)
        else:
            dz = _activation_gradient(self.activation, pre, y_work, grad)
        dz = kind.result(dz.astype(self.dtype, copy=False))
        strides, padding, data_format, dilations = self._op_args()
        kernel = kind.operand(self.depthwise_kernel)
        dx = ops.depthwise_conv2d_native_backprop_input(
            tuple(x.shape), kernel, dz, strides, padding, data_format, dilations, backend=self.backend)
        dkernel = kind.to_host(ops.depthwise_conv2d_native_backprop_filter(
            x, self.depthwise_kernel.shape, dz, strides, padding, data_format, dilations, backend=self.backend))
        gradients = {"depthwise_kernel": self._plus_penalty(dkernel, self.depthwise_kernel,
                                                            self.depthwise_regularizer, "depthwise_regularizer")}
        if self.use_bias:
            axes = (0, 1, 2) if self.data_format == "channels_last" else (0, 2, 3)
            dbias = kind.to_host(kind.work(dz).astype(acc, copy=False).sum(axis=axes))
            gradients["bias"] = self._plus_penalty(dbias, self.bias, self.bias_regularizer, "bias_regularizer")
        self.gradients = gradients
        return kind.result(dx)

    def _plus_penalty(self, grad, weight, regularizer, what):
        acc = spec.accumulator_dtype(self.dtype)
        grad = np.asarray(grad, dtype=acc)
        if regularizer is not None and self.trainable:
            grad = grad + _gradient_of(regularizer, what, weight.astype(acc))
        return grad.astype(self.dtype)

    def apply_gradients(self, learning_rate):
        """One SGD step ``w -= learning_rate * gradient`` on each weight, then its constraint (as Keras).

        Does nothing to a layer that is not trainable.
        """
        if not self.gradients:
            raise RuntimeError(f"{self.name}: apply_gradients() needs gradients; call backward() first")
        if not isinstance(learning_rate, (numbers.Real, np.floating)) or isinstance(learning_rate, bool):
            raise TypeError(f"learning_rate must be a real number, got {learning_rate!r}")
        if not self.trainable:
            return
        acc = spec.accumulator_dtype(self.dtype)
        for name, constraint in (("depthwise_kernel", self.depthwise_constraint), ("bias", self.bias_constraint)):
            if name not in self.gradients:
                continue
            weight = getattr(self, name).astype(acc) - acc.type(learning_rate) * self.gradients[name].astype(acc)
            if constraint is not None:
                projected = np.asarray(constraint(weight))
                if projected.shape != weight.shape:
                    raise ValueError(f"{self.name}: {name} constraint returned shape {projected.shape}, "
                                     f"expected {weight.shape}")
                weight = projected
            setattr(self, name, weight.astype(self.dtype))

    # ------------------------------------------------------------------
    # Configs
    # ------------------------------------------------------------------

    def get_config(self):
        """Every constructor argument; objects in Keras 3's serialized form (user callables as themselves)."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.dtype.name,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "depth_multiplier": self.depth_multiplier,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "depthwise_initializer": initializers.serialize(self.depthwise_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "depthwise_regularizer": regularizers.serialize(self.depthwise_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "depthwise_constraint": constraints.serialize(self.depthwise_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "backend": self.backend,
        }

    @classmethod
    def from_config(cls, config):
        """A layer from :meth:`get_config`'s dict or from Keras's ``DepthwiseConv2D.get_config()`` (2 or 3).

        Keras's bookkeeping keys (``batch_input_shape``, ``batch_shape``, ``input_shape``) are
        ignored; ``groups`` must be 1 and ``filters`` None (Keras 2 writes them); a Keras dtype
        policy dict gives its dtype. Other unknown keys are an error.
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        config = dict(config)
        for key in _KERAS_ONLY_KEYS:
            config.pop(key, None)
        groups = config.pop("groups", 1)
        if groups != 1:
            raise ValueError(f"config has groups={groups!r}; a depthwise layer has groups=1")
        if config.pop("filters", None) is not None:
            raise ValueError("config sets filters; a DepthwiseConv2D config has filters=None")
        for key in ("kernel_initializer", "kernel_regularizer", "kernel_constraint"):
            if config.get(key) is not None:
                raise ValueError(f"config sets {key}; DepthwiseConv2D's kernel is set by depthwise_{key[7:]}")
            config.pop(key, None)
        backend = config.pop("backend", "auto")
        try:
            return cls(**config, backend=backend)
        except TypeError as error:
            raise TypeError(f"DepthwiseConv2D config does not match the layer's arguments: {error}") from None

    def __repr__(self):
        args = [f"name={self.name!r}", f"kernel_size={self.kernel_size}"]
        if self.strides != (1, 1):
            args.append(f"strides={self.strides}")
        args.append(f"padding={self.padding!r}")
        if self.depth_multiplier != 1:
            args.append(f"depth_multiplier={self.depth_multiplier}")
        args.append(f"data_format={self.data_format!r}")
        if self.dilation_rate != (1, 1):
            args.append(f"dilation_rate={self.dilation_rate}")
        args.append(f"activation={_describe(activations.serialize(self.activation))}")
        if not self.use_bias:
            args.append("use_bias=False")
        for key in ("depthwise_regularizer", "bias_regularizer", "activity_regularizer",
                    "depthwise_constraint", "bias_constraint"):
            value = getattr(self, key)
            if value is not None:
                args.append(f"{key}={value!r}")
        args.append(f"dtype={self.dtype.name!r}")
        if not self.trainable:
            args.append("trainable=False")
        if self.built:
            weights = f"depthwise_kernel {self.depthwise_kernel.shape}"
            if self.use_bias:
                weights += f", bias {self.bias.shape}"
            args.append(f"built for {self.input_channels} input channels: {weights}")
        else:
            args.append("not built")
        return f"DepthwiseConv2D({', '.join(args)})"


def _describe(serialized):
    return repr(serialized) if isinstance(serialized, str) else getattr(serialized, "__name__", repr(serialized))


def _gradient_of(regularizer, what, x):
    gradient = getattr(regularizer, "gradient", None)
    if gradient is None:
        raise TypeError(
            f"{what} {regularizer!r} has no gradient; to train with a custom regularizer give it a "
            "gradient(x) attribute returning the gradient of its penalty with respect to x")
    return gradient(x)


def _activation_gradient(activation, x, y, dy):
    gradient = getattr(activation, "gradient", None)
    if gradient is None:
        raise TypeError(
            f"activation {activation!r} has no derivative; to train through a custom activation give it a "
            "gradient(x, y, dy) attribute returning the gradient with respect to its input x, given its "
            "output y and the gradient dy with respect to that output")
    return gradient(x, y, dy)
