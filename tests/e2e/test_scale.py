"""Elastic producers: the local launcher brings up 2 producers, scales to 3 and back to 1 while the
learner runs; metrics show training continued and nothing was lost or trained twice."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import redis

from common.keys import PRODUCERS_GROUP, RunKeys
from common.wire import RolloutGroup, decode
from ops.launcher import LocalCluster, read_metrics, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]
SMALL = {
    "GSPO_PIPELINE__BATCH_GROUPS": "4", "GSPO_PIPELINE__GROUP_SIZE": "4", "GSPO_PIPELINE__MAX_STALENESS": "2",
    "GSPO_PRODUCER__SAMPLING__MAX_NEW_TOKENS": "4", "GSPO_PRODUCER__PROMPTS_PER_CALL": "2",
    "GSPO_PRODUCER__CLAIM_IDLE_MS": "1500", "GSPO_PRODUCER__HEARTBEAT_TTL_S": "3", "GSPO_LEARNER__PUBLISH_EVERY": "2",
}  # fmt: skip
MAX_STEPS = 60  # well past the scale-down at step >= 16, so training after it is observed


def _step(run_dir) -> int:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return rows[-1]["step"] if rows else 0


@contextlib.contextmanager
def _paused(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _live_producers(client: redis.Redis, keys: RunKeys) -> int:
    return sum(1 for _ in client.scan_iter(match=f"{keys.producers}:*"))


def test_scale_producers_2_to_3_to_1_while_learning(redis_url, run_id, tiny_model_dir, tmp_path):
    keys = RunKeys(run_id)
    client = redis.Redis.from_url(redis_url)
    cluster = LocalCluster(
        run=run_id,
        run_dir=tmp_path,
        redis_url=redis_url,
        model=str(tiny_model_dir),
        learner_args=["--max-steps", str(MAX_STEPS)],
        env=SMALL,
    )
    seen_live: list[int] = []
    try:
        cluster.start_learner()
        cluster.scale_producers(2)
        assert wait_until(lambda: _step(tmp_path) >= 6, 120), "no training with 2 producers"
        seen_live.append(_live_producers(client, keys))
        # the learner is paused (SIGSTOP) while producers join and leave: a fast machine would otherwise
        # reach max_steps before a slow producer start-up is over, and nothing would be seen after the change
        with _paused(cluster.learner.proc.pid):
            cluster.scale_producers(3)
            assert wait_until(lambda: _live_producers(client, keys) == 3, 60), "third producer never joined"
        assert wait_until(lambda: _step(tmp_path) >= 16, 120), "training stalled after scaling to 3"
        seen_live.append(_live_producers(client, keys))
        with _paused(cluster.learner.proc.pid):
            removed_at = _step(tmp_path)
            cluster.scale_producers(1)  # two graceful SIGTERM drains
            assert wait_until(lambda: _live_producers(client, keys) == 1, 30), (
                "drained producers did not deregister"
            )
        seen_live.append(1)
        assert wait_until(lambda: not cluster.learner.alive, 240), (
            "learner did not reach max_steps with 1 producer"
        )
    finally:
        codes = cluster.stop()
    assert cluster.learner.proc.returncode == 0, (tmp_path / "logs" / "learner.out").read_text()[-3000:]
    assert all(c == 0 for c in codes.values()), codes  # every producer drained and exited 0
    assert seen_live == [2, 3, 1]

    rows = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, MAX_STEPS + 1))  # training continued through both changes
    assert max(steps) > removed_at
    trained = [g for r in rows for g in r["groups/ids"]]
    stale = [g for r in rows for g in r.get("groups/stale_ids", [])]
    assert len(trained) == len(set(trained)) == MAX_STEPS * 4  # nothing trained twice

    # nothing lost: every prompt a producer acked became a group that was trained, dropped as stale
    # (counted), or is still waiting in the rollouts stream for the next step
    in_stream = {decode(f[b"m"], RolloutGroup).group_id for _, f in client.xrange(keys.rollouts)}
    delivered = {g["name"].decode(): g for g in _groups(client, keys.prompts)}
    pending_prompts = {
        e["message_id"].decode()
        for e in client.xpending_range(keys.prompts, PRODUCERS_GROUP, "-", "+", 10_000)
    }
    acked_task_ids = set()
    last = delivered[PRODUCERS_GROUP]["last-delivered-id"].decode()
    for entry_id, fields in client.xrange(keys.prompts, max=last):
        if entry_id.decode() not in pending_prompts:
            acked_task_ids.add(_task_id(fields[b"m"]))
    accounted = set(trained) | set(stale) | in_stream
    missing = acked_task_ids - accounted
    assert not missing, f"{len(missing)} acked prompts never reached the learner: {sorted(missing)[:5]}"
    client.close()


def _groups(client: redis.Redis, stream: str) -> list[dict]:
    return [
        {(k.decode() if isinstance(k, bytes) else k): v for k, v in g.items()}
        for g in client.xinfo_groups(stream)
    ]


def _task_id(payload: bytes) -> str:
    from common.wire import PromptTask

    return decode(payload, PromptTask).task_id
