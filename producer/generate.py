"""The engine stage: one engine call samples G completions (tokens, behaviour log-probs, versions) for each
admitted prompt of a batch."""

from __future__ import annotations

import time

from common.config import Settings
from producer.engines.base import Completion, Engine, SamplingParams
from producer.intake import Held
from producer.metrics import ProducerMetrics


def sampling_from(settings: Settings) -> SamplingParams:
    s = settings.producer.sampling
    return SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens
    )


class Generator:
    def __init__(self, engine: Engine, group_size: int, sampling: SamplingParams, metrics: ProducerMetrics):
        self.engine, self.group_size, self.sampling, self.metrics = engine, group_size, sampling, metrics
        self.inflight = 0  # prompts in the current engine call

    async def generate(self, batch: list[Held]) -> tuple[list[list[Completion]], float]:
        """G completions per prompt of ``batch``, and the seconds the call took."""
        self.inflight = len(batch)
        t0 = time.monotonic()
        groups = await self.engine.generate([h.prompt_ids for h in batch], self.group_size, self.sampling)
        gen_s = time.monotonic() - t0
        self.inflight = 0
        self.metrics.generate_s_total += gen_s
        return groups, gen_s
