"""Load and save ONNX models through onnx-ir: external data (> 2 GB), atomic writes, clear errors.

Saving never leaves a half-written model behind: the model (and its external data file, when the
model is large) is written into a temporary directory next to the destination and moved into place
with ``os.replace``. The external data file is named after the output (``model.onnx`` ->
``model.onnx.data``) so two outputs in one directory never share one.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError, EncodeError

from bct_onnx.errors import ModelFileError, OverwriteInputError
from bct_onnx.external_data import check_external_data, stream_external_tensors
from bct_onnx.inline_data import WireFormatError, detached_model_bytes, write_inline
from bct_onnx.signals import terminate_as_exception

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
LARGE_MODEL_BYTES = 1_800_000_000
# With external data, tensors smaller than this stay inside the .onnx file (shapes, scalars).
EXTERNAL_TENSOR_MIN_BYTES = 1024
EXTERNAL_DATA_SUFFIX = ".data"
# ONNX Runtime's session option naming the folder of the external data of a model opened from bytes.
EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

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


def graphs(model: ir.Model) -> list[ir.Graph]:
    """model.graphs(): the main graph, then every subgraph (If/Loop/Scan bodies) once, in the order
    onnx_ir's RecursiveGraphIterator enters them.

    A loop over the nodes that looks into the attributes of those that have any: SmolLM2's 7365
    nodes in 8 against 45 ms; the input checks and the file helpers walk the model several times
    before the calibration forward can start.
    """
    found: dict[ir.Graph, None] = {model.graph: None}

    def enter(graph: object) -> None:
        if not isinstance(graph, ir.Graph):
            raise TypeError(f"Expected a Graph, got {type(graph)}. The model may be invalid")
        if graph not in found:
            found[graph] = None
        walk(graph)

    def walk(graph: ir.Graph) -> None:
        for node in graph:
            attributes = node.attributes
            if not attributes:
                continue
            # Attributes is a UserDict: its dict's values, not the mapping view's (8x slower).
            for attr in getattr(attributes, "data", attributes).values():
                kind = getattr(attr, "type", None)
                if kind is ir.AttributeType.GRAPH and isinstance(attr, ir.Attr):
                    enter(attr.value)
                elif kind is ir.AttributeType.GRAPHS and isinstance(attr, ir.Attr):
                    for subgraph in attr.value:
                        enter(subgraph)

    walk(model.graph)
    return list(found)


def external_data_files(model: ir.Model) -> set[Path]:
    """Absolute paths of the external data files the model's initializers refer to."""
    found: set[Path] = set()
    for graph in graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                found.add(Path(tensor.path).absolute())
    return found


def load(path: PathLike) -> ir.Model:
    """Load an ONNX model (a file, or a directory holding one); its weights stay in their files.

    Weights, external or inline, are read on demand (bct_onnx.external_data.StreamedTensor), so a
    loaded model takes the memory of its graph, not of its weights.

    Raises ModelFileError naming the file when it is missing, not an ONNX model, or refers to
    external data files that do not exist.
    """
    file = resolve_model_file(path)
    try:
        model = _load_detached(file)
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
    check_external_data(model, file)
    stream_external_tensors(model)
    return model


def _load_detached(file: Path) -> ir.Model:
    """The model in ``file``, its large inline weights left in the file (bct_onnx.inline_data).

    A file the wire-format walk cannot handle is parsed the ordinary way (whose errors name the problem).
    """
    try:
        proto = onnx.ModelProto.FromString(detached_model_bytes(file)[0])
    except (WireFormatError, OSError, ValueError):
        return ir.load(file)
    model = ir.serde.deserialize_model(proto)
    del proto
    ir.external_data.set_base_dir(model.graph, file.parent)
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
    for graph in graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def file_bytes(path: PathLike) -> int:
    """Size of a saved model: the .onnx file plus every external data file it refers to."""
    file = Path(path)
    proto = _proto_without_weights(file)
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
    locations.discard(file.resolve())  # inline weights, referred to in place by the detached proto
    return file.stat().st_size + sum(p.stat().st_size for p in locations)


def _proto_without_weights(file: Path) -> onnx.ModelProto:
    """The ModelProto in file, its large inline weights detached (not read into memory)."""
    detached = model_bytes_without_weights(file)
    if detached is None:
        return onnx.load(str(file), load_external_data=False)
    return onnx.ModelProto.FromString(detached)


def model_bytes_without_weights(file: Path) -> bytes | None:
    """The model in file serialized with its large inline weights as references into file itself.

    ONNX Runtime opens these bytes with the session option ``EXTERNAL_DATA_FOLDER_KEY`` set to the
    file's folder and maps the weights from the file instead of copying them. None when the file is
    not a protobuf message the wire-format walk handles (parse it the ordinary way to learn why).
    """
    try:
        return detached_model_bytes(file)[0]
    except (WireFormatError, OSError, ValueError):
        return None


def _same_file(a: Path, b: Path) -> bool:
    if a.absolute() == b.absolute():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _special_kind(path: Path) -> str | None:
    """'a FIFO', 'a device', ... when path exists and is neither a regular file nor a directory."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return "a special file"
    return None


def check_target(path: PathLike, protected: Iterable[PathLike], what: str = "output") -> None:
    """Refuse to write ``path`` (the ``what`` of the command) over a protected file or a special file.

    A FIFO, device or socket is never replaced (``-o /dev/null`` as root would break the system);
    a directory cannot be a file output.
    """
    target = Path(path)
    for guarded in protected:
        if _same_file(target, Path(guarded)):
            raise OverwriteInputError(
                f"refusing to overwrite the input: {what} {target} would replace {guarded}; choose another path"
            )
    kind = _special_kind(target)
    if kind is not None:
        raise ModelFileError(f"{what} {target} is {kind}, not a regular file; refusing to replace it")
    if target.is_dir():
        raise ModelFileError(f"{what} {target} is a directory; give a file path such as {target / 'model.onnx'}")
    _check_folder(target, what)


def _check_folder(target: Path, what: str) -> None:
    """The nearest existing folder above target must be a directory (mkdir would fail otherwise)."""
    folder = next((parent for parent in target.absolute().parents if parent.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ModelFileError(f"{what} {target} cannot be written: {folder} is a file, not a directory")


def check_output_path(output: PathLike, protected: Iterable[PathLike], what: str = "output") -> None:
    """Refuse an output whose .onnx or external data file would replace a protected or special file."""
    out = Path(output)
    protected = list(protected)
    for guarded in protected:
        if _same_file(external_data_path(out), Path(guarded)):
            raise OverwriteInputError(
                f"refusing to overwrite the input: {what} {out} would write its external data file "
                f"{external_data_path(out).name} over {guarded}; choose another output path"
            )
    check_target(out, protected, what)
    check_target(external_data_path(out), protected, f"{what}'s external data file")


def check_debug_dir(debug_dir: PathLike, protected: Iterable[PathLike]) -> None:
    """A debug directory must be a directory (or not exist yet) and hold none of the input's files."""
    folder = Path(debug_dir)
    if folder.exists() and not folder.is_dir():
        raise ModelFileError(f"--debug-dir {folder} exists and is not a directory")
    _check_folder(folder, "--debug-dir")
    for guarded in protected:
        if _same_file(Path(guarded).parent, folder):
            raise OverwriteInputError(
                f"refusing --debug-dir {folder}: it holds the input file {Path(guarded).name}, which the "
                "snapshots saved there could replace; choose another directory"
            )


def external_data_path(output: PathLike) -> Path:
    """Where the external data of a model saved at ``output`` goes (``<output>.data``)."""
    out = Path(output)
    return out.with_name(out.name + EXTERNAL_DATA_SUFFIX)


@contextlib.contextmanager
def initializers_replaced(
    model: ir.Model, replacement: Callable[[ir.TensorProtocol], ir.TensorProtocol | None]
) -> Iterator[None]:
    """Within: every initializer holds ``replacement(tensor)`` instead (None keeps it); restored after."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in graphs(model):
            for value in graph.initializers.values():
                tensor = value.const_value
                stand_in = replacement(tensor) if tensor is not None else None
                if stand_in is not None:
                    swapped.append((value, tensor))
                    value.const_value = stand_in
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _tensors_in_memory(model: ir.Model) -> contextlib.AbstractContextManager[None]:
    """External initializers replaced by in-memory copies, so a save inlines them."""
    return initializers_replaced(
        model, lambda t: ir.Tensor(t.numpy(), name=t.name) if isinstance(t, ir.ExternalTensor) else None
    )


TEMP_SUFFIX = ".tmp"
# Inside every temporary save directory; flock-ed by the saving process until it is done.
TEMP_LOCK_NAME = ".bct_onnx.lock"


def remove_stale_temp_dirs(output: PathLike) -> list[Path]:
    """Remove the ``.<name>.XXXX.tmp/`` directories that killed saves of ``output`` left behind.

    A directory whose lock is free belonged to a process that is gone and is removed; one without a
    lock file (from a version before the lock) is named in a warning and kept: its writer is unknown.
    Returns the directories removed.
    """
    out = Path(output)
    removed = []
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.*{TEMP_SUFFIX}")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            lock = os.open(folder / TEMP_LOCK_NAME, os.O_RDONLY)
        except OSError:
            logger.warning(
                "%s is a temporary directory left by an interrupted save of %s; remove it if no other "
                "bct-onnx process is writing %s", folder, out.name, out.name,
            )
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a save in progress in another process
            continue
        finally:
            os.close(lock)
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted save of %s", folder, out.name)
        removed.append(folder)
    return removed


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
    remove_stale_temp_dirs(out)
    use_external = tensor_bytes(model) > large_model_bytes if external_data is None else external_data
    data_file = external_data_path(out)
    temp_dir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=TEMP_SUFFIX))
    lock = os.open(temp_dir / TEMP_LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while this process lives: the directory is not stale
        with terminate_as_exception():
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
                write_inline(model, temp_model)  # weights written one at a time, not copied twice first
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
        os.close(lock)
    logger.info("saved %s (%s)", out, "with external data" if use_external else "single file")
    return written
