"""The prompt feeder: keeps ``prompts_ahead × B`` prompts queued on the prompts stream for producers.

Prompts come from ``learner.dataset`` in a seeded order; the cursor (the dataset position of the next prompt)
is saved in ``keys.prompt_cursor`` after each enqueue and in every checkpoint, so a resumed run goes on where
the checkpoint left off. Task ids are ``f"{run}-{position:09d}"``: the producers' idempotency key.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from common.config import Settings
from common.feeder import enqueue
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow, dataset_rows


class PromptFeeder:
    def __init__(self, settings: Settings, streams: StreamClient, keys: RunKeys, cursor: int = 0):
        self.s, self.streams, self.keys = settings, streams, keys
        self.cursor = cursor
        self._rows: Iterator[PromptRow] | None = None  # opened at the first prompt needed

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
        pairs = [(f"{self.s.run}-{self.cursor + i:09d}", row) for i, row in enumerate(rows)]
        await enqueue(self.streams, self.keys, pairs, self.s.pipeline.prompts_maxlen)
        self.cursor += len(pairs)
        cursor = {"position": self.cursor, "source": self.s.learner.dataset}
        redis = self.streams.redis
        await self.streams.call(
            lambda: redis.hset(self.keys.prompt_cursor, mapping=cursor), "HSET prompt cursor"
        )
