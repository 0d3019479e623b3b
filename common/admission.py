"""Staleness admission control for producers (docs/architecture.md, "Admission control").

A group admitted now, by a producer holding weights of version ``w``, is trained after every group
admitted before it. ``v`` is the version the learner's *next* batch will be trained with (its
``next_version``: one more than its weights while a taken batch is still training, so the step in
flight is not forgotten). With the learner having taken ``consumed`` groups and ``B``
groups per step, it is consumed at about version ``v + outstanding / B`` where
``outstanding = admitted - consumed``; its staleness stays <= K iff
``outstanding < (K + 1 - (v - w)) * B``. With nothing dropped (consumed = v·B) this is AReaL's
``(K + w + 1)·B − (accepted + running)``. Before any learner exists the bound is at least
``prefill_min_groups``.

The learner is the authority on K, B and G: it writes ``max_staleness``, ``batch_groups`` and
``group_size`` into ``keys.learner_state``, and the bound uses those. A producer's own K and B are
used only before any learner has written them (the prefill); a producer whose G differs from the
learner's is refused (:class:`GroupSizeMismatch`).

A group id is admitted at most once (a reclaimed prompt re-uses its admission), atomically in Lua.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.keys import RunKeys

log = logging.getLogger(__name__)

# A marker only has to outlive a reclaim (claim_idle_ms plus a generation). Should one expire first,
# the reclaimed group may be counted twice, which errs on the safe side (one group less of headroom,
# never more than the bound); an hour bounds the markers to an hour of admissions.
MARKER_TTL_S = 3600

# the learner-state fields the learner writes as the authority on the pipeline's shape
SHAPE_FIELDS = ("max_staleness", "batch_groups", "group_size")

_ADMIT = """
-- KEYS: admitted_count, admitted_marker, learner_state
-- ARGV: w, K, B, prefill_min, marker_ttl_s, G (0 = not checked)
-- returns {status, headroom, K, B}: status 1 admitted, 0 refused, -1 wrong G (headroom = the learner's G)
local s = redis.call('HMGET', KEYS[3], 'next_version', 'version', 'consumed', 'max_staleness', 'batch_groups',
                     'group_size')
-- the learner's K and B once it has written them; the producer's own only before (the prefill)
local K, B = tonumber(s[4] or ARGV[2]), tonumber(s[5] or ARGV[3])
local G = tonumber(ARGV[6])
if s[6] and G > 0 and tonumber(s[6]) ~= G then return {-1, tonumber(s[6]), K, B} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, -1, K, B} end
local v = tonumber(s[1] or s[2] or '0')
local consumed = tonumber(s[3] or '0')
local admitted = tonumber(redis.call('GET', KEYS[1]) or '0')
local w, prefill = tonumber(ARGV[1]), tonumber(ARGV[4])
local lag = v - w
if lag < 0 then lag = 0 end
local cap = (K + 1 - lag) * B
if v == 0 and consumed == 0 and cap < prefill then cap = prefill end
local outstanding = admitted - consumed
if outstanding < cap then
  redis.call('INCR', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[5]))
  return {1, cap - outstanding - 1, K, B}
end
return {0, cap - outstanding, K, B}
"""


class GroupSizeMismatch(ValueError):
    """This producer's G differs from the one the learner published: its groups would be the wrong shape."""

    def __init__(self, mine: int, learners: int):
        super().__init__(
            f"pipeline.group_size G={mine} differs from the learner's G={learners} "
            f"(published in the learner state): run the producer with -G {learners}"
        )
        self.mine, self.learners = mine, learners


@dataclass(frozen=True)
class Admission:
    admitted: bool
    headroom: int  # groups still admissible after this one (-1: re-admission of a known group)
    max_staleness: int  # the K and B the bound was computed with (the learner's, once it published them)
    batch_groups: int


class Admitter:
    def __init__(
        self,
        client,
        keys: RunKeys,
        max_staleness: int,
        batch_groups: int,
        prefill_min_groups: int,
        group_size: int = 0,
        marker_ttl_s: int = MARKER_TTL_S,
    ):
        """``max_staleness`` and ``batch_groups`` bound the prefill only (until the learner publishes its
        own); ``group_size`` > 0 is checked against the learner's."""
        self.client, self.keys = client, keys
        self.max_staleness = max_staleness
        self.batch_groups = batch_groups
        self.prefill_min_groups = prefill_min_groups
        self.group_size = group_size
        self.marker_ttl_s = marker_ttl_s
        self._script = client.register_script(_ADMIT)
        self._warned: tuple[int, int] | None = None

    async def try_admit(self, group_id: str, weight_version: int) -> Admission:
        """Admit ``group_id`` if the bound allows; raise :class:`GroupSizeMismatch` if the learner's G is
        another (nothing is admitted then)."""
        keys = [self.keys.admitted_count, self.keys.admitted_group(group_id), self.keys.learner_state]
        args = [
            weight_version,
            self.max_staleness,
            self.batch_groups,
            self.prefill_min_groups,
            self.marker_ttl_s,
            self.group_size,
        ]
        status, headroom, k, b = (int(x) for x in await self._script(keys=keys, args=args))
        if status < 0:
            raise GroupSizeMismatch(self.group_size, headroom)
        self._note_bound(k, b)
        return Admission(status == 1, headroom, k, b)

    async def check_learner(self) -> None:
        """Compare this producer's K, B, G with what the learner published (nothing if it has not yet)."""
        raw = await self.client.hmget(self.keys.learner_state, list(SHAPE_FIELDS))
        k, b, g = (int(x) if x is not None else None for x in raw)
        if g is not None and self.group_size > 0 and g != self.group_size:
            raise GroupSizeMismatch(self.group_size, g)
        self._note_bound(self.max_staleness if k is None else k, self.batch_groups if b is None else b)

    def _note_bound(self, k: int, b: int) -> None:
        if (k, b) != (self.max_staleness, self.batch_groups) and (k, b) != self._warned:
            self._warned = (k, b)
            log.warning(
                "configured max_staleness K=%d, batch_groups B=%d differ from the learner's K=%d, B=%d: "
                "the learner's values are used",
                self.max_staleness,
                self.batch_groups,
                k,
                b,
            )
