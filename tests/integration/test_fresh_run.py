"""Re-using a run with real ``python -m gspo learner`` processes: ``--no-resume`` on a used run is refused in one
line, ``--fresh`` wipes the run's Redis keys and checkpoints and starts over, and a learner killed with -9 and
resumed neither re-enqueues nor skips a prompt (the feeder's cursor comes from Redis, not from the checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from common.keys import PRODUCERS_GROUP, RunKeys
from common.manifest import stable_steps, verify_checkpoint
from common.wire import CheckpointAnnouncement, PromptTask, decode, encode
from tests.integration.test_learner_service import make_groups

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[2]


def learner_cmd(redis_url: str, run_id: str, model: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gspo", "learner", "--redis-url", redis_url, "--run", run_id, "--model", str(model),
            "--run-dir", str(run_dir), "--publish-every", "2", "-B", "2", "-K", "100", "--threads", "1",
            "--log-level", "WARNING", *extra]  # fmt: skip


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
    return dict(e, OMP_NUM_THREADS="1")


def run(cmd: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout_s)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def used_run(r: redis.Redis, keys: RunKeys, model: Path, redis_url: str, run_dir: Path) -> None:
    """A run trained to step 4 (checkpoints 2 and 4, announced), with producers' admissions counted."""
    for g in make_groups(model, 8):
        r.xadd(keys.rollouts, {b"m": encode(g)})
    r.set(keys.admitted_count, 8)  # what the producers of that run had admitted
    done = run(learner_cmd(redis_url, keys.run, model, run_dir, "--max-steps", "4", "--dataset", ""))
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in stable_steps(run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in (run_dir / "learner-state").iterdir()) == ["step_00000002", "step_00000004"]


def test_no_resume_on_a_used_run_is_refused_in_one_line(tiny_model_dir, redis_url, run_id, tmp_path):
    keys = RunKeys(run_id)
    run_dir = tmp_path / "run"
    r = redis.Redis.from_url(redis_url)
    try:
        used_run(r, keys, tiny_model_dir, redis_url, run_dir)
        latest_before = r.get(keys.latest)
        # four more groups: enough for two steps of a new run (before the refusal it ran, mixing both runs)
        for g in make_groups(tiny_model_dir, 4, prefix="n", seed=3):
            r.xadd(keys.rollouts, {b"m": encode(g)})

        refused = run(learner_cmd(redis_url, run_id, tiny_model_dir, run_dir, "--no-resume", "--max-steps", "2",
                                  "--dataset", ""))  # fmt: skip
        assert refused.returncode == 2, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        line = lines[0]
        assert "--no-resume" in line and "--fresh" in line and "--resume" in line, line
        assert "step_00000004" in line and str(run_dir / "checkpoints") in line, line
        assert f"gspo:{run_id}:latest" in line and f"gspo:{run_id}:admitted" in line, line
        # nothing was touched
        assert [p.name for p in stable_steps(run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]
        assert r.get(keys.latest) == latest_before and metric_steps(run_dir) == [1, 2, 3, 4]
    finally:
        r.close()


def test_fresh_wipes_the_run_and_starts_over(tiny_model_dir, redis_url, run_id, tmp_path):
    keys = RunKeys(run_id)
    run_dir = tmp_path / "run"
    r = redis.Redis.from_url(redis_url)
    try:
        used_run(r, keys, tiny_model_dir, redis_url, run_dir)
        old = {k for k in r.scan_iter(match=f"gspo:{run_id}:*")}
        assert keys.latest.encode() in old and keys.learner_state.encode() in old
        r.set(f"gspo:{run_id}x:latest", b"another run")  # a neighbour whose name has this run's as prefix
        (run_dir / "metrics").mkdir(exist_ok=True)
        (run_dir / "metrics" / "producer-old.jsonl").write_text("{}\n")

        # the new run's own rollouts are added once the wipe is done: the learner is started with a stopper
        proc = subprocess.Popen(learner_cmd(redis_url, run_id, tiny_model_dir, run_dir, "--fresh", "--max-steps",
                                            "2", "--dataset", "", "--log-level", "INFO"),
                                cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 90
        while r.exists(keys.latest) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert not r.exists(keys.latest), "the old announcement was not wiped"
        while not r.exists(keys.learner_state) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        for g in make_groups(tiny_model_dir, 4, prefix="f", seed=5):
            r.xadd(keys.rollouts, {b"m": encode(g)})
        out = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 0, out[-3000:]
        assert "--fresh: deleted" in out, out[-3000:]

        # one run, the new one: steps 1-2 only, checkpoint 2 only (the old step_00000004 cannot prune it)
        assert metric_steps(run_dir) == [1, 2]
        assert [p.name for p in stable_steps(run_dir / "checkpoints")] == ["step_00000002"]
        # the old run's learner-private state went too: only the new step's remains
        assert sorted(p.name for p in (run_dir / "learner-state").iterdir()) == ["step_00000002"]
        assert not (run_dir / "metrics" / "producer-old.jsonl").exists()
        latest = decode(r.get(keys.latest), expect=CheckpointAnnouncement)
        assert latest.step == 2
        verify_checkpoint(latest.path, latest.manifest_sha256)
        assert r.get(keys.admitted_count) is None  # the old count (8) is gone: no phantom admissions
        assert int(r.hget(keys.learner_state, "consumed")) == 4
        assert r.get(f"gspo:{run_id}x:latest") == b"another run"
    finally:
        r.close()


def take_prompts(r: redis.Redis, keys: RunKeys, n: int) -> list[str]:
    """Read ``n`` prompts as a (test) producer would, leaving them pending (so nothing is trimmed)."""
    got = r.xreadgroup(PRODUCERS_GROUP, "test-producer", {keys.prompts: ">"}, count=n)
    entries = got[0][1] if got else []
    return [decode(f[b"m"], expect=PromptTask).task_id for _, f in entries]


def task_ids(r: redis.Redis, keys: RunKeys) -> list[str]:
    return [decode(f[b"m"], expect=PromptTask).task_id for _, f in r.xrange(keys.prompts)]


def wait_for(pred, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.05)


def test_a_resumed_learner_enqueues_each_prompt_once(tiny_model_dir, redis_url, run_id, tmp_path):
    """Checkpoint at cursor 8, 8 more prompts enqueued, kill -9, resume: the next prompts are 16.., not 8..15
    again (the same task ids twice on the stream: generated twice, counted twice in ``consumed``)."""
    keys = RunKeys(run_id)
    run_dir = tmp_path / "run"
    cmd = learner_cmd(
        redis_url, run_id, tiny_model_dir, run_dir, "--max-steps", "100", "--dataset", "addition"
    )
    r = redis.Redis.from_url(redis_url)
    proc = None
    try:
        for g in make_groups(tiny_model_dir, 4):  # two steps: a checkpoint at step 2, prompt cursor 8
            r.xadd(keys.rollouts, {b"m": encode(g)})
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(
            lambda: [p.name for p in stable_steps(run_dir / "checkpoints")] == ["step_00000002"], 90, proc
        )
        assert task_ids(r, keys) == [f"{run_id}-{i:09d}" for i in range(8)]
        assert len(take_prompts(r, keys, 8)) == 8
        wait_for(lambda: r.xlen(keys.prompts) == 16, 30, proc)  # the idle learner tops the stream up
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

        assert take_prompts(r, keys, 8) == [f"{run_id}-{i:09d}" for i in range(8, 16)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: r.xlen(keys.prompts) >= 24, 90, proc)
        time.sleep(1.5)  # one more idle feed: nothing more may come
        ids = task_ids(r, keys)
        assert ids == [f"{run_id}-{i:09d}" for i in range(24)], ids
        assert int(r.hget(keys.prompt_cursor, "position")) == 24
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        r.close()
