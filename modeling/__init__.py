"""Hugging Face model and tokenizer loading shared by both services (torch-side; imports neither service).

The producer's in-process engine and the learner load the same directories the same way: safetensors only,
sdpa attention, a left-padding tokenizer with a pad token. The tiny reference-task model lives here too,
because tests, the demo and the benchmarks build it on both sides.
"""

from modeling.hf import (
    ModelLoadError,
    build_char_tokenizer,
    build_tiny_model,
    load_model,
    load_tokenizer,
)

__all__ = ["ModelLoadError", "build_char_tokenizer", "build_tiny_model", "load_model", "load_tokenizer"]
