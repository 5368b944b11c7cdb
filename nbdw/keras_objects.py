"""How Keras names, serializes and configures things, in one place.

* :func:`get` turns an identifier (``None``, a registered name, a Keras-serialized config
  dict, a class or a callable) into an object, as ``keras.<kind>.get`` does;
* :func:`serialize` writes an object back in Keras 3's serialized form;
* :class:`KerasObject` is the small base class (``get_config``/``from_config``, ``repr``,
  equality) of nbdw's initializers, regularizers and constraints;
* :func:`keras_config`, :func:`image_data_format` and :func:`floatx` read Keras's own
  settings file, ``$KERAS_HOME/keras.json`` (default ``~/.keras/keras.json``).

Both serialized forms are accepted: Keras 2's ``{"class_name": ..., "config": {...}}`` and
Keras 3's, which adds ``"module"`` and ``"registered_name"``. Keras 3 writes a plain function
(an activation) as ``{"class_name": "function", "config": "<name>", ...}``.
"""

from __future__ import annotations

import inspect
import json
import os

__all__ = [
    "KerasObject",
    "get",
    "serialize",
    "keras_dir",
    "keras_config",
    "image_data_format",
    "floatx",
    "DATA_FORMATS",
]

DATA_FORMATS = ("channels_last", "channels_first")


class KerasObject:
    """Base of nbdw's Keras-compatible objects: a config of constructor arguments.

    Subclasses set ``keras_module`` (where Keras keeps the class, written into serialized
    configs) and implement :meth:`get_config` returning their constructor arguments.
    """

    keras_module = "keras"

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config):
        try:
            return cls(**config)
        except TypeError as error:  # an argument this class does not have
            raise TypeError(f"{cls.__name__} config {config!r} does not match its arguments: {error}") from None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), repr(self)))


def _unknown(kind, name, registry):
    known = ", ".join(sorted(registry))
    return ValueError(f"unknown {kind} {name!r}; known {kind}s: {known}")


def _instantiate(kind, name, entry):
    """A registry entry (a class, a factory or an object) as an object."""
    if inspect.isclass(entry) or getattr(entry, "_nbdw_factory", False):
        return entry()
    return entry


def get(kind: str, identifier, registry: dict):
    """Resolve ``identifier`` for ``kind`` ("activation", "initializer", ...) against ``registry``.

    Parameters
    ----------
    kind : str
        Used in error messages.
    identifier : None, str, dict, class or callable
        ``None`` gives ``None``. A string is looked up (case-sensitively, as in Keras). A dict
        is a Keras-serialized config. A class is instantiated with its defaults; any other
        callable is returned unchanged.
    registry : dict
        Name -> class, zero-argument factory (marked ``_nbdw_factory``) or ready object.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    TypeError
        For an identifier of another type, or a config that does not match the class.
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        if identifier not in registry:
            raise _unknown(kind, identifier, registry)
        return _instantiate(kind, identifier, registry[identifier])
    if isinstance(identifier, dict):
        return _deserialize(kind, identifier, registry)
    if inspect.isclass(identifier):
        return identifier()
    if callable(identifier):
        return identifier
    raise TypeError(
        f"{kind} must be None, a name, a Keras config dict or a callable, got {identifier!r} "
        f"({type(identifier).__name__})")


def _deserialize(kind, config, registry):
    if "class_name" not in config:
        raise ValueError(f"{kind} config dict must have a 'class_name' key, got {config!r}")
    class_name = config["class_name"]
    inner = config.get("config", {})
    registered = config.get("registered_name")
    if class_name == "function":  # Keras 3's form for a plain function such as an activation
        if not isinstance(inner, str):
            raise ValueError(f"{kind} config of a function must name it in 'config', got {config!r}")
        return get(kind, inner, registry)
    entry = registry.get(class_name)
    if entry is None:
        if registered not in (None, class_name):
            raise ValueError(
                f"{kind} {class_name!r} is a custom Keras object (registered as {registered!r}); nbdw cannot "
                f"import Keras custom objects, pass an equivalent callable instead. Known {kind}s: "
                f"{', '.join(sorted(registry))}")
        raise _unknown(kind, class_name, registry)
    if not inspect.isclass(entry):
        if inner not in ({}, None):
            raise ValueError(f"{kind} {class_name!r} takes no config, got {inner!r}")
        return _instantiate(kind, class_name, entry)
    if inner is None:
        inner = {}
    if not isinstance(inner, dict):
        raise TypeError(f"{kind} {class_name!r} config must be a dict, got {inner!r}")
    return entry.from_config(dict(inner))


def serialize(obj, name_of=None):
    """``obj`` in Keras 3's serialized form.

    ``None`` stays ``None``. A :class:`KerasObject` becomes
    ``{"module", "class_name", "config", "registered_name": None}``. ``name_of(obj)`` may give
    a registered name to write instead (activations are written as their name, as in Keras 3).
    Anything else (a user's callable) is returned as is: it round-trips through
    ``from_config`` in the same process but is not JSON-serializable.
    """
    if obj is None:
        return None
    if name_of is not None:
        name = name_of(obj)
        if name is not None:
            return name
    if isinstance(obj, KerasObject):
        return {"module": obj.keras_module, "class_name": type(obj).__name__,
                "config": obj.get_config(), "registered_name": None}
    return obj


# ---------------------------------------------------------------------------
# Keras's settings file
# ---------------------------------------------------------------------------

def keras_dir() -> str:
    """Keras's directory: ``$KERAS_HOME``, else ``~/.keras`` (``/tmp/.keras`` if home is read-only)."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    base = os.path.expanduser("~")
    if not os.access(base, os.W_OK):
        base = "/tmp"
    return os.path.join(base, ".keras")


def keras_config() -> dict:
    """The contents of ``keras.json`` in :func:`keras_dir`, or ``{}`` if it is absent or unreadable.

    Read at each call (Keras reads it once, at import), so a test or a notebook can point
    ``KERAS_HOME`` elsewhere. A file that is not valid JSON is ignored, as Keras ignores it.
    """
    path = os.path.join(keras_dir(), "keras.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def image_data_format() -> str:
    """Keras's default ``data_format``: ``image_data_format`` in keras.json, else ``"channels_last"``."""
    value = keras_config().get("image_data_format", "channels_last")
    if value not in DATA_FORMATS:
        raise ValueError(
            f"image_data_format in {os.path.join(keras_dir(), 'keras.json')} must be one of {DATA_FORMATS}, "
            f"got {value!r}")
    return value


def floatx() -> str:
    """Keras's default float type: ``floatx`` in keras.json, else ``"float32"``."""
    return keras_config().get("floatx", "float32")
