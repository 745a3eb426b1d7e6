"""Input-channel importance of MatMul weights, measured on calibration inputs: a diagonal Hessian.

GPTQ uses the whole Hessian X^T X of a MatMul's input and fits the rounding to it; on made-up inputs
(random token ids) its off-diagonal part describes real inputs badly (docs/results.md, data-free
quality). Its diagonal does not: how large each input channel is depends mostly on the weights (the
norms' scales, the residual stream's few huge channels), not on which tokens flow through. So for a
decoder without a tokenizer, bct-onnx measures only E[x_k^2] per input channel k on a few random-id
sequences and lets the per-block scale search minimise the error weighted by it, sum_k E[x_k^2] *
(w_k - q_k)^2: the expected squared output error when the channels are uncorrelated (AWQ's
activation awareness, without its data, and without moving weights off their grid).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bct_onnx.calibration import Calibration, MatMulKey, collect_hessians

IMPORTANCE_METHOD = "channel-importance"  # the report's calibration method


@dataclasses.dataclass(frozen=True)
class ImportanceCalibration(Calibration):
    """Calibration inputs used only for each MatMul input channel's mean square (no GPTQ rounding)."""


def collect_channel_importance(model: ir.Model, calibration: Calibration) -> dict[MatMulKey, np.ndarray]:
    """Mean square of each input channel [K] per constant-weight MatMul, scaled to mean 1.

    A channel that never moved (all zeros) keeps a small positive weight, so its block still gets a
    scale that represents it.
    """
    store = collect_hessians(model, calibration)
    try:
        importance: dict[MatMulKey, np.ndarray] = {}
        for key in store:
            diagonal = np.diagonal(store[key]).astype(np.float64)
            importance[key] = normalized_importance(diagonal)
        return importance
    finally:
        store.close()


# Floor of an importance relative to the tensor's mean: no channel is ignored completely.
IMPORTANCE_FLOOR = 1e-3


def normalized_importance(mean_square: np.ndarray) -> np.ndarray:
    """mean_square scaled to mean 1 with a floor of IMPORTANCE_FLOOR, as float32; uniform if all zero."""
    mean_square = np.maximum(np.asarray(mean_square, dtype=np.float64), 0.0)
    mean = float(mean_square.mean()) if mean_square.size else 0.0
    if not np.isfinite(mean) or mean <= 0.0:
        return np.ones(mean_square.shape, dtype=np.float32)
    return np.maximum(mean_square / mean, IMPORTANCE_FLOOR).astype(np.float32)


# Random-id sequences a decoder's channel importance is measured on (docs/results.md: the mean
# squares barely depend on which ids flow, so a few sequences suffice).
IMPORTANCE_SEQUENCES = 4
IMPORTANCE_LENGTH = 128


def random_token_importance(model: ir.Model, seed: int = 0) -> ImportanceCalibration:
    """ImportanceCalibration on IMPORTANCE_SEQUENCES random-id sequences of IMPORTANCE_LENGTH tokens.

    Raises CalibrationError when the model's inputs cannot be made up (see random_token_calibration).
    """
    from bct_onnx.synthetic_calibration import SyntheticSettings, random_token_calibration

    settings = SyntheticSettings(sequences=IMPORTANCE_SEQUENCES, length=IMPORTANCE_LENGTH, batch_size=1, seed=seed)
    return ImportanceCalibration(random_token_calibration(model, settings).feeds)
