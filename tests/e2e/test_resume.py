"""``gspo up`` run again on the same run dir resumes and reaches its next --max-steps, also when the
embedded Redis was restarted from a rewritten AOF with a prompts group whose XINFO lag is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from common.keys import PRODUCERS_GROUP, RunKeys
from common.redis_conn import running_embedded, stop_embedded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def gspo_up(run_dir: Path, model: Path, max_steps: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    env["GSPO_PIPELINE__BATCH_GROUPS"] = "4"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gspo",
            "up",
            "--run-dir",
            str(run_dir),
            "--model",
            str(model),
            "--max-steps",
            str(max_steps),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        stdin=subprocess.DEVNULL,
    )


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def break_lag_and_rewrite_aof(run_dir: Path) -> None:
    """Start the run's embedded Redis, make XINFO report a lag of every prompt ever added while nothing is
    undelivered (entries-read lost, as after the AOF rewrite seen in a real run), rewrite the AOF, stop."""
    url = subprocess.run(
        [sys.executable, "-m", "gspo", "redis", "start", "--run-dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    c = redis.Redis.from_url(url)
    try:
        prompts = RunKeys("default").prompts
        [last] = c.xrevrange(prompts, count=1)
        c.execute_command("XGROUP", "SETID", prompts, PRODUCERS_GROUP, last[0], "ENTRIESREAD", 0)
        [g] = [g for g in c.xinfo_groups(prompts) if g["name"] == PRODUCERS_GROUP.encode()]
        assert g["lag"] > 0 and g["last-delivered-id"] == last[0]
        c.bgrewriteaof()
        for _ in range(100):
            if c.info("persistence")["aof_rewrite_in_progress"] == 0:
                break
            __import__("time").sleep(0.1)
    finally:
        c.close()
    stop_embedded(run_dir)


def test_a_resumed_run_reaches_its_next_max_steps_after_an_aof_rewrite(tmp_path: Path, tiny_model_dir: Path):
    run_dir = tmp_path / "run"
    try:
        first = gspo_up(run_dir, tiny_model_dir, 3)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
        assert steps_logged(run_dir)[-1] == 3
        break_lag_and_rewrite_aof(run_dir)
        # more steps than the rollouts left over from the first run can feed: new prompts must be enqueued
        second = gspo_up(run_dir, tiny_model_dir, 12)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        assert steps_logged(run_dir)[-9:] == list(range(4, 13))
    finally:
        if running_embedded(run_dir):
            stop_embedded(run_dir)
