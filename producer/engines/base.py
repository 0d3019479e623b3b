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


class EngineRefused(EngineError):
    """The engine refused a request because of what it holds (SGLang: HTTP 400 for the whole batch when any
    one prompt is too long or otherwise invalid). The engine stage narrows it down to the prompts at fault."""


class EngineTimeout(EngineError):
    """A request kept timing out. For one prompt: after the engine's retries; for a batch: at the first
    timeout (the engine stage then retries it in halves, which also finds a prompt the engine chokes on)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS ids
    stop: tuple[str, ...] = ()  # stop strings: the completion ends with the token that completes one


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


@dataclass(frozen=True)
class PromptFailure:
    """The engine stage's answer for a prompt it gave up on, in place of its list of completions.

    The append stage dead-letters the prompt with ``reason`` and ``detail`` (one line) and releases its
    admission slot. Reasons: ``prompt_too_long`` (prompt + max_new_tokens over the context limit, or over
    ``producer.max_prompt_tokens``; found before any engine call), ``engine_refused`` (the engine refused
    this prompt alone; detail: its message), ``engine_timeout`` (this prompt alone kept timing out while
    the engine answered a probe), ``engine_aborted`` (its samples kept coming back aborted)."""

    reason: str
    detail: str


GroupResult = list[Completion] | PromptFailure  # what the engine stage returns per prompt


class Engine(abc.ABC):
    """One inference backend. ``version`` is the weight version it currently serves; ``context_limit`` the
    most tokens a prompt plus its ``max_new_tokens`` may hold (None: unknown), checked before every call."""

    name: str = "engine"
    fingerprint: str = ""
    # how the engine computes log-probs (modeling.hf.numerics_id), stamped on every group; "" = not declared
    # (the learner then always recomputes the anchor itself)
    numerics: str = ""
    version: int = 0
    context_limit: int | None = None

    async def start(self) -> None:
        """Wait until the backend is ready (no-op for in-process engines)."""
        return None

    @abc.abstractmethod
    async def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[GroupResult]:
        """``n`` completions per prompt, in prompt order, or a :class:`PromptFailure` for a prompt the engine
        gave up on. Raises :class:`EngineRefused` / :class:`EngineTimeout` when the whole call failed in a
        way a prompt of it may cause, :class:`EngineError` otherwise."""

    @abc.abstractmethod
    async def load_weights(self, path: str, version: int) -> None:
        """Serve the (already verified) HF checkpoint in ``path`` as weight version ``version``."""

    async def check_alive(self) -> None:
        """Raise :class:`EngineError` if the engine cannot answer a trivial request (asked when every prompt
        of a batch failed: then the fault may be the engine's, not the prompts')."""
        return None

    async def close(self) -> None:
        """Release resources."""
        return None
