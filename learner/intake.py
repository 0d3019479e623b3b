"""Rollout intake: from the rollouts stream to one batch of B trainable groups.

- a reader task pulls entries (this consumer's own pending ones first after a resume, then new ones),
  decodes and validates them while the current step trains in a thread: poison entries go to the
  dead-letter stream (acked there), good ones to a bounded queue;
- ``take()`` hands out B trainable groups, classifying each group it takes off the queue: a duplicate
  (its group id already trained) and a group staler than K are dropped and counted. Every entry taken,
  dropped or not, is acked later with the checkpoint of the step it was taken for (``learner.publisher``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.config import Settings
from common.keys import LEARNER_GROUP, RunKeys
from common.streams import Entry, StreamClient
from common.wire import RolloutGroup
from learner.batching import BadRollout, TakenGroup, decode_entry
from learner.state import LearnerState

log = logging.getLogger(__name__)
CONSUMER = "learner-0"
READ_BLOCK_MS = 1000


@dataclass
class TakenBatch:
    """What one ``take()`` took off the stream: the groups to train and the accounting of the others."""

    groups: list[tuple[RolloutGroup, int]] = field(default_factory=list)  # (group, staleness k)
    ids: set[str] = field(default_factory=set)  # group ids of ``groups``
    entry_ids: list[str] = field(default_factory=list)  # every entry taken, dropped ones included
    duplicates: int = 0
    stale_dropped: int = 0
    # group ids dropped as too stale (accounting: nothing is silently lost)
    stale_ids: list[str] = field(default_factory=list)


class Intake:
    def __init__(
        self,
        settings: Settings,
        streams: StreamClient,
        keys: RunKeys,
        state: LearnerState,
        fingerprint: str,
        vocab_size: int,
        trained_ids: set[str],
    ):
        self.s, self.streams, self.keys, self.state = settings, streams, keys, state
        self.fingerprint, self.vocab_size = fingerprint, vocab_size
        # group ids trained so far (restored from the checkpoint): a group is never trained twice
        self.trained_ids = trained_ids
        self.dead = 0  # entries dead-lettered
        self.queue: asyncio.Queue[TakenGroup] = asyncio.Queue(maxsize=2 * settings.pipeline.batch_groups)
        self.holding: TakenBatch | None = None  # the batch ``take()`` is filling
        self._stop = asyncio.Event()
        self._reader: asyncio.Task | None = None

    @property
    def in_hand(self) -> int:
        """Entries counted in ``consumed`` by the unfinished ``take()`` (not yet part of any trained step)."""
        return len(self.holding.entry_ids) if self.holding is not None else 0

    def mark_trained(self, group_ids: list[str]) -> None:
        self.trained_ids.update(group_ids)

    # ------------------------------------------------------------------ the reader task
    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="rollout-reader")

    async def stop(self) -> None:
        """Let the reader finish its current read (at most READ_BLOCK_MS) instead of cancelling it: a cancel
        that lands as a blocking XREADGROUP returns can be lost inside redis-py (8.1), and the task then
        reads forever while the exit waits for it (seen: ~40% of SIGTERMs to an idle learner hung)."""
        reader = self._reader
        if reader is None:
            return
        self._stop.set()
        done, _ = await asyncio.wait({reader}, timeout=READ_BLOCK_MS / 1000 + 10)
        if not done:  # stuck in connection retries (Redis down): cancelling a sleep is safe
            reader.cancel()
            done, _ = await asyncio.wait({reader}, timeout=5)
        if done and not reader.cancelled() and reader.exception() is not None:
            log.warning("the rollout reader had stopped with %r", reader.exception())

    async def _read(self) -> None:
        """Own pending entries first (a resumed run retrains them), then new ones, into the queue."""
        stream, count = self.keys.rollouts, self.s.pipeline.batch_groups
        after, own = "0", True
        while not self._stop.is_set():
            if own:
                entries = await self.streams.read_own_pending(stream, LEARNER_GROUP, CONSUMER, count, after)
                if not entries:
                    own = False
                    continue
                after = entries[-1].id
            else:
                entries = await self.streams.read(stream, LEARNER_GROUP, CONSUMER, count, READ_BLOCK_MS)
            for e in entries:
                if not await self._accept(e):
                    return  # stopping with the queue full: the entry stays pending for the next run

    async def _accept(self, entry: Entry) -> bool:
        """Dead-letter or queue one entry; False if the learner stopped while the queue was full."""
        try:
            taken = decode_entry(entry, self.fingerprint, self.vocab_size)
        except BadRollout as bad:
            self.dead += 1
            if bad.well_formed:
                # admission control counted it: release its slot now, not at the next step (a producer
                # of another model could otherwise fill the bound before any step)
                self.state.consumed += 1
                await self.state.write_consumed()
            await self.streams.dead_letter(
                self.keys.dead,
                self.keys.rollouts,
                LEARNER_GROUP,
                entry,
                bad.reason,
                bad.detail,
                CONSUMER,
                self.s.pipeline.dead_maxlen,
            )
            return True
        while not self._stop.is_set():  # polled, not awaited: the reader is never cancelled (stop())
            try:
                self.queue.put_nowait(taken)
                return True
            except asyncio.QueueFull:
                await asyncio.sleep(0.05)
        return False

    # ------------------------------------------------------------------ taking a batch
    async def take(self, stop: asyncio.Event, idle: Callable[[], Awaitable[None]]) -> TakenBatch | None:
        """B trainable groups (duplicates and too-stale ones are dropped, counted and acked later); None once
        ``stop`` is set. ``idle`` runs after each second spent waiting for the queue."""
        taken = self.holding = TakenBatch()
        last_log = time.monotonic()
        while len(taken.groups) < self.s.pipeline.batch_groups:
            if stop.is_set():
                return None
            try:
                tg = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except TimeoutError:
                if self._reader is not None and self._reader.done():
                    self._reader.result()  # re-raise the reader's error
                await idle()
                if time.monotonic() - last_log >= self.s.learner.wait_log_s:
                    last_log = time.monotonic()
                    await self._log_waiting(len(taken.groups))
                continue
            self._classify(tg, taken)
        self.holding = None
        return taken

    def _classify(self, tg: TakenGroup, taken: TakenBatch) -> None:
        self.state.consumed += 1
        taken.entry_ids.append(tg.entry_id)
        if tg.group_id in self.trained_ids or tg.group_id in taken.ids:
            taken.duplicates += 1
            return
        k = max(0, self.state.step - tg.group.version_min)
        if k > self.s.pipeline.max_staleness:
            taken.stale_dropped += 1
            taken.stale_ids.append(tg.group_id)
            return
        taken.ids.add(tg.group_id)
        taken.groups.append((tg.group, k))

    async def _log_waiting(self, have: int) -> None:
        redis, pattern = self.streams.redis, f"{self.keys.producers}:*"

        async def count_alive() -> int:
            return len([k async for k in redis.scan_iter(match=pattern, count=100)])

        alive = await self.streams.call(count_alive, "SCAN producers")
        log.info(
            "waiting for producers: %d/%d groups of the next batch, %d producers alive",
            have,
            self.s.pipeline.batch_groups,
            alive,
        )
