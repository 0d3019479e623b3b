"""Prompts in: read, reclaim, decode and tokenise prompts, and admit them in order under the staleness bound.

A prompt read from the stream is *held* (still pending: un-acked) until admitted. The holding order is
own pending after a restart, prompts reclaimed from dead producers (XAUTOCLAIM), then new ones; at most
one engine call's worth. A poison message (undecodable, unknown reward, empty prompt) is dead-lettered
with its reason and acked. A prompt the bound refuses stays held, never dropped or acked: pacing, not
dropping.

Every prompt this producer holds, admits, generates or appends is *owned* until its group is appended or
it is dead-lettered, and this producer never reclaims an owned prompt (even when its engine call outlasts
``claim_idle_ms``). :meth:`Intake.keep_alive` resets the idle time of its owned pending entries more often
than ``claim_idle_ms``, so no other producer reclaims them either: each prompt is generated once when nothing
dies. Only prompts held by a producer that admission has refused for longer than ``claim_idle_ms / 2`` (its
weights lag, say) are left to go idle, so that a producer with room may take them over instead of letting
them wait; the holder finds that out before admitting them (a prompt must still be pending for it) and drops
them, so they are still generated once. An admitted prompt found pending for another producer (this one was
frozen for longer than ``claim_idle_ms``) is generated but not appended (``producer/append.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.admission import Admitter, close_keys
from common.config import Settings
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import Entry, StreamClient
from common.tasks import TaskError
from common.wire import PromptTask, WireError, decode
from producer.metrics import ProducerMetrics
from producer.rewards import Reward, rewards_of

log = logging.getLogger(__name__)
READ_BLOCK_MS = 500  # short enough that a drain request is noticed quickly


@dataclass
class Held:
    """A prompt read from the stream and not yet generated (still pending: un-acked)."""

    entry: Entry  # the original stream entry (its bytes go to the dead-letter stream if scoring fails)
    task: PromptTask
    prompt_ids: list[int]
    rewards: list[Reward] = field(repr=False)


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
        # entry ids of every prompt held, admitted, generating or appending (pending for this producer)
        self.owned: set[str] = set()
        self.admitted_total = 0
        self.refused_since: float | None = (
            None  # monotonic time admission started refusing us (None: it admits)
        )
        self._claim_cursor, self._next_claim = "0-0", 0.0

    @property
    def keep_alive_every_s(self) -> float:
        """How often owned entries are refreshed: well within ``claim_idle_ms``."""
        return max(0.02, self.settings.producer.claim_idle_ms / 4000)

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
        # what we hold, admit, generate or append is never ours to reclaim (a held prompt goes idle while we are
        # paced; one past admission between two refreshes if the loop was blocked): XAUTOCLAIM handed it back
        fresh = [e for e in entries if e.id not in self.owned]
        if fresh:
            log.info("reclaimed %d prompts from dead (or long paced) producers", len(fresh))
            self.metrics.reclaimed += len(fresh)
        return await self._hold(fresh)

    async def _hold(self, entries: list[Entry]) -> int:
        n = 0
        for e in entries:
            if e.id in self.owned:
                continue  # already ours (e.g. read again as our own pending entry)
            held = await self._prepare(e)
            if held is not None:
                self.held.append(held)
                self.owned.add(e.id)
                n += 1
        return n

    # ------------------------------------------------------------------ ownership
    async def keep_alive(self) -> None:
        """Reset the idle time of every owned pending entry (so no producer reclaims it), except held ones
        once admission has refused this producer for longer than ``claim_idle_ms / 2``: those may go to a
        producer with room (checked at admission)."""
        ids = list(self.owned)
        paced_for_s = time.monotonic() - self.refused_since if self.refused_since is not None else 0.0
        if paced_for_s > self.settings.producer.claim_idle_ms / 2000:
            held = {h.entry.id for h in self.held}
            ids = [i for i in ids if i not in held]
        if ids:
            await self.streams.refresh_own(self.keys.prompts, PRODUCERS_GROUP, self.id, ids)

    def _drop_lost(self, lost: list[Held]) -> None:
        if not lost:
            return
        gone = {h.entry.id for h in lost}
        self.held = [h for h in self.held if h.entry.id not in gone]
        self.done(list(gone))
        self.metrics.lost_to_reclaim += len(lost)
        log.info(
            "%d held prompts were taken over by another producer while this one was paced; dropped here",
            len(lost),
        )

    def done(self, entry_ids: list[str]) -> None:
        """The prompts of ``entry_ids`` are finished here (appended, dead-lettered, or not ours any more)."""
        self.owned.difference_update(entry_ids)

    async def _prepare(self, entry: Entry) -> Held | None:
        """Decode and tokenise one prompt; a poison message is dead-lettered (with the reason) and acked."""
        if entry.payload is None:
            await self.streams.ack(self.keys.prompts, PRODUCERS_GROUP, [entry.id])
            return None
        try:
            task = decode(entry.payload, PromptTask)
            rewards = rewards_of(task)
        except WireError as e:
            return await self.dead(entry, e.reason, str(e))
        except TaskError as e:
            return await self.dead(entry, "unknown_reward", str(e))
        try:
            ids = [int(x) for x in task.prompt_ids] if task.prompt_ids.size else self._tokenize(task)
        except Exception as e:  # noqa: BLE001 - user data: a chat prompt the template refuses, no template, ...
            return await self.dead(entry, "bad_prompt", f"task {task.task_id}: {type(e).__name__}: {e}")
        if not ids:
            return await self.dead(
                entry, "empty_prompt", f"task {task.task_id}: prompt tokenises to no tokens"
            )
        return Held(entry, task, ids, rewards)

    def _tokenize(self, task: PromptTask) -> list[int]:
        """A text prompt as the tokenizer encodes it (its default special tokens unless the task says); chat
        messages through the tokenizer's chat template with ``add_generation_prompt=True``."""
        from modeling.chat import render_prompt

        if task.messages:
            return render_prompt(
                self.tokenizer, list(task.messages), chat_template_kwargs=task.chat_template_kwargs
            )
        if not task.prompt:
            return []
        return render_prompt(self.tokenizer, task.prompt, add_special_tokens=task.add_special_tokens)

    async def dead_admitted(self, h: Held, reason: str, detail: str) -> bool:
        """Dead-letter an admitted prompt (its original bytes and the reason), ack it and release its admission
        slot, in one step, if it is still ours. True if it was dead-lettered here."""
        done, _ = await self.streams.dead_letter_owned(
            self.keys.dead,
            self.keys.prompts,
            PRODUCERS_GROUP,
            h.entry,
            reason,
            detail,
            self.id,
            self.settings.pipeline.dead_maxlen,
            group_id=h.task.task_id,
            close=close_keys(self.keys),
        )
        if done:
            self.metrics.dead_lettered += 1
        else:
            self.metrics.lost_to_reclaim += 1
        self.done([h.entry.id])
        return done

    async def dead(self, entry: Entry, reason: str, detail: str) -> None:
        """Dead-letter a prompt that was never admitted (its original bytes and the reason) and ack it."""
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
        """Admit held prompts in order until the staleness bound refuses one (the rest stay held), in one
        admission script call. ``weight_version``: the engine's version now (read when the call is made)."""
        batch: list[Held] = []
        limit = self.max_groups - self.admitted_total if self.max_groups > 0 else len(self.held)
        candidates = list(self.held)[: max(0, limit)]
        if candidates:  # still ours? (another producer may have taken over a prompt held for long)
            ids = [h.entry.id for h in candidates]
            mine = set(await self.streams.pending_for(self.keys.prompts, PRODUCERS_GROUP, self.id, ids))
            self._drop_lost([h for h in candidates if h.entry.id not in mine])
            candidates = [h for h in candidates if h.entry.id in mine]
        if candidates:
            # One script call for the whole batch. Retrying it is safe: the script marks each id it admits as
            # an open admission in the same atomic step as the count, so after a lost reply the retry finds
            # those ids open and re-uses their admissions (no second count), then decides the rest afresh.
            group_ids = [h.task.task_id for h in candidates]
            got = await self.streams.call(
                lambda: self.admitter.admit_many(group_ids, weight_version()),
                f"EVALSHA admit x{len(group_ids)}",
            )
            batch = candidates[: got.admitted]
            taken = {h.entry.id for h in batch}
            self.held = [h for h in self.held if h.entry.id not in taken]
        if candidates and not batch:
            self.refused_since = self.refused_since or time.monotonic()
        if batch:  # from now on kept alive; one lost in the moment since the check is left to its new owner
            self.refused_since = None
            ids = [h.entry.id for h in batch]
            mine = set(await self.streams.refresh_own(self.keys.prompts, PRODUCERS_GROUP, self.id, ids))
            if len(mine) < len(batch):
                lost = [h for h in batch if h.entry.id not in mine]
                self.done([h.entry.id for h in lost])
                self.metrics.lost_to_reclaim += len(lost)
                batch = [h for h in batch if h.entry.id in mine]
        self.admitted_total += len(batch)
        return batch
