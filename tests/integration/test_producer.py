"""The producer service on a real Redis with the tiny model: groups, rewards, acks, log-probs, pacing, weights."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import Settings, load_settings
from common.feeder import enqueue
from common.fingerprint import model_fingerprint
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import addition_prompt, get_reward
from common.wire import DeadLetter, ProducerHeartbeat, PromptTask, RolloutGroup, decode, encode
from modeling import load_model, load_tokenizer
from producer.engines.base import SamplingParams
from producer.engines.hf import HFEngine
from producer.service import serve
from tests.support import announce, write_step_dir


def make_settings(redis_url: str, run_id: str, run_dir: Path, model_dir: Path, **over) -> Settings:
    base = {
        "redis.url": redis_url,
        "run": run_id,
        "run_dir": str(run_dir),
        "producer.model": str(model_dir),
        "producer.producer_id": "p1",
        "pipeline.group_size": 4,
        "producer.sampling.max_new_tokens": 6,
        "producer.prompts_per_call": 2,
        "pipeline.batch_groups": 64,
        "producer.claim_idle_ms": 60_000,
    }
    base.update(over)
    return load_settings(None, base, env={})


async def put_prompts(aredis, run_id: str, pairs: list[tuple[int, int]]) -> list[str]:
    rows = [(f"task-{i}", addition_prompt(a, b)) for i, (a, b) in enumerate(pairs)]
    await enqueue(StreamClient(aredis), RunKeys(run_id), rows, maxlen=10_000)
    return [t for t, _ in rows]


async def rollouts(aredis, run_id: str) -> list[RolloutGroup]:
    return [decode(f[b"m"], RolloutGroup) for _, f in await aredis.xrange(RunKeys(run_id).rollouts)]


def recompute(model, prompt_ids, completion_ids, temperature: float) -> np.ndarray:
    """Independent reference: one unpadded forward of prompt+completion, log_softmax(logits / T)."""
    seq = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(seq).logits[0].float()  # (P+L, V)
    p = len(prompt_ids)
    lp = torch.log_softmax(logits[p - 1 : -1] / temperature, dim=-1)  # predicts tokens p..p+L-1
    return lp.gather(-1, torch.tensor(completion_ids).long()[:, None]).squeeze(-1).numpy()


@pytest.mark.redis
async def test_three_prompts_become_three_scored_groups_and_are_acked(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path
):
    task_ids = await put_prompts(aredis, run_id, [(12, 34), (5, 7), (99, 1)])
    settings = make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **{"producer.max_groups": 3})
    metrics = await serve(settings)

    groups = await rollouts(aredis, run_id)
    assert sorted(g.group_id for g in groups) == sorted(task_ids)
    tok = load_tokenizer(tiny_model_dir)
    tasks = {
        t.task_id: t
        for t in [decode(f[b"m"], PromptTask) for _, f in await aredis.xrange(RunKeys(run_id).prompts)]
    }
    for g in groups:
        task = tasks[g.group_id]
        assert len(g.samples) == 4 and g.producer_id == "p1" and g.task == "addition"
        assert g.prompt_id == task.meta["prompt_id"]
        assert list(g.prompt_ids) == tok.encode(task.prompt, add_special_tokens=False)
        assert (g.temperature, g.top_p, g.top_k) == (1.0, 1.0, -1)
        for s in g.samples:
            text = tok.decode(list(s.completion_ids), skip_special_tokens=True)
            assert s.reward == get_reward("addition")(text, task.meta)
            assert 1 <= s.completion_ids.size <= 6 and s.version_start == s.version_end == 0
            assert (s.finish_reason == "stop") == (int(s.completion_ids[-1]) == tok.eos_token_id)
    assert metrics.groups_total == 3 and metrics.samples_total == 12
    assert await StreamClient(aredis).pending_count(RunKeys(run_id).prompts, PRODUCERS_GROUP) == 0
    assert await aredis.exists(RunKeys(run_id).producer("p1")) == 0  # heartbeat removed on clean exit
    assert int(await aredis.get(RunKeys(run_id).admitted_count)) == 3


@pytest.mark.redis
async def test_group_logprobs_match_a_recompute_at_temperature_07(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path
):
    await put_prompts(aredis, run_id, [(1, 2), (40, 41)])
    over = {
        "producer.max_groups": 2,
        "producer.sampling.temperature": 0.7,
        "producer.sampling.max_new_tokens": 12,
    }
    await serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **over))
    model = load_model(tiny_model_dir)
    groups = await rollouts(aredis, run_id)
    assert len(groups) == 2 and groups[0].temperature == pytest.approx(0.7)
    for g in groups:
        for s in g.samples:
            want = recompute(model, g.prompt_ids, s.completion_ids, 0.7)
            np.testing.assert_allclose(s.logprobs, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_independent_and_learner_recompute(tiny_model_dir, temperature):
    engine = HFEngine(tiny_model_dir, seed=3)
    prompts = [[5, 6, 14, 7, 8, 15], [5, 14, 6, 15], [13, 13, 14, 13, 13, 15]]  # lengths differ: left padding
    out = engine.generate_sync(
        prompts, 3, SamplingParams(temperature=temperature, top_k=5, max_new_tokens=10)
    )
    assert [len(g) for g in out] == [3, 3, 3]
    seqs = [(p, [int(x) for x in c.token_ids]) for p, g in zip(prompts, out, strict=True) for c in g]
    behaviour = [c.logprobs for g in out for c in g]
    for (p, ids), lp in zip(seqs, behaviour, strict=True):
        np.testing.assert_allclose(lp, recompute(engine.model, p, ids, temperature), atol=1e-4, rtol=0)
    logprobs = pytest.importorskip("learner.logprobs")  # the shared contract's recompute
    learner = logprobs.token_logprobs(engine.model, seqs, [temperature] * len(seqs))
    for lp, ref in zip(behaviour, learner, strict=True):
        assert ref.dtype == torch.float32
        np.testing.assert_allclose(lp, ref.numpy(), atol=1e-4, rtol=0)


def test_engine_keeps_eos_and_strips_after_it(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    eos = engine.tokenizer.eos_token_id
    out = engine.generate_sync([[5, 6, 14, 7, 8, 15]] * 8, 4, SamplingParams(max_new_tokens=30))
    comps = [c for g in out for c in g]
    stopped = [c for c in comps if c.finish_reason == "stop"]
    assert stopped, "with 32 samples of 30 tokens from a random 43-symbol model some must hit EOS"
    for c in stopped:
        assert (
            int(c.token_ids[-1]) == eos
            and eos not in c.token_ids[:-1].tolist()
            and c.logprobs.size == c.token_ids.size
        )
    for c in comps:
        if c.finish_reason == "length":
            assert c.token_ids.size == 30 and eos not in c.token_ids.tolist()


@pytest.mark.redis
async def test_poison_prompts_are_dead_lettered_and_acked(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path
):
    keys = RunKeys(run_id)
    streams = StreamClient(aredis)
    await streams.ensure_group(keys.prompts, PRODUCERS_GROUP)
    await streams.append(keys.prompts, b"\xc1garbage", maxlen=None)
    await streams.append(
        keys.prompts, encode(PromptTask("bad-reward", "1+1=", "no_such_reward", {"answer": "2"})), None
    )
    await put_prompts(aredis, run_id, [(3, 4)])
    await serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **{"producer.max_groups": 1}))
    dead = [decode(f[b"m"], DeadLetter) for _, f in await aredis.xrange(keys.dead)]
    assert sorted(d.reason for d in dead) == ["malformed", "unknown_reward"]
    assert [g.group_id for g in await rollouts(aredis, run_id)] == ["task-0"]
    assert await streams.pending_count(keys.prompts, PRODUCERS_GROUP) == 0


async def wait_for(predicate, timeout_s: float = 20.0, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(every_s)
    raise AssertionError(f"condition not met in {timeout_s}s")


async def heartbeat(aredis, run_id: str) -> ProducerHeartbeat | None:
    raw = await aredis.get(RunKeys(run_id).producer("p1"))
    return decode(raw, ProducerHeartbeat) if raw else None


@pytest.mark.redis
async def test_pacing_admits_the_bound_then_waits_for_learner_and_weights(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path
):
    """K=1, B=2: 4 groups on version 0, then paced; the learner stepping alone frees nothing (its weights
    would be 2 versions stale); new weights (version 1) free exactly 2 more. Staleness <= K throughout."""
    keys = RunKeys(run_id)
    await put_prompts(aredis, run_id, [(i, i) for i in range(10)])
    over = {
        "pipeline.max_staleness": 1,
        "pipeline.batch_groups": 2,
        "pipeline.prefill_min_groups": 1,
        "producer.prompts_per_call": 1,
        "pipeline.rollouts_maxlen": 1000,
    }
    settings = make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **over)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        await wait_for(lambda: _state_is(aredis, run_id, "paced", groups=4))
        await asyncio.sleep(1.0)
        assert len(await rollouts(aredis, run_id)) == 4
        await aredis.hset(keys.learner_state, mapping={"version": 1, "consumed": 2})  # one step on groups 0-1
        await asyncio.sleep(1.0)
        # a version-0 group admitted now would be consumed at version 2: still paced
        assert len(await rollouts(aredis, run_id)) == 4
        await announce(
            StreamClient(aredis), keys, write_step_dir(tmp_path / "ckpt", 1, tiny_model_dir, perturb=0.01)
        )
        await wait_for(lambda: _state_is(aredis, run_id, "paced", groups=6, version=1))
        await asyncio.sleep(1.0)
        groups = await rollouts(aredis, run_id)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [g.version_min for g in groups] == [0, 0, 0, 0, 1, 1]
    # an in-order learner with B=2 consumes group j at version j // 2: staleness never exceeds K=1
    assert max(j // 2 - g.version_min for j, g in enumerate(groups)) == 1
    # the held, un-admitted prompt stays pending (reclaimable), it is neither dropped nor acked
    assert await StreamClient(aredis).pending_count(keys.prompts, PRODUCERS_GROUP) == 1


async def _state_is(aredis, run_id, state, groups, version=0) -> bool:
    hb = await heartbeat(aredis, run_id)
    return hb is not None and (hb.state, hb.groups_done, hb.version) == (state, groups, version)


@pytest.mark.redis
async def test_corrupt_checkpoint_is_refused_and_a_good_one_loaded(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, caplog
):
    keys = RunKeys(run_id)
    streams = StreamClient(aredis)
    await put_prompts(aredis, run_id, [(i, 1) for i in range(3)])
    bad = write_step_dir(tmp_path / "ckpt", 1, tiny_model_dir, perturb=0.05)
    with (bad / "model.safetensors").open("r+b") as f:  # flip bytes after STABLE: a torn copy / bit rot
        f.seek(-16, 2)
        f.write(b"\x00" * 16)
    await announce(streams, keys, bad)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir), stop))
    try:
        await wait_for(lambda: _groups_at_least(aredis, run_id, 3))
        assert (await heartbeat(aredis, run_id)).version == 0
        good = write_step_dir(tmp_path / "ckpt", 2, tiny_model_dir, perturb=0.05, seed=7)
        await announce(streams, keys, good)
        await wait_for(lambda: _state_is_version(aredis, run_id, 2))
        rows = [(f"late-{i}", addition_prompt(i, 2)) for i in range(2)]
        await enqueue(streams, keys, rows, maxlen=10_000)
        await wait_for(lambda: _groups_at_least(aredis, run_id, 5))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    refusals = [r.getMessage() for r in caplog.records if "REFUSED checkpoint version 1" in r.getMessage()]
    assert len(refusals) == 1 and "model.safetensors has sha256" in refusals[0]
    groups = await rollouts(aredis, run_id)
    assert [sorted({s.version_start for s in g.samples}) for g in groups] == [[0], [0], [0], [2], [2]]
    model = load_model(good)
    for g in groups[3:]:
        for s in g.samples:
            np.testing.assert_allclose(
                s.logprobs, recompute(model, g.prompt_ids, s.completion_ids, 1.0), atol=1e-4, rtol=0
            )


@pytest.mark.redis
async def test_an_announcement_wakes_the_weight_follower_at_once(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch
):
    """With keys.latest read only every 60 s, a new checkpoint is still loaded within seconds: the
    announcement on the checkpoints stream wakes the follower (K = 0 waits for every reload)."""
    import producer.service as service

    monkeypatch.setattr(service, "WEIGHTS_POLL_S", 60.0)
    keys = RunKeys(run_id)
    streams = StreamClient(aredis)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir), stop))
    try:
        await wait_for(lambda: _state_is_version(aredis, run_id, 0))
        await asyncio.sleep(1.0)  # the follower has read latest (none) and blocks on the stream
        good = write_step_dir(tmp_path / "ckpt", 3, tiny_model_dir, perturb=0.05, seed=3)
        t0 = time.monotonic()
        await announce(streams, keys, good)
        await wait_for(lambda: _state_is_version(aredis, run_id, 3), timeout_s=30)
        assert time.monotonic() - t0 < 20  # polling alone would take up to 60 s
    finally:
        stop.set()
        await asyncio.wait_for(task, 90)


@pytest.mark.redis
async def test_a_finished_producer_does_not_wait_for_the_followers_blocking_read(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch
):
    """Its stages done, the producer wakes the weight follower's blocking XREAD (here 60 s long) instead of
    waiting for it; the wake stream is deleted. The steady-state timestamps are set, and not exported."""
    import json

    import producer.service as service

    monkeypatch.setattr(service, "WAKE_BLOCK_MS", 60_000)
    await put_prompts(aredis, run_id, [(1, 2), (3, 4)])
    settings = make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **{"producer.max_groups": 2})
    t0 = time.monotonic()
    metrics = await asyncio.wait_for(serve(settings), 120)
    done = time.monotonic()
    assert metrics.groups_total == 2
    assert t0 < metrics.first_generate_start < metrics.last_append_end < done
    assert done - metrics.last_append_end < 10  # not the 60 s read, nor STOP_GRACE_S (15 s) and a cancel
    assert [k async for k in aredis.scan_iter(match=f"{RunKeys(run_id).prefix}:wake:*")] == []
    rows = [json.loads(x) for x in (tmp_path / "metrics" / "producer-p1.jsonl").read_text().splitlines()]
    assert rows and not {"first_generate_start", "last_append_end"} & set(rows[-1])


async def _groups_at_least(aredis, run_id, n) -> bool:
    return await aredis.xlen(RunKeys(run_id).rollouts) >= n


async def _state_is_version(aredis, run_id, version) -> bool:
    hb = await heartbeat(aredis, run_id)
    return hb is not None and hb.version == version


@pytest.mark.redis
async def test_producer_drives_the_sglang_engine(redis_url, run_id, aredis, tiny_model_dir, tmp_path):
    from tests.support.fake_sglang import FakeSGLang

    fake = FakeSGLang(tiny_model_dir).start()
    fake.faults.spans = [{"version": "0", "start": 0, "end": 1}, {"version": "1", "start": 1, "end": 6}]
    try:
        await put_prompts(aredis, run_id, [(1, 1), (2, 2)])
        over = {"producer.engine": "sglang", "producer.sglang_url": fake.url, "producer.max_groups": 2}
        metrics = await serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **over))
    finally:
        fake.stop()
    groups = await rollouts(aredis, run_id)
    assert metrics.groups_total == 2 and sorted(g.group_id for g in groups) == ["task-0", "task-1"]
    assert fake.paths()[:2] == ["/health", "/model_info"]
    for g in groups:
        assert len(g.samples) == 4
        assert {(s.version_start, s.version_end, s.version_spans) for s in g.samples} == {
            (0, 1, ((0, 0, 1), (1, 1, 6)))
        }


@pytest.mark.redis
async def test_metrics_reach_prometheus_and_the_jsonl_file(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path
):
    import json

    import httpx

    from common.redis_conn import free_port

    port = free_port()
    await put_prompts(aredis, run_id, [(1, 1), (2, 2)])
    settings = make_settings(redis_url, run_id, tmp_path, tiny_model_dir, metrics_port=port)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        await wait_for(lambda: _state_is(aredis, run_id, "idle", groups=2))  # a heartbeat after both groups
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    # served from common/prom.py's producer registry (Prometheus adds the instance label)
    assert "gspo_producer_groups_total 2.0" in text and "gspo_producer_weight_version 0.0" in text
    assert "gspo_learner_step" not in text
    rows = [json.loads(x) for x in (tmp_path / "metrics" / "producer-p1.jsonl").read_text().splitlines()]
    assert rows[-1]["groups_total"] == 2 and rows[-1]["samples_total"] == 8


def test_checkpoint_of_another_model_is_refused(tiny_model_dir, tmp_path):
    from common.manifest import CheckpointError, read_manifest
    from common.wire import CheckpointAnnouncement
    from modeling import build_tiny_model
    from producer.weights import verify_announcement

    other = build_tiny_model(tmp_path / "other", hidden=64, layers=1)
    step = write_step_dir(tmp_path / "ckpt", 1, other)
    manifest, digest = read_manifest(step)
    ann = CheckpointAnnouncement(1, 1, str(step), digest, manifest.model_fingerprint)
    with pytest.raises(CheckpointError, match="announced model fingerprint .* != base model's"):
        verify_announcement(ann, model_fingerprint(tiny_model_dir))
    assert verify_announcement(ann, model_fingerprint(other)).version == 1
    wrong_sha = CheckpointAnnouncement(1, 1, str(step), "0" * 64, manifest.model_fingerprint)
    with pytest.raises(CheckpointError, match="manifest sha256 .* != announced"):
        verify_announcement(wrong_sha, model_fingerprint(other))
