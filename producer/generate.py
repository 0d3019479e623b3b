"""The engine stage: one engine call samples G completions (tokens, behaviour log-probs, versions) for each
admitted prompt of a batch.

One bad prompt must not take the batch, or the producer, down with it. Per prompt the stage returns its G
completions or a :class:`~producer.engines.base.PromptFailure` that the append stage dead-letters:

- ``prompt_too_long``, before any engine call: ``prompt + max_new_tokens`` over the engine's context limit
  (SGLang: from the server's own limits; transformers: the model's ``max_position_embeddings``), or a
  prompt over ``producer.max_prompt_tokens`` (> 0);
- a call the engine refuses (:class:`EngineRefused`: SGLang answers 400 for the *whole* batch when one
  prompt is invalid) or that keeps timing out (:class:`EngineTimeout`) is split in halves, and so on, until
  the prompts at fault are alone: ``engine_refused`` / ``engine_timeout`` for those, completions for the
  rest (a batch of P prompts with one bad prompt costs about 2·log2(P) extra calls);
- when no prompt of the batch got completions, the engine is asked to answer a trivial request
  (``check_alive``) before the failures are believed: an engine that refuses or times out on everything
  is the engine's fault, and the producer stops with one line instead of dead-lettering every prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.config import Settings
from producer.engines.base import (
    Engine,
    EngineRefused,
    EngineTimeout,
    GroupResult,
    PromptFailure,
    SamplingParams,
)
from producer.intake import Held
from producer.metrics import ProducerMetrics

log = logging.getLogger(__name__)
DETAIL_CHARS = 300  # a failure's detail is one line of at most this many characters


def sampling_from(settings: Settings) -> SamplingParams:
    s = settings.producer.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        stop_token_ids=tuple(s.stop_token_ids),
        stop=tuple(s.stop),
    )


def one_line(text: str) -> str:
    return " ".join(str(text).split())[:DETAIL_CHARS]


def length_failure(
    prompt_len: int, max_new_tokens: int, context_limit: int | None, max_prompt_tokens: int
) -> PromptFailure | None:
    """``prompt_too_long`` if the prompt exceeds ``max_prompt_tokens`` (> 0) or, with its max_new_tokens,
    the engine's ``context_limit``; else None."""
    if max_prompt_tokens > 0 and prompt_len > max_prompt_tokens:
        return PromptFailure(
            "prompt_too_long",
            f"prompt of {prompt_len} tokens > producer.max_prompt_tokens {max_prompt_tokens}",
        )
    if context_limit is not None and prompt_len + max_new_tokens > context_limit:
        return PromptFailure(
            "prompt_too_long",
            f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} > the engine's context limit {context_limit}",
        )
    return None


class Generator:
    def __init__(
        self,
        engine: Engine,
        group_size: int,
        sampling: SamplingParams,
        metrics: ProducerMetrics,
        max_prompt_tokens: int = 0,
    ):
        self.engine, self.group_size, self.sampling, self.metrics = engine, group_size, sampling, metrics
        self.max_prompt_tokens = max_prompt_tokens  # 0: only the engine's context limit applies
        self.inflight = 0  # prompts in the current engine call
        self.engine_calls = 0  # engine.generate calls, splits included
        self.failures = 0  # prompts answered with a PromptFailure

    async def generate(self, batch: list[Held]) -> tuple[list[GroupResult], float]:
        """G completions or a :class:`PromptFailure` per prompt of ``batch``, and the seconds it took."""
        self.inflight = len(batch)
        t0 = time.monotonic()
        if not self.metrics.first_generate_start:
            self.metrics.first_generate_start = t0
        try:
            results = await self.generate_ids([h.prompt_ids for h in batch])
        finally:
            self.inflight = 0
        gen_s = time.monotonic() - t0
        self.metrics.generate_s_total += gen_s
        for h, r in zip(batch, results, strict=True):
            if isinstance(r, PromptFailure):
                log.warning("task %s fails: %s: %s", h.task.task_id, r.reason, r.detail)
        return results, gen_s

    async def generate_ids(self, prompts: list[list[int]]) -> list[GroupResult]:
        results: list[GroupResult | None] = [None] * len(prompts)
        todo = []
        for i, p in enumerate(prompts):
            too_long = length_failure(
                len(p), self.sampling.max_new_tokens, self.engine.context_limit, self.max_prompt_tokens
            )
            if too_long is None:
                todo.append(i)
            else:
                results[i] = too_long
        if todo:
            for i, r in zip(todo, await self._isolate([prompts[i] for i in todo]), strict=True):
                results[i] = r
            engine_side = [
                r for r in results if isinstance(r, PromptFailure) and r.reason != "prompt_too_long"
            ]
            if engine_side and not any(isinstance(r, list) for r in results):
                await self.engine.check_alive()  # raises if the engine, not the prompts, is at fault
        self.failures += sum(isinstance(r, PromptFailure) for r in results)
        return results  # type: ignore[return-value]

    async def _isolate(self, prompts: list[list[int]]) -> list[GroupResult]:
        """One engine call; if the engine refuses it or it times out, the same for each half (the halves run
        concurrently), down to single prompts, which get a PromptFailure."""
        self.engine_calls += 1
        try:
            return list(await self.engine.generate(prompts, self.group_size, self.sampling))
        except EngineRefused as e:
            if len(prompts) == 1:
                return [PromptFailure("engine_refused", one_line(e))]
            log.warning("engine refused a batch of %d prompts (%s): splitting it", len(prompts), one_line(e))
        except EngineTimeout as e:
            if len(prompts) == 1:
                return [PromptFailure("engine_timeout", one_line(e))]
            log.warning("a batch of %d prompts timed out (%s): splitting it", len(prompts), one_line(e))
        mid = len(prompts) // 2
        left, right = await _both(self._isolate(prompts[:mid]), self._isolate(prompts[mid:]))
        return left + right


async def _both(a, b) -> tuple[list[GroupResult], list[GroupResult]]:
    """Run two coroutines concurrently; the first error cancels the other and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as tg:
            ta, tb = tg.create_task(a), tg.create_task(b)
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return ta.result(), tb.result()
