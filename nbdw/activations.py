"""Keras 3's activations, each with its exact derivative.

Every activation is an :class:`Activation`: calling it applies the function (with Keras's
default arguments, which is what a layer's ``activation="<name>"`` means), and
``gradient(x, y, dy)`` returns the gradient with respect to its input ``x``, given the
output ``y = f(x)`` and the gradient ``dy`` with respect to the output. Both work on NumPy
and CuPy arrays (:func:`nbdw.arrays.array_namespace`).

Definitions follow Keras 3 (``keras.src.activations`` and the NumPy backend's ``nn``).
Derivatives at kinks follow TensorFlow's gradient kernels: ``relu'(0) = 0``,
``relu6'`` is 1 on the open interval (0, 6), ``leaky_relu'(0)`` is the negative slope,
``elu'(0) = 1``, ``hard_sigmoid'`` is 1/6 on the open interval (-3, 3).

``softmax`` and ``log_softmax`` act along the last axis, as Keras's do (for
``channels_first`` that is the width axis, as in Keras).

A user-supplied activation is any callable; to train through it give it a
``gradient(x, y, dy)`` attribute with the meaning above.
"""

from __future__ import annotations

import math

import numpy as np

from . import keras_objects, spec
from .arrays import array_namespace

__all__ = ["Activation", "get", "serialize", "ACTIVATIONS", "is_fusable"]

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_LEAKY_SLOPE = 0.2


class Activation:
    """A named activation: ``f(x)`` and ``gradient(x, y, dy)``."""

    def __init__(self, name, function, gradient, doc):
        self.name = name
        self.__name__ = name
        self._function = function
        self._gradient = gradient
        self.__doc__ = doc

    def __call__(self, x):
        return self._function(x, array_namespace(x))

    def gradient(self, x, y, dy):
        """Gradient with respect to ``x`` of ``sum(f(x) * dy)``, given ``y = f(x)``."""
        return self._gradient(x, y, dy, array_namespace(x))

    def __repr__(self):
        return f"<activation {self.name!r}>"


def _c(value, x):
    """A Python constant as a scalar of ``x``'s dtype, so float32 work stays float32."""
    return x.dtype.type(value)


def _sigmoid(x, xp):
    e = xp.exp(-xp.abs(x))  # never overflows
    one = _c(1, x)
    return xp.where(x >= 0, one / (one + e), e / (one + e))


_erf_ufunc = None


def _erf_scalar(v):
    return math.erf(v)



def _erf(x, xp):
    if xp is not np:
        from cupyx.scipy.special import erf

        return erf(x)
    global _erf_ufunc
    if _erf_ufunc is None:  # compiled on first use: NumPy has no erf and SciPy is not required
        from numba import vectorize

        _erf_ufunc = vectorize(["float32(float32)", "float64(float64)"], cache=True)(_erf_scalar)
    return _erf_ufunc(x)


def _softplus(x, xp):
    return xp.logaddexp(x, _c(0, x))


def _hard_sigmoid(x, xp):
    return xp.clip(x / _c(6, x) + _c(0.5, x), _c(0, x), _c(1, x))


def _softmax(x, xp):
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def _log_softmax(x, xp):
    shifted = x - xp.max(x, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def _elu(x, xp, alpha):
    # expm1 of min(x, 0): the branch that is thrown away never overflows
    return xp.where(x >= 0, x, _c(alpha, x) * xp.expm1(xp.minimum(x, _c(0, x))))


_DEFINITIONS = {
    # name: (f(x, xp), gradient(x, y, dy, xp), doc)
    "linear": (lambda x, xp: x,
               lambda x, y, dy, xp: dy,
               "x"),
    "relu": (lambda x, xp: xp.maximum(x, _c(0, x)),
             lambda x, y, dy, xp: xp.where(x > 0, dy, _c(0, dy)),
             "max(x, 0)"),
    "relu6": (lambda x, xp: xp.minimum(xp.maximum(x, _c(0, x)), _c(6, x)),
              lambda x, y, dy, xp: xp.where((x > 0) & (x < 6), dy, _c(0, dy)),
              "min(max(x, 0), 6)"),
    "leaky_relu": (lambda x, xp: xp.where(x > 0, x, _c(_LEAKY_SLOPE, x) * x),
                   lambda x, y, dy, xp: xp.where(x > 0, dy, _c(_LEAKY_SLOPE, dy) * dy),
                   "x if x > 0 else 0.2 * x"),
    "elu": (lambda x, xp: _elu(x, xp, 1.0),
            lambda x, y, dy, xp: xp.where(x >= 0, dy, dy * (y + _c(1, y))),
            "x if x >= 0 else exp(x) - 1"),
    "selu": (lambda x, xp: _c(_SELU_SCALE, x) * _elu(x, xp, _SELU_ALPHA),
             lambda x, y, dy, xp: xp.where(x >= 0, _c(_SELU_SCALE, dy) * dy,
                                           dy * (y + _c(_SELU_SCALE * _SELU_ALPHA, y))),
             "scale * elu(x, alpha), alpha = 1.6732632423543772, scale = 1.0507009873554805"),
    "sigmoid": (_sigmoid,
                lambda x, y, dy, xp: dy * y * (_c(1, y) - y),
                "1 / (1 + exp(-x))"),
    "hard_sigmoid": (_hard_sigmoid,
                     lambda x, y, dy, xp: xp.where((x > -3) & (x < 3), dy / _c(6, dy), _c(0, dy)),
                     "clip(x / 6 + 0.5, 0, 1)"),
    "tanh": (lambda x, xp: xp.tanh(x),
             lambda x, y, dy, xp: dy * (_c(1, y) - y * y),
             "tanh(x)"),
    "softplus": (_softplus,
                 lambda x, y, dy, xp: dy * _sigmoid(x, xp),
                 "log(exp(x) + 1)"),
    "softsign": (lambda x, xp: x / (_c(1, x) + xp.abs(x)),
                 lambda x, y, dy, xp: dy / (_c(1, x) + xp.abs(x)) ** 2,
                 "x / (abs(x) + 1)"),
    "silu": (lambda x, xp: x * _sigmoid(x, xp),
             lambda x, y, dy, xp: dy * _silu_slope(x, xp),
             "x * sigmoid(x) (alias: swish)"),
    "gelu": (lambda x, xp: _c(0.5, x) * x * (_c(1, x) + _erf(x / _c(_SQRT_2, x), xp)),
             lambda x, y, dy, xp: dy * (_c(0.5, x) * (_c(1, x) + _erf(x / _c(_SQRT_2, x), xp))
                                        + x * _c(_INV_SQRT_2PI, x) * xp.exp(-_c(0.5, x) * x * x)),
             "x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))) (Keras's default, approximate=False)"),
    "exponential": (lambda x, xp: xp.exp(x),
                    lambda x, y, dy, xp: dy * y,
                    "exp(x)"),
    "hard_silu": (lambda x, xp: x * _hard_sigmoid(x, xp),
                  lambda x, y, dy, xp: dy * xp.where(x >= 3, _c(1, x),
                                                     xp.where(x > -3, (_c(2, x) * x + _c(3, x)) / _c(6, x),
                                                              _c(0, x))),
                  "x * hard_sigmoid(x) (alias: hard_swish)"),
    "mish": (lambda x, xp: x * xp.tanh(_softplus(x, xp)),
             lambda x, y, dy, xp: dy * _mish_slope(x, xp),
             "x * tanh(softplus(x))"),
    "softmax": (_softmax,
                lambda x, y, dy, xp: y * (dy - xp.sum(dy * y, axis=-1, keepdims=True)),
                "exp(x) / sum(exp(x)) along the last axis"),
    "log_softmax": (_log_softmax,
                    lambda x, y, dy, xp: dy - xp.exp(y) * xp.sum(dy, axis=-1, keepdims=True),
                    "x - log(sum(exp(x))) along the last axis"),
}


def _silu_slope(x, xp):
    s = _sigmoid(x, xp)
    return s * (_c(1, x) + x * (_c(1, x) - s))


def _mish_slope(x, xp):
    t = xp.tanh(_softplus(x, xp))
    return t + x * (_c(1, x) - t * t) * _sigmoid(x, xp)


#: name -> :class:`Activation`, Keras 3's names and aliases.
ACTIVATIONS = {name: Activation(name, f, g, doc) for name, (f, g, doc) in _DEFINITIONS.items()}
ACTIVATIONS["swish"] = ACTIVATIONS["silu"]
ACTIVATIONS["hard_swish"] = ACTIVATIONS["hard_silu"]


def get(identifier):
    """An activation from ``None`` (linear), a name, a Keras config dict or a callable.

    Raises ``ValueError`` for an unknown name, listing the known ones.
    """
    if identifier is None:
        return ACTIVATIONS["linear"]
    return keras_objects.get("activation", identifier, ACTIVATIONS)


def _builtin_name(activation):
    if isinstance(activation, Activation) and ACTIVATIONS.get(activation.name) is activation:
        return activation.name
    return None


def serialize(activation):
    """A built-in activation's name (as Keras 3 writes it); a user's callable as itself."""
    return keras_objects.serialize(activation, _builtin_name)


def is_fusable(activation) -> bool:
    """Whether the forward kernels can apply ``activation`` in their store (bias + clamp)."""
    return _builtin_name(activation) in spec.FUSED_ACTIVATIONS
