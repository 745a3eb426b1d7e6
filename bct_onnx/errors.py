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


class InvalidModelError(ModelFileError):
    """The input model breaks the ONNX spec or cannot be loaded by ONNX Runtime."""


class QuantizedModelError(ModelFileError):
    """The input is already quantized (by another tool) or already compressed by bct-onnx."""


class TerminatedError(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (temporary files removed), exit status 143.

    A BaseException, as KeyboardInterrupt is, so no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
