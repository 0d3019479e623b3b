"""Exactly-once training across kill -9 of the sharded learner under torchrun: 2 ranks killed mid-step and
mid-checkpoint-write, then resumed on 2 ranks, on 1 rank (2 → 1: the plain 1-rank learner reads the sharded
optimizer state whole) and on 2 again (1 → 2: the ranks share out the plain learner's whole optimizer state);
every group is trained exactly once, every entry acked, the last checkpoint verifies and loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import verify_checkpoint
from common.wire import CheckpointAnnouncement, decode, encode
from tests.integration.test_learner_resume import metric_lines
from tests.integration.test_learner_service import make_groups

pytestmark = [pytest.mark.redis, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STEPS = 10


def learner(ranks: int, redis_url: str, run_id: str, model: Path, run_dir: Path, crash_at: str | None):
    """``gspo learner`` under torchrun (the run id as GSPO_RUN: torchrun would take ``--run`` for its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
    env.update(OMP_NUM_THREADS="1", GSPO_RUN=run_id)
    if crash_at:
        env["LEARNER_TEST_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "gspo", "learner", "--redis-url", redis_url, "--model", str(model), "--run-dir", str(run_dir),
           "--max-steps", str(STEPS), "--publish-every", "2", "-B", "2", "-K", "100", "--dataset", "",
           "--threads", "1", "--log-level", "WARNING"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


async def test_kills_of_the_two_rank_learner_lose_nothing_and_train_nothing_twice(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
):
    keys = RunKeys(run_id)
    groups = make_groups(tiny_model_dir, 2 * STEPS)
    for g in groups:
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    run_dir = tmp_path / "run"
    # 2 ranks killed in step 3 (resume from step 2), 2 ranks killed writing step 6 (resume from 4), 1 rank
    # killed after step 7 (resume from 6), then 2 ranks to the end
    for ranks, crash in ((2, "during_step:3"), (2, "checkpoint_write:6"), (1, "after_step:7"), (2, None)):
        done = learner(ranks, redis_url, run_id, tiny_model_dir, run_dir, crash)
        tail = (done.stdout + done.stderr)[-3000:]
        if crash:
            assert done.returncode != 0, tail
            assert "exiting with 137" in done.stdout + done.stderr, tail  # the hook fired (no other failure)
        else:
            assert done.returncode == 0, tail
    last: dict[int, dict] = {}
    for row in metric_lines(run_dir):  # a resumed run re-logs the steps after its checkpoint: the last counts
        last[row["step"]] = row
    assert sorted(last) == list(range(1, STEPS + 1))
    trained = [gid for s in last for gid in last[s]["groups/ids"]]
    assert sorted(trained) == sorted(g.group_id for g in groups)  # each exactly once
    assert (await aredis.xpending(keys.rollouts, LEARNER_GROUP))["pending"] == 0
    latest = decode(await aredis.get(keys.latest), expect=CheckpointAnnouncement)
    assert latest.step == STEPS
    verify_checkpoint(latest.path, latest.manifest_sha256)
    state = await aredis.hgetall(keys.learner_state)
    assert int(state[b"version"]) == STEPS and int(state[b"consumed"]) == 2 * STEPS
    from modeling import load_model

    load_model(latest.path)  # the consolidated weights load as a model
