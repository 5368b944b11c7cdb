"""nbdw.layers.DepthwiseConv2D and its Keras objects against an independent float64 reference.

The reference is tests/naive.py's convolution plus activations, penalties and constraints
written here again from Keras 3's definitions; activation derivatives in the reference are
central differences of those definitions, so no derivative formula is shared with nbdw.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import naive
from nbdw import activations, constraints, initializers, keras_objects, regularizers
from nbdw.layers import DepthwiseConv2D

# --------------------------------------------------------------------------- float64 reference

_erf = np.vectorize(math.erf)


def _relu6(z):
    return np.minimum(np.maximum(z, 0.0), 6.0)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

#: Keras 3's definitions (keras.src.activations, TensorFlow backend forms where they differ in writing).
REF_ACTIVATIONS = {
    "linear": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu6": _relu6,
    "leaky_relu": lambda z: np.maximum(z, 0.2 * z),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
    "selu": lambda z: SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(np.minimum(z, 0))),
    "sigmoid": _sigmoid,
    "hard_sigmoid": lambda z: _relu6(z + 3.0) / 6.0,
    "tanh": np.tanh,
    "softplus": lambda z: np.log1p(np.exp(z)),
    "softsign": lambda z: z / (1.0 + np.abs(z)),
    "silu": lambda z: z * _sigmoid(z),
    "swish": lambda z: z * _sigmoid(z),
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
    "exponential": np.exp,
    "hard_silu": lambda z: z * _relu6(z + 3.0) / 6.0,
    "hard_swish": lambda z: z * _relu6(z + 3.0) / 6.0,
    "mish": lambda z: z * np.tanh(np.log1p(np.exp(z))),
    "softmax": _softmax,
    "log_softmax": lambda z: np.log(_softmax(z)),
}


def reference_activation_vjp(name, z, dy, h=1e-6):
    """``sum_j dy_j * d f_j / d z_k`` by central differences, one last-axis position at a time.

    Exact up to O(h^2) for the smooth activations and exact away from kinks for the piecewise
    ones; moving one last-axis index at a time also covers softmax's cross terms.
    """
    f = REF_ACTIVATIONS[name]
    dz = np.empty_like(z)
    for k in range(z.shape[-1]):
        step = np.zeros_like(z)
        step[..., k] = h
        dz[..., k] = (dy * (f(z + step) - f(z - step))).sum(axis=-1) / (2 * h)
    return dz


def ref_l1l2(l1, l2):
    return (lambda w: l1 * np.abs(w).sum() + l2 * np.square(w).sum(),
            lambda w: l1 * np.sign(w) + 2 * l2 * w)


def op_args(layer):
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    if layer.data_format == "channels_last":
        return [1, sh, sw, 1], layer.padding.upper(), "NHWC", [1, dh, dw, 1]
    return [1, 1, sh, sw], layer.padding.upper(), "NCHW", [1, 1, dh, dw]


def bias_shape(layer):
    return (1, 1, 1, -1) if layer.data_format == "channels_last" else (1, -1, 1, 1)


def reference(layer, x, dy, activation, kernel_reg=None, bias_reg=None, activity_reg=None):
    """Output, losses and gradients of ``sum(y * dy) + sum(losses)``, all float64."""
    x = np.asarray(x, np.float64)
    k = layer.depthwise_kernel.astype(np.float64)
    b = layer.bias.astype(np.float64) if layer.use_bias else np.zeros(k.shape[2] * k.shape[3])
    strides, padding, fmt, dil = op_args(layer)
    z = naive.tf_forward(x, k, strides, padding, fmt, dil) + b.reshape(bias_shape(layer))
    y = REF_ACTIVATIONS[activation](z)
    n = x.shape[0]
    grad_y = np.asarray(dy, np.float64).copy()
    losses = []
    if activity_reg is not None:
        losses.append(activity_reg[0](y) / n)
        grad_y += activity_reg[1](y) / n
    dz = reference_activation_vjp(activation, z, grad_y)
    dk = naive.tf_backprop_filter(x, k.shape, dz, strides, padding, fmt, dil)
    db = dz.sum(axis=(0, 1, 2) if fmt == "NHWC" else (0, 2, 3))
    dx = naive.tf_backprop_input(x.shape, k, dz, strides, padding, fmt, dil)
    if kernel_reg is not None:
        losses.append(kernel_reg[0](k))
        dk = dk + kernel_reg[1](k)
    if bias_reg is not None:
        losses.append(bias_reg[0](b))
        db = db + bias_reg[1](b)
    return {"y": y, "dx": dx, "dk": dk, "db": db, "losses": losses}


def _input(rng, layer, n=2, h=6, w=5, c=3, dtype=np.float64):
    shape = (n, h, w, c) if layer.data_format == "channels_last" else (n, c, h, w)
    return rng.standard_normal(shape).astype(dtype)


def _assert_close(actual, expected, rtol=1e-7, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def _check_against_reference(layer, x, dy, ref, rtol=1e-7):
    y = layer(x)
    _assert_close(y, ref["y"], rtol, "output")
    np.testing.assert_allclose(layer.losses, ref["losses"], rtol=1e-9, err_msg="losses")
    dx = layer.backward(dy)
    _assert_close(dx, ref["dx"], rtol, "input gradient")
    _assert_close(layer.gradients["depthwise_kernel"], ref["dk"], rtol, "kernel gradient")
    _assert_close(layer.gradients["bias"], ref["db"], rtol, "bias gradient")


# --------------------------------------------------------------------------- activations on their own

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(REF_ACTIVATIONS))
def test_activation_values_and_gradients(name, dtype):
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((4, 5, 7)) * 4).astype(dtype)
    dy = rng.standard_normal(z.shape).astype(dtype)
    act = activations.get(name)
    y = act(z)
    assert y.dtype == dtype and y.shape == z.shape
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    _assert_close(y, REF_ACTIVATIONS[name](z.astype(np.float64)), rtol, name)
    grad = act.gradient(z, y, dy)
    assert grad.dtype == dtype
    ref = reference_activation_vjp(name, z.astype(np.float64), dy.astype(np.float64))
    _assert_close(grad, ref, 1e-6 if dtype == np.float64 else 2e-5, name + " gradient")


# Derivatives at the kinks, as TensorFlow's gradient kernels define them.
KINKS = {
    "relu": {0.0: 0.0},
    "relu6": {0.0: 0.0, 6.0: 0.0},
    "leaky_relu": {0.0: 0.2},
    "elu": {0.0: 1.0},
    "selu": {0.0: SELU_SCALE},
    "hard_sigmoid": {-3.0: 0.0, 3.0: 0.0},
    "hard_silu": {-3.0: 0.0, 3.0: 1.0},
}


@pytest.mark.parametrize("name", sorted(KINKS))
def test_activation_derivatives_at_kinks(name):
    points = np.array(list(KINKS[name]))
    act = activations.get(name)
    grad = act.gradient(points, act(points), np.ones_like(points))
    np.testing.assert_allclose(grad, list(KINKS[name].values()), rtol=1e-15)


def test_activations_are_overflow_safe():
    z = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        for name in ("sigmoid", "softplus", "silu", "elu", "selu", "mish", "softmax", "log_softmax"):
            act = activations.get(name)
            y = act(z)
            assert np.isfinite(y).all() and np.isfinite(act.gradient(z, y, np.ones_like(z))).all(), name


# --------------------------------------------------------------------------- outputs and gradients

# One configuration per row: strides, dilation, padding and multiplier vary together.
GEOMETRIES = [
    dict(kernel_size=3, padding="same", depth_multiplier=2),
    dict(kernel_size=(2, 3), strides=(2, 1), padding="valid"),
    dict(kernel_size=(3, 2), dilation_rate=2, padding="SAME", depth_multiplier=3),
]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("activation", sorted(REF_ACTIVATIONS))
def test_every_activation_matches_reference(activation, data_format):
    rng = np.random.default_rng(abs(hash((activation, data_format))) % 2**32)
    geometry = GEOMETRIES[sorted(REF_ACTIVATIONS).index(activation) % len(GEOMETRIES)]
    layer = DepthwiseConv2D(**geometry, data_format=data_format, activation=activation, dtype="float64",
                            bias_initializer=initializers.RandomNormal(stddev=0.5, seed=1))
    x = _input(rng, layer)
    layer.build(x.shape)
    dy = rng.standard_normal(layer.compute_output_shape(x.shape))
    ref = reference(layer, x, dy, activation)
    _check_against_reference(layer, x, dy, ref, rtol=1e-6)  # the reference derivative is a difference quotient


REGULARIZER_CASES = {
    "l1": ("l1", ref_l1l2(0.01, 0.0)),
    "l2": ("l2", ref_l1l2(0.0, 0.01)),
    "l1_l2": ("l1_l2", ref_l1l2(0.01, 0.01)),
    "l1l2_keras3_config": ({"module": "keras.regularizers", "class_name": "L1L2",
                            "config": {"l1": 0.03, "l2": 0.2}, "registered_name": None}, ref_l1l2(0.03, 0.2)),
    "L2_keras2_config": ({"class_name": "L2", "config": {"l2": 0.5}}, ref_l1l2(0.0, 0.5)),
}


@pytest.mark.parametrize("case", sorted(REGULARIZER_CASES))
@pytest.mark.parametrize("slot", ["depthwise", "bias", "activity"])
def test_every_regularizer_in_every_slot(case, slot):
    identifier, ref_reg = REGULARIZER_CASES[case]
    rng = np.random.default_rng(7)
    layer = DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="tanh", dtype="float64",
                            bias_initializer=initializers.RandomNormal(stddev=0.5, seed=2),
                            **{f"{slot}_regularizer": identifier})
    x = _input(rng, layer, n=3)
    layer.build(x.shape)
    dy = rng.standard_normal(layer.compute_output_shape(x.shape))
    ref = reference(layer, x, dy, "tanh", **{{"depthwise": "kernel_reg", "bias": "bias_reg",
                                              "activity": "activity_reg"}[slot]: ref_reg})
    _check_against_reference(layer, x, dy, ref, rtol=1e-6)
    assert len(layer.losses) == 1 and layer.losses[0] > 0


def test_losses_order_and_batch_normalisation_as_keras3():
    """Activity penalty first and divided by the batch size; then kernel and bias penalties."""
    layer = DepthwiseConv2D(1, activation=None, depthwise_initializer="ones", bias_initializer="ones",
                            depthwise_regularizer=regularizers.L1(0.5), bias_regularizer=regularizers.L2(0.25),
                            activity_regularizer=regularizers.L2(0.01), dtype="float64")
    x = np.full((5, 2, 2, 3), 2.0)
    layer(x)
    # y = 2 * 1 + 1 = 3 everywhere: activity 0.01 * 9 * 60 / 5; kernel 0.5 * 3; bias 0.25 * 3
    assert layer.losses == pytest.approx([0.01 * 9 * 60 / 5, 1.5, 0.75], rel=1e-12)
    layer(x[:0])  # an empty batch: Keras's divide_no_nan gives 0
    assert layer.losses[0] == 0.0
    layer.trainable = False  # only trainable weights are regularized
    assert len(layer.losses) == 1


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_finite_differences_of_the_whole_loss(data_format):
    """Every gradient against central differences of sum(y * dy) + sum(losses), in float64."""
    rng = np.random.default_rng(3)
    layer = DepthwiseConv2D((3, 2), strides=(2, 1), padding="same", depth_multiplier=2, activation="softmax",
                            data_format=data_format, dtype="float64", depthwise_regularizer="l2",
                            bias_regularizer=regularizers.L1L2(0.02, 0.03), activity_regularizer="l2",
                            bias_initializer=initializers.RandomNormal(stddev=1.0, seed=0))
    x = _input(rng, layer, n=2, h=4, w=3, c=2)
    layer.build(x.shape)
    dy = rng.standard_normal(layer.compute_output_shape(x.shape))

    def loss():
        return float((layer(x) * dy).sum() + sum(layer.losses))

    layer(x)
    dx = layer.backward(dy)
    grads = dict(layer.gradients)
    h = 1e-6
    for name, array, grad in (("x", x, dx), ("depthwise_kernel", layer.depthwise_kernel, grads["depthwise_kernel"]),
                              ("bias", layer.bias, grads["bias"])):
        numeric = np.empty_like(array)
        for i in np.ndindex(array.shape):
            keep = array[i]
            array[i] = keep + h
            up = loss()
            array[i] = keep - h
            down = loss()
            array[i] = keep
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_float32_layer_matches_reference():
    rng = np.random.default_rng(11)
    layer = DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu",
                            bias_initializer=initializers.RandomNormal(stddev=0.5, seed=3))
    x = _input(rng, layer, dtype=np.float32)
    y = layer(x)
    assert y.dtype == np.float32 and layer.depthwise_kernel.dtype == np.float32
    dy = rng.standard_normal(y.shape).astype(np.float32)
    ref = reference(layer, x, dy, "relu")
    _check_against_reference(layer, x, dy, ref, rtol=2e-5)
    assert layer.gradients["depthwise_kernel"].dtype == np.float32


def test_inputs_are_cast_to_the_layer_dtype():
    layer = DepthwiseConv2D(2, dtype="float64", depthwise_initializer="ones")
    x = np.arange(2 * 3 * 3 * 2).reshape(2, 3, 3, 2)  # integers, as Keras accepts them
    y = layer(x)
    assert y.dtype == np.float64
    _assert_close(y, naive.tf_forward(x.astype(np.float64), np.ones((2, 2, 2, 1)), [1, 1, 1, 1], "VALID"))


@pytest.mark.parametrize("dtype, rtol", [(np.float16, 4e-3), (ml_dtypes.bfloat16, 3e-2)], ids=["float16", "bfloat16"])
def test_half_precision_layer_trains_close_to_reference(dtype, rtol):
    """Half-precision weights and data; elementwise work and accumulation in float32."""
    rng = np.random.default_rng(5)
    layer = DepthwiseConv2D(3, padding="same", activation="gelu", dtype=dtype, depthwise_regularizer="l2")
    x = _input(rng, layer, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    dy = rng.standard_normal(y.shape).astype(dtype)
    ref = reference(layer, x, dy, "gelu", kernel_reg=ref_l1l2(0.0, 0.01))
    _assert_close(y, ref["y"], rtol, "output")
    dx = layer.backward(dy)
    assert dx.dtype == dtype and layer.gradients["bias"].dtype == dtype
    _assert_close(dx, ref["dx"], 2.5 * rtol, "input gradient")
    _assert_close(layer.gradients["depthwise_kernel"], ref["dk"], 2.5 * rtol, "kernel gradient")
    _assert_close(layer.gradients["bias"], ref["db"], 2.5 * rtol, "bias gradient")
    layer.apply_gradients(0.1)
    assert layer.depthwise_kernel.dtype == dtype


def test_no_bias():
    rng = np.random.default_rng(2)
    layer = DepthwiseConv2D(2, use_bias=False, dtype="float64", activation="elu")
    x = _input(rng, layer)
    y = layer(x)
    assert layer.bias is None and len(layer.get_weights()) == 1
    dy = rng.standard_normal(y.shape)
    layer.backward(dy)
    assert set(layer.gradients) == {"depthwise_kernel"}
    ref = reference(layer, x, dy, "elu")
    _assert_close(layer.gradients["depthwise_kernel"], ref["dk"], 1e-6)


def test_fused_and_unfused_paths_agree():
    """relu through the fused kernel equals relu applied afterwards by a callable."""
    rng = np.random.default_rng(4)
    fused = DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu6", dtype="float64",
                            bias_initializer=initializers.RandomNormal(stddev=3.0, seed=4))
    x = _input(rng, fused) * 4
    y = fused(x)

    def relu6(z):
        return np.clip(z, 0, 6)

    relu6.gradient = lambda z, y, dy: np.where((z > 0) & (z < 6), dy, 0.0)
    unfused = DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation=relu6, dtype="float64")
    unfused.build(x.shape)
    unfused.set_weights(fused.get_weights())
    np.testing.assert_array_equal(unfused(x), y)
    assert ((y == 0) | (y == 6)).any() and ((y > 0) & (y < 6)).any()  # both kinks and the slope are exercised
    dy = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(fused.backward(dy), unfused.backward(dy))
    np.testing.assert_array_equal(fused.gradients["depthwise_kernel"], unfused.gradients["depthwise_kernel"])


# --------------------------------------------------------------------------- training and constraints

def ref_constraint(name, w):
    eps = 1e-7
    norms = lambda axis: np.sqrt(np.square(w).sum(axis=axis, keepdims=True))  # noqa: E731
    if name == "max_norm":
        n = norms(0)
        return w * np.clip(n, 0, 2) / (eps + n)
    if name == "unit_norm":
        return w / (eps + norms(0))
    if name == "min_max_norm":
        n = norms(0)
        return w * np.clip(n, 0.0, 1.0) / (eps + n)
    if name == "non_neg":
        return np.maximum(w, 0)
    if name == "max_norm_filters":
        n = norms((0, 1))
        return w * np.clip(n, 0, 0.5) / (eps + n)
    if name == "min_max_norm_rate":
        n = norms(1)
        return w * (0.5 * np.clip(n, 1.0, 3.0) + 0.5 * n) / (eps + n)
    raise KeyError(name)


CONSTRAINT_CASES = {
    "max_norm": "max_norm",
    "unit_norm": "UnitNorm",
    "min_max_norm": "min_max_norm",
    "non_neg": "non_neg",
    "max_norm_filters": {"module": "keras.constraints", "class_name": "MaxNorm",
                         "config": {"max_value": 0.5, "axis": [0, 1]}, "registered_name": None},
    "min_max_norm_rate": {"class_name": "MinMaxNorm",
                          "config": {"min_value": 1.0, "max_value": 3.0, "rate": 0.5, "axis": 1}},
}


# Cases whose axes exist on the 1-D bias as well; the others constrain the kernel only.
BIAS_CASES = ("max_norm", "unit_norm", "min_max_norm", "non_neg")


@pytest.mark.parametrize("case", sorted(CONSTRAINT_CASES))
def test_apply_gradients_is_sgd_then_every_constraint(case):
    rng = np.random.default_rng(9)
    layer = DepthwiseConv2D(3, depth_multiplier=2, dtype="float64", activation="sigmoid",
                            depthwise_constraint=CONSTRAINT_CASES[case],
                            bias_constraint=CONSTRAINT_CASES[case] if case in BIAS_CASES else None,
                            depthwise_initializer=initializers.RandomNormal(stddev=1.0, seed=5))
    x = _input(rng, layer, h=5, w=5)
    y = layer(x)
    layer.backward(rng.standard_normal(y.shape))
    kernel, bias = layer.get_weights()
    grads = dict(layer.gradients)
    layer.apply_gradients(0.3)
    stepped_bias = bias - 0.3 * grads["bias"]
    expected_bias = ref_constraint(case, stepped_bias) if case in BIAS_CASES else stepped_bias
    np.testing.assert_allclose(layer.bias, expected_bias, rtol=1e-12, atol=1e-15)
    expected_kernel = ref_constraint(case, kernel - 0.3 * grads["depthwise_kernel"])
    np.testing.assert_allclose(layer.depthwise_kernel, expected_kernel, rtol=1e-12, atol=1e-15)
    assert not np.allclose(expected_kernel, kernel - 0.3 * grads["depthwise_kernel"])  # the constraint acted


def test_constraint_keras_default_axis_is_zero():
    """Keras's norm constraints default to axis=0, also for a depthwise kernel."""
    for name in ("max_norm", "unit_norm", "min_max_norm"):
        assert constraints.get(name).get_config()["axis"] == 0
    w = np.random.default_rng(0).standard_normal((3, 3, 2, 2)) * 5
    out = constraints.get("unit_norm")(w)
    np.testing.assert_allclose(np.sqrt((out ** 2).sum(axis=0)), 1.0, rtol=1e-6)


def test_training_lowers_a_loss():
    """A few SGD steps towards a target made by a hidden layer reduce the squared error."""
    rng = np.random.default_rng(12)
    teacher = DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="tanh", dtype="float64",
                              depthwise_initializer=initializers.RandomNormal(stddev=0.5, seed=1))
    student = DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="tanh", dtype="float64",
                              depthwise_initializer=initializers.GlorotUniform(seed=2))
    x = rng.standard_normal((8, 7, 7, 3))
    target = teacher(x)
    errors = []
    for _ in range(30):
        y = student(x)
        errors.append(float(((y - target) ** 2).sum()))
        student.backward(2 * (y - target))
        student.apply_gradients(0.01)
    assert errors[-1] < 0.2 * errors[0]


def test_non_trainable_layer_is_not_updated():
    layer = DepthwiseConv2D(2, trainable=False, depthwise_regularizer="l2", dtype="float64")
    x = np.ones((1, 3, 3, 2))
    y = layer(x)
    layer.backward(np.ones_like(y))
    before = layer.get_weights()
    layer.apply_gradients(1.0)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- weights and shapes

def test_weights_build_and_keras_order():
    layer = DepthwiseConv2D((3, 2), depth_multiplier=4, dtype="float64")
    assert not layer.built and layer.get_weights() == []
    layer.build((None, 9, 9, 5))
    kernel, bias = layer.get_weights()
    assert kernel.shape == (3, 2, 5, 4) and bias.shape == (20,)
    assert layer.kernel is layer.depthwise_kernel
    new_kernel = np.arange(kernel.size, dtype=np.float64).reshape(kernel.shape)
    layer.set_weights([new_kernel, np.ones(20)])
    np.testing.assert_array_equal(layer.depthwise_kernel, new_kernel)
    new_kernel[0, 0, 0, 0] = -1  # set_weights copies
    assert layer.depthwise_kernel[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match=r"weight 0 \(depthwise_kernel\) must have shape \(3, 2, 5, 4\)"):
        layer.set_weights([np.zeros((3, 2, 4, 4)), np.ones(20)])
    with pytest.raises(ValueError, match=r"weight 1 \(bias\) must have shape \(20,\)"):
        layer.set_weights([np.zeros((3, 2, 5, 4)), np.ones(5)])
    with pytest.raises(ValueError, match="expects 2 arrays"):
        layer.set_weights([np.zeros((3, 2, 5, 4))])


def test_set_weights_builds_an_unbuilt_layer():
    layer = DepthwiseConv2D(3, data_format="channels_first", dtype="float32")
    layer.set_weights([np.ones((3, 3, 4, 1)), np.zeros(4)])
    assert layer.built and layer.input_channels == 4 and layer.depthwise_kernel.dtype == np.float32
    assert layer(np.ones((1, 4, 5, 5), np.float32)).shape == (1, 4, 3, 3)


def test_builds_on_first_call_and_checks_channels():
    layer = DepthwiseConv2D(1)
    layer(np.ones((1, 2, 2, 3), np.float32))
    assert layer.built and layer.depthwise_kernel.shape == (1, 1, 3, 1)
    with pytest.raises(ValueError, match="input has 4 channels .* built for 3"):
        layer(np.ones((1, 2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="expected a 4-D input"):
        layer(np.ones((2, 2, 3), np.float32))


@pytest.mark.parametrize("kwargs, input_shape, expected", [
    (dict(kernel_size=3), (None, 10, 10, 3), (None, 8, 8, 3)),
    (dict(kernel_size=3, padding="same", strides=2, depth_multiplier=2), (4, 7, 10, 3), (4, 4, 5, 6)),
    (dict(kernel_size=(3, 5), dilation_rate=2), (2, 9, 12, 1), (2, 5, 4, 1)),
    (dict(kernel_size=3, data_format="channels_first", depth_multiplier=3), (None, 2, 6, None), (None, 6, 4, None)),
    (dict(kernel_size=2, strides=(1, 3), padding="same"), (1, 5, 7, 2), (1, 5, 3, 2)),
])
def test_compute_output_shape_matches_keras(kwargs, input_shape, expected):
    layer = DepthwiseConv2D(**kwargs)
    assert layer.compute_output_shape(input_shape) == expected
    if None not in input_shape[1:]:
        x = np.zeros(tuple(1 if d is None else d for d in input_shape), np.float32)
        assert layer(x).shape == tuple(1 if d is None else d for d in expected)


# --------------------------------------------------------------------------- configs

# What Keras 3 (3.5+) writes for
#   keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, activation="relu6",
#       depthwise_initializer=keras.initializers.HeNormal(seed=7),
#       depthwise_regularizer=keras.regularizers.L2(0.001),
#       depthwise_constraint=keras.constraints.MaxNorm(3.0), name="dw").get_config()
KERAS3_CONFIG = {
    "name": "dw",
    "trainable": True,
    "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None},
    "depth_multiplier": 2,
    "kernel_size": (3, 3),
    "strides": (2, 2),
    "padding": "same",
    "data_format": "channels_last",
    "dilation_rate": (1, 1),
    "activation": "relu6",
    "use_bias": True,
    "depthwise_initializer": {"module": "keras.initializers", "class_name": "HeNormal", "config": {"seed": 7},
                              "registered_name": None},
    "bias_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "depthwise_regularizer": {"module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.001},
                              "registered_name": None},
    "bias_regularizer": None,
    "activity_regularizer": None,
    "depthwise_constraint": {"module": "keras.constraints", "class_name": "MaxNorm",
                             "config": {"max_value": 3.0, "axis": 0}, "registered_name": None},
    "bias_constraint": None,
}

# What tf.keras 2.x writes (no module keys, Keras 2 extras such as groups).
KERAS2_CONFIG = {
    "name": "depthwise_conv2d_3", "trainable": True, "dtype": "float32", "batch_input_shape": [None, 32, 32, 8],
    "kernel_size": [5, 5], "strides": [1, 1], "padding": "valid", "data_format": "channels_first",
    "dilation_rate": [2, 2], "groups": 1, "activation": "swish", "use_bias": False,
    "bias_initializer": {"class_name": "Zeros", "config": {}},
    "bias_regularizer": None, "activity_regularizer": {"class_name": "L1", "config": {"l1": 0.004}},
    "bias_constraint": None, "depth_multiplier": 1,
    "depthwise_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
    "depthwise_regularizer": None, "depthwise_constraint": {"class_name": "NonNeg", "config": {}},
}


def test_from_keras3_config():
    layer = DepthwiseConv2D.from_config(KERAS3_CONFIG)
    assert (layer.name, layer.kernel_size, layer.strides, layer.padding, layer.depth_multiplier) == \
        ("dw", (3, 3), (2, 2), "same", 2)
    assert layer.dtype == np.float32 and layer.data_format == "channels_last"
    assert layer.activation is activations.get("relu6") and activations.is_fusable(layer.activation)
    assert layer.depthwise_initializer == initializers.HeNormal(seed=7)
    assert layer.depthwise_regularizer == regularizers.L2(0.001)
    assert layer.depthwise_constraint == constraints.MaxNorm(3.0, axis=0)
    assert layer.bias_regularizer is None and layer.bias_constraint is None
    config = layer.get_config()
    for key, value in KERAS3_CONFIG.items():  # and it writes Keras's config back
        if key != "dtype":
            assert config[key] == value, key
    assert config["dtype"] == "float32"
    json.dumps(config)


def test_from_keras2_config():
    layer = DepthwiseConv2D.from_config(KERAS2_CONFIG)
    assert layer.kernel_size == (5, 5) and layer.dilation_rate == (2, 2) and layer.data_format == "channels_first"
    assert layer.activation is activations.get("silu") and not layer.use_bias
    assert layer.activity_regularizer == regularizers.L1(0.004)
    assert layer.depthwise_constraint == constraints.NonNeg()
    assert layer.compute_output_shape((None, 8, 32, 32)) == (None, 8, 24, 24)


def test_config_round_trips():
    layer = DepthwiseConv2D((3, 1), strides=(1, 2), padding="same", depth_multiplier=3, data_format="channels_first",
                            activation="gelu", use_bias=True, depthwise_initializer="lecun_uniform",
                            bias_initializer=initializers.Constant(0.25), depthwise_regularizer="l1_l2",
                            bias_regularizer="l2", activity_regularizer=regularizers.L1(0.5),
                            depthwise_constraint="unit_norm", bias_constraint=constraints.MinMaxNorm(0.1, 2.0, 0.5),
                            name="round", dtype="float64", trainable=False)
    config = layer.get_config()
    again = DepthwiseConv2D.from_config(json.loads(json.dumps(config)))  # JSON turns tuples into lists
    assert again.get_config() == config
    assert set(config) >= set(KERAS3_CONFIG)


def test_config_round_trips_user_callables_in_process():
    def act(z):
        return z * 2

    layer = DepthwiseConv2D(2, activation=act, depthwise_regularizer=lambda w: 0.0)
    config = layer.get_config()
    assert config["activation"] is act
    assert DepthwiseConv2D.from_config(config).activation is act


def test_from_config_rejects_what_it_cannot_honour():
    with pytest.raises(ValueError, match="groups=2"):
        DepthwiseConv2D.from_config(dict(KERAS2_CONFIG, groups=2))
    with pytest.raises(TypeError, match="unexpected keyword argument 'units'"):
        DepthwiseConv2D.from_config(dict(KERAS3_CONFIG, units=3))
    with pytest.raises(ValueError, match="mixed-precision"):
        DepthwiseConv2D.from_config(dict(KERAS3_CONFIG, dtype={"module": "keras", "class_name": "DTypePolicy",
                                                               "config": {"name": "mixed_float16"}}))
    with pytest.raises(ValueError, match="custom Keras object"):
        DepthwiseConv2D.from_config(dict(KERAS3_CONFIG, depthwise_regularizer={
            "module": None, "class_name": "MyReg", "config": {}, "registered_name": "Custom>MyReg"}))


def test_repr_is_readable():
    layer = DepthwiseConv2D(3, depth_multiplier=2, activation="relu", depthwise_regularizer="l2", name="dw1")
    text = repr(layer)
    assert text.startswith("DepthwiseConv2D(name='dw1', kernel_size=(3, 3)")
    assert "activation='relu'" in text and "depthwise_regularizer=L2(l2=0.01)" in text and "not built" in text
    layer.build((None, 4, 4, 5))
    assert "built for 5 input channels: depthwise_kernel (3, 3, 5, 2), bias (10,)" in repr(layer)


def test_default_names_are_unique():
    a, b = DepthwiseConv2D(1), DepthwiseConv2D(1)
    assert a.name != b.name and a.name.startswith("depthwise_conv2d") and b.name.startswith("depthwise_conv2d")


# --------------------------------------------------------------------------- data_format from keras.json

def test_data_format_none_reads_keras_json(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert DepthwiseConv2D(3).data_format == "channels_last"  # no file
    (tmp_path / "keras.json").write_text(json.dumps({"image_data_format": "channels_first", "floatx": "float64"}))
    layer = DepthwiseConv2D(3)
    assert layer.data_format == "channels_first"
    assert DepthwiseConv2D(3, dtype=None).dtype == np.float64  # dtype=None is Keras's floatx
    assert layer.compute_output_shape((None, 2, 5, 5)) == (None, 2, 3, 3)
    assert DepthwiseConv2D(3, data_format="channels_last").data_format == "channels_last"
    (tmp_path / "keras.json").write_text("{not json")  # Keras ignores a broken file
    assert DepthwiseConv2D(3).data_format == "channels_last"
    (tmp_path / "keras.json").write_text(json.dumps({"image_data_format": "NCHW"}))
    with pytest.raises(ValueError, match="image_data_format in .*keras.json"):
        DepthwiseConv2D(3)


def test_data_format_default_location(tmp_path, monkeypatch):
    """Without KERAS_HOME, Keras's file is ~/.keras/keras.json."""
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keras_objects.keras_dir() == os.path.join(str(tmp_path), ".keras")
    assert DepthwiseConv2D(3).data_format == "channels_last"
    (tmp_path / ".keras").mkdir()
    (tmp_path / ".keras" / "keras.json").write_text(json.dumps({"image_data_format": "channels_first"}))
    assert DepthwiseConv2D(3).data_format == "channels_first"


# --------------------------------------------------------------------------- registries

def test_registries_know_keras_names():
    for name in ["linear", "relu", "relu6", "leaky_relu", "elu", "selu", "sigmoid", "hard_sigmoid", "tanh",
                 "softplus", "softsign", "swish", "silu", "gelu", "exponential", "hard_silu", "hard_swish", "mish",
                 "softmax", "log_softmax"]:
        assert callable(activations.get(name)) and callable(getattr(activations.get(name), "gradient"))
    assert activations.get(None) is activations.get("linear")
    assert activations.get({"module": "builtins", "class_name": "function", "config": "tanh",
                            "registered_name": "function"}) is activations.get("tanh")
    for name in ["glorot_uniform", "GlorotUniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform",
                 "lecun_normal", "zeros", "ones", "constant", "random_normal", "random_uniform", "truncated_normal",
                 "variance_scaling", "orthogonal", "uniform", "normal", "one", "zero"]:
        assert isinstance(initializers.get(name), initializers.Initializer), name
    assert regularizers.get("l1") == regularizers.L1(0.01) and regularizers.get("L2") == regularizers.L2(0.01)
    assert regularizers.get("l1l2") == regularizers.L1L2(0.0, 0.0)  # Keras 3's L1L2() defaults
    assert regularizers.get("l1_l2") == regularizers.L1L2(0.01, 0.01)
    for name, cls in [("non_neg", constraints.NonNeg), ("max_norm", constraints.MaxNorm),
                      ("min_max_norm", constraints.MinMaxNorm), ("unit_norm", constraints.UnitNorm)]:
        assert type(constraints.get(name)) is cls
    assert constraints.get("max_norm").get_config() == {"max_value": 2, "axis": 0}


@pytest.mark.parametrize("module, kind, known", [
    (activations, "activation", "gelu"), (initializers, "initializer", "glorot_uniform"),
    (regularizers, "regularizer", "l1_l2"), (constraints, "constraint", "max_norm")])
def test_unknown_names_list_the_known_ones(module, kind, known):
    with pytest.raises(ValueError, match=f"unknown {kind} 'nope'; known {kind}s: .*{known}"):
        module.get("nope")
    with pytest.raises(ValueError, match=f"unknown {kind} 'Nope'"):
        module.get({"class_name": "Nope", "config": {}})
    with pytest.raises(TypeError, match=f"{kind} must be None, a name"):
        module.get(3.5)


def test_regularizer_factors_are_checked():
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="l2: expected a non-negative float"):
            regularizers.L2(bad)
    with pytest.raises(TypeError, match="does not match its arguments"):
        regularizers.get({"class_name": "L2", "config": {"l1": 0.1}})


# --------------------------------------------------------------------------- initializers

SHAPE = (3, 3, 64, 32)  # a depthwise kernel: fan_in = 9 * 64, fan_out = 9 * 32
FAN_IN, FAN_OUT = 9 * 64, 9 * 32


def test_fans_of_a_depthwise_kernel():
    assert initializers.compute_fans(SHAPE) == (FAN_IN, FAN_OUT)
    assert initializers.compute_fans((5,)) == (5, 5) and initializers.compute_fans((4, 7)) == (4, 7)
    assert initializers.compute_fans(()) == (1, 1)


UNIFORM = {"glorot_uniform": 6 / (FAN_IN + FAN_OUT), "he_uniform": 6 / FAN_IN, "lecun_uniform": 3 / FAN_IN}
NORMAL = {"glorot_normal": 2 / (FAN_IN + FAN_OUT), "he_normal": 2 / FAN_IN, "lecun_normal": 1 / FAN_IN}


@pytest.mark.parametrize("name", sorted(UNIFORM))
def test_uniform_initializer_bounds_and_variance(name):
    limit = math.sqrt(UNIFORM[name])  # limit**2 / 3 is the variance
    w = initializers.get({"class_name": name, "config": {"seed": 1}})(SHAPE, "float64")
    assert w.shape == SHAPE and np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    assert w.var() == pytest.approx(limit ** 2 / 3, rel=0.04)  # 5 standard errors of the estimate
    assert abs(w.mean()) < 5 * limit / math.sqrt(3 * w.size)


@pytest.mark.parametrize("name", sorted(NORMAL))
def test_truncated_normal_initializer_bounds_and_variance(name):
    variance = NORMAL[name]
    w = initializers.get(name)(SHAPE, "float64")
    sigma = math.sqrt(variance) / .87962566103423978  # before truncation at two sigma
    assert np.abs(w).max() <= 2 * sigma and np.abs(w).max() > 1.95 * sigma
    assert w.var() == pytest.approx(variance, rel=0.06)


def test_variance_scaling_modes_and_distributions():
    vs = initializers.VarianceScaling(scale=3.0, mode="fan_out", distribution="untruncated_normal", seed=0)
    w = vs(SHAPE, "float64")
    assert w.var() == pytest.approx(3.0 / FAN_OUT, rel=0.06) and np.abs(w).max() > 3 * math.sqrt(3.0 / FAN_OUT)
    assert initializers.VarianceScaling(distribution="normal").distribution == "truncated_normal"
    w = initializers.VarianceScaling(0.5, "fan_avg", "uniform", seed=1)((4,), "float64")  # 1-D: fans are 4
    assert np.abs(w).max() <= math.sqrt(3 * 0.5 / 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        initializers.VarianceScaling(mode="fan")
    with pytest.raises(ValueError, match="scale must be a positive float"):
        initializers.VarianceScaling(scale=0)


def test_simple_initializers():
    rng_stats = initializers.RandomUniform(-2.0, 1.0, seed=3)((100000,), "float64")
    assert rng_stats.min() >= -2.0 and rng_stats.max() < 1.0 and rng_stats.mean() == pytest.approx(-0.5, abs=0.02)
    w = initializers.RandomNormal(mean=1.0, stddev=0.5, seed=3)((100000,), "float64")
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.std() == pytest.approx(0.5, rel=0.02)
    w = initializers.TruncatedNormal(mean=-1.0, stddev=0.1, seed=3)((100000,), "float64")
    assert np.abs(w + 1.0).max() <= 0.2 and w.std() == pytest.approx(0.1 * .87962566103423978, rel=0.02)
    assert (initializers.get("constant")((2, 2)) == 0).all() and initializers.Constant(2.5)((3,)).tolist() == [2.5] * 3
    assert (initializers.get("ones")((2,), "float16") == 1).all()
    q = initializers.Orthogonal(seed=0)((3, 3, 4, 6), "float64").reshape(36, 6)
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-12)
    with pytest.raises(ValueError, match="2-D"):
        initializers.Identity()((3, 3, 2, 1))


def test_initializer_seeds_are_reproducible():
    a = initializers.GlorotUniform(seed=5)(SHAPE)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, initializers.GlorotUniform(seed=5)(SHAPE))
    assert not np.array_equal(a, initializers.GlorotUniform(seed=6)(SHAPE))
    unseeded = initializers.GlorotUniform()
    np.testing.assert_array_equal(unseeded(SHAPE), unseeded(SHAPE))  # Keras 3: same values at every call
    assert not np.array_equal(unseeded(SHAPE), initializers.GlorotUniform()(SHAPE))
    l1 = DepthwiseConv2D(3, depthwise_initializer=initializers.HeUniform(seed=1))
    l2 = DepthwiseConv2D(3, depthwise_initializer={"class_name": "HeUniform", "config": {"seed": 1}})
    l1.build((1, 5, 5, 4))
    l2.build((1, 5, 5, 4))
    np.testing.assert_array_equal(l1.depthwise_kernel, l2.depthwise_kernel)
    with pytest.raises(ValueError, match="seed must be an integer"):
        initializers.HeUniform(seed=1.5)


def test_bfloat16_weights():
    layer = DepthwiseConv2D(3, dtype="bfloat16", depthwise_initializer="glorot_normal")
    layer.build((1, 5, 5, 2))
    assert layer.depthwise_kernel.dtype == ml_dtypes.bfloat16


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int or a tuple/list of 2 ints"),
    (dict(kernel_size="3"), ValueError, "kernel_size must be an int"),
    (dict(kernel_size=3, strides=2, dilation_rate=2), ValueError, "strides > 1 cannot be combined"),
    (dict(kernel_size=3, padding="causal"), ValueError, "padding must be 'valid' or 'same'"),
    (dict(kernel_size=3, depth_multiplier=0), ValueError, "depth_multiplier must be a positive integer"),
    (dict(kernel_size=3, data_format="NHWC"), ValueError, "data_format must be one of"),
    (dict(kernel_size=3, dtype="int32"), TypeError, "dtype must be one of"),
    (dict(kernel_size=3, use_bias="yes"), TypeError, "use_bias must be a bool"),
    (dict(kernel_size=3, activation="rellu"), ValueError, "unknown activation 'rellu'; known activations"),
    (dict(kernel_size=3, backend="tpu"), ValueError, "backend must be"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DepthwiseConv2D(**kwargs)


def test_training_errors():
    layer = DepthwiseConv2D(2)
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        layer.backward(np.zeros((1, 1, 1, 1)))
    with pytest.raises(RuntimeError, match="call backward"):
        layer.apply_gradients(0.1)
    y = layer(np.ones((1, 3, 3, 2), np.float32))
    with pytest.raises(ValueError, match=r"dy must have the output's shape \(1, 2, 2, 2\)"):
        layer.backward(np.ones((1, 2, 2, 3), np.float32))


def test_callable_activation_without_derivative_fails_at_backward():
    layer = DepthwiseConv2D(2, activation=lambda z: z ** 3)
    y = layer(np.ones((1, 3, 3, 2), np.float32))  # the forward works
    with pytest.raises(TypeError, match=r"has no derivative; .* gradient\(x, y, dy\) attribute"):
        layer.backward(np.ones_like(y))


def test_callable_regularizer_without_gradient_fails_at_backward():
    layer = DepthwiseConv2D(2, depthwise_regularizer=lambda w: float((w ** 4).sum()))
    y = layer(np.ones((1, 3, 3, 2), np.float32))
    assert len(layer.losses) == 1
    with pytest.raises(TypeError, match=r"depthwise_regularizer .* has no gradient; .* gradient\(x\)"):
        layer.backward(np.ones_like(y))


def test_callable_activation_and_regularizer_with_gradients_train():
    def cube(z):
        return z ** 3

    cube.gradient = lambda z, y, dy: 3 * z ** 2 * dy

    class Quartic:
        def __call__(self, w):
            return float((w ** 4).sum())

        def gradient(self, w):
            return 4 * w ** 3

    rng = np.random.default_rng(1)
    layer = DepthwiseConv2D(2, activation=cube, depthwise_regularizer=Quartic(), dtype="float64")
    x = _input(rng, layer, h=4, w=4)
    y = layer(x)
    dy = rng.standard_normal(y.shape)
    layer.backward(dy)
    k = layer.depthwise_kernel
    z = naive.tf_forward(x, k, [1, 1, 1, 1], "VALID")
    expected = naive.tf_backprop_filter(x, k.shape, 3 * z ** 2 * dy, [1, 1, 1, 1], "VALID") + 4 * k ** 3
    _assert_close(layer.gradients["depthwise_kernel"], expected, 1e-10)


# --------------------------------------------------------------------------- device arrays

_DEVICE_SCRIPT = textwrap.dedent("""
    import sys, types
    import numpy as np
    from numba import cuda
    from nbdw import backends, cpu
    from nbdw.layers import DepthwiseConv2D

    try:
        backends.load("cuda")
        label = "nbdw.cuda"
    except Exception:
        # Stand-in: the CPU kernels behind device-array inputs and outputs, so that the layer's
        # device plumbing (kinds, uploads, results) runs under the simulator.
        fake = types.ModuleType("fake_cuda")
        host = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)
        fake.unavailable_reason = lambda: None
        fake.as_array = lambda obj, name: obj
        fake.forward = lambda x, f, g, out=None, bias=None, activation="linear": cuda.to_device(
            cpu.forward(host(x), host(f), g, None, None if bias is None else host(bias), activation))
        fake.backprop_input = lambda f, dy, g, out=None: cuda.to_device(cpu.backprop_input(host(f), host(dy), g))
        fake.backprop_filter = lambda x, dy, g, out=None: cuda.to_device(cpu.backprop_filter(host(x), host(dy), g))
        sys.modules["fake_cuda"] = fake
        backends.BACKENDS["cuda"] = "fake_cuda"
        label = "stand-in"

    rng = np.random.default_rng(0)
    for activation, fmt in (("relu", "channels_last"), ("gelu", "channels_first")):
        kw = dict(kernel_size=3, padding="same", depth_multiplier=2, activation=activation, data_format=fmt,
                  activity_regularizer="l2", depthwise_regularizer="l1", dtype="float64")
        host_layer = DepthwiseConv2D(**kw)
        dev_layer = DepthwiseConv2D(**kw, backend="cuda")
        x = rng.standard_normal((2, 5, 5, 3) if fmt == "channels_last" else (2, 3, 5, 5))
        host_layer.build(x.shape)
        dev_layer.set_weights(host_layer.get_weights())
        y = host_layer(x)
        y_dev = dev_layer(cuda.to_device(x))
        assert hasattr(y_dev, "copy_to_host"), type(y_dev)
        np.testing.assert_allclose(y_dev.copy_to_host(), y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dev_layer.losses, host_layer.losses, rtol=1e-12)
        dy = rng.standard_normal(y.shape)
        dx = host_layer.backward(dy)
        dx_dev = dev_layer.backward(cuda.to_device(dy))
        assert hasattr(dx_dev, "copy_to_host"), type(dx_dev)
        np.testing.assert_allclose(dx_dev.copy_to_host(), dx, rtol=1e-12, atol=1e-12)
        for key in host_layer.gradients:
            assert isinstance(dev_layer.gradients[key], np.ndarray)
            np.testing.assert_allclose(dev_layer.gradients[key], host_layer.gradients[key], rtol=1e-12, atol=1e-12)
    print("device path ok with", label)
""")


def test_device_arrays_in_device_arrays_out_under_the_simulator():
    """Numba device arrays (CUDA simulator) in and out; gradients as NumPy; same numbers as on the host."""
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device path ok" in result.stdout


# --------------------------------------------------------------------------- Keras itself, when installed

def test_matches_keras_when_installed():
    keras = pytest.importorskip("keras", reason="Keras is not installed; this comparison is optional")
    rng = np.random.default_rng(0)
    k_layer = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, activation="gelu",
                                           depthwise_regularizer=keras.regularizers.L2(0.01),
                                           activity_regularizer=keras.regularizers.L1(0.01))
    x = rng.standard_normal((2, 9, 9, 3)).astype(np.float32)
    y_keras = np.asarray(k_layer(x))
    layer = DepthwiseConv2D.from_config(k_layer.get_config())
    layer.set_weights([np.asarray(w) for w in k_layer.get_weights()])
    np.testing.assert_allclose(layer(x), y_keras, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.losses, [float(v) for v in k_layer.losses], rtol=1e-5)


def test_initializer_fan_axes_of_newer_keras():
    """Keras >= 3.12 writes input_axes/output_axes into initializer configs (found against Keras 3.15)."""
    from nbdw import initializers

    assert initializers.compute_fans((3, 3, 8, 2), input_axes=[0, 1, 2], output_axes=[3]) == (72, 2)
    init = initializers.get({"class_name": "GlorotUniform", "config": {"seed": 1, "input_axes": None,
                                                                       "output_axes": None}})
    assert init.variance((3, 3, 8, 2)) == pytest.approx(1.0 / ((72 + 18) / 2))
    init = initializers.get({"class_name": "HeNormal", "config": {"seed": 1, "input_axes": [0, 1],
                                                                  "output_axes": [3]}})
    assert init.variance((3, 3, 8, 2)) == pytest.approx(2.0 / 9)
    assert init.get_config()["input_axes"] == [0, 1]
