"""Read PyTorch ``.pth`` files (``torch.save``'s zip format) without PyTorch and without running
code from the file.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive::

    <archive>/data.pkl       the pickled object; tensors refer to storages by persistent id
                             ('storage', <torch.XStorage class>, key, location, numel)
    <archive>/data/<key>     the raw bytes of each storage (little-endian, see <archive>/byteorder)

A tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks[, metadata])``; state_dicts are ``collections.OrderedDict``.

:func:`load_pth` unpickles ``data.pkl`` with a restricted ``pickle.Unpickler``: those globals map
to NumPy builders, and every other global (e.g. a pickled yacs ``CfgNode`` config or optimizer
classes inside a training checkpoint) becomes an inert :class:`OpaqueObject` that only records
its arguments. Nothing from the file is imported or executed. Tensors come back as NumPy arrays
(bfloat16 as ``ml_dtypes.bfloat16``), always C-contiguous copies with the tensor's logical shape.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch storage class name -> element dtype (without byte order)
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("f8"),
    "FloatStorage": np.dtype("f4"),
    "HalfStorage": np.dtype("f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("i8"),
    "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}


class OpaqueObject(dict):
    """Stand-in for a pickled object of a class this reader does not know.

    Records the class name and whatever pickle hands it (constructor arguments, dict items,
    list items, state) so it can be inspected, but never runs the original class's code.
    """

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        self.args = args
        self.kwargs = kwargs
        self.items_ = []
        self.state = None

    def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ calls cls.__new__(cls, *args)
        return super().__new__(cls)

    def append(self, item: Any) -> None:
        self.items_.append(item)

    def extend(self, items: Any) -> None:
        self.items_.extend(items)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"OpaqueObject({self.qualname})"


def _opaque_class(module: str, name: str) -> type:
    return type(f"Opaque[{module}.{name}]", (OpaqueObject,), {"qualname": f"{module}.{name}"})


class _StorageType:
    """The value ``torch.XStorage`` unpickles to: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` for a NumPy 1-D storage: a strided view, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in rank")
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise ValueError(
            f"tensor (offset {storage_offset}, size {size}, stride {stride}) reaches element "
            f"{last}, outside its storage of {storage.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(st * storage.itemsize for st in stride),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused) -> np.ndarray:
    """``torch._utils._rebuild_parameter``: a Parameter is just its data here."""
    return data


_KNOWN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Maps only the torch/collections globals above; every other global is opaque."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _KNOWN_GLOBALS:
            return _KNOWN_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        return _opaque_class(module, name)

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            dtype = storage_type.dtype
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            needed = int(numel) * dtype.itemsize
            if len(raw) < needed:
                raise ValueError(
                    f"storage {key!r} has {len(raw)} bytes; expected {needed} ({numel} x {dtype})"
                )
            # Read as unsigned words of the file's byte order, then reinterpret natively (this
            # also works for bfloat16, which has no byte-order-aware NumPy dtype).
            words = np.frombuffer(
                raw, dtype=f"{self._byteorder}u{dtype.itemsize}", count=int(numel)
            )
            self._storages[key] = words.astype(f"=u{dtype.itemsize}", copy=False).view(dtype)
        return self._storages[key]


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(
            f"{path}: expected exactly one '<archive>/data.pkl' in a torch.save zip; "
            f"found {pickles or 'none'}"
        )
    return pickles[0][: -len("/data.pkl")]


def load_pth(path: str | os.PathLike) -> Any:
    """Loads a ``torch.save`` file (zip format) as nested Python containers of NumPy arrays.

    Args:
      path: a ``.pth`` / ``.pt`` file written by ``torch.save`` (PyTorch >= 1.6 default format).

    Returns:
      The saved object with every tensor replaced by a C-contiguous NumPy array (same dtype;
      bfloat16 as ``ml_dtypes.bfloat16``) and every unknown class by an :class:`OpaqueObject`.

    Raises:
      ValueError: not a torch zip file (e.g. the legacy pre-1.6 format), or a corrupt one.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a torch.save zip archive (legacy pre-1.6 files are not supported; "
            "re-save with torch.save(obj, f) from PyTorch >= 1.6)"
        )
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        names = set(archive.namelist())
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        with archive.open(f"{prefix}/data.pkl") as f:
            return _Unpickler(f, archive, prefix, byteorder).load()
