"""External data of a loaded model: checked once up front, then read tensor by tensor on demand.

onnx-ir maps the whole data file again for every tensor that lives in it (a 90 MB model of 100
tensors takes 9 GB of address space and fails under a ``ulimit -v``) and keeps every array it
read; ``stream_external_tensors`` swaps the model's external tensors for ones that read their
bytes with pread when asked and keep nothing, so a compile holds one weight at a time.
``check_external_data`` turns every bad reference (absolute, escaping the model's folder, a symlink
out of it, past the end of the file, a length that does not match the tensor) into one error naming
the tensor and the file, before anything reads the data.
"""

from __future__ import annotations

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


class StreamedTensor(ir.ExternalTensor):
    """An ExternalTensor read from its file on every access, never cached nor memory-mapped.

    onnx-ir's ExternalTensor maps its file and keeps the array: every weight a pass reads stays in
    the process (as file-backed resident pages) until the model is gone, so the peak RSS of a
    compile reaches the model's size. Here ``numpy()`` returns a fresh array (read with pread)
    that is freed once the caller drops it, and ``tofile`` (saving) copies inside the kernel.
    """

    def _read(self) -> np.ndarray:
        self._check_validity()
        self._check_path_containment()
        offset, length = self.offset or 0, self.length if self.length is not None else self.nbytes
        buffer = np.empty(length, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as file:
            done = 0
            while done < length:
                count = os.preadv(file.fileno(), [memoryview(buffer)[done:]], offset + done)
                if count <= 0:
                    raise OSError(f"external data file {self.path} ends before byte {offset + length} of {self.name!r}")
                done += count
        return buffer

    def _streamable(self) -> bool:
        return self.size > 0 and self.dtype.bitwidth not in _SUB_BYTE_BITS

    def numpy(self) -> np.ndarray:
        if not self._streamable():
            return super().numpy()
        dtype = np.dtype(self.dtype.numpy()).newbyteorder("<")
        return self._read().view(dtype).reshape(self.shape.numpy())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def tobytes(self) -> bytes:
        if not self._streamable():
            return super().tobytes()
        return self._read().tobytes()

    def release(self) -> None:
        """Nothing to drop: no array or map is kept (onnx-ir's release would close a map)."""
        if self._streamable():
            return
        super().release()


def stream_external_tensors(model: ir.Model) -> int:
    """Make the model's external tensors read on demand (StreamedTensor); return how many were swapped."""
    swapped = 0
    for value, tensor in list(external_tensors(model)):
        if isinstance(tensor, StreamedTensor):
            continue
        value.const_value = StreamedTensor(
            tensor.location,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=tensor.name or value.name or "",
            doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props),
            base_dir=tensor.base_dir,
        )
        swapped += 1
    return swapped
