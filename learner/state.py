"""The learner-state hash in Redis (``keys.learner_state``): what producers' admission control reads.

- ``step`` / ``version``: the weights the learner holds (one version per step);
- ``next_version``: the weights the next taken group will meet (one more than ``version`` while a taken
  batch is still training, so the step in flight is not forgotten);
- ``consumed``: groups taken off the rollouts stream (trained, dropped as duplicates or too stale, or
  well-formed groups dead-lettered: each of them had been admitted, so each releases its slot). It is rolled
  back to the checkpoint's value on a resume, and every entry it counted since is acked only with a later
  checkpoint, so the resumed learner reads and counts those again: it never drifts from what admission
  counted (``common/admission.py``: outstanding = admitted − consumed − released);
- ``max_staleness`` (K), ``batch_groups`` (B), ``group_size`` (G): the pipeline shape. The learner is its
  authority: it writes them from its settings with every write, admission control reads K and B from
  here and a producer refuses to run with another G.
"""

from __future__ import annotations

import time

from common.config import PipelineSettings
from common.keys import RunKeys
from common.streams import StreamClient


class LearnerState:
    """The learner's step and consumed counters, and their copy in ``keys.learner_state``."""

    def __init__(
        self,
        streams: StreamClient,
        keys: RunKeys,
        pipeline: PipelineSettings,
        step: int = 0,
        consumed: int = 0,
    ):
        self.streams, self.keys = streams, keys
        self.step = step
        self.consumed = consumed
        self.shape = {
            "max_staleness": pipeline.max_staleness,
            "batch_groups": pipeline.batch_groups,
            "group_size": pipeline.group_size,
        }

    async def write(self, training: bool = False) -> None:
        """Write every field; ``training``: a taken batch is being trained (``next_version`` = step + 1)."""
        mapping = {
            "version": self.step,
            "next_version": self.step + int(training),
            "consumed": self.consumed,
            "step": self.step,
            "updated_at": time.time(),
            **self.shape,
        }
        await self._hset(mapping, "HSET learner state")

    async def write_consumed(self) -> None:
        """Write ``consumed`` alone (with the constant shape): the rollout reader releases admission slots
        while a step trains, and must not overwrite ``next_version`` then."""
        await self._hset({"consumed": self.consumed, **self.shape}, "HSET consumed")

    async def _hset(self, mapping: dict, op: str) -> None:
        redis = self.streams.redis
        await self.streams.call(lambda: redis.hset(self.keys.learner_state, mapping=mapping), op)
