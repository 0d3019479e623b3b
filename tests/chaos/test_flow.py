"""Flow control with real processes: a reward function that raises on a third of the prompts costs their
groups, never the run. Each such prompt is dead-lettered by its producer with ``reward_error`` and releases
its admission slot (``common/admission.py``), so the learner reaches ``--max-steps`` although far more than
(K+1)·B admitted groups never reach it; at the end every admitted group is accounted for."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from common.keys import LEARNER_GROUP, RunKeys
from common.tasks import addition_prompt
from tests.chaos.conftest import dead_letters, learner_args, metric_rows, producer_args, report, sync_client

pytestmark = [pytest.mark.redis, pytest.mark.slow]
B, K, MAX_STEPS = 4, 2, 15


def flaky_dataset(path, n: int = 300) -> None:
    """Addition rows scored by ``tests.support.rewards:flaky_addition``, which raises on every third one."""
    with path.open("w") as f:
        for i in range(n):
            row = addition_prompt(i % 100, (7 * i) % 100)
            f.write(json.dumps({"id": f"flaky-{i}", "prompt": row.prompt, "answer": row.meta["answer"],
                                "task": "tests.support.rewards:flaky_addition", "fail": i % 3 == 0}) + "\n")  # fmt: skip


def admission_accounting(r, keys: RunKeys) -> dict[str, int]:
    """The admission counters, and the groups appended that the learner has not counted (read ahead and still
    pending for it, or never delivered to it)."""
    group = next(g for g in r.xinfo_groups(keys.rollouts) if g["name"] == LEARNER_GROUP.encode())
    undelivered = len(r.xrange(keys.rollouts, f"({group['last-delivered-id'].decode()}", "+"))
    return {
        "admitted": int(r.get(keys.admitted_count) or 0),
        "consumed": int(r.hget(keys.learner_state, "consumed") or 0),
        "released": int(r.get(keys.released_count) or 0),
        "open": int(r.zcard(keys.admissions_open)),
        "appended_not_consumed": int(r.xpending(keys.rollouts, LEARNER_GROUP)["pending"]) + undelivered,
    }


def test_a_reward_raising_on_a_third_of_the_prompts_does_not_stall_the_run(
    own_redis, services, run_id, tiny_model_dir, tmp_path
):
    url, run_dir, keys = own_redis.url, tmp_path / "run", RunKeys(run_id)
    r = sync_client(url)
    dataset = tmp_path / "flaky.jsonl"
    flaky_dataset(dataset)
    learner = services.start("learner", learner_args(url, run_id, tiny_model_dir, run_dir, max_steps=MAX_STEPS, batch_groups=B,
                                                     max_staleness=K, dataset=str(dataset)), "learner")  # fmt: skip
    producer = services.start("producer", producer_args(url, run_id, tiny_model_dir, run_dir, "p0"), "p0")
    # before the fix: (K+1)·B = 12 reward errors and admission never admitted again (the learner waited for ever)
    assert learner.wait(240) == 0, learner.tail()
    assert producer.terminate() == 0, producer.tail()  # drains: what it admitted is appended or dead-lettered

    rows = metric_rows(run_dir)
    assert rows[-1]["step"] == MAX_STEPS
    dead = dead_letters(r, keys)
    reasons = Counter(d.reason for d in dead)
    assert set(reasons) == {"reward_error"} and reasons["reward_error"] > (K + 1) * B, reasons
    counts = admission_accounting(r, keys)
    assert counts["open"] == 0, counts  # the producer drained: nothing admitted is left in generation
    assert counts["released"] == reasons["reward_error"], counts  # one release per dead letter, no more
    accounted = counts["consumed"] + counts["released"] + counts["open"] + counts["appended_not_consumed"]
    assert counts["admitted"] == accounted, counts
    trained = [g for row in rows for g in row["groups/ids"]]
    assert len(trained) == len(set(trained)) == MAX_STEPS * B
    report("flow_reward_errors", {"steps": rows[-1]["step"], "trained": len(trained), "bound": (K + 1) * B,
                                  "reward_errors": reasons["reward_error"], **counts,
                                  "slots_leaked": counts["admitted"] - accounted})  # fmt: skip
