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

A group id is admitted at most once (a reclaimed prompt re-uses its admission), atomically in Lua.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.keys import RunKeys

# A marker only has to outlive a reclaim (claim_idle_ms plus a generation). Should one expire first,
# the reclaimed group may be counted twice, which errs on the safe side (one group less of headroom,
# never more than the bound); an hour bounds the markers to an hour of admissions.
MARKER_TTL_S = 3600

_ADMIT = """
-- KEYS: admitted_count, admitted_marker, learner_state ; ARGV: w, K, B, prefill_min, marker_ttl_s
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, -1} end
local v = tonumber(redis.call('HGET', KEYS[3], 'next_version') or redis.call('HGET', KEYS[3], 'version') or '0')
local consumed = tonumber(redis.call('HGET', KEYS[3], 'consumed') or '0')
local admitted = tonumber(redis.call('GET', KEYS[1]) or '0')
local w, K, B, prefill = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lag = v - w
if lag < 0 then lag = 0 end
local cap = (K + 1 - lag) * B
if v == 0 and consumed == 0 and cap < prefill then cap = prefill end
local outstanding = admitted - consumed
if outstanding < cap then
  redis.call('INCR', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[5]))
  return {1, cap - outstanding - 1}
end
return {0, cap - outstanding}
"""


@dataclass(frozen=True)
class Admission:
    admitted: bool
    headroom: int  # groups still admissible after this one (-1: re-admission of a known group)


class Admitter:
    def __init__(self, client, keys: RunKeys, max_staleness: int, batch_groups: int, prefill_min_groups: int,
                 marker_ttl_s: int = MARKER_TTL_S):  # fmt: skip
        self.client, self.keys = client, keys
        self.args = (max_staleness, batch_groups, prefill_min_groups, marker_ttl_s)
        self._script = client.register_script(_ADMIT)

    async def try_admit(self, group_id: str, weight_version: int) -> Admission:
        k, b, prefill, ttl = self.args
        keys = [self.keys.admitted_count, self.keys.admitted_group(group_id), self.keys.learner_state]
        ok, headroom = await self._script(keys=keys, args=[weight_version, k, b, prefill, ttl])
        return Admission(bool(ok), int(headroom))
