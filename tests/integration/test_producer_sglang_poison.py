"""One poison prompt among many does not stop a real ``gspo producer`` process driving an SGLang server.

SGLang answers 400 for the *whole* batch when any one prompt (plus max_new_tokens) exceeds its context
length. Before the engine stage isolated such prompts, the producer exited on that 400, the prompt stayed
pending, and the same producer id restarted straight into it (own pending entries come first): a crash
loop, and any other producer that reclaimed it died the same way. Here the poison prompt is already
pending for the producer's id when it starts (the restart case); the producer must dead-letter it with
its reason, generate every other prompt, and keep running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.feeder import enqueue
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow, addition_prompt
from common.wire import DeadLetter, PromptTask, RolloutGroup, decode
from tests.support.fake_sglang import FakeSGLang

pytestmark = [pytest.mark.redis, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
G = 2


def start_producer(redis_url: str, run_id: str, model: Path, url: str, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gspo", "producer", "--redis-url", redis_url, "--run", run_id]
    cmd += ["--engine", "sglang", "--sglang-url", url, "--model", str(model), "--producer-id", "p0"]
    cmd += ["-G", str(G), "--max-new-tokens", "8", "--prompts-per-call", "4", "--claim-idle-ms", "60000"]
    cmd += ["--run-dir", str(run_dir), "--log-level", "INFO"]
    log = (run_dir / "p0.out").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}
    )


async def until(predicate, timeout_s: float, what: str, proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        if proc.poll() is not None:
            tail = (run_dir / "p0.out").read_text(errors="replace")[-3000:]
            raise AssertionError(f"the producer exited ({proc.returncode}) while waiting for {what}\n{tail}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.mark.parametrize(
    ("report_limits", "reason", "detail"),
    [
        (True, "prompt_too_long", "> the engine's context limit 62"),
        (False, "engine_refused", "longer than the model's context length (64 tokens)"),
    ],
    ids=["limit-reported", "limit-unknown"],
)
async def test_one_poison_prompt_does_not_stop_an_sglang_producer(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path, report_limits, reason, detail
):
    fake = FakeSGLang(tiny_model_dir, context_len=64, report_limits=report_limits).start()
    keys = RunKeys(run_id)
    streams = StreamClient(aredis)
    poison = PromptRow("poison", "1" * 70 + "+1=", "addition", {"answer": "0"})  # > 64 tokens
    good = [(f"task-{i:03d}", addition_prompt(i, 99 - i)) for i in range(12)]
    await aredis.hset(keys.learner_state, mapping={"max_staleness": 10, "batch_groups": 64, "group_size": G})
    # the poison prompt is pending for p0 already: a p0 that crashed on it, restarted
    await enqueue(streams, keys, [("task-poison", poison)], maxlen=10_000)
    delivered = await aredis.xreadgroup(PRODUCERS_GROUP, "p0", {keys.prompts: ">"}, count=1)
    assert decode(delivered[0][1][0][1][b"m"], PromptTask).task_id == "task-poison"
    await enqueue(streams, keys, good, maxlen=10_000)
    t0 = time.monotonic()
    proc = start_producer(redis_url, run_id, tiny_model_dir, fake.url, tmp_path)
    try:

        async def all_done() -> bool:
            groups = {decode(f[b"m"], RolloutGroup).group_id for _, f in await aredis.xrange(keys.rollouts)}
            return (
                groups == {t for t, _ in good}
                and await streams.pending_count(keys.prompts, PRODUCERS_GROUP) == 0
            )

        await until(all_done, 120, "every good prompt generated and every prompt acked", proc, tmp_path)
        elapsed = time.monotonic() - t0
        dead = [decode(f[b"m"], DeadLetter) for _, f in await aredis.xrange(keys.dead)]
        assert [(decode(d.payload, PromptTask).task_id, d.reason) for d in dead] == [("task-poison", reason)]
        assert detail in dead[0].detail and "\n" not in dead[0].detail
        time.sleep(1.0)
        assert proc.poll() is None, "the producer must keep running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        fake.stop()
    generate_calls = [b for p, b in fake.requests if p == "/generate"]
    poisoned = [b for b in generate_calls if any(len(ids) >= 64 for ids in b["input_ids"])]
    # reported limit: the poison never reaches the server; unknown limit: the refused batch is split down to it
    assert (len(poisoned) == 0) == report_limits, len(poisoned)
    print(
        f"\n{reason}: 12 good prompts + 1 poison done in {elapsed:.1f}s after the producer started, "
        f"{len(generate_calls)} /generate calls, {len(poisoned)} holding the poison"
    )
