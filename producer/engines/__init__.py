"""Inference engines: the SGLang HTTP client (production) and the in-process transformers engine."""

from producer.engines.base import (
    Completion,
    Engine,
    EngineError,
    EngineRefused,
    EngineTimeout,
    GroupResult,
    PromptFailure,
    SamplingParams,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "EngineRefused",
    "EngineTimeout",
    "GroupResult",
    "PromptFailure",
    "SamplingParams",
]
