"""The learner is the authority on K, B and G (its learner-state hash): a producer configured otherwise
cannot over-admit, and one with another G refuses to run (exit 2, one line naming both values)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.admission import Admitter, GroupSizeMismatch
from common.feeder import enqueue
from common.keys import RunKeys
from common.streams import StreamClient
from common.tasks import addition_prompt

pytestmark = pytest.mark.redis
REPO = Path(__file__).resolve().parents[2]


async def admit_all(adm: Admitter, prefix: str, n: int = 50, version: int = 0) -> int:
    admitted = 0
    for i in range(n):
        admitted += (await adm.try_admit(f"{prefix}{i}", version)).admitted
    return admitted


async def test_learner_k_and_b_bound_admission_not_the_producers(aredis, run_id, caplog):
    keys = RunKeys(run_id)
    await aredis.hset(keys.learner_state, mapping={"max_staleness": 0, "batch_groups": 2, "group_size": 4})
    adm = Admitter(aredis, keys, max_staleness=5, batch_groups=2, prefill_min_groups=1, group_size=4)
    with caplog.at_level(logging.WARNING, logger="common.admission"):
        assert (
            await admit_all(adm, "g") == 2
        )  # (K+1)*B with the learner's K=0; the producer's K=5 would be 12
    warnings = [r.getMessage() for r in caplog.records if "learner's values are used" in r.getMessage()]
    assert warnings == [
        "configured max_staleness K=5, batch_groups B=2 differ from the learner's K=0, B=2: "
        "the learner's values are used"
    ]  # once, not per admission
    first = await adm.try_admit("g0", 0)
    assert (first.admitted, first.headroom, first.max_staleness, first.batch_groups) == (True, -1, 0, 2)
    # the learner trains a step (version 1, 2 consumed): again at most (K+1)*B outstanding
    await aredis.hset(keys.learner_state, mapping={"version": 1, "next_version": 1, "consumed": 2})
    assert await admit_all(adm, "h", version=1) == 2
    assert int(await aredis.get(keys.admitted_count)) == 4


async def test_the_producers_own_k_and_b_hold_until_a_learner_publishes(aredis, run_id):
    keys = RunKeys(run_id)
    adm = Admitter(aredis, keys, max_staleness=5, batch_groups=2, prefill_min_groups=1, group_size=4)
    await adm.check_learner()  # nothing published yet: nothing to refuse
    assert await admit_all(adm, "g") == 12  # the prefill: (5+1)*2 of the producer's own
    await aredis.hset(keys.learner_state, mapping={"max_staleness": 1, "batch_groups": 2, "group_size": 4})
    assert await admit_all(adm, "h") == 0  # 12 outstanding >= (1+1)*2: the learner's bound from now on


async def test_another_group_size_is_refused_before_anything_is_admitted(aredis, run_id):
    keys = RunKeys(run_id)
    adm = Admitter(aredis, keys, max_staleness=1, batch_groups=2, prefill_min_groups=1, group_size=4)
    assert (await adm.try_admit("g0", 0)).admitted
    await aredis.hset(keys.learner_state, mapping={"max_staleness": 1, "batch_groups": 2, "group_size": 8})
    with pytest.raises(GroupSizeMismatch, match="G=4 differs from the learner's G=8"):
        await adm.try_admit("g1", 0)
    with pytest.raises(GroupSizeMismatch, match="G=4 differs from the learner's G=8"):
        await adm.check_learner()
    assert int(await aredis.get(keys.admitted_count)) == 1


def start_producer(
    redis_url: str, run_id: str, model: Path, run_dir: Path, group_size: int
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gspo", "producer", "--redis-url", redis_url, "--run", run_id]
    cmd += ["--model", str(model), "--run-dir", str(run_dir), "--producer-id", "p1", "-G", str(group_size)]
    cmd += ["--max-new-tokens", "4", "--prompts-per-call", "1", "--threads", "1", "--log-level", "INFO"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("GSPO_")}
    with (run_dir / "p1.out").open("wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def refusal_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if "producer failed" in ln]


@pytest.mark.slow
async def test_producer_with_another_g_exits_2_at_start(redis_url, run_id, aredis, tiny_model_dir, tmp_path):
    keys = RunKeys(run_id)
    await aredis.hset(keys.learner_state, mapping={"max_staleness": 1, "batch_groups": 2, "group_size": 8})
    proc = start_producer(redis_url, run_id, tiny_model_dir, tmp_path, group_size=4)
    await asyncio.to_thread(proc.wait, 120)
    out = (tmp_path / "p1.out").read_text()
    assert proc.returncode == 2, out
    (line,) = refusal_lines(out)
    assert "G=4" in line and "G=8" in line and "Traceback" not in out


@pytest.mark.slow
async def test_producer_exits_2_when_the_learner_publishes_another_g_later(
    redis_url, run_id, aredis, tiny_model_dir, tmp_path
):
    keys = RunKeys(run_id)
    rows = [(f"task-{i}", addition_prompt(i, 1)) for i in range(200)]
    await enqueue(StreamClient(aredis), keys, rows, maxlen=10_000)
    proc = start_producer(redis_url, run_id, tiny_model_dir, tmp_path, group_size=4)
    try:
        deadline = time.monotonic() + 120
        while await aredis.xlen(keys.rollouts) == 0:  # the prefill runs on the producer's own K and B
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "p1.out").read_text()
            await asyncio.sleep(0.1)
        await aredis.hset(
            keys.learner_state, mapping={"max_staleness": 1, "batch_groups": 2, "group_size": 8}
        )
        await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "p1.out").read_text()
    assert proc.returncode == 2, out
    (line,) = refusal_lines(out)
    assert "G=4 differs from the learner's G=8" in line and "Traceback" not in out
