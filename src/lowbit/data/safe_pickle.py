"""Restricted unpickling for the few pickled dataset files we read.

Pickle runs code: any global reachable through ``find_class`` can be called while
loading. The dataset files we accept (MNIST ``mnist.pkl.gz``, CIFAR-10 python batches)
contain only tuples, lists, dicts, strings, numbers and numpy arrays, and a numpy array
needs exactly three globals: ``numpy.core.multiarray._reconstruct`` (spelled
``numpy._core.multiarray._reconstruct`` by numpy >= 2), ``numpy.ndarray`` and
``numpy.dtype``. :class:`RestrictedUnpickler` resolves those and refuses every other
global with :class:`pickle.UnpicklingError` before anything is called. Object arrays
(which could smuggle arbitrary values) are refused after loading as well.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "safe_load", "safe_loads"]

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

#: (module, name) -> object. Nothing else is ever resolved.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _reconstruct for m in _MULTIARRAY_MODULES},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


_HINTS = {
    ("_codecs", "encode"): " (Python 3 writes bytes this way with protocol 2: re-save the "
    "file with protocol 3 or 4)",
    ("numpy._core.numeric", "_frombuffer"): " (numpy writes arrays this way with protocol "
    "5: re-save the file with protocol 2 to 4)",
    ("numpy.core.numeric", "_frombuffer"): " (numpy writes arrays this way with protocol "
    "5: re-save the file with protocol 2 to 4)",
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves the numpy array-reconstruction globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            hint = _HINTS.get((module, name), "")
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy array "
                "reconstruction (numpy.core.multiarray._reconstruct, numpy.ndarray, "
                f"numpy.dtype) is allowed in dataset pickles{hint}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in dataset pickles")


def _check_no_object_arrays(obj: Any, depth: int = 0) -> None:
    if depth > 50:
        raise pickle.UnpicklingError("dataset pickle nests too deeply")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError("object arrays are not allowed in dataset pickles")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_no_object_arrays(k, depth + 1)
            _check_no_object_arrays(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        # long lists of ints (CIFAR labels) are common: only recurse into containers
        for v in obj:
            if isinstance(v, (np.ndarray, dict, list, tuple)):
                _check_no_object_arrays(v, depth + 1)


def safe_load(file: IO[bytes], *, encoding: str = "ASCII") -> Any:
    """Unpickle ``file`` with :class:`RestrictedUnpickler` (see the module docstring).

    ``encoding`` is passed to the unpickler for Python 2 ``str`` objects: ``"latin1"``
    for numpy-array pickles written by Python 2 (MNIST), ``"bytes"`` to keep them as
    ``bytes`` (CIFAR-10, whose dict keys then read ``b"data"``).
    """
    obj = RestrictedUnpickler(file, encoding=encoding).load()
    _check_no_object_arrays(obj)
    return obj


def safe_loads(data: bytes, *, encoding: str = "ASCII") -> Any:
    """:func:`safe_load` from a bytes object."""
    return safe_load(io.BytesIO(data), encoding=encoding)
