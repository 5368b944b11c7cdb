"""Keras 3's weight and activity regularizers, each with its gradient.

``regularizer(x)`` is the penalty (a Python float, computed in float64) and
``regularizer.gradient(x)`` its gradient with respect to ``x`` (an array of ``x``'s kind and
dtype). Definitions and defaults follow ``keras.src.regularizers`` (Keras 3):

* ``L1(l1=0.01)``: ``l1 * sum(|x|)``, gradient ``l1 * sign(x)`` (0 at 0, as TensorFlow's);
* ``L2(l2=0.01)``: ``l2 * sum(x**2)``, gradient ``2 * l2 * x``;
* ``L1L2(l1=0.0, l2=0.0)``: both.

Names: ``"L1"``/``"l1"``, ``"L2"``/``"l2"``, ``"L1L2"``/``"l1l2"`` (Keras 3's registry, which
makes ``L1L2()`` with zero factors), and ``"l1_l2"``, which gives ``L1L2(l1=0.01, l2=0.01)``:
the factors Keras documents for the ``'l1_l2'`` string and ``tf.keras.regularizers.l1_l2``'s
defaults (Keras 3 itself does not register that string).

A user-supplied regularizer is any callable returning a scalar; to train with it give it a
``gradient(x)`` attribute returning the penalty's gradient.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import keras_objects
from .arrays import array_namespace

__all__ = ["Regularizer", "L1", "L2", "L1L2", "get", "serialize", "REGULARIZERS"]


def _factor(value, name):
    """Keras's check: a non-negative finite number."""
    if (not isinstance(value, (numbers.Real, np.floating, np.integer)) or isinstance(value, (bool, np.bool_))
            or math.isinf(value) or math.isnan(value) or value < 0):
        raise ValueError(
            f"Invalid value for argument {name}: expected a non-negative float. Received: {name}={value!r}")
    return float(value)


def _sum(values, xp):
    return float(xp.sum(values.astype(np.float64)))


class Regularizer(keras_objects.KerasObject):
    """Base class: ``__call__(x) -> float`` and ``gradient(x) -> array``."""

    keras_module = "keras.regularizers"

    def __call__(self, x):
        return 0.0

    def gradient(self, x):
        return array_namespace(x).zeros_like(x)


class L1L2(Regularizer):
    """``l1 * sum(|x|) + l2 * sum(x**2)``."""

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = _factor(0.0 if l1 is None else l1, "l1")
        self.l2 = _factor(0.0 if l2 is None else l2, "l2")

    def __call__(self, x):
        xp = array_namespace(x)
        penalty = 0.0
        if self.l1:
            penalty += self.l1 * _sum(xp.abs(x), xp)
        if self.l2:
            penalty += self.l2 * _sum(xp.square(x.astype(np.float64)), xp)
        return penalty

    def gradient(self, x):
        xp = array_namespace(x)
        grad = xp.zeros_like(x)
        if self.l1:
            grad = grad + x.dtype.type(self.l1) * xp.sign(x)
        if self.l2:
            grad = grad + x.dtype.type(2 * self.l2) * x
        return grad

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(L1L2):
    """``l1 * sum(|x|)``."""

    def __init__(self, l1=0.01):
        super().__init__(l1=0.01 if l1 is None else l1)

    def get_config(self):
        return {"l1": self.l1}


class L2(L1L2):
    """``l2 * sum(x**2)``."""

    def __init__(self, l2=0.01):
        super().__init__(l2=0.01 if l2 is None else l2)

    def get_config(self):
        return {"l2": self.l2}


def _l1_l2():
    return L1L2(l1=0.01, l2=0.01)


_l1_l2._nbdw_factory = True

#: Keras 3's names, plus ``"l1_l2"`` (see the module doc).
REGULARIZERS = {"L1": L1, "l1": L1, "L2": L2, "l2": L2, "L1L2": L1L2, "l1l2": L1L2, "l1_l2": _l1_l2}


def get(identifier):
    """A regularizer from ``None``, a name, a Keras config dict, a class or a callable."""
    return keras_objects.get("regularizer", identifier, REGULARIZERS)


def serialize(regularizer):
    return keras_objects.serialize(regularizer)
