"""Model/tokenizer fingerprint: ties every rollout to the vocabulary and architecture it was made with.

Computed from the files that define token ids and shapes (config architecture fields, tokenizer
files), not from the weights, so it is stable across training steps and cheap to check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")


class FingerprintError(ValueError):
    pass


def model_fingerprint(model_dir: str | Path) -> str:
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FingerprintError(f"{d} is not a model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    h = hashlib.sha256()
    h.update(json.dumps({k: cfg.get(k) for k in _CONFIG_KEYS}, sort_keys=True).encode())
    found = False
    for name in _TOKENIZER_FILES:
        p = d / name
        if p.exists():
            found = True
            h.update(name.encode())
            h.update(_canonical_tokenizer_bytes(p))
    if not found:
        raise FingerprintError(f"{d} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return h.hexdigest()[:16]


def _canonical_tokenizer_bytes(p: Path) -> bytes:
    if p.name == "tokenizer.json":
        # only the parts that decide ids: re-serialised so formatting differences do not matter
        obj = json.loads(p.read_text())
        return json.dumps(
            {k: obj.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}, sort_keys=True
        ).encode()
    return p.read_bytes()
