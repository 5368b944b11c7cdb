"""Hypothesis strategies for depthwise-convolution configurations (shared by the test modules)."""

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64)]


@st.composite
def conv_configs(draw, max_batch=3, max_size=9, max_channels=5, max_multiplier=3, max_taps=4,
                 max_stride=3, max_dilation=3, allow_empty_batch=True):
    """A valid configuration: shapes plus TF-style 4-element strides/dilations and padding.

    Returns a dict with data_format, input_shape, filter_shape, strides, dilations, padding.
    """
    data_format = draw(st.sampled_from(["NHWC", "NCHW"]))
    n = draw(st.integers(0 if allow_empty_batch else 1, max_batch))
    c = draw(st.integers(1, max_channels))
    m = draw(st.integers(1, max_multiplier))
    kh, kw = draw(st.integers(1, max_taps)), draw(st.integers(1, max_taps))
    sh, sw = draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride))
    dh, dw = draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation))
    kind = draw(st.sampled_from(["SAME", "VALID", "EXPLICIT"]))
    pads = ((0, 0), (0, 0))
    if kind == "EXPLICIT":
        pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
    sizes = []
    for k, d, (lo, hi) in ((kh, dh, pads[0]), (kw, dw, pads[1])):
        eff = (k - 1) * d + 1
        least = 1 if kind == "SAME" else max(1, eff - lo - hi)
        sizes.append(draw(st.integers(least, max(least, max_size))))
    h, w = sizes
    if data_format == "NHWC":
        input_shape, strides, dilations = (n, h, w, c), [1, sh, sw, 1], [1, dh, dw, 1]
        padding = kind if kind != "EXPLICIT" else [[0, 0], list(pads[0]), list(pads[1]), [0, 0]]
    else:
        input_shape, strides, dilations = (n, c, h, w), [1, 1, sh, sw], [1, 1, dh, dw]
        padding = kind if kind != "EXPLICIT" else [[0, 0], [0, 0], list(pads[0]), list(pads[1])]
    return dict(data_format=data_format, input_shape=input_shape, filter_shape=(kh, kw, c, m),
                strides=strides, dilations=dilations, padding=padding)


def random_array(rng, shape, dtype):
    """Standard-normal data rounded to ``dtype`` (so the float64 reference sees the same values)."""
    return rng.standard_normal(shape).astype(dtype)
