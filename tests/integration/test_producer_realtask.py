"""A user's task on a real Redis with the tiny model whose tokenizer has a chat template: chat prompts rendered with
it (both engines send the same ids), several weighted rewards in both forms with each one's score in the group,
stop strings, a reward slower than the heartbeat interval (the heartbeat never lapses) and one slower than its
timeout (dead-lettered as reward_error, its admission slot released)."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.config import TaskSettings
from common.feeder import enqueue
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow
from common.wire import DeadLetter, PromptTask, decode
from modeling import load_tokenizer
from producer.service import serve
from tests.integration.test_producer import make_settings, rollouts
from tests.support import rewards as R

pytestmark = pytest.mark.redis

QUESTIONS = [("what is one plus two", "3"), ("what is two plus two", "4"), ("what is four plus one", "5")]


def chat_rows() -> list[tuple[str, PromptRow]]:
    return [
        (f"task-{i}", PromptRow(f"q{i}", [{"role": "user", "content": q}], "exact_match", {"answer": a}))
        for i, (q, a) in enumerate(QUESTIONS)
    ]


async def put(aredis, run_id, rows, task: TaskSettings | None = None) -> None:
    await enqueue(StreamClient(aredis), RunKeys(run_id), rows, maxlen=10_000, task=task)


def template_ids(tok, question: str, system: str | None = None, **kw) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False, **kw)


@pytest.mark.parametrize("engine", ["transformers", "sglang"])
async def test_chat_prompts_are_the_chat_templates_token_ids_on_both_engines(
    engine, redis_url, run_id, aredis, chat_model_dir, tmp_path
):
    task = TaskSettings(system_prompt="be brief", chat_template_kwargs={"enable_thinking": False})
    await put(aredis, run_id, chat_rows(), task)
    over = {"producer.max_groups": 3}
    fake = None
    if engine == "sglang":
        from tests.support.fake_sglang import FakeSGLang

        fake = FakeSGLang(chat_model_dir).start()
        over |= {"producer.engine": "sglang", "producer.sglang_url": fake.url}
    try:
        await serve(make_settings(redis_url, run_id, tmp_path, chat_model_dir, **over))
    finally:
        if fake is not None:
            fake.stop()
    tok = load_tokenizer(chat_model_dir)
    want = {
        f"task-{i}": template_ids(tok, q, "be brief", enable_thinking=False)
        for i, (q, _) in enumerate(QUESTIONS)
    }
    groups = await rollouts(aredis, run_id)
    assert {g.group_id: g.prompt_ids.tolist() for g in groups} == want
    assert (
        tok.decode(want["task-0"])
        == "<s>system be brief</s><s>user what is one plus two</s><s>assistant nothink "
    )
    if fake is not None:  # what SGLang was sent: the same ids
        sent = [p for path, body in fake.requests if path == "/generate" and body for p in body["input_ids"]]
        from producer.engines.sglang import PROBE_PROMPT

        assert {tuple(p) for p in sent if p != PROBE_PROMPT} == {tuple(p) for p in want.values()}


async def test_a_chat_prompt_for_a_tokenizer_without_a_template_is_dead_lettered(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path
):
    rows = chat_rows()[:1] + [("task-text", PromptRow("t", "1+2=", "addition", {"answer": "3"}))]
    await put(aredis, run_id, rows)
    await serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **{"producer.max_groups": 1}))
    dead = [decode(f[b"m"], DeadLetter) for _, f in await aredis.xrange(RunKeys(run_id).dead)]
    assert [d.reason for d in dead] == ["bad_prompt"]
    assert "has no chat template" in dead[0].detail
    assert decode(dead[0].payload, PromptTask).task_id == "task-0"  # the original bytes: nothing lost
    assert [g.group_id for g in await rollouts(aredis, run_id)] == ["task-text"]


async def test_weighted_rewards_of_both_forms_and_stop_strings(
    redis_url, run_id, aredis, chat_model_dir, tmp_path
):
    R.BATCHES.clear()
    task = TaskSettings(
        rewards=[
            {"function": "tests.support.rewards:trl_exact", "name": "exact", "weight": 2.0},
            {"function": "tests.support.rewards:only_named", "name": "length", "weight": 0.5},
            {"function": "tests.support.rewards:recording", "name": "legacy", "weight": 1.0},
        ]
    )
    await put(aredis, run_id, chat_rows(), task)
    over = {
        "producer.max_groups": 3,
        "producer.sampling.max_new_tokens": 24,
        "producer.sampling.stop": ["e", "a"],
        "producer.seed": 3,
    }
    await serve(make_settings(redis_url, run_id, tmp_path, chat_model_dir, **over))
    tok = load_tokenizer(chat_model_dir)
    groups = await rollouts(aredis, run_id)
    assert len(groups) == 3 and len(R.BATCHES) == 3
    stopped_by_string = 0
    for g in groups:
        for s in g.samples:
            text = tok.decode(s.completion_ids.tolist(), skip_special_tokens=False)
            assert set(s.rewards) == {"exact", "length", "legacy"}
            parts = {k: (v or 0.0) for k, v in s.rewards.items()}
            assert s.reward == pytest.approx(2 * parts["exact"] + 0.5 * parts["length"] + parts["legacy"])
            if s.finish_reason == "length":
                assert s.rewards["length"] is None  # only_named: does not apply to a cut completion
            if text[-1:] in ("e", "a") and s.finish_reason == "stop":
                stopped_by_string += 1
                assert "e" not in text[:-1] and "a" not in text[:-1]  # ends at the first stop string
    assert stopped_by_string > 0
    # the batched reward saw the text before the stop string, and chat completions in TRL's form
    for call in R.BATCHES:
        for c, ids in zip(call["completions"], call["completion_ids"], strict=True):
            full = tok.decode(ids, skip_special_tokens=False)
            assert "e" not in c[0]["content"] and "a" not in c[0]["content"]
            assert full.startswith(c[0]["content"])


async def test_a_reward_slower_than_the_heartbeat_interval_never_lets_the_heartbeat_lapse(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(R.SLEEP_S, "value", 4.0)  # > heartbeat TTL (2 s), let alone its interval (0.67 s)
    task = TaskSettings(rewards=[{"function": "tests.support.rewards:sleepy"}])
    await put(aredis, run_id, [("task-0", PromptRow("p", "1+2=", "addition", {"answer": "3"}))], task)
    settings = make_settings(
        redis_url,
        run_id,
        tmp_path,
        tiny_model_dir,
        **{"producer.max_groups": 1, "producer.heartbeat_ttl_s": 2.0},
    )
    key = RunKeys(run_id).producer("p1")
    run = asyncio.create_task(serve(settings))
    seen, lapses, t0 = 0, 0, time.monotonic()
    while not run.done():
        if await aredis.exists(key):
            seen += 1
        elif seen:
            lapses += 1  # the key expired after it had been written
        await asyncio.sleep(0.1)
    await run
    assert time.monotonic() - t0 > 4.0  # the reward did take its 4 s
    assert seen > 20 and lapses <= 1  # (the last poll may follow the producer's clean removal of its key)
    (g,) = await rollouts(aredis, run_id)
    assert [s.reward for s in g.samples] == [1.0] * 4


async def test_a_reward_past_its_timeout_dead_letters_the_prompt_and_frees_its_slot(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, monkeypatch
):
    from common.admission import accounting

    monkeypatch.setitem(R.SLEEP_S, "value", 3.0)
    slow = TaskSettings(rewards=[{"function": "tests.support.rewards:async_sleepy", "name": "judge"}])
    await put(aredis, run_id, [("task-slow", PromptRow("p", "1+2=", "addition", {"answer": "3"}))], slow)
    await put(aredis, run_id, [("task-ok", PromptRow("q", "2+2=", "addition", {"answer": "4"}))])
    over = {"producer.max_groups": 2, "producer.reward_timeout_s": 0.5, "producer.prompts_per_call": 1}
    await serve(make_settings(redis_url, run_id, tmp_path, tiny_model_dir, **over))
    keys = RunKeys(run_id)
    dead = [decode(f[b"m"], DeadLetter) for _, f in await aredis.xrange(keys.dead)]
    assert [(d.reason, decode(d.payload, PromptTask).task_id) for d in dead] == [
        ("reward_error", "task-slow")
    ]
    assert "judge" in dead[0].detail and "reward_timeout_s=0.5s" in dead[0].detail
    assert [g.group_id for g in await rollouts(aredis, run_id)] == ["task-ok"]
    counts = await accounting(aredis, keys)
    assert counts["admitted"] == 2 and counts["released"] == 1
    assert await StreamClient(aredis).pending_count(keys.prompts, PRODUCERS_GROUP) == 0
