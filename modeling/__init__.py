"""Hugging Face model and tokenizer loading shared by both services (torch-side; imports neither service).

The producer's in-process engine and the learner load the same directories (or cached hub ids) the same way:
safetensors only, the configured attention implementation (sdpa by default), a left-padding tokenizer with a pad
token. The tiny reference-task model lives here too, because tests, the demo and the benchmarks build it on both sides; so do prompt rendering (``render_prompt``:
strings and chat messages to token ids) and the offline SmolLM2-135M-Instruct conversion (``convert_smollm2``).
"""

from common.hub import resolve_model_dir
from modeling.chat import ChatTemplateError, has_chat_template, render_prompt
from modeling.hf import (
    ModelLoadError,
    build_char_tokenizer,
    build_tiny_model,
    disable_dropout,
    load_model,
    load_tokenizer,
    numerics_id,
)
from modeling.smollm2 import convert_smollm2, find_smollm2_gguf

__all__ = [
    "ChatTemplateError",
    "ModelLoadError",
    "build_char_tokenizer",
    "build_tiny_model",
    "convert_smollm2",
    "disable_dropout",
    "find_smollm2_gguf",
    "has_chat_template",
    "load_model",
    "load_tokenizer",
    "numerics_id",
    "render_prompt",
    "resolve_model_dir",
]
