"""Rollout intake: from the rollouts stream to one batch of B trainable groups.

- a reader task pulls entries (this consumer's own pending ones first after a resume, then new ones),
  decodes and validates them while the current step trains in a thread: poison entries go to the
  dead-letter stream, good ones to a bounded queue;
- ``take()`` moves what the reader queued into a buffer and hands out B trainable groups: **the oldest
  first** (lowest weight version, then arrival), so that a slow producer's group is not overtaken by newer
  ones until it is too stale. Before it fills a batch with groups that could wait, it waits (boundedly) for
  groups that must be trained in this step or never: admitted at version ``step − K`` and still being
  generated (``common/admission.py``, the open admissions). Groups staler than K and duplicates (a group
  id already trained) are dropped and counted;
- eval groups (``learner/evaluation.py``) are counted like the others and handed to the evaluator, never
  trained;
- every entry taken, dropped or not, counts in ``consumed`` and is acked later with the checkpoint of the
  step it was taken for (``learner.publisher``). A well-formed group the learner dead-letters (another
  model, token ids outside the vocabulary; an entry deleted while pending) had been admitted: it counts in
  ``consumed`` too, and its entry is acked with the checkpoint like the others, so that a resume from an
  older checkpoint (which rolls ``consumed`` back) reads and counts it again: no admission slot leaks.
  Undecodable garbage was never admitted: it is dead-lettered and acked at once, uncounted.

Trained group ids are kept for a window of steps (:class:`TrainedIds`), not for ever.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from common.admission import generating_at
from common.config import Settings
from common.keys import LEARNER_GROUP, RunKeys
from common.streams import Entry, StreamClient
from common.wire import RolloutGroup
from learner.batching import BadRollout, TakenGroup, decode_entry
from learner.evaluation import Evaluator
from learner.state import LearnerState

log = logging.getLogger(__name__)
CONSUMER = "learner-0"
READ_BLOCK_MS = 1000
# trained ids are kept for max(DEDUP_GROUPS / B, 4 publish intervals, 2 (K + 1)) steps (TrainedIds)
DEDUP_GROUPS = 2048
# waiting for groups that turn stale after this step: polled this often, for at least URGENT_WAIT_MIN_S and
# otherwise twice the longest recent engine call, never more than URGENT_WAIT_MAX_S
URGENT_POLL_S = 0.05
URGENT_WAIT_MIN_S, URGENT_WAIT_MAX_S = 1.0, 30.0


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def dedup_window_steps(batch_groups: int, publish_every: int, max_staleness: int) -> int:
    """Steps for which a trained group id is remembered.

    A second copy of a group can no longer come from the pipeline itself: a producer appends a group and
    acks its prompt in one atomic step and only while the prompt is still pending for it
    (``StreamClient.append_owned``), so one prompt entry yields one group. Copies come from elsewhere: the
    same task id enqueued twice (``gspo prompts load`` of one file twice, a feeder resumed from an older
    cursor), whose second copy is admitted while or shortly after the first trains, and groups re-read after
    a learner crash, which are at most a publish interval behind the checkpoint. Any copy generated with
    weights older than ``step − K`` is dropped as stale anyway. So a few publish intervals and K versions
    suffice; the ``DEDUP_GROUPS / B`` term keeps about 2,000 ids (~100 kB, in every checkpoint) for margin at
    small B. A file loaded again after the window is trained again (a new epoch of it)."""
    return max(math.ceil(DEDUP_GROUPS / batch_groups), 4 * publish_every, 2 * (max_staleness + 1))


class TrainedIds:
    """Group ids trained in the last ``window`` steps, each with the step it was trained at.

    Iterates over the ids (what a checkpoint stores); ``steps()`` gives the ids with their steps."""

    def __init__(self, window: int, initial: Mapping[str, int] | Iterable[str] = (), step: int = 0):
        self.window = max(1, int(window))
        self._step: dict[str, int] = {}
        self._by_step: dict[int, list[str]] = {}
        items = initial.items() if isinstance(initial, Mapping) else ((g, step) for g in initial)
        for gid, s in sorted(items, key=lambda x: x[1]):
            self._put(str(gid), int(s))
        self.forget_before(max(self._by_step, default=step) - self.window + 1)

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._step

    def __len__(self) -> int:
        return len(self._step)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._step))

    def steps(self) -> dict[str, int]:
        return dict(self._step)

    def add(self, group_ids: Iterable[str], step: int) -> None:
        """Record ``group_ids`` as trained at ``step`` and forget those trained ``window`` steps before."""
        for gid in group_ids:
            self._put(gid, step)
        self.forget_before(step - self.window + 1)

    def _put(self, gid: str, step: int) -> None:
        old = self._step.get(gid)
        if old is not None:
            self._by_step[old].remove(gid)
        self._step[gid] = step
        self._by_step.setdefault(step, []).append(gid)

    def forget_before(self, step: int) -> None:
        for s in [s for s in self._by_step if s < step]:
            for gid in self._by_step.pop(s):
                if self._step.get(gid) == s:
                    del self._step[gid]


@dataclass(frozen=True)
class DeadRollout:
    """A dead-lettered entry that counts as consumed (a well-formed group, or one deleted while pending)."""

    entry_id: str
    reason: str


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
    dead: int = 0  # dead-lettered well-formed entries counted with this batch
    evals: int = 0  # eval groups taken off the stream with this batch (not trained)
    urgent_wait_s: float = 0.0  # time spent waiting for groups that would turn stale after this step


class Intake:
    def __init__(
        self,
        settings: Settings,
        streams: StreamClient,
        keys: RunKeys,
        state: LearnerState,
        fingerprint: str,
        vocab_size: int,
        trained_ids: Mapping[str, int] | Iterable[str],
        evaluator: Evaluator | None = None,
    ):
        self.s, self.streams, self.keys, self.state = settings, streams, keys, state
        self.evaluator = evaluator  # eval groups are counted and handed to it, never trained
        self.fingerprint, self.vocab_size = fingerprint, vocab_size
        p = settings.pipeline
        self.window = dedup_window_steps(p.batch_groups, settings.learner.publish_every, p.max_staleness)
        # group ids trained in the last ``window`` steps (restored from the checkpoint, trained at its step
        # or earlier): a duplicate inside the window is dropped
        self.trained_ids = (
            trained_ids
            if isinstance(trained_ids, TrainedIds)
            else TrainedIds(self.window, trained_ids, step=state.step)
        )
        self.dead = 0  # entries dead-lettered
        self.queue: asyncio.Queue[TakenGroup | DeadRollout] = asyncio.Queue(maxsize=2 * p.batch_groups)
        # groups read and not yet taken, with their arrival number (take() picks the oldest versions first)
        self.buffer: list[tuple[int, TakenGroup]] = []
        self.buffer_cap = 4 * (p.max_staleness + 2) * p.batch_groups  # what admission lets be outstanding
        self._early: list[TakenGroup | DeadRollout] = []  # taken off the queue by _next, before the queue
        self._arrivals = itertools.count()
        self._gen_s: deque[float] = deque(maxlen=4 * p.batch_groups)  # recent engine call times
        self._handled = (0, 0)  # the newest rollouts entry the reader queued or dead-lettered
        self.holding: TakenBatch | None = None  # the batch ``take()`` is filling
        self._stop = asyncio.Event()
        self._reader: asyncio.Task | None = None

    @property
    def in_hand(self) -> int:
        """Entries counted in ``consumed`` by the unfinished ``take()`` (not yet part of any trained step)."""
        return len(self.holding.entry_ids) if self.holding is not None else 0

    def mark_trained(self, group_ids: list[str]) -> None:
        """The groups of the step just trained (``state.step``)."""
        self.trained_ids.add(group_ids, self.state.step)

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
                self._handled = max(self._handled, _entry_key(e.id))

    async def _accept(self, entry: Entry) -> bool:
        """Dead-letter or queue one entry; False if the learner stopped while the queue was full."""
        item: TakenGroup | DeadRollout
        try:
            item = decode_entry(entry, self.fingerprint, self.vocab_size)
        except BadRollout as bad:
            self.dead += 1
            args = (self.keys.dead, self.keys.rollouts)
            tail = (bad.reason, bad.detail, CONSUMER, self.s.pipeline.dead_maxlen)
            if not (bad.well_formed or bad.reason == "deleted"):
                # garbage no producer made (no admission counted it): dead-lettered and acked now
                await self.streams.dead_letter(*args, LEARNER_GROUP, entry, *tail)
                return True
            # a producer's group: admission counted it, so it is consumed, counted when take() meets it and
            # acked with that step's checkpoint (see the module docstring)
            await self.streams.copy_to_dead(*args, entry, *tail)
            item = DeadRollout(entry.id, bad.reason)
        while not self._stop.is_set():  # polled, not awaited: the reader is never cancelled (stop())
            try:
                self.queue.put_nowait(item)
                return True
            except asyncio.QueueFull:
                await asyncio.sleep(0.05)
        return False

    # ------------------------------------------------------------------ taking a batch
    async def take(self, stop: asyncio.Event, idle: Callable[[], Awaitable[None]]) -> TakenBatch | None:
        """B trainable groups, oldest versions first (duplicates and too-stale ones are dropped, counted and
        acked later); None once ``stop`` is set. ``idle`` runs after each second spent waiting for the queue."""
        taken = self.holding = TakenBatch()
        b = self.s.pipeline.batch_groups
        last_log = time.monotonic()
        ready_since: float | None = None
        while True:
            if stop.is_set():
                return None
            if self._drain(taken) | self._drop_unusable(taken):
                await self.state.write_consumed()  # release their admission slots now
            if len(self.buffer) >= b:
                now = time.monotonic()
                ready_since = now if ready_since is None else ready_since
                if await self._wait_for_urgent(now - ready_since):
                    await self._next(URGENT_POLL_S)
                    continue
                if (self._early or not self.queue.empty()) and len(self.buffer) < self.buffer_cap:
                    continue  # queued while we asked Redis: weigh it first
                taken.urgent_wait_s = now - ready_since
                if taken.urgent_wait_s > URGENT_POLL_S:
                    log.info(
                        "waited %.2fs (bound %.1fs) for groups that turn stale after step %d",
                        taken.urgent_wait_s,
                        self._urgent_wait_bound(),
                        self.state.step + 1,
                    )
                self._select(taken, b)
                self.holding = None
                return taken
            if await self._next(1.0):
                continue
            if self._reader is not None and self._reader.done():
                self._reader.result()  # re-raise the reader's error
            await idle()
            if time.monotonic() - last_log >= self.s.learner.wait_log_s:
                last_log = time.monotonic()
                await self._log_waiting(len(self.buffer))

    async def _next(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the reader to queue something (kept for ``_drain``). True if it did."""
        if self._early or not self.queue.empty():
            return True
        try:
            self._early.append(await asyncio.wait_for(self.queue.get(), timeout=timeout_s))
        except TimeoutError:
            return False
        return True

    def _drain(self, taken: TakenBatch) -> bool:
        """Queued entries into the buffer (dead-lettered ones are counted at once). True if any was counted."""
        counted = False
        while len(self.buffer) < self.buffer_cap and (self._early or not self.queue.empty()):
            item = self._early.pop(0) if self._early else self.queue.get_nowait()
            if isinstance(item, DeadRollout):
                self._count(item.entry_id, taken)
                taken.dead += 1
                counted = True
                continue
            if self.evaluator is not None and self.evaluator.is_eval(item.group_id):
                self._count(item.entry_id, taken)  # consumed (slot released), acked with the checkpoint
                taken.evals += 1
                self.evaluator.record(item.group)
                counted = True
                continue
            self.buffer.append((next(self._arrivals), item))
            if item.group.gen_time_s > 0:
                self._gen_s.append(float(item.group.gen_time_s))
        return counted

    def _count(self, entry_id: str, taken: TakenBatch) -> None:
        self.state.consumed += 1
        taken.entry_ids.append(entry_id)

    def _drop_unusable(self, taken: TakenBatch) -> bool:
        """Drop (count, ack later) buffered groups already trained, twice in the buffer, or staler than K."""
        keep, seen, dropped = [], set(), False
        for arrival, tg in self.buffer:
            k = self.state.step - tg.group.version_min
            if tg.group_id in self.trained_ids or tg.group_id in seen:
                self._count(tg.entry_id, taken)
                taken.duplicates += 1
            elif k > self.s.pipeline.max_staleness:
                self._count(tg.entry_id, taken)
                taken.stale_dropped += 1
                taken.stale_ids.append(tg.group_id)
            else:
                seen.add(tg.group_id)
                keep.append((arrival, tg))
                continue
            dropped = True
        self.buffer = keep
        return dropped

    def _select(self, taken: TakenBatch, b: int) -> None:
        """The ``b`` buffered groups of the oldest versions (then the earliest arrivals) into ``taken``."""
        order = sorted(self.buffer, key=lambda x: (x[1].group.version_min, x[0]))
        chosen, rest = order[:b], order[b:]
        for _, tg in sorted(chosen, key=lambda x: x[0]):  # trained in arrival order within the batch
            self._count(tg.entry_id, taken)
            taken.ids.add(tg.group_id)
            taken.groups.append((tg.group, max(0, self.state.step - tg.group.version_min)))
        self.buffer = sorted(rest, key=lambda x: x[0])

    async def _wait_for_urgent(self, waited_s: float) -> bool:
        """True while the batch should wait: fewer than B buffered groups must be trained in this step (their
        version is ``step − K``: after it they are too stale), and producers are still generating groups
        admitted at that version, or groups are on their way (appended, not yet read: a producer closes an
        admission as it appends the group), within the wait's bound."""
        oldest = self.state.step - self.s.pipeline.max_staleness
        if oldest < 0 or waited_s >= self._urgent_wait_bound():
            return False
        urgent = sum(1 for _, tg in self.buffer if tg.group.version_min <= oldest)
        if urgent >= self.s.pipeline.batch_groups:
            return False  # the batch is all must-train-now groups already: waiting cannot save another
        redis = self.streams.redis
        missing = await self.streams.call(
            lambda: generating_at(redis, self.keys, oldest), "ZCOUNT admissions"
        )
        if missing > 0:
            return True
        if len(self.buffer) >= self.buffer_cap:
            return False  # the reader waits for room: nothing more arrives before a batch is taken
        newest = await self.streams.latest_entries(self.keys.rollouts, 1)
        return bool(newest) and _entry_key(newest[0].id) > self._handled

    def _urgent_wait_bound(self) -> float:
        recent = max(self._gen_s, default=0.0)
        return min(URGENT_WAIT_MAX_S, max(URGENT_WAIT_MIN_S, 2 * recent))

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
