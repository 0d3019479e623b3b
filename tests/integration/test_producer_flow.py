"""Producer flow control on a real Redis, with in-process producers whose engines are slowed or scripted:

- an engine call longer than ``claim_idle_ms`` never makes a producer (nor its neighbour) reclaim and
  regenerate the prompts it is working on;
- every admitted prompt that never becomes a group (the engine gives up on it, its reward raises, its group
  would not decode) is dead-lettered with its reason and releases its admission slot: a small bound never
  stalls;
- the reward sees the completion without its final stop token only, and the finish reason.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from common.feeder import enqueue
from common.fingerprint import model_fingerprint
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow, addition_prompt
from common.wire import DeadLetter, decode
from modeling import load_tokenizer
from producer import assembly
from producer.engines.base import Completion, Engine, PromptFailure, SamplingParams
from producer.service import serve
from tests.integration.test_producer import make_settings, rollouts
from tests.support import rewards

pytestmark = pytest.mark.redis


async def accounting(aredis, keys: RunKeys) -> dict[str, int]:
    from common.admission import accounting as counts  # (imported here: the test module loads without it)

    return await counts(aredis, keys)


def slow_engines(monkeypatch, delay_s: float, calls: Counter, transform=None) -> None:
    """Producers built from now on get the real engine with ``delay_s`` added to every generate call;
    ``calls`` counts each prompt (by its token ids) sent to an engine; ``transform(results)`` may alter them."""
    build = assembly.build_engine

    async def build_slow(*args, **kw):
        engine, tokenizer = await build(*args, **kw)
        inner = engine.generate

        async def generate(prompts, n, sampling):
            calls.update(tuple(p) for p in prompts)
            await asyncio.sleep(delay_s)
            out = await inner(prompts, n, sampling)
            return transform(out) if transform else out

        engine.generate = generate
        return engine, tokenizer

    monkeypatch.setattr(assembly, "build_engine", build_slow)


async def put_rows(aredis, run_id: str, rows: list[PromptRow]) -> list[str]:
    pairs = [(f"task-{i:03d}", row) for i, row in enumerate(rows)]
    await enqueue(StreamClient(aredis), RunKeys(run_id), pairs, maxlen=10_000)
    return [t for t, _ in pairs]


async def test_an_engine_call_longer_than_claim_idle_ms_is_not_reclaimed_by_its_own_producer(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch
):
    """Each call sleeps 0.8 s, four times claim_idle_ms: while one batch is in the engine the next one waits
    admitted, and both stay pending for this producer. Before the fix XAUTOCLAIM handed them back to it."""
    task_ids = await put_rows(aredis, run_id, [addition_prompt(i, i + 1) for i in range(8)])
    calls: Counter = Counter()
    slow_engines(monkeypatch, 0.8, calls)
    over = {"producer.max_groups": 8, "producer.claim_idle_ms": 200, "producer.prompts_per_call": 2}
    metrics = await asyncio.wait_for(
        serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **over)), 120
    )

    groups = await rollouts(aredis, run_id)
    assert Counter(g.group_id for g in groups) == Counter(task_ids)  # each appended once
    assert len(calls) == 8 and set(calls.values()) == {1}  # each generated once
    assert (metrics.reclaimed, metrics.lost_to_reclaim) == (0, 0)
    assert await StreamClient(aredis).pending_count(RunKeys(run_id).prompts, PRODUCERS_GROUP) == 0


async def test_two_slow_producers_never_take_each_others_prompts(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch
):
    """Two producers, engine calls of 0.6 s with claim_idle_ms = 150: each keeps its pending entries fresh, so
    neither reclaims the other's (before the fix both regenerated each other's in-flight prompts)."""
    keys = RunKeys(run_id)
    task_ids = await put_rows(aredis, run_id, [addition_prompt(i, 2 * i) for i in range(12)])
    calls: Counter = Counter()
    slow_engines(monkeypatch, 0.6, calls)
    over = {"producer.claim_idle_ms": 150, "producer.prompts_per_call": 2}
    stop = asyncio.Event()
    runs = [
        asyncio.create_task(
            serve(
                make_settings(
                    redis_url, run_id, tmp_path, tiny_model_dir, **over, **{"producer.producer_id": p}
                ),
                stop,
            )
        )
        for p in ("p1", "p2")
    ]
    try:
        for _ in range(600):
            if len(await rollouts(aredis, run_id)) >= 12 or any(t.done() for t in runs):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # ten claim_idle_ms more: a late reclaim would show now
    finally:
        stop.set()
        m1, m2 = await asyncio.wait_for(asyncio.gather(*runs), 60)
    groups = await rollouts(aredis, run_id)
    assert Counter(g.group_id for g in groups) == Counter(task_ids)
    assert len(calls) == 12 and set(calls.values()) == {1}
    assert {g.producer_id for g in groups} == {"p1", "p2"}  # both worked
    assert (m1.reclaimed, m2.reclaimed, m1.lost_to_reclaim, m2.lost_to_reclaim) == (0, 0, 0, 0)
    assert await StreamClient(aredis).pending_count(keys.prompts, PRODUCERS_GROUP) == 0


def failing_rows(n: int, fail) -> list[PromptRow]:
    """Addition prompts scored by ``tests.support.rewards:flaky_addition``, which raises on row i if fail(i)."""
    rows = [addition_prompt(i, 3 * i % 100) for i in range(n)]
    return [PromptRow(r.prompt_id, r.prompt, "tests.support.rewards:flaky_addition", {**r.meta, "fail": fail(i)})
            for i, r in enumerate(rows)]  # fmt: skip


def sabotage(counter: list[int]):
    """Results transform: the 1st, 4th, ... prompt gets a PromptFailure, the 2nd, 5th, ... a NaN log-prob."""

    def transform(results):
        out = []
        for r in results:
            i = counter[0]
            counter[0] += 1
            if i % 3 == 0:
                out.append(PromptFailure("engine_refused", "test: the engine refused this prompt"))
            elif i % 3 == 1 and isinstance(r, list):
                bad = r[0].logprobs.copy()
                bad[0] = np.nan
                out.append([replace(r[0], logprobs=bad), *r[1:]])
            else:
                out.append(r)
        return out

    return transform


@pytest.mark.parametrize("engine_failures", [False, True], ids=["reward_errors", "engine_and_reward_errors"])
async def test_admitted_prompts_that_fail_release_their_slots(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch, engine_failures
):
    """A bound of (K+1)·B = 2 groups and 12 prompts that all fail after admission: the engine gives up on
    some, some get a NaN log-prob (the learner's decoder would refuse the group), the reward raises on the
    rest. Each is dead-lettered with its reason and releases its slot, so all 12 are admitted in turn; before
    the fix the third admission never came (2 slots leaked) and the producer stalled."""
    keys = RunKeys(run_id)
    # one producer admits and generates in stream order: the sabotaged prompts are rows 0, 3, ... and 1, 4, ...
    await put_rows(aredis, run_id, failing_rows(12, lambda i: not engine_failures or i % 3 == 2))
    await aredis.hset(keys.learner_state, mapping={"max_staleness": 0, "batch_groups": 2, "group_size": 4})
    seen = [0]
    slow_engines(monkeypatch, 0.0, Counter(), sabotage(seen) if engine_failures else None)
    over = {"producer.max_groups": 12, "producer.prompts_per_call": 2, "pipeline.prefill_min_groups": 1}
    metrics = await asyncio.wait_for(
        serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **over)), 90
    )

    dead = [decode(f[b"m"], DeadLetter) for _, f in await aredis.xrange(keys.dead)]
    reasons = Counter(d.reason for d in dead)
    if engine_failures:
        assert reasons == {"engine_refused": 4, "non_finite": 4, "reward_error": 4}, reasons
    else:
        assert reasons == {"reward_error": 12}, reasons
    assert len({d.entry_id for d in dead}) == 12 and metrics.dead_lettered == 12
    assert await rollouts(aredis, run_id) == []
    counts = await accounting(aredis, keys)
    assert counts == {"admitted": 12, "released": 12, "open": 0, "consumed": 0}, counts
    assert await StreamClient(aredis).pending_count(keys.prompts, PRODUCERS_GROUP) == 0


class ScriptedEngine(Engine):
    """Answers every prompt with the same completions (token ids and finish reasons given)."""

    name = "scripted"

    def __init__(self, fingerprint: str, script: list[tuple[list[int], str]]):
        self.fingerprint, self.script = fingerprint, script

    async def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams):
        assert n == len(self.script)
        comps = [
            Completion(np.array(ids, np.int32), np.full(len(ids), -1.0, np.float32), reason, 0, 0)
            for ids, reason in self.script
        ]
        return [list(comps) for _ in prompts]

    async def load_weights(self, path: str, version: int) -> None:
        self.version = version


async def test_the_reward_sees_every_special_token_but_the_final_stop_and_the_finish_reason(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch
):
    tok = load_tokenizer(tiny_model_dir)
    d = tok.encode("123", add_special_tokens=False)
    pad, bos, eos = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    script = [(d + [pad, bos, eos], "stop"), (d + [eos], "stop"), (d[:2], "length"), ([bos, *d], "length")]
    engine = ScriptedEngine(model_fingerprint(tiny_model_dir), script)

    async def build_scripted(*args, **kw):
        return engine, tok

    monkeypatch.setattr(assembly, "build_engine", build_scripted)
    rewards.SEEN.clear()
    row = addition_prompt(61, 62)
    await put_rows(aredis, run_id, [PromptRow(row.prompt_id, row.prompt, "tests.support.rewards:recording", row.meta),
                                    PromptRow(row.prompt_id, row.prompt, "tests.support.rewards:two_arguments_only", row.meta)])  # fmt: skip
    await asyncio.wait_for(
        serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **{"producer.max_groups": 2})), 60
    )

    texts = [(text, meta["finish_reason"]) for text, meta in rewards.SEEN]
    assert texts == [("123<pad><s>", "stop"), ("123", "stop"), ("12", "length"), ("<s>123", "length")]
    assert all(meta["answer"] == "123" for _, meta in rewards.SEEN)  # the task's own meta is still there
    recorded, legacy = sorted(await rollouts(aredis, run_id), key=lambda g: g.task)
    assert [s.reward for s in recorded.samples] == [1.0] * 4  # the finish reason reached the reward
    assert [s.reward for s in legacy.samples] == [float(len("123<pad><s>")), 3.0, 2.0, float(len("<s>123"))]
    assert [int(s.completion_ids[-1]) for s in recorded.samples[:2]] == [
        eos,
        eos,
    ]  # the stop token is trained on
