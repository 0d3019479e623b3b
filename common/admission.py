"""Staleness admission control for producers (docs/architecture.md, "Admission control").

A group admitted now, by a producer holding weights of version ``w``, is trained after every group
admitted before it. ``v`` is the version the learner's *next* batch will be trained with (its
``next_version``: one more than its weights while a taken batch is still training, so the step in
flight is not forgotten). With ``outstanding`` groups ahead of it and ``B`` groups per step, it is
consumed at about version ``v + outstanding / B``; its staleness stays <= K iff
``outstanding < (K + 1 - (v - w)) * B``. With nothing dropped this is AReaL's
``(K + w + 1)·B − (accepted + running)``. Before any learner exists the bound is at least
``prefill_min_groups``.

A producer admits its whole batch in one script call (:meth:`Admitter.admit_many`, one round trip per engine
call): the group ids in order, each decided exactly as a call for it alone would decide it, up to the first
refusal. :meth:`Admitter.try_admit` is the same script with one id, so there is one bound.

**Every admitted group ends in exactly one terminal state that frees its slot**, so
``outstanding = admitted − consumed − released``:

- ``consumed`` (the learner-state hash): groups the learner took off the rollouts stream, trained or
  dropped (stale, duplicate, a well-formed group it dead-letters). The learner rolls it back to its
  checkpoint on a resume and counts the entries it re-reads again, so it never drifts;
- ``released`` (``keys.released_count``, never rolled back): admitted groups that never reach the rollouts
  stream: dead-lettered by their producer (atomically with the dead letter, ``common/streams.py``) or
  expired (below).

An admission is *open* (``keys.admissions_open``, with its weight version in ``keys.admissions_version``)
from admission until its group is appended (closed atomically with the XADD) or its prompt dead-lettered.
A reclaimed or retried prompt re-uses its open admission: a lost reply or a reclaim never counts twice. An
admission still open after ``lease_s`` (an hour: its producer died and nobody reclaimed the prompt) expires:
it is closed and counted in ``released``, and a later reclaim of that prompt is a new admission. Open
admissions are the groups being generated: their count is bounded by the bound itself.

The learner is the authority on K, B and G: it writes ``max_staleness``, ``batch_groups`` and
``group_size`` into ``keys.learner_state``, and the bound uses those. A producer's own K and B are
used only before any learner has written them (the prefill); a producer whose G differs from the
learner's is refused (:class:`GroupSizeMismatch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from common.keys import RunKeys

log = logging.getLogger(__name__)

# An open admission only has to outlive one generation (claim_idle_ms plus an engine call if its producer
# died and another reclaimed the prompt). One that expires is released; should its group still arrive, the
# bound is one group looser for good (never tighter: the pipeline cannot stall on it).
LEASE_S = 3600
EXPIRE_BATCH = 256  # expired admissions closed per admission call (the rest at the next calls)

# the learner-state fields the learner writes as the authority on the pipeline's shape
SHAPE_FIELDS = ("max_staleness", "batch_groups", "group_size")

_ADMIT = """
-- KEYS: admitted_count, admissions_open, admissions_version, learner_state, released_count
-- ARGV: w, K, B, prefill_min, lease_s, G (0 = not checked), now (unix s), expire_batch, group_id...
-- Admits the group ids in order, each exactly as if it were the only one of its call, and stops at the first
-- refusal. Returns {n, headroom, K, B, expired}: n the ids admitted (a prefix of them), or -1 if the learner's
-- G differs (headroom = the learner's G; nothing is touched then); headroom the last id's (see Admission:
-- -1 for a re-admission, <= 0 for a refusal); expired the admissions closed as expired by this call
local s = redis.call('HMGET', KEYS[4], 'next_version', 'version', 'consumed', 'max_staleness', 'batch_groups',
                     'group_size')
-- the learner's K and B once it has written them; the producer's own only before (the prefill)
local K, B = tonumber(s[4] or ARGV[2]), tonumber(s[5] or ARGV[3])
local G = tonumber(ARGV[6])
if s[6] and G > 0 and tonumber(s[6]) ~= G then return {-1, tonumber(s[6]), K, B, 0} end
local w, now, lease, batch = tonumber(ARGV[1]), tonumber(ARGV[7]), tonumber(ARGV[5]), tonumber(ARGV[8])
-- the bound: nothing it reads from the learner changes during the call
local v = tonumber(s[1] or s[2] or '0')
local consumed = tonumber(s[3] or '0')
local lag = v - w
if lag < 0 then lag = 0 end
local cap = (K + 1 - lag) * B
if v == 0 and consumed == 0 and cap < tonumber(ARGV[4]) then cap = tonumber(ARGV[4]) end
local n, headroom, expired = 0, 0, 0
for i = 9, #ARGV do
  local id = ARGV[i]
  -- admissions open for longer than the lease will never be appended: close them, count them released
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - lease, 'LIMIT', 0, batch)
  if #old > 0 then
    redis.call('ZREM', KEYS[2], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
    redis.call('INCRBY', KEYS[5], #old)
    expired = expired + #old
  end
  if redis.call('ZSCORE', KEYS[2], id) then
    -- a reclaimed or retried prompt: its admission is re-used, with a fresh lease and the newer version
    redis.call('ZADD', KEYS[2], now, id)
    local had = tonumber(redis.call('ZSCORE', KEYS[3], id) or '0')
    if w > had then redis.call('ZADD', KEYS[3], w, id) end
    headroom = -1
  else
    local admitted = tonumber(redis.call('GET', KEYS[1]) or '0')
    local released = tonumber(redis.call('GET', KEYS[5]) or '0')
    local outstanding = admitted - consumed - released
    if outstanding >= cap then return {n, cap - outstanding, K, B, expired} end
    redis.call('INCR', KEYS[1])
    redis.call('ZADD', KEYS[2], now, id)
    redis.call('ZADD', KEYS[3], w, id)
    headroom = cap - outstanding - 1
  end
  n = n + 1
end
return {n, headroom, K, B, expired}
"""


def close_keys(keys: RunKeys) -> tuple[str, str, str]:
    """The keys a terminal state touches to close an admission: the two open sets and the released
    counter (``common/streams.py`` closes admissions atomically with the append or the dead letter)."""
    return keys.admissions_open, keys.admissions_version, keys.released_count


async def generating_at(client, keys: RunKeys, version: int) -> int:
    """Open admissions (admitted, not yet appended nor dead-lettered) made with weights of ``version``."""
    return int(await client.zcount(keys.admissions_version, version, version))


async def accounting(client, keys: RunKeys) -> dict[str, int]:
    """The admission counters: admitted, released, open, and the learner's consumed (0 before a learner)."""
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.admitted_count)
    pipe.get(keys.released_count)
    pipe.zcard(keys.admissions_open)
    pipe.hget(keys.learner_state, "consumed")
    admitted, released, open_, consumed = await pipe.execute()
    return {
        "admitted": int(admitted or 0),
        "released": int(released or 0),
        "open": int(open_ or 0),
        "consumed": int(consumed or 0),
    }


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


@dataclass(frozen=True)
class Admissions:
    """One call's admissions: its first ``admitted`` group ids were admitted, in order; the next one, if any,
    was refused and the rest were not looked at."""

    admitted: int
    headroom: int  # the last group id looked at's, as in Admission (0 if no ids were given)
    max_staleness: int
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
        lease_s: float = LEASE_S,
    ):
        """``max_staleness`` and ``batch_groups`` bound the prefill only (until the learner publishes its
        own); ``group_size`` > 0 is checked against the learner's."""
        self.client, self.keys = client, keys
        self.max_staleness = max_staleness
        self.batch_groups = batch_groups
        self.prefill_min_groups = prefill_min_groups
        self.group_size = group_size
        self.lease_s = lease_s
        self._script = client.register_script(_ADMIT)
        self._warned: tuple[int, int] | None = None

    async def try_admit(self, group_id: str, weight_version: int) -> Admission:
        """Admit ``group_id`` if the bound allows; raise :class:`GroupSizeMismatch` if the learner's G is
        another (nothing is admitted then)."""
        got = await self.admit_many([group_id], weight_version)
        return Admission(got.admitted == 1, got.headroom, got.max_staleness, got.batch_groups)

    async def admit_many(self, group_ids: Sequence[str], weight_version: int) -> Admissions:
        """Admit ``group_ids`` in order, in one script call, until the bound refuses one: the same admissions
        as one :meth:`try_admit` per id stopped at the first refusal (each id is decided exactly as if it
        were alone). Raise :class:`GroupSizeMismatch` if the learner's G is another (nothing is admitted
        then)."""
        k_ = self.keys
        keys = [
            k_.admitted_count,
            k_.admissions_open,
            k_.admissions_version,
            k_.learner_state,
            k_.released_count,
        ]
        args = [
            weight_version,
            self.max_staleness,
            self.batch_groups,
            self.prefill_min_groups,
            self.lease_s,
            self.group_size,
            time.time(),
            EXPIRE_BATCH,
            *group_ids,
        ]
        n, headroom, k, b, expired = (int(x) for x in await self._script(keys=keys, args=args))
        if expired:
            log.warning(
                "%d admissions open for more than %.0fs (never appended nor dead-lettered) expired: "
                "their slots are released",
                expired,
                self.lease_s,
            )
        if n < 0:
            raise GroupSizeMismatch(self.group_size, headroom)
        self._note_bound(k, b)
        return Admissions(n, headroom, k, b)

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
