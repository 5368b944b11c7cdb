"""Keras 3's weight initializers, drawing with NumPy.

Formulas, defaults and names follow ``keras.src.initializers`` (Keras 3):

* fans (:func:`compute_fans`): for a kernel of shape ``(..., in, out)`` the receptive field is
  the product of the leading dimensions, ``fan_in = in * receptive_field`` and
  ``fan_out = out * receptive_field``. For a depthwise kernel ``(kh, kw, C, M)`` that is
  ``fan_in = kh * kw * C`` and ``fan_out = kh * kw * M``, exactly as Keras computes it.
* :class:`VarianceScaling`: ``scale /= max(1, n)`` with ``n`` the fan of ``mode``; uniform
  draws in ``[-sqrt(3 * scale), sqrt(3 * scale)]``; ``"truncated_normal"`` draws a normal of
  stddev ``sqrt(scale) / .87962566103423978`` truncated at two stddevs (so that the truncated
  distribution has variance ``scale``); ``"untruncated_normal"`` has stddev ``sqrt(scale)``.
* Glorot = VarianceScaling(1, fan_avg); He = (2, fan_in); Lecun = (1, fan_in); each in a
  uniform and a truncated-normal flavour.

Seeds: an initializer with an integer seed, or with none, returns the same values at every
call (Keras 3's rule; without a seed, the seed is drawn once when the initializer is made).
The numbers differ from Keras's, whose random generators are its backends'.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import keras_objects

__all__ = [
    "Initializer", "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal",
    "VarianceScaling", "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform",
    "LecunNormal", "Orthogonal", "Identity", "compute_fans", "get", "serialize", "INITIALIZERS",
]

#: stddev of a standard normal truncated to [-2, 2] (Keras's constant).
TRUNCATED_NORMAL_STDDEV = .87962566103423978


def compute_fans(shape, input_axes=None, output_axes=None):
    """``(fan_in, fan_out)`` of a weight shape, as Keras computes them.

    With both ``input_axes`` and ``output_axes`` given (Keras >= 3.12), the fans are the
    products of those axes instead.
    """
    shape = tuple(shape)
    if input_axes is not None and output_axes is not None:
        return int(np.prod([shape[a] for a in input_axes])), int(np.prod([shape[a] for a in output_axes]))
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), int(shape[0])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    receptive_field = 1
    for dim in shape[:-2]:
        receptive_field *= dim
    return int(shape[-2] * receptive_field), int(shape[-1] * receptive_field)


def _check_seed(seed):
    if seed is not None and (not isinstance(seed, (numbers.Integral, np.integer)) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    return None if seed is None else int(seed)


def _as_dtype(values, dtype):
    return np.asarray(values).astype(np.float32 if dtype is None else dtype)


class Initializer(keras_objects.KerasObject):
    """Base class: ``initializer(shape, dtype=None)`` returns a NumPy array (float32 by default)."""

    keras_module = "keras.initializers"

    def __call__(self, shape, dtype=None):
        raise NotImplementedError


class Zeros(Initializer):
    """All zeros."""

    def __call__(self, shape, dtype=None):
        return _as_dtype(np.zeros(shape), dtype)


class Ones(Initializer):
    """All ones."""

    def __call__(self, shape, dtype=None):
        return _as_dtype(np.ones(shape), dtype)


class Constant(Initializer):
    """All ``value`` (a scalar)."""

    def __init__(self, value=0.0):
        if not isinstance(value, (numbers.Real, np.floating, np.integer)) or isinstance(value, bool):
            raise ValueError(f"Constant value must be a real scalar, got {value!r}")
        self.value = value

    def __call__(self, shape, dtype=None):
        return _as_dtype(np.full(shape, float(self.value)), dtype)

    def get_config(self):
        return {"value": self.value}


class _Random(Initializer):
    def __init__(self, seed=None):
        self.seed = _check_seed(seed)
        # Without a seed, one is drawn now, so every call of this object gives the same values.
        self._draw_seed = self.seed if self.seed is not None else int(np.random.SeedSequence().entropy)

    def _rng(self):
        return np.random.default_rng(self._draw_seed)

    def get_config(self):
        return {"seed": self.seed}


def _truncated_normal(rng, shape, mean, stddev):
    """Normal draws, those more than two stddevs from the mean drawn again."""
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2
    return mean + stddev * z


class RandomNormal(_Random):
    """Normal draws with ``mean`` and ``stddev``."""

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean, self.stddev = mean, stddev
        super().__init__(seed)

    def __call__(self, shape, dtype=None):
        return _as_dtype(self._rng().normal(self.mean, self.stddev, shape), dtype)

    def get_config(self):
        return {"seed": self.seed, "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(_Random):
    """Normal draws with ``mean`` and ``stddev``, redrawn when more than two ``stddev`` from the mean."""

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean, self.stddev = mean, stddev
        super().__init__(seed)

    def __call__(self, shape, dtype=None):
        return _as_dtype(_truncated_normal(self._rng(), shape, self.mean, self.stddev), dtype)

    def get_config(self):
        return {"seed": self.seed, "mean": self.mean, "stddev": self.stddev}


class RandomUniform(_Random):
    """Uniform draws in ``[minval, maxval)``."""

    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        self.minval, self.maxval = minval, maxval
        super().__init__(seed)

    def __call__(self, shape, dtype=None):
        return _as_dtype(self._rng().uniform(self.minval, self.maxval, shape), dtype)

    def get_config(self):
        return {"seed": self.seed, "minval": self.minval, "maxval": self.maxval}


class VarianceScaling(_Random):
    """Draws whose variance is ``scale / n``, ``n`` the fan selected by ``mode`` (see the module doc)."""

    MODES = ("fan_in", "fan_out", "fan_avg")
    DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None,
                 input_axes=None, output_axes=None):
        if not isinstance(scale, (numbers.Real, np.floating)) or not scale > 0:
            raise ValueError(f"VarianceScaling scale must be a positive float, got {scale!r}")
        if mode not in self.MODES:
            raise ValueError(f"VarianceScaling mode must be one of {self.MODES}, got {mode!r}")
        dist = distribution.lower() if isinstance(distribution, str) else distribution
        if dist == "normal":  # Keras's alias
            dist = "truncated_normal"
        if dist not in self.DISTRIBUTIONS:
            raise ValueError(f"VarianceScaling distribution must be one of {self.DISTRIBUTIONS} or 'normal', "
                             f"got {distribution!r}")
        self.scale, self.mode, self.distribution = scale, mode, dist
        self.input_axes, self.output_axes = input_axes, output_axes
        super().__init__(seed)

    def variance(self, shape) -> float:
        """The variance of the draws for ``shape``: ``scale / max(1, n)``."""
        fan_in, fan_out = compute_fans(shape, self.input_axes, self.output_axes)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        return self.scale / max(1.0, n)

    def __call__(self, shape, dtype=None):
        variance = self.variance(shape)
        rng = self._rng()
        if self.distribution == "truncated_normal":
            values = _truncated_normal(rng, shape, 0.0, math.sqrt(variance) / TRUNCATED_NORMAL_STDDEV)
        elif self.distribution == "untruncated_normal":
            values = rng.normal(0.0, math.sqrt(variance), shape)
        else:
            limit = math.sqrt(3.0 * variance)
            values = rng.uniform(-limit, limit, shape)
        return _as_dtype(values, dtype)

    def get_config(self):
        return {"seed": self.seed, "scale": self.scale, "mode": self.mode, "distribution": self.distribution,
                **self._axes_config()}

    def _axes_config(self):
        # Keras >= 3.12 writes fan axes; left out when unset so older Keras configs round-trip as-is.
        if self.input_axes is None and self.output_axes is None:
            return {}
        return {"input_axes": self.input_axes, "output_axes": self.output_axes}


def _preset(name, scale, mode, distribution, doc):
    def __init__(self, seed=None, input_axes=None, output_axes=None):
        VarianceScaling.__init__(self, scale, mode, distribution, seed, input_axes, output_axes)

    def get_config(self):
        return {"seed": self.seed, **self._axes_config()}

    return type(name, (VarianceScaling,), {"__init__": __init__, "get_config": get_config, "__doc__": doc,
                                           "__module__": __name__})


GlorotUniform = _preset("GlorotUniform", 1.0, "fan_avg", "uniform",
                        "Uniform in [-limit, limit], limit = sqrt(6 / (fan_in + fan_out)).")
GlorotNormal = _preset("GlorotNormal", 1.0, "fan_avg", "truncated_normal",
                       "Truncated normal with stddev sqrt(2 / (fan_in + fan_out)) after truncation.")
HeUniform = _preset("HeUniform", 2.0, "fan_in", "uniform",
                    "Uniform in [-limit, limit], limit = sqrt(6 / fan_in).")
HeNormal = _preset("HeNormal", 2.0, "fan_in", "truncated_normal",
                   "Truncated normal with stddev sqrt(2 / fan_in) after truncation.")
LecunUniform = _preset("LecunUniform", 1.0, "fan_in", "uniform",
                       "Uniform in [-limit, limit], limit = sqrt(3 / fan_in).")
LecunNormal = _preset("LecunNormal", 1.0, "fan_in", "truncated_normal",
                      "Truncated normal with stddev sqrt(1 / fan_in) after truncation.")


class Orthogonal(_Random):
    """An orthogonal matrix (QR of normal draws, made unique by the signs of R's diagonal), times ``gain``.

    For more than two dimensions the matrix is ``(prod(shape[:-1]), shape[-1])``, reshaped.
    """

    def __init__(self, gain=1.0, seed=None):
        self.gain = gain
        super().__init__(seed)

    def __call__(self, shape, dtype=None):
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"Orthogonal needs a shape of at least two dimensions, got {shape}")
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        a = self._rng().standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return _as_dtype(self.gain * q.reshape(shape), dtype)

    def get_config(self):
        return {"seed": self.seed, "gain": self.gain}


class Identity(Initializer):
    """``gain`` times the identity matrix; two-dimensional shapes only (as in Keras)."""

    def __init__(self, gain=1.0):
        self.gain = gain

    def __call__(self, shape, dtype=None):
        if len(shape) != 2:
            raise ValueError(f"Identity can only initialize 2-D weights, got shape {tuple(shape)}")
        return _as_dtype(self.gain * np.eye(*shape), dtype)

    def get_config(self):
        return {"gain": self.gain}


def _snake(name):
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (name[i - 1].islower() or (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


_CLASSES = (Zeros, Ones, Constant, RandomNormal, RandomUniform, TruncatedNormal, VarianceScaling,
            GlorotUniform, GlorotNormal, HeUniform, HeNormal, LecunUniform, LecunNormal, Orthogonal, Identity)

#: Keras 3's names: class names, their snake_case forms and Keras's aliases.
INITIALIZERS = {cls.__name__: cls for cls in _CLASSES}
INITIALIZERS.update({_snake(cls.__name__): cls for cls in _CLASSES})
INITIALIZERS.update({"uniform": RandomUniform, "normal": RandomNormal, "one": Ones, "zero": Zeros,
                     "OrthogonalInitializer": Orthogonal, "orthogonal_initializer": Orthogonal,
                     "IdentityInitializer": Identity})


def get(identifier):
    """An initializer from ``None``, a name, a Keras config dict, a class or a callable."""
    return keras_objects.get("initializer", identifier, INITIALIZERS)


def serialize(initializer):
    return keras_objects.serialize(initializer)
