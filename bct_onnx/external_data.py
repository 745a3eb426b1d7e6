"""External data of a loaded model: checked once up front, and each data file memory-mapped once.

onnx-ir maps the whole data file again for every tensor that lives in it (a 90 MB model of 100
tensors takes 9 GB of address space and fails under a ``ulimit -v``); ``share_file_maps`` swaps
the model's external tensors for ones that share one read-only map per file.
``check_external_data`` turns every bad reference (absolute, escaping the model's folder, a symlink
out of it, past the end of the file, a length that does not match the tensor) into one error naming
the tensor and the file, before anything reads the data.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from bct_onnx.errors import InvalidModelError

# Types onnx-ir stores packed below one byte: left to onnx-ir's own loader (which unpacks them).
_SUB_BYTE_BITS = (2, 4, 6)


def external_tensors(model: ir.Model) -> Iterator[tuple[ir.Value, ir.ExternalTensor]]:
    """(initializer value, its external tensor) for every initializer stored in an external file."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value, value.const_value


def check_external_data(model: ir.Model, model_file: Path) -> None:
    """Raise InvalidModelError on the first external-data reference that cannot be read safely."""
    folder = Path(os.path.normpath(model_file.parent.absolute()))
    real_folder = folder.resolve()
    sizes: dict[Path, int] = {}
    for _, tensor in external_tensors(model):
        location = str(tensor.location)
        where = f"{model_file}: tensor {tensor.name!r} stores its data in {location!r}"
        if os.path.isabs(location):
            raise InvalidModelError(f"{where}, an absolute path; external data must be relative to the model's folder")
        path = Path(os.path.normpath(Path(tensor.base_dir).absolute() / location))
        if not _inside(path, folder):
            raise InvalidModelError(f"{where}, outside the model's folder {folder}")
        resolved = path.resolve()
        if not _inside(resolved, real_folder):
            raise InvalidModelError(f"{where}, a link to {resolved} outside the model's folder {folder}")
        if not resolved.is_file():
            raise InvalidModelError(f"{where}, which does not exist or is not a regular file")
        size = sizes.setdefault(resolved, resolved.stat().st_size)
        offset = tensor.offset or 0
        try:
            expected = tensor.nbytes
        except TypeError as exc:  # a dtype without a fixed width (STRING) cannot live in external data
            raise InvalidModelError(f"{where}, but its dtype {tensor.dtype} cannot be stored there") from exc
        length = tensor.length if tensor.length is not None else expected
        if offset < 0 or length < 0:
            raise InvalidModelError(f"{where} at a negative offset or length ({offset}, {length})")
        if length != expected:
            raise InvalidModelError(
                f"{where} with length {length} bytes, but its dtype and dims {list(tensor.shape.numpy())} need {expected}"
            )
        if offset + length > size:
            raise InvalidModelError(
                f"{where} at bytes {offset}..{offset + length}, past the end of the file ({size} bytes)"
            )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class _FileMaps:
    """One read-only map per data file, shared by every tensor of one loaded model."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, path: str) -> mmap.mmap:
        key = os.path.realpath(path)
        found = self._maps.get(key)
        if found is None or found.closed:
            with open(key, "rb") as file:
                found = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[key] = found
        return found

    def __len__(self) -> int:
        return len(self._maps)


class SharedMapTensor(ir.ExternalTensor):
    """An ExternalTensor that reads through its model's shared map of the data file."""

    def __init__(self, *args: Any, file_maps: _FileMaps, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._file_maps = file_maps

    def _load(self) -> None:
        if self.size == 0 or self.dtype.bitwidth in _SUB_BYTE_BITS:
            super()._load()
            return
        self._check_validity()
        self._check_path_containment()
        self.raw = self._file_maps.get(self.path)
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        array = np.frombuffer(self.raw, dtype=dtype, offset=self.offset or 0, count=self.size)
        self._array = array.reshape(self.shape.numpy())

    def release(self) -> None:
        """Drop this tensor's view; the shared map stays open for the other tensors."""
        self._array = None
        self.raw = None


def share_file_maps(model: ir.Model) -> int:
    """Make the model's external tensors share one map per data file; return how many were swapped."""
    file_maps = _FileMaps()
    swapped = 0
    for value, tensor in list(external_tensors(model)):
        if isinstance(tensor, SharedMapTensor):
            continue
        value.const_value = SharedMapTensor(
            tensor.location,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=tensor.name or value.name or "",
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
            base_dir=tensor.base_dir,
            file_maps=file_maps,
        )
        swapped += 1
    return swapped
