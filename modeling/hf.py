"""Loading models/tokenizers, and building the tiny in-process model of the reference task.

The tiny model (a small Qwen3 with a character-level tokenizer trained with ``tokenizers``) needs no
model hub: tests, the demo and benchmarks build it in seconds and save it with ``save_pretrained``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from common.hub import ModelLoadError, resolve_model_dir
from common.tasks import ADDITION_CHARS

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_char_tokenizer(
    chars: str = ADDITION_CHARS + " abcdefghijklmnopqrstuvwxyz",
) -> PreTrainedTokenizerFast:
    """One token per character, plus pad/bos/eos (ids 0, 1, 2)."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {PAD: 0, BOS: 1, EOS: 2, "<unk>": 3}
    for c in dict.fromkeys(chars):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 512,
    seed: int = 0,
    max_positions: int = 256,
) -> Path:
    """A ~0.5M-parameter Qwen3 with tied embeddings, saved (model + tokenizer) to ``out_dir``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_char_tokenizer()
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = resolve_model_dir(path)
    if not (p / "config.json").exists():
        raise ModelLoadError(f"model directory {p} does not exist or has no config.json")
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {p}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def numerics_id(dtype: str, attn_implementation: str, device: str) -> str:
    """How a transformers model computes log-probs: two processes that hold the same weights and report the same
    id compute the same log-probs up to float rounding (different batch shapes and KV-cache paths reorder the
    sums; measured ~2e-7 per token in float32 on the CPU). The producer stamps it on every rollout group
    (``RolloutGroup.logprob_numerics``) and the learner compares it with its own (``Trainer.numerics``)."""
    return f"transformers/{dtype}/{attn_implementation}/{torch.device(device).type}"


def load_model(
    path: str | Path, device: str = "cpu", dtype: str = "float32", attn_implementation: str = "sdpa"
) -> torch.nn.Module:
    """An HF causal LM from a directory or a cached hub id (common/hub.py), on ``device``, in eval mode.

    ``attn_implementation``: what transformers calls it (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    p = resolve_model_dir(path)
    if not (p / "config.json").exists():
        raise ModelLoadError(f"model directory {p} does not exist or has no config.json")
    try:
        AutoConfig.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(  # safetensors only: a pickled *.bin is refused, never loaded
            p, dtype=_DTYPES[dtype], attn_implementation=attn_implementation, use_safetensors=True
        )
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package
        raise ModelLoadError(f"cannot load the model from {p} with attn_implementation={attn_implementation!r}: "
                             f"{str(e).splitlines()[0]}") from None  # fmt: skip
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load the model from {p}: {e}") from None
    return model.to(device).eval()


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability of ``model`` to 0, in place; return the names of what was > 0.

    Covers ``nn.Dropout`` modules and the float ``*dropout*`` attributes that attention modules apply only in
    train mode (transformers passes ``dropout=0.0 if not self.training else self.attention_dropout``). The
    model's config is left as it is, so published checkpoints keep the user's values."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            changed.append(f"{name or 'model'}.p={module.p}")
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if "dropout" in attr and isinstance(value, float) and not isinstance(value, bool) and value > 0:
                changed.append(f"{name or 'model'}.{attr}={value}")
                setattr(module, attr, 0.0)
    return changed
