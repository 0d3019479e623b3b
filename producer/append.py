"""Rollouts out: score each completion, then, in one atomic step per batch, XADD one RolloutGroup per prompt,
XACK the prompts and close their admissions (``common/streams.py::append_owned``), but only for prompts still
pending for this producer: one copy of each group reaches the learner, and no crash can land between the
XADD and the XACK.

Every admitted prompt ends here in exactly one terminal state that frees its admission slot
(``common/admission.py``): appended (the learner consumes it), or dead-lettered with its reason and released
(the engine gave up on it: ``PromptFailure``; its reward function raised; its group would not pass the
learner's decoder), or not ours any more (another producer reclaimed it while this one was stalled: its
copy is the one that counts).

The reward sees the completion decoded without its final stop token only (any other special token stays in
the text, so ``"123<pad><bos>"`` is not scored as ``"123"``), cut before a stop string that ended it
(``producer.sampling.stop``), and the finish reason. Rewards run off the event loop (``producer/rewards.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from common.admission import close_keys
from common.config import Settings
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.wire import RolloutGroup, Sample, WireError, decode, encode
from producer.engines.base import Completion, Engine, PromptFailure
from producer.generate import sampling_from
from producer.intake import Held
from producer.metrics import ProducerMetrics
from producer.rewards import RewardFailure, RewardRunner

if TYPE_CHECKING:
    from producer.intake import Intake

log = logging.getLogger(__name__)


class Appender:
    def __init__(
        self,
        settings: Settings,
        streams: StreamClient,
        producer_id: str,
        tokenizer,
        engine: Engine,
        metrics: ProducerMetrics,
        intake: Intake,
        runner: RewardRunner | None = None,
    ):
        self.streams, self.keys, self.id = streams, RunKeys(settings.run), producer_id
        p = settings.producer
        self.runner = runner or RewardRunner(p.reward_threads, p.reward_timeout_s)
        self.tokenizer, self.engine, self.metrics, self.intake = tokenizer, engine, metrics, intake
        self.sampling = sampling_from(settings)  # recorded in each group
        self.maxlen = settings.pipeline.rollouts_maxlen
        # a completion that finished with "stop" ends with its stop token: the engine's stop ids (EOS ...),
        # or failing that any special token
        stops = {int(x) for x in self.sampling.stop_token_ids}
        stops.update(int(x) for x in getattr(engine, "eos_ids", ()) or ())
        if getattr(tokenizer, "eos_token_id", None) is not None:
            stops.add(int(tokenizer.eos_token_id))
        stops.update(int(x) for x in getattr(tokenizer, "all_special_ids", ()) or ())
        self.stop_ids = frozenset(stops)

    async def append(
        self, batch: list[Held], results: list[list[Completion] | PromptFailure], gen_s: float
    ) -> None:
        ready: list[tuple[Held, RolloutGroup, bytes]] = []
        scored = await asyncio.gather(  # every group's rewards at once, off the event loop
            *(
                self._score(h, r, gen_s) if not isinstance(r, PromptFailure) else _none()
                for h, r in zip(batch, results, strict=True)
            )
        )
        for h, result, group in zip(batch, results, scored, strict=True):
            if isinstance(result, PromptFailure):
                await self.intake.dead_admitted(h, result.reason, result.detail)
                continue
            if isinstance(group, RewardFailure):
                await self.intake.dead_admitted(h, "reward_error", str(group))
                continue
            payload = await self._checked(h, group)
            if payload is not None:
                ready.append((h, group, payload))
        appended: list[RolloutGroup] = []
        if ready:
            items = [(h.entry.id, g.group_id, payload) for h, g, payload in ready]
            ids = await self.streams.append_owned(
                self.keys.rollouts,
                self.maxlen,
                self.keys.prompts,
                PRODUCERS_GROUP,
                self.id,
                items,
                close_keys(self.keys),
            )
            appended = [g for (_, g, _), i in zip(ready, ids, strict=True) if i is not None]
            lost = len(ready) - len(appended)
            if lost:
                self.metrics.lost_to_reclaim += lost
                log.warning(
                    "%d groups not appended: their prompts were reclaimed by another producer while this one "
                    "was stalled for longer than claim_idle_ms (that producer's copies count)",
                    lost,
                )
        self.intake.done([h.entry.id for h in batch])
        self._count(appended)
        self.metrics.last_append_end = time.monotonic()

    async def _checked(self, h: Held, group: RolloutGroup) -> bytes | None:
        """The encoded group, if the learner's strict decoder accepts it; else the prompt is dead-lettered here
        with the decoder's reason (and its slot released), instead of being refused by the learner."""
        try:
            payload = encode(group)
            decode(payload, RolloutGroup)
        except (WireError, ValueError, TypeError, OverflowError) as e:
            reason = e.reason if isinstance(e, WireError) else "malformed"
            await self.intake.dead_admitted(h, reason, f"group {group.group_id} does not encode: {e}")
            return None
        return payload

    def reward_text(self, c: Completion) -> str:
        """The completion as the reward sees it: without its final stop token, every other token kept, and cut
        before the first stop string (``producer.sampling.stop``) of a completion that stopped."""
        ids = [int(x) for x in c.token_ids]
        if c.finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if c.finish_reason == "stop" and self.sampling.stop:
            cut = min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
        return text

    async def _score(self, h: Held, comps: list[Completion], gen_s: float) -> RolloutGroup | RewardFailure:
        texts = [self.reward_text(c) for c in comps]
        ids = [[int(x) for x in c.token_ids] for c in comps]
        reasons = [c.finish_reason for c in comps]
        try:
            scored = await self.runner.score(h.task, h.rewards, texts, ids, reasons)
        except RewardFailure as e:
            return e
        samples = []
        for c, total, parts in zip(comps, scored.totals, scored.parts, strict=True):
            versions = (c.version_start, c.version_end, c.version_spans)  # the weights each token came from
            samples.append(Sample(c.token_ids, c.logprobs, total, c.finish_reason, *versions, rewards=parts))
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
            logprob_numerics=self.engine.numerics,
        )

    def _count(self, done: list[RolloutGroup]) -> None:
        m = self.metrics
        m.groups_total += len(done)
        for g in done:
            m.samples_total += len(g.samples)
            m.tokens_total += sum(int(s.completion_ids.size) for s in g.samples)


async def _none() -> None:
    return None
