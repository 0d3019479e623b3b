"""Where a model lives: a local directory, or a Hugging Face hub id found in the local cache (never downloaded).

``learner.model``, ``producer.model`` and ``gspo up --model`` take either. A hub id (``org/name``) is looked up
in the local Hugging Face cache only (``HF_HUB_CACHE`` / ``HF_HOME``, as ``HF_HUB_OFFLINE=1`` would): the pipeline
never reaches the network for a model, so every host of a run loads the same files. Torch-free.
"""

from __future__ import annotations

import re
from pathlib import Path

# what a hub id looks like: "name" or "org/name" (letters, digits, "-", "_", "."), not a path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelLoadError(RuntimeError):
    """A model that cannot be used (missing, not cached, incomplete, wrong format), stated in one line."""


def resolve_model_dir(name: str | Path) -> Path:
    """The local directory of ``name``: an existing directory as is, else the cached snapshot of hub id ``name``.

    Raises :class:`ModelLoadError` in one line when it is neither."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    text = str(name)
    if not text or not _HUB_ID.match(text) or text.endswith((".json", ".safetensors")):
        raise ModelLoadError(f"model directory {p} does not exist")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # a transformers dependency: only a broken environment lacks it
        raise ModelLoadError(
            f"model {text!r} is not a directory, and huggingface_hub is not installed"
        ) from None
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise ModelLoadError(
            f"model {text!r} is neither a directory nor a hub id in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); models are never downloaded: fetch it first "
            f"(e.g. `hf download {text}`) or pass a directory"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"model {text!r}: cannot read it from the local Hugging Face cache: {e}"
        ) from None
