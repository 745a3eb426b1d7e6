"""Model families: export recipes, tiny random-weight test configs, loaders of real shipped models.

Installed as ``bct_onnx.models``. Submodules are imported lazily by the caller (they pull torch
and transformers), so importing this package is cheap.
"""

from bct_onnx.models.export import (
    DEFAULT_OPSET,
    ExportError,
    ModelDirError,
    export_hf_directory,
    export_hf_files,
    infer_task,
    is_hf_model_dir,
)

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ModelDirError",
    "export_hf_directory",
    "export_hf_files",
    "infer_task",
    "is_hf_model_dir",
]
