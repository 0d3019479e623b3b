"""Inference engines: the SGLang HTTP client (production) and the in-process transformers engine."""

from producer.engines.base import Completion, Engine, EngineError, SamplingParams

__all__ = ["Completion", "Engine", "EngineError", "SamplingParams"]
