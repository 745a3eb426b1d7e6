"""Load and save ONNX models through onnx-ir: external data (> 2 GB), atomic writes, clear errors.

Saving never leaves a half-written model behind: the model (and its external data file, when the
model is large) is written into a temporary directory next to the destination and moved into place
with ``os.replace``. The external data file is named after the output (``model.onnx`` ->
``model.onnx.data``) so two outputs in one directory never share one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError, EncodeError

from bct_onnx.errors import ModelFileError, OverwriteInputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
LARGE_MODEL_BYTES = 1_800_000_000
# With external data, tensors smaller than this stay inside the .onnx file (shapes, scalars).
EXTERNAL_TENSOR_MIN_BYTES = 1024
EXTERNAL_DATA_SUFFIX = ".data"

SaveCallback = Callable[[ir.TensorProtocol, ir.external_data.CallbackInfo], None]


def resolve_model_file(path: PathLike) -> Path:
    """The .onnx file ``path`` names: the file itself, or the single model inside a directory."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"input not found: {p}")
    if p.is_dir():
        candidates = sorted(c for c in p.glob("*.onnx") if c.is_file())
        if len(candidates) == 1:
            return candidates[0]
        if (p / "model.onnx").is_file():
            return p / "model.onnx"
        if not candidates:
            raise ModelFileError(f"directory {p} contains no .onnx model")
        names = ", ".join(c.name for c in candidates)
        raise ModelFileError(f"directory {p} contains several .onnx models ({names}); name one of them")
    return p


def external_data_files(model: ir.Model) -> set[Path]:
    """Absolute paths of the external data files the model's initializers refer to."""
    found: set[Path] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                found.add(Path(tensor.path).absolute())
    return found


def load(path: PathLike) -> ir.Model:
    """Load an ONNX model (a file, or a directory holding one) with its external data (memory-mapped).

    Raises ModelFileError naming the file when it is missing, not an ONNX model, or refers to
    external data files that do not exist.
    """
    file = resolve_model_file(path)
    try:
        model = ir.load(file)
    except DecodeError as exc:
        raise ModelFileError(f"{file} is not an ONNX model (cannot parse it: {exc})") from exc
    except (RuntimeError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{file} is not an ONNX model ({type(exc).__name__}: {exc})") from exc
    if model.graph is None or (len(model.graph) == 0 and not model.graph.outputs):
        # An empty or foreign file can parse as an empty ModelProto: protobuf accepts almost anything.
        raise ModelFileError(f"{file} is not an ONNX model (it parses to an empty graph)")
    missing = sorted(str(p) for p in external_data_files(model) if not p.is_file())
    if missing:
        raise ModelFileError(f"{file} refers to external data files that do not exist: {', '.join(missing)}")
    return model


def is_graphsurgeon_graph(model: object) -> bool:
    """True for an onnx_graphsurgeon Graph (checked by type, without importing graphsurgeon)."""
    kind = type(model)
    return kind.__name__ == "Graph" and kind.__module__.startswith("onnx_graphsurgeon")


def from_proto(model: Any) -> ir.Model:
    """An onnx-ir model from an onnx ModelProto or an onnx-graphsurgeon Graph (an ir.Model is returned
    as is). A graphsurgeon graph is converted at the edge, with gs.export_onnx."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if is_graphsurgeon_graph(model):
        import onnx_graphsurgeon as gs

        return ir.serde.deserialize_model(gs.export_onnx(model))
    raise TypeError(
        f"expected an onnx.ModelProto, an onnx_ir.Model or an onnx_graphsurgeon Graph, got {type(model).__name__}"
    )


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of all initializer data (what decides whether the model needs external data)."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def file_bytes(path: PathLike) -> int:
    """Size of a saved model: the .onnx file plus every external data file it refers to."""
    file = Path(path)
    proto = onnx.load(str(file), load_external_data=False)
    locations: set[Path] = set()
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        locations.add((file.parent / entry.value).resolve())
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return file.stat().st_size + sum(p.stat().st_size for p in locations)


def _same_file(a: Path, b: Path) -> bool:
    if a.absolute() == b.absolute():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: PathLike, protected: Iterable[PathLike]) -> None:
    """Refuse an output whose .onnx or external data file would replace one of ``protected``."""
    out = Path(output)
    targets = [out, external_data_path(out)]
    for guarded in protected:
        g = Path(guarded)
        for target in targets:
            if _same_file(target, g):
                what = "the input model" if target == out else f"external data file {target.name}"
                raise OverwriteInputError(
                    f"refusing to overwrite the input: output {out} would replace {what} ({g}); "
                    "choose another output path"
                )
    if out.exists() and out.is_dir():
        raise ModelFileError(f"output {out} is a directory; give a file path such as {out / 'model.onnx'}")


def external_data_path(output: PathLike) -> Path:
    """Where the external data of a model saved at ``output`` goes (``<output>.data``)."""
    out = Path(output)
    return out.with_name(out.name + EXTERNAL_DATA_SUFFIX)


@contextlib.contextmanager
def _tensors_in_memory(model: ir.Model) -> Iterator[None]:
    """Temporarily replace external initializers by in-memory copies, so a save inlines them."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def save(
    model: ir.Model,
    path: PathLike,
    *,
    external_data: bool | None = None,
    large_model_bytes: int = LARGE_MODEL_BYTES,
    size_threshold_bytes: int = EXTERNAL_TENSOR_MIN_BYTES,
    protected: Iterable[PathLike] = (),
    callback: SaveCallback | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; return the files written (.onnx first).

    external_data: True/False force it; None (default) uses external data when the initializers
    exceed ``large_model_bytes``. The data file is ``<path>.data``, tensors of at least
    ``size_threshold_bytes`` go there. ``protected`` files (the input) are never replaced.
    The model object is left as it was (external tensors keep pointing at their files).
    """
    out = Path(path)
    check_output_path(out, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    use_external = tensor_bytes(model) > large_model_bytes if external_data is None else external_data
    data_file = external_data_path(out)
    temp_dir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        temp_model = temp_dir / out.name
        if use_external:
            ir.save(
                model,
                temp_model,
                external_data=data_file.name,
                size_threshold_bytes=size_threshold_bytes,
                callback=callback,
            )
        else:
            with _tensors_in_memory(model):
                ir.save(model, temp_model)
        written = [out]
        temp_data = temp_dir / data_file.name
        if use_external and temp_data.exists():
            os.replace(temp_data, data_file)  # data first: the .onnx never points at missing data
            written.append(data_file)
        os.replace(temp_model, out)
    except EncodeError as exc:  # a single-file model over protobuf's 2 GB limit
        raise ModelFileError(
            f"cannot save {out} as one file ({tensor_bytes(model)} bytes of tensors exceed protobuf's "
            f"2 GB limit): save it with external data ({exc})"
        ) from exc
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    logger.info("saved %s (%s)", out, "with external data" if use_external else "single file")
    return written
