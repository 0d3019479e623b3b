"""Prompts in: read, reclaim, decode and tokenise prompts, and admit them in order under the staleness bound.

A prompt read from the stream is *held* (still pending: un-acked) until admitted. The holding order is
own pending after a restart, prompts reclaimed from dead producers (XAUTOCLAIM), then new ones; at most
one engine call's worth. A poison message (undecodable, unknown reward, empty prompt) is dead-lettered
with its reason and acked. A prompt the bound refuses stays held, never dropped or acked: pacing, not
dropping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.admission import Admitter
from common.config import Settings
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import Entry, StreamClient
from common.tasks import RewardFn, TaskError, get_reward
from common.wire import PromptTask, WireError, decode
from producer.metrics import ProducerMetrics

log = logging.getLogger(__name__)
READ_BLOCK_MS = 500  # short enough that a drain request is noticed quickly


@dataclass
class Held:
    """A prompt read from the stream and not yet generated (still pending: un-acked)."""

    entry: Entry  # the original stream entry (its bytes go to the dead-letter stream if scoring fails)
    task: PromptTask
    prompt_ids: list[int]
    reward: RewardFn = field(repr=False)


class Intake:
    def __init__(
        self,
        settings: Settings,
        streams: StreamClient,
        producer_id: str,
        tokenizer,
        admitter: Admitter,
        metrics: ProducerMetrics,
    ):
        self.settings, self.streams, self.keys = settings, streams, RunKeys(settings.run)
        self.id = producer_id
        self.tokenizer, self.admitter, self.metrics = tokenizer, admitter, metrics
        self.max_groups = settings.producer.max_groups  # 0: no cap
        self.held: list[Held] = []
        self.admitted_total = 0
        self._claim_cursor, self._next_claim = "0-0", 0.0

    @property
    def quota_reached(self) -> bool:
        return self.max_groups > 0 and self.admitted_total >= self.max_groups

    def _room(self) -> int:
        """Prompts this producer may still take on (max_groups counts admitted and held ones too)."""
        want = self.settings.producer.prompts_per_call
        if self.max_groups > 0:
            want = min(want, self.max_groups - self.admitted_total)
        return want - len(self.held)

    # ------------------------------------------------------------------ taking prompts
    async def take_own_pending(self) -> None:
        """Prompts this id read before a restart and never acked: process them first."""
        entries = await self.streams.read_own_pending(self.keys.prompts, PRODUCERS_GROUP, self.id, count=1000)
        await self._hold(entries)
        if entries:
            log.info("resuming %d prompts left pending by a previous run of %s", len(entries), self.id)

    async def fill(self) -> None:
        """Top up the held prompts: reclaimed ones first (at most every claim_idle_ms / 2), then new ones."""
        room = self._room()
        if room > 0 and time.monotonic() >= self._next_claim:
            room -= await self._reclaim(room)
        if room > 0:
            block = None if self.held else READ_BLOCK_MS
            entries = await self.streams.read(self.keys.prompts, PRODUCERS_GROUP, self.id, room, block)
            await self._hold(entries)

    async def _reclaim(self, room: int) -> int:
        """XAUTOCLAIM prompts idle longer than claim_idle_ms (their producer died)."""
        idle_ms = self.settings.producer.claim_idle_ms
        self._next_claim = time.monotonic() + max(0.5, idle_ms / 2000)
        entries, deleted, self._claim_cursor = await self.streams.autoclaim(
            self.keys.prompts, PRODUCERS_GROUP, self.id, idle_ms, count=room, start=self._claim_cursor
        )
        if deleted:
            log.warning(
                "%d pending prompts were trimmed before anyone generated them: %s", len(deleted), deleted[:5]
            )
            await self.streams.ack(self.keys.prompts, PRODUCERS_GROUP, deleted)
        mine = {h.entry.id for h in self.held}
        fresh = [e for e in entries if e.id not in mine]  # our own held prompts go idle while we are paced
        if fresh:
            log.info("reclaimed %d prompts from dead producers", len(fresh))
            self.metrics.reclaimed += len(fresh)
        return await self._hold(fresh)

    async def _hold(self, entries: list[Entry]) -> int:
        n = 0
        for e in entries:
            held = await self._prepare(e)
            if held is not None:
                self.held.append(held)
                n += 1
        return n

    async def _prepare(self, entry: Entry) -> Held | None:
        """Decode and tokenise one prompt; a poison message is dead-lettered (with the reason) and acked."""
        if entry.payload is None:
            await self.streams.ack(self.keys.prompts, PRODUCERS_GROUP, [entry.id])
            return None
        try:
            task = decode(entry.payload, PromptTask)
            reward = get_reward(task.task)
        except WireError as e:
            return await self.dead(entry, e.reason, str(e))
        except TaskError as e:
            return await self.dead(entry, "unknown_reward", str(e))
        ids = [int(x) for x in task.prompt_ids] if task.prompt_ids.size else self._tokenize(task.prompt)
        if not ids:
            return await self.dead(
                entry, "empty_prompt", f"task {task.task_id}: prompt tokenises to no tokens"
            )
        return Held(entry, task, ids, reward)

    def _tokenize(self, prompt: str) -> list[int]:
        # plain text, no chat template and no special tokens: the reference task's prompts are raw strings
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    async def dead(self, entry: Entry, reason: str, detail: str) -> None:
        """Dead-letter a prompt (its original bytes and the reason) and ack it."""
        await self.streams.dead_letter(
            self.keys.dead,
            self.keys.prompts,
            PRODUCERS_GROUP,
            entry,
            reason,
            detail,
            self.id,
            self.settings.pipeline.dead_maxlen,
        )
        self.metrics.dead_lettered += 1

    # ------------------------------------------------------------------ admission
    async def admit(self, weight_version: Callable[[], int]) -> list[Held]:
        """Admit held prompts in order until the staleness bound refuses one (the rest stay held).
        ``weight_version``: the engine's version now (new weights may arrive between two admissions)."""
        batch: list[Held] = []
        limit = self.max_groups - self.admitted_total if self.max_groups > 0 else len(self.held)
        for h in list(self.held)[: max(0, limit)]:
            # retrying is safe: the script marks the group id, so a lost reply cannot count it twice
            admission = await self.streams.call(
                lambda h=h: self.admitter.try_admit(h.task.task_id, weight_version()), "EVALSHA admit"
            )
            if not admission.admitted:
                break
            batch.append(h)
            self.held.remove(h)
        self.admitted_total += len(batch)
        return batch
