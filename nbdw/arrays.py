"""Array kinds for code that does elementwise work around the ops (the layer, activations).

The ops take NumPy arrays (CPU) and GPU arrays (CUDA). Elementwise work (an activation that
is not fused, a regularizer, a gradient) needs an array module: NumPy for host arrays and
CuPy for CuPy arrays. A Numba device array has no arithmetic, so when CuPy is not installed
that work runs on a host copy and the result goes back to the device.

:func:`array_namespace` answers "which module does arithmetic on this array";
:func:`kind_of` answers "how do I move arrays to and from the caller's kind".
"""

from __future__ import annotations

import numpy as np

__all__ = ["array_namespace", "kind_of", "ArrayKind"]


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _is_numba_device(a) -> bool:
    # numba.cuda DeviceNDArray, and the simulator's FakeCUDAArray (which has no
    # __cuda_array_interface__, so it is recognised by its host-copy method).
    return not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")


def array_namespace(a):
    """The module with NumPy's API that computes on ``a``: ``cupy`` for CuPy arrays, else ``numpy``."""
    if _is_cupy(a):
        import cupy

        return cupy
    return np


class ArrayKind:
    """How arrays of one kind (host, CuPy, Numba device) move around the layer.

    ``work(a)`` gives an array ``xp`` computes on (an op result or a caller's array);
    ``result(a)`` gives a working array back in the caller's kind; ``operand(a)`` puts a
    host array (a weight) where the ops can use it with this kind's inputs; ``to_host(a)``
    gives a NumPy array.
    """

    name = "host"
    xp = np
    device = False

    def work(self, a):
        return np.asarray(a)

    def result(self, a):
        return a

    def operand(self, a):
        return a

    def to_host(self, a):
        return np.asarray(a)


class _CupyKind(ArrayKind):
    name = "cupy"
    device = True

    def __init__(self, numba_results=False):
        import cupy

        self.xp = cupy
        self.numba_results = numba_results  # the caller passed Numba device arrays

    def work(self, a):
        return self.xp.asarray(a)  # zero-copy for any __cuda_array_interface__ object

    def result(self, a):
        a = self.xp.asarray(a)
        if self.numba_results:
            from numba import cuda

            return cuda.as_cuda_array(a)  # zero-copy view, so the caller gets its own kind back
        return a

    def operand(self, a):
        return self.xp.asarray(a)

    def to_host(self, a):
        return self.xp.asnumpy(self.xp.asarray(a)) if not isinstance(a, np.ndarray) else a


class _NumbaDeviceKind(ArrayKind):
    """Numba device arrays without CuPy: elementwise work runs on host copies."""

    name = "numba"
    device = True

    def work(self, a):
        return a.copy_to_host() if _is_numba_device(a) else np.asarray(a)

    def result(self, a):
        if isinstance(a, np.ndarray):
            from numba import cuda

            return cuda.to_device(np.ascontiguousarray(a))
        return a

    def operand(self, a):
        return self.result(a)

    def to_host(self, a):
        return self.work(a)


def kind_of(a) -> ArrayKind:
    """The :class:`ArrayKind` of the caller's array ``a``."""
    if _is_cupy(a):
        return _CupyKind()
    if _is_numba_device(a) or hasattr(a, "__cuda_array_interface__"):
        try:
            return _CupyKind(numba_results=_is_numba_device(a))
        except ImportError:
            if not _is_numba_device(a):
                raise TypeError(
                    f"{type(a).__name__} is a GPU array that is neither a Numba device array nor a CuPy "
                    "array; install CuPy, or pass a Numba device array") from None
            return _NumbaDeviceKind()
    return ArrayKind()
