"""Keras 3's weight constraints: projections applied after each optimizer step.

Definitions and defaults follow ``keras.src.constraints`` (Keras 3). Norms are taken along
``axis`` (default 0, Keras's default whatever the layer), kept as size-1 axes, and divided
with Keras's ``epsilon()`` of 1e-7 added:

* ``MaxNorm(max_value=2, axis=0)``: ``w * clip(norm, 0, max_value) / (eps + norm)``;
* ``MinMaxNorm(min_value=0.0, max_value=1.0, rate=1.0, axis=0)``:
  ``w * (rate * clip(norm, min_value, max_value) + (1 - rate) * norm) / (eps + norm)``;
* ``UnitNorm(axis=0)``: ``w / (eps + norm)``;
* ``NonNeg()``: ``max(w, 0)``.

For a depthwise kernel ``(kh, kw, C, M)`` the default ``axis=0`` normalises along the kernel
rows only, as Keras does; pass ``axis=[0, 1]`` to constrain each 2-D filter.
A user-supplied constraint is any callable ``w -> projected w`` of the same shape.
"""

from __future__ import annotations

from . import keras_objects
from .arrays import array_namespace

__all__ = ["Constraint", "MaxNorm", "MinMaxNorm", "UnitNorm", "NonNeg", "get", "serialize", "CONSTRAINTS",
           "EPSILON"]

#: Keras's ``backend.epsilon()`` default.
EPSILON = 1e-7


def _axis(axis):
    return tuple(axis) if isinstance(axis, (list, tuple)) else axis


def _norms(w, axis, xp):
    return xp.sqrt(xp.sum(xp.square(w), axis=_axis(axis), keepdims=True))


class Constraint(keras_objects.KerasObject):
    """Base class: ``constraint(w)`` returns the projected weights (the identity here)."""

    keras_module = "keras.constraints"

    def __call__(self, w):
        return w


class MaxNorm(Constraint):
    """Rescale so that the norm along ``axis`` is at most ``max_value``."""

    def __init__(self, max_value=2, axis=0):
        self.max_value, self.axis = max_value, axis

    def __call__(self, w):
        xp = array_namespace(w)
        norms = _norms(w, self.axis, xp)
        desired = xp.clip(norms, 0, self.max_value)
        return w * (desired / (w.dtype.type(EPSILON) + norms))

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(Constraint):
    """Move the norm along ``axis`` towards ``[min_value, max_value]`` at ``rate``."""

    def __init__(self, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, axis

    def __call__(self, w):
        xp = array_namespace(w)
        norms = _norms(w, self.axis, xp)
        desired = self.rate * xp.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms
        return w * (desired / (w.dtype.type(EPSILON) + norms))

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate, "axis": self.axis}


class UnitNorm(Constraint):
    """Rescale to unit norm along ``axis``."""

    def __init__(self, axis=0):
        self.axis = axis

    def __call__(self, w):
        xp = array_namespace(w)
        return w / (w.dtype.type(EPSILON) + _norms(w, self.axis, xp))

    def get_config(self):
        return {"axis": self.axis}


class NonNeg(Constraint):
    """Clamp negative weights to zero."""

    def __call__(self, w):
        return array_namespace(w).maximum(w, w.dtype.type(0))


_CLASSES = (MaxNorm, MinMaxNorm, UnitNorm, NonNeg)

#: Keras 3's names: class names and their snake_case forms.
CONSTRAINTS = {cls.__name__: cls for cls in _CLASSES}
CONSTRAINTS.update({"max_norm": MaxNorm, "min_max_norm": MinMaxNorm, "unit_norm": UnitNorm, "non_neg": NonNeg})


def get(identifier):
    """A constraint from ``None``, a name, a Keras config dict, a class or a callable."""
    return keras_objects.get("constraint", identifier, CONSTRAINTS)


def serialize(constraint):
    return keras_objects.serialize(constraint)
