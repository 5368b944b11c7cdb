"""The backend registry: the one table that maps a backend name to its kernels.

A backend is a module exposing ``as_array(obj, name)``, ``forward``,
``backprop_input`` and ``backprop_filter`` (see :mod:`nbdw.cpu` for the
reference signatures). Modules are imported on first use, so ``import nbdw``
compiles nothing and does not need numba-cuda. Adding a backend means adding a
line here; the ops in :mod:`nbdw.ops` do not change.
"""

from __future__ import annotations

import importlib

#: name -> module implementing it, imported lazily.
BACKENDS = {
    "cpu": "nbdw.cpu",
    "cuda": "nbdw.cuda",
}


#: module path -> module, for the backends imported so far (an op looks its backend up on every call)
_IMPORTED = {}


class BackendUnavailableError(RuntimeError):
    """A known backend cannot run here (for example: no numba-cuda, or no GPU)."""


def _is_device_array(obj) -> bool:
    # Numba device arrays also mark themselves with __cuda_ndarray__; the CUDA simulator's
    # arrays carry only that mark, so "auto" dispatch works (and is tested) under the simulator.
    return hasattr(obj, "__cuda_array_interface__") or bool(getattr(obj, "__cuda_ndarray__", False))


def select(backend, *arrays) -> str:
    """Resolve ``backend`` (a name or ``"auto"``) for the given arguments."""
    if backend == "auto":
        return "cuda" if any(_is_device_array(a) for a in arrays) else "cpu"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    return backend


def load(name: str):
    """Import and return the module of backend ``name``.

    Raises :class:`BackendUnavailableError` with the backend's own explanation
    when it cannot run on this machine.
    """
    path = BACKENDS[name]
    module = _IMPORTED.get(path)
    if module is None:
        module = _IMPORTED[path] = importlib.import_module(path)
    # asked on every call: what a backend needs (a driver, a device) can go away
    reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    if reason:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return module


def available_backends() -> list:
    """Names of the backends that can run on this machine now."""
    names = []
    for name in BACKENDS:
        try:
            load(name)
        except (BackendUnavailableError, ImportError):
            continue
        names.append(name)
    return names
