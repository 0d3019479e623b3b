"""The prompt feeder: keeps ``prompts_ahead × B`` prompts queued on the prompts stream for producers.

Prompts come from ``learner.dataset`` in a seeded order. The cursor is the dataset position of the next
prompt; a prompt's task id is ``f"{run}-{position:09d}"``, the idempotency key of its group.

**The cursor's source of truth is Redis**, not the checkpoint. The feeder writes it to ``keys.prompt_cursor``
after every enqueue, and a (re)starting learner continues from there (:meth:`PromptFeeder.restore`). It does
not go back to the cursor saved in the checkpoint it resumes from: the prompts enqueued between that
checkpoint and a crash are not lost (each is still on the prompts stream, or held by a producer, or its
group is on the rollouts stream, pending until a STABLE checkpoint covers it, and the resumed learner trains
it), so enqueueing them again would hand out the same task ids twice. Measured before this rule: after a
kill -9, the positions between the checkpoint and the crash were appended a second time; each copy is a
separate stream entry, so producers generate the group twice (admission lets a known group id through
without counting it, the learner drops the second copy as a duplicate only after it was generated and
counts both in ``consumed``, which loosens the staleness bound by one group per duplicate).

Two records back the hash up, and the cursor is the furthest position any of them shows, so no id is ever
handed out twice: the tail of the prompts stream (a crash between the XADD and the write of the hash leaves
the hash one enqueue behind), and the checkpoint's copy (``counters.prompt_cursor``), which only matters when
Redis lost the run's data; the prompts after it were lost with Redis then, and new positions are enqueued.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator

from common.config import Settings
from common.feeder import check_task_settings, enqueue
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow, dataset_rows, eval_rows
from common.wire import PromptTask, WireError, decode

log = logging.getLogger(__name__)
TAIL_SCAN = 1000  # newest prompts-stream entries searched for this feeder's last task id at start


class PromptFeeder:
    def __init__(self, settings: Settings, streams: StreamClient, keys: RunKeys, cursor: int = 0):
        self.s, self.streams, self.keys = settings, streams, keys
        self.cursor = cursor
        self._rows: Iterator[PromptRow] | None = None  # opened at the first prompt needed
        self._id_re = re.compile(rf"^{re.escape(settings.run)}-(\d{{9}})$")
        self._eval: list[PromptRow] | None = None  # the eval set, read at the first round
        check_task_settings(settings.task)

    def task_id(self, position: int) -> str:
        return f"{self.s.run}-{position:09d}"

    # ------------------------------------------------------------------ evaluation
    def eval_prefix(self) -> str:
        """Task ids of eval prompts: ``{run}-eval-{step:09d}-{i:06d}`` (never trained: learner/evaluation.py)."""
        return f"{self.s.run}-eval-"

    def eval_task_id(self, step: int, i: int) -> str:
        return f"{self.eval_prefix()}{step:09d}-{i:06d}"

    def eval_set(self) -> list[PromptRow]:
        if self._eval is None:
            limit = self.s.learner.eval_prompts or None
            self._eval = list(eval_rows(self.s.learner.eval_dataset, limit=limit))
        return self._eval

    async def enqueue_eval(self, step: int) -> int:
        """Put the eval prompts of the round of ``step`` on the prompts stream (ahead of none: after the
        training prompts already queued). Returns how many."""
        rows = self.eval_set()
        pairs = [(self.eval_task_id(step, i), row) for i, row in enumerate(rows)]
        await enqueue(self.streams, self.keys, pairs, self.s.pipeline.prompts_maxlen, task=self.s.task)
        return len(pairs)

    async def restore(self, checkpoint_cursor: int = 0) -> str:
        """Set the cursor where this run's feeding stopped (see the module docstring): the furthest of the
        Redis cursor, the stream's tail and ``checkpoint_cursor``. Returns how it was found, for the log."""
        redis = self.streams.redis
        raw = await self.streams.call(
            lambda: redis.hget(self.keys.prompt_cursor, "position"), "HGET prompt cursor"
        )
        in_redis = int(raw) if raw is not None else None
        on_stream = await self._tail_position()
        self.cursor = max(checkpoint_cursor, in_redis or 0, on_stream or 0)
        self._rows = None
        how = (
            f"prompt cursor {self.cursor} (Redis {in_redis}, prompts stream tail {on_stream}, "
            f"checkpoint {checkpoint_cursor})"
        )
        if in_redis is None and on_stream is None and checkpoint_cursor:
            how += ": Redis holds no cursor of this run, the checkpoint's is used"
        return how

    async def _tail_position(self) -> int | None:
        """One past the highest position of this feeder's task ids among the newest stream entries."""
        best = None
        for entry in await self.streams.latest_entries(self.keys.prompts, TAIL_SCAN):
            try:
                task = decode(entry.payload or b"", expect=PromptTask)
            except WireError:
                continue  # not ours to judge here: producers dead-letter it
            m = self._id_re.match(task.task_id)
            if m and (best is None or int(m.group(1)) + 1 > best):
                best = int(m.group(1)) + 1
        return best

    async def feed(self) -> None:
        """Top the prompts stream up to prompts_ahead × B undelivered prompts (nothing without a dataset)."""
        if not self.s.learner.dataset:
            return
        target = self.s.learner.prompts_ahead * self.s.pipeline.batch_groups
        missing = target - await self.streams.backlog(self.keys.prompts, PRODUCERS_GROUP, cap=target)
        if missing <= 0:
            return
        if self._rows is None:
            self._rows = dataset_rows(self.s.learner.dataset, self.s.learner.seed, start=self.cursor)
        rows = itertools.islice(self._rows, missing)
        pairs = [(self.task_id(self.cursor + i), row) for i, row in enumerate(rows)]
        await enqueue(self.streams, self.keys, pairs, self.s.pipeline.prompts_maxlen, task=self.s.task)
        self.cursor += len(pairs)
        cursor = {"position": self.cursor, "source": self.s.learner.dataset}
        redis = self.streams.redis
        await self.streams.call(
            lambda: redis.hset(self.keys.prompt_cursor, mapping=cursor), "HSET prompt cursor"
        )
