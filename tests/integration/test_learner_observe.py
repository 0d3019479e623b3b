"""What the learner shows of a user's task, on a real Redis: each reward's mean (``reward/<name>``), eval rounds
(eval prompts enqueued every N steps, their groups counted but never trained, ``eval/reward``), and sample
completions in RUN_DIR/samples.jsonl."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest

from common.keys import RunKeys
from common.wire import PromptTask, RolloutGroup, decode, encode
from tests.integration.test_learner_service import learner_settings, make_groups, read_metrics, run_learner

pytestmark = pytest.mark.redis


def with_parts(group: RolloutGroup, exact: list[float], fmt: list[float | None]) -> RolloutGroup:
    samples = tuple(
        replace(s, reward=2 * e + (f or 0.0), rewards={"exact": e, "fmt": f})
        for s, e, f in zip(group.samples, exact, fmt, strict=True)
    )
    return replace(group, samples=samples)


async def play_producer_for_eval(aredis, keys: RunKeys, template: RolloutGroup, later: list[RolloutGroup]):
    """Answer each eval prompt the learner enqueues with a group (rewards 0.25 each), then append ``later``."""
    answered: set[str] = set()
    while len(answered) < 3:
        for _, f in await aredis.xrange(keys.prompts):
            task = decode(f[b"m"], PromptTask)
            if "-eval-" in task.task_id and task.task_id not in answered:
                answered.add(task.task_id)
                samples = tuple(replace(s, reward=0.25) for s in template.samples)
                g = replace(template, group_id=task.task_id, prompt_id=task.task_id, samples=samples)
                await aredis.xadd(keys.rollouts, {b"m": encode(g)})
        await asyncio.sleep(0.05)
    for g in later:
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    return sorted(answered)


async def test_reward_components_eval_rounds_and_samples(tiny_model_dir, redis_url, run_id, aredis, tmp_path):
    from learner.service import main

    keys = RunKeys(run_id)
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "task": "addition"}) + "\n"
            for i in range(3)
        )
    )
    base = make_groups(tiny_model_dir, 8)
    groups = [
        with_parts(g, [1.0, 0.0, 1.0, 1.0], [0.5, None, 0.0, 1.0]) if i % 2 == 0 else g
        for i, g in enumerate(base)
    ]
    for g in groups[:4]:
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    s = learner_settings(
        run_id,
        redis_url,
        tmp_path / "run",
        tiny_model_dir,
        max_staleness=5,
        eval_dataset=str(evalset),
        eval_every=2,
        samples_every=2,
        samples_groups=1,
    )
    producer = asyncio.create_task(play_producer_for_eval(aredis, keys, base[0], groups[4:]))
    assert await run_learner(main, s) == 0
    answered = await asyncio.wait_for(producer, 5)
    assert answered == [f"{run_id}-eval-000000002-{i:06d}" for i in range(3)]

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # each step's batch is one group with reward parts and one without
    for r in rows:
        assert r["reward/exact"] == pytest.approx(0.75)
        assert r["reward/fmt"] == pytest.approx(0.5)  # the None is left out of the mean
    trained = [g for r in rows for g in r["groups/ids"]]
    assert trained == [g.group_id for g in groups]  # eval groups never trained
    (ev,) = [r for r in rows if "eval/reward" in r]
    assert ev["step"] == 3
    assert (ev["eval/reward"], ev["eval/step"], ev["eval/groups"], ev["eval/prompts"]) == (0.25, 2, 3, 3)
    state = await aredis.hgetall(keys.learner_state)
    assert int(state[b"consumed"]) == 8 + 3  # eval groups released their admission slots
    # the eval prompts went out as tasks of the eval set
    tasks = [decode(f[b"m"], PromptTask) for _, f in await aredis.xrange(keys.prompts)]
    assert [(t.prompt, t.meta["answer"]) for t in tasks[:3]] == [("0+1=", "1"), ("1+1=", "2"), ("2+1=", "3")]
    # samples at steps 2 and 4: all completions of the batch's first group
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(x["step"], x["group_id"]) for x in samples] == [(2, groups[2].group_id)] * 4 + [
        (4, groups[6].group_id)
    ] * 4
    assert samples[0]["rewards"] == {"exact": 1.0, "fmt": 0.5} and samples[1]["rewards"]["fmt"] is None
    assert {x["finish_reason"] for x in samples} == {"stop"}
    assert all(isinstance(x["prompt"], str) and x["prompt"] for x in samples)
    assert [x["tokens"] for x in samples[:4]] == [int(s.completion_ids.size) for s in groups[2].samples]
    assert np.isclose(samples[0]["reward"], groups[2].samples[0].reward)
