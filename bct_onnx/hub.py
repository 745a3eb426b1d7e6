"""Hugging Face Hub ids as inputs: ``org/name`` (optionally ``@revision``) resolved to a snapshot
directory through huggingface_hub's cache.

The local cache is looked at first; the network is used only when the snapshot is not cached and
huggingface_hub is not offline (``HF_HUB_OFFLINE=1``). ``HF_HUB_CACHE`` / ``HF_HOME`` are read when
the id is resolved, not when huggingface_hub was imported, so a cache chosen at run time is honoured.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bct_onnx.errors import BctOnnxError

# A repo id as the Hub spells it: "name" or "org/name", letters, digits, "-", "_", "."; "@rev" optional.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}(?:/[A-Za-z0-9][\w.-]{0,95})?)(?:@(?P<revision>[\w./-]+))?$")
# Files an export never needs (weights of other frameworks, ready-made ONNX exports of others).
_SKIPPED_ON_DOWNLOAD = ["*.h5", "*.msgpack", "*.ot", "*.tflite", "tf_model*", "flax_model*", "rust_model*", "onnx/*"]
_TRUE = {"1", "true", "yes", "on"}


class HubInputError(BctOnnxError):
    """A Hub id that could not be resolved (not cached while offline, unknown, or no huggingface_hub)."""


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``text`` reads as a Hub id, else None."""
    if text.endswith(".onnx") or text.startswith((".", "/", "~")):
        return None
    match = _HUB_ID.match(text)
    if match is None:
        return None
    return match.group("repo"), match.group("revision")


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use if started now (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_hub_id(text: str) -> Path:
    """The local snapshot directory of Hub id ``text`` (downloading it only when online and uncached)."""
    parsed = parse_hub_id(text)
    if parsed is None:
        raise HubInputError(f"{text!r} is not a Hugging Face Hub id (expected org/name or org/name@revision)")
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as error:
        raise HubInputError(
            f"{text!r} is not a local path; reading Hub ids needs huggingface_hub: pip install 'bct-onnx[hf]'"
        ) from error
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except LocalEntryNotFoundError as error:
        if hub_offline():
            raise HubInputError(
                f"{text!r} is neither a local path nor cached in the Hugging Face cache {cache} "
                "(HF_HUB_OFFLINE is set, so nothing is downloaded)"
            ) from error
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache), ignore_patterns=_SKIPPED_ON_DOWNLOAD
        )
    except Exception as error:  # huggingface_hub raises many types (HTTP, auth, repo not found)
        raise HubInputError(f"{text!r} is not a local path and downloading it from the Hub failed: {error}") from error
    return Path(folder)
