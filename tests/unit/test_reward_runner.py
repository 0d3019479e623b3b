"""producer/rewards.py: both reward forms (per completion, TRL's batched keyword form), sync and async, weights and
None, and the failures that dead-letter a prompt (raise, timeout, wrong count, not a number). Rewards run off the
calling event loop: a sleeping reward does not stop it."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.tasks import TaskError
from common.wire import PromptTask
from producer.rewards import RewardFailure, RewardRunner, batch_kwargs, is_batched, rewards_of
from tests.support import rewards as R

TEXTS = ["46", "45", "4"]
IDS = [[5, 6, 2], [5, 7], [5]]
REASONS = ["stop", "stop", "length"]


def task(rewards=(), messages=(), prompt="12+34=", **meta) -> PromptTask:
    return PromptTask(
        task_id="t-1",
        prompt="" if messages else prompt,
        task="addition",
        meta={"answer": "46", "prompt_id": "p", **meta},
        messages=tuple(messages),
        rewards=tuple(rewards),
    )


@pytest.fixture
def runner():
    r = RewardRunner(threads=4, timeout_s=2.0)
    yield r
    r.close()


async def test_the_single_reward_of_a_task_is_called_per_completion(runner):
    t = task()
    scored = await runner.score(t, rewards_of(t), TEXTS, IDS, REASONS)
    assert scored.totals == [1.0, 0.0, 0.0]
    assert scored.parts == [{}, {}, {}]  # one legacy reward: nothing extra on the wire


async def test_legacy_rewards_see_a_copy_of_meta_with_the_finish_reason(runner):
    R.SEEN.clear()
    t = task(rewards=[("rec", "tests.support.rewards:recording", 1.0)])
    await runner.score(t, rewards_of(t), TEXTS, IDS, REASONS)
    assert sorted(m["finish_reason"] for _, m in R.SEEN) == sorted(REASONS)
    assert "finish_reason" not in t.meta


async def test_trl_form_gets_prompts_completions_ids_and_columns(runner):
    R.BATCHES.clear()
    t = task(rewards=[("exact", "tests.support.rewards:trl_exact", 1.0)], source="gsm8k")
    scored = await runner.score(t, rewards_of(t), TEXTS, IDS, REASONS)
    assert scored.totals == [1.0, 0.0, 0.0] and [p["exact"] for p in scored.parts] == [1.0, 0.0, 0.0]
    (call,) = R.BATCHES
    assert call["prompts"] == ["12+34="] * 3
    assert call["completions"] == TEXTS
    assert call["completion_ids"] == IDS
    assert call["answer"] == ["46"] * 3 and call["source"] == ["gsm8k"] * 3
    assert call["finish_reason"] == REASONS and call["task_id"] == ["t-1"] * 3


async def test_chat_prompts_reach_batched_rewards_in_trls_conversational_form(runner):
    R.BATCHES.clear()
    msgs = [{"role": "user", "content": "12+34?"}]
    t = task(rewards=[("exact", "tests.support.rewards:trl_exact", 1.0)], messages=msgs)
    scored = await runner.score(t, rewards_of(t), TEXTS, IDS, REASONS)
    assert scored.totals == [1.0, 0.0, 0.0]
    (call,) = R.BATCHES
    assert call["prompts"] == [msgs] * 3
    assert call["completions"][0] == [{"role": "assistant", "content": "46"}]


async def test_weights_sum_and_none_does_not_count(runner):
    t = task(
        rewards=[
            ("exact", "tests.support.rewards:trl_exact", 2.0),
            ("length", "tests.support.rewards:only_named", -0.5),
            ("async", "tests.support.rewards:async_length", 0.25),
        ]
    )
    scored = await runner.score(t, rewards_of(t), TEXTS, IDS, REASONS)
    assert scored.parts == [
        {"exact": 1.0, "length": 2.0, "async": 2.0},
        {"exact": 0.0, "length": 2.0, "async": 2.0},
        {"exact": 0.0, "length": None, "async": 1.0},  # "length": only_named says it does not apply
    ]
    assert scored.totals == [2.0 - 1.0 + 0.5, -1.0 + 0.5, 0.25]


def test_the_batched_form_is_told_by_a_completions_parameter():
    assert is_batched(R.trl_exact) and is_batched(R.only_named) and is_batched(R.async_length)
    assert not is_batched(R.recording) and not is_batched(R.two_arguments_only)


def test_batch_kwargs_keep_the_reserved_names_over_columns():
    t = task(prompts="a column called prompts")
    kw = batch_kwargs(t, TEXTS, IDS, REASONS)
    assert kw["prompts"] == ["12+34="] * 3


@pytest.mark.parametrize(
    "function, match",
    [
        ("tests.support.rewards:flaky_addition", "raised ValueError: flaky reward refuses"),
        ("tests.support.rewards:wrong_count", "returned 4 scores for 3 completions"),
        ("tests.support.rewards:not_a_number", "returned str, not a number"),
    ],
)
async def test_a_bad_reward_fails_the_prompt_with_one_line(runner, function, match):
    t = task(rewards=[("r", function, 1.0)], fail=True)
    with pytest.raises(RewardFailure, match=match):
        await runner.score(t, rewards_of(t), TEXTS, IDS, REASONS)


def test_an_unknown_reward_is_a_task_error():
    with pytest.raises(TaskError, match="cannot be imported"):
        rewards_of(task(rewards=[("r", "tests.support.nothing:here", 1.0)]))


@pytest.mark.parametrize("function", ["tests.support.rewards:sleepy", "tests.support.rewards:async_sleepy"])
async def test_a_slow_reward_times_out_while_the_event_loop_keeps_running(function, monkeypatch):
    monkeypatch.setitem(R.SLEEP_S, "value", 1.5)
    runner = RewardRunner(threads=4, timeout_s=0.5)
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    tick = asyncio.create_task(ticker())
    t = task(rewards=[("slow", function, 1.0)])
    t0 = time.monotonic()
    try:
        with pytest.raises(RewardFailure, match="longer than producer.reward_timeout_s=0.5s"):
            await runner.score(t, rewards_of(t), TEXTS, IDS, REASONS)
    finally:
        tick.cancel()
        runner.close()
    assert time.monotonic() - t0 < 1.4  # the timeout, not the reward, ended the wait
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert len(ticks) >= 6 and max(gaps) < 0.3  # the loop ran all along


def test_a_reward_that_never_returns_does_not_keep_the_process_from_exiting(tmp_path):
    """The timed-out call's thread is a daemon: the interpreter exits without waiting for it."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "hang.py"
    script.write_text(
        "import asyncio, threading\n"
        "from producer.rewards import RewardRunner, RewardFailure\n"
        "async def main():\n"
        "    r = RewardRunner(threads=2, timeout_s=0.2)\n"
        "    try:\n"
        "        await r.call('hang', threading.Event().wait)\n"
        "    except RewardFailure as e:\n"
        "        print('failed:', e)\n"
        "    r.close()\n"
        "asyncio.run(main())\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script)], cwd=repo, env={"PYTHONPATH": str(repo)},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "failed: reward hang took longer than producer.reward_timeout_s=0.2s"
