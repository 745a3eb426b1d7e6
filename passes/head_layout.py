"""The head split / merge around attention, as exporters write it (shared by the attention passes).

Split: Transpose(Reshape(x [B, S, H * Dh], [B, S, H, Dh]), [0, 2, 1, 3]) -> [B, H, S, Dh] (BERT's K^T
is Transpose [0, 2, 3, 1] of the same Reshape). Merge: Transpose [0, 2, 1, 3] -> Reshape [B, S, H * Dh].
BlockAttention reads and writes [B, S, H * Dh] itself (attribute q_heads), so these nodes go away.
"""

from __future__ import annotations

import onnx_ir as ir
from bct_onnx.passes.graph_patterns import (
    is_op,
    last_dim,
    producer,
    sole_user,
    static_value,
    value_rank,
    value_shape,
)


class NoFit(Exception):
    """The layout does not fit; the message says why."""


def shape_entries(reshape: ir.Node) -> list[int | None] | None:
    """The entries of a Reshape's shape: ints where constant, None where computed at run time."""
    shape = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    if shape is None:
        return None
    whole = static_value(shape)
    if whole is not None:
        return [int(v) for v in whole.reshape(-1)]
    concat = producer(shape, "Concat")
    if concat is None:
        return None
    entries: list[int | None] = []
    for part in concat.inputs:
        value = static_value(part)
        if value is None:
            entries.append(None)  # one run-time dim (an Unsqueeze of a Gather of a Shape)
        else:
            entries.extend(int(v) for v in value.reshape(-1))
    return entries


def static_width(value: ir.Value | None) -> int | None:
    """The static last dim of value, also through a bias Add / scale Mul of a BlockMatMul result (whose
    inferred shape a compressed graph loaded from a file no longer carries)."""
    width = last_dim(value)
    node = producer(value, "Add", "Mul")
    if width is not None or node is None:
        return width
    widths = {last_dim(v) for v in node.inputs} - {None, 1}
    return widths.pop() if len(widths) == 1 else None


def _keeps_leading_dims(entries: list[int | None], source: ir.Value) -> bool:
    """The Reshape's first two entries keep source's B and S: run-time dims, 0, -1, or source's own
    static dims (an export with static shapes folds them to constants)."""
    shape = value_shape(source)
    for axis, entry in enumerate(entries[:2]):
        if entry is None or entry in (0, -1):
            continue
        if shape is None or len(shape) <= axis or shape[axis] != entry:
            return False
    return True


def split_reshape(value: ir.Value, heads: int | None, dh: int | None) -> tuple[ir.Value, int, int]:
    """value = Reshape(x [B, S, H * Dh], [B, S, H, Dh]) -> (x, H, Dh); dh None: Dh from the shape."""
    reshape = producer(value, "Reshape")
    x = reshape.inputs[0] if reshape is not None else None
    width = static_width(x)
    entries = shape_entries(reshape) if reshape is not None else None
    if dh is None and entries is not None and len(entries) == 4 and entries[3] is not None and entries[3] > 0:
        dh = entries[3]
    if reshape is None or x is None or width is None or dh is None or width % dh != 0:
        raise NoFit("an input's head split is not a Reshape of a [B, S, H * Dh] tensor of static width")
    h = width // dh
    if (
        entries is None
        or len(entries) != 4
        or entries[3] != dh
        or entries[2] not in (-1, h)
        or (heads and h != heads)
    ):
        raise NoFit(f"an input's head split Reshape has shape entries {entries}, not [B, S, H, {dh}]")
    if value_rank(x) not in (None, 3) or not _keeps_leading_dims(entries, x):
        raise NoFit(f"an input's head split Reshape has leading entries {entries[:2]}, not x's [B, S]")
    return x, h, dh


def split_heads(value: ir.Value, heads: int | None, dh: int | None) -> tuple[ir.Value, int, int]:
    """value = Transpose(Reshape(x [B, S, H * Dh], [B, S, H, Dh]), [0, 2, 1, 3]) -> (x, H, Dh)."""
    transpose = producer(value, "Transpose")
    if transpose is None or list(transpose.attributes["perm"].as_ints()) != [0, 2, 1, 3]:
        raise NoFit("an input is not a Transpose [0, 2, 1, 3] of the head split")
    return split_reshape(transpose.inputs[0], heads, dh)  # type: ignore[arg-type]


def merge_heads(value: ir.Value, width: int) -> tuple[ir.Value, list[ir.Node]]:
    """value read only by Transpose [0, 2, 1, 3] -> Reshape [B, S, H * Dh]: (that Reshape's result,
    [the Transpose, the Reshape])."""
    transpose = sole_user(value)
    if not is_op(transpose, "Transpose") or list(transpose.attributes["perm"].as_ints()) != [0, 2, 1, 3]:  # type: ignore[union-attr]
        raise NoFit("the result is not read by one Transpose [0, 2, 1, 3]")
    reshape = sole_user(transpose.outputs[0])  # type: ignore[union-attr]
    if not is_op(reshape, "Reshape") or reshape.inputs[0] is not transpose.outputs[0]:  # type: ignore[union-attr]
        raise NoFit("the result's Transpose is not read by one Reshape")
    entries = shape_entries(reshape)  # type: ignore[arg-type]
    if entries is None or len(entries) != 3 or entries[2] not in (-1, width):
        raise NoFit(f"the result's Reshape has shape entries {entries}, not [B, S, H * Dh]")
    if not _keeps_leading_dims(entries, transpose.outputs[0]):  # type: ignore[union-attr]
        raise NoFit(f"the result's Reshape has leading entries {entries[:2]}, not [B, S]")
    return reshape.outputs[0], [transpose, reshape]  # type: ignore[union-attr, list-item]
