"""Exactly-once training across kill -9: real `python -m gspo learner` processes killed mid-step,
mid-checkpoint-write and between STABLE and the announcement, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import verify_checkpoint
from common.wire import CheckpointAnnouncement, decode, encode
from tests.integration.test_learner_service import make_groups

pytestmark = [pytest.mark.redis, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def learner_cmd(redis_url: str, run_id: str, model: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gspo",
        "learner",
        "--redis-url",
        redis_url,
        "--run",
        run_id,
        "--model",
        str(model),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        "8",
        "--publish-every",
        "2",
        "-B",
        "2",
        "-K",
        "100",
        "--dataset",
        "",
        "--threads",
        "1",
        "--log-level",
        "WARNING",
    ]


def start(cmd: list[str], crash_at: str | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LEARNER_TEST_CRASH_AT", None)
    if crash_at:
        env["LEARNER_TEST_CRASH_AT"] = crash_at
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def test_every_group_is_trained_exactly_once_across_kills(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
):
    keys = RunKeys(run_id)
    groups = make_groups(tiny_model_dir, 16)
    for g in groups:
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    run_dir = tmp_path / "run"
    cmd = learner_cmd(redis_url, run_id, tiny_model_dir, run_dir)

    # 1: SIGKILL at a random moment once the first step is logged
    proc = start(cmd, None)
    deadline = time.monotonic() + 60
    while not metric_lines(run_dir) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) in (-signal.SIGKILL, 0)
    # 2..3: crash hooks inside a checkpoint write and between STABLE and the announcement; 4: clean
    codes = []
    for crash in ("checkpoint_write:6", "before_announce:8", None):
        proc = start(cmd, crash)
        out = proc.communicate(timeout=120)[0].decode()
        codes.append(proc.returncode)
        assert proc.returncode in (0, 137), out[-3000:]
    assert 137 in codes and codes[-1] == 0

    last: dict[int, dict] = {}
    for row in metric_lines(
        run_dir
    ):  # a resumed run re-logs the steps after its checkpoint: the last one counts
        last[row["step"]] = row
    assert sorted(last) == list(range(1, 9))
    trained = [gid for s in range(1, 9) for gid in last[s]["groups/ids"]]
    assert sorted(trained) == sorted(g.group_id for g in groups)  # each exactly once
    assert (await aredis.xpending(keys.rollouts, LEARNER_GROUP))["pending"] == 0
    latest = decode(await aredis.get(keys.latest), expect=CheckpointAnnouncement)
    assert latest.step == 8
    verify_checkpoint(latest.path, latest.manifest_sha256)
    state = await aredis.hgetall(keys.learner_state)
    assert int(state[b"version"]) == 8 and int(state[b"consumed"]) == 16
