"""The engine interface the producer loop talks to (docs/architecture.md, "Engines").

An engine samples ``n`` completions for each of a batch of tokenised prompts and returns, per
sampled token, the behaviour log-prob: ``log_softmax(raw_logits / temperature)[token]``. top-p/top-k
truncate what is *sampled* but are not applied to the reported log-probs (SGLang's default too); RL
runs keep top_p=1, top_k=-1 so the two coincide.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

FINISH_REASONS = ("stop", "length", "abort")


class EngineError(RuntimeError):
    """An engine failed in a way the producer cannot paper over (message: one line, names the problem)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    token_ids: np.ndarray  # (L,) int32, EOS included when finish_reason == "stop"
    logprobs: np.ndarray  # (L,) float32 behaviour log-probs
    finish_reason: str  # "stop" | "length" | "abort"
    version_start: int  # weight version of the first token
    version_end: int  # weight version of the last token
    # (version, start, end) token spans, only when the weights changed during the completion
    version_spans: tuple[tuple[int, int, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.logprobs.shape:
            raise EngineError(
                f"completion has {self.token_ids.size} tokens but {self.logprobs.size} log-probs"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise EngineError(f"finish_reason {self.finish_reason!r} not in {FINISH_REASONS}")


class Engine(abc.ABC):
    """One inference backend. ``version`` is the weight version it currently serves."""

    name: str = "engine"
    fingerprint: str = ""
    version: int = 0

    async def start(self) -> None:
        """Wait until the backend is ready (no-op for in-process engines)."""
        return None

    @abc.abstractmethod
    async def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, in prompt order."""

    @abc.abstractmethod
    async def load_weights(self, path: str, version: int) -> None:
        """Serve the (already verified) HF checkpoint in ``path`` as weight version ``version``."""

    async def close(self) -> None:
        """Release resources."""
        return None
