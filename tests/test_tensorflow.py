"""Optional: nbdw against TensorFlow itself, when TensorFlow is installed (nothing requires it)."""

import numpy as np
import pytest
from hypothesis import given, settings

import nbdw
from strategies import conv_configs

tf = pytest.importorskip("tensorflow")


def _tf_can_run(cfg):
    """TensorFlow's CPU kernels refuse strides > 1 with dilations > 1, unequal strides, and NCHW."""
    fmt = cfg["data_format"]
    s = cfg["strides"][1:3] if fmt == "NHWC" else cfg["strides"][2:4]
    d = cfg["dilations"][1:3] if fmt == "NHWC" else cfg["dilations"][2:4]
    return (fmt == "NHWC" and not (max(s) > 1 and max(d) > 1) and s[0] == s[1]
            and cfg["input_shape"][0] > 0)


@settings(max_examples=60)
@given(cfg=conv_configs(allow_empty_batch=False))
def test_against_tensorflow(cfg):
    if not _tf_can_run(cfg):
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cfg["input_shape"])
    f = rng.standard_normal(cfg["filter_shape"])
    args = (cfg["strides"], cfg["padding"], cfg["data_format"])
    rate = cfg["dilations"][1:3]
    expected = tf.nn.depthwise_conv2d(x, f, *args, dilations=rate).numpy()
    got = nbdw.depthwise_conv2d(x, f, *args, dilations=rate)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    if isinstance(cfg["padding"], str) and cfg["dilations"] == [1, 1, 1, 1]:
        dy = rng.standard_normal(got.shape)
        tf_dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
            input_sizes=list(x.shape), filter=f, out_backprop=dy, strides=cfg["strides"], padding=cfg["padding"])
        tf_df = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
            input=x, filter_sizes=list(f.shape), out_backprop=dy, strides=cfg["strides"], padding=cfg["padding"])
        np.testing.assert_allclose(
            nbdw.depthwise_conv2d_native_backprop_input(x.shape, f, dy, *args), tf_dx.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(
            nbdw.depthwise_conv2d_native_backprop_filter(x, f.shape, dy, *args), tf_df.numpy(), rtol=1e-10, atol=1e-10)
