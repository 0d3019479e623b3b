"""Rollouts out: score each completion, XADD one RolloutGroup per prompt, and only then XACK the prompts
(a crash in between re-generates them; the group id lets the learner keep one copy)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from common.config import Settings
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import Entry, StreamClient
from common.wire import RolloutGroup, Sample, encode
from producer.engines.base import Engine, GroupResult, PromptFailure
from producer.generate import sampling_from
from producer.intake import Held
from producer.metrics import ProducerMetrics

DeadLetter = Callable[[Entry, str, str], Awaitable[None]]  # (entry, reason, detail): dead-letter and ack


class Appender:
    def __init__(
        self,
        settings: Settings,
        streams: StreamClient,
        producer_id: str,
        tokenizer,
        engine: Engine,
        metrics: ProducerMetrics,
        dead: DeadLetter,
    ):
        self.streams, self.keys, self.id = streams, RunKeys(settings.run), producer_id
        self.tokenizer, self.engine, self.metrics, self.dead = tokenizer, engine, metrics, dead
        self.sampling = sampling_from(settings)  # recorded in each group
        self.maxlen = settings.pipeline.rollouts_maxlen

    async def append(self, batch: list[Held], groups: list[GroupResult], gen_s: float) -> None:
        done: list[tuple[Held, RolloutGroup]] = []
        for h, comps in zip(batch, groups, strict=True):
            if isinstance(comps, PromptFailure):  # the engine refused or kept failing on this prompt alone
                await self.dead(h.entry, comps.reason, comps.detail)
                continue
            group = await self._score(h, comps, gen_s)
            if group is not None:
                done.append((h, group))
        if done:
            await self.streams.append_many(self.keys.rollouts, [encode(g) for _, g in done], self.maxlen)
            # acked only once the groups are in the rollouts stream: a crash before this re-generates them
            await self.streams.ack(self.keys.prompts, PRODUCERS_GROUP, [h.entry.id for h, _ in done])
        self._count(done)

    async def _score(self, h: Held, comps: list, gen_s: float) -> RolloutGroup | None:
        samples = []
        for c in comps:
            text = self.tokenizer.decode([int(x) for x in c.token_ids], skip_special_tokens=True)
            try:
                reward = float(h.reward(text, h.task.meta))
            except Exception as e:  # noqa: BLE001 - user reward code: per-message boundary (dead letter + ack)
                await self.dead(h.entry, "reward_error", f"{type(e).__name__}: {e}")
                return None
            versions = (c.version_start, c.version_end, c.version_spans)  # the weights each token came from
            samples.append(Sample(c.token_ids, c.logprobs, reward, c.finish_reason, *versions))
        s = self.sampling
        return RolloutGroup(
            group_id=h.task.task_id,
            prompt_id=str(h.task.meta.get("prompt_id", h.task.task_id)),
            prompt_ids=h.prompt_ids,
            task=h.task.task,
            producer_id=self.id,
            model_fingerprint=self.engine.fingerprint,
            samples=tuple(samples),
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            gen_time_s=gen_s,
        )

    def _count(self, done: list[tuple[Held, RolloutGroup]]) -> None:
        m = self.metrics
        m.groups_total += len(done)
        for _, g in done:
            m.samples_total += len(g.samples)
            m.tokens_total += sum(int(s.completion_ids.size) for s in g.samples)
