"""Errors a user can cause and fix (bad paths, files that are not models, bad options).

The CLI prints these as one line (`bct-onnx: error: ...`) and exits with status 1; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class BctOnnxError(Exception):
    """Base of the errors bct-onnx raises for user input it cannot work with."""


class ModelFileError(BctOnnxError):
    """A model path is missing, is not an ONNX file, or cannot be written where asked."""


class OverwriteInputError(ModelFileError):
    """The output would replace the input model (or one of its external data files)."""
