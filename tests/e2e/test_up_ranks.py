"""``gspo up --learner-ranks 2``: the learner runs under torchrun (2 gloo ranks, the model sharded over them)
next to a producer, reaches --max-steps, publishes checkpoints producers load, and everything exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.manifest import stable_steps, verify_checkpoint
from common.redis_conn import running_embedded, stop_embedded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def test_gspo_up_with_two_learner_ranks_reaches_max_steps(tiny_model_dir, tmp_path: Path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
    cmd = [sys.executable, "-m", "gspo", "up", "--run-dir", str(run_dir), "--model", str(tiny_model_dir),
           "--learner-ranks", "2", "--max-steps", str(STEPS)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL
    )
    try:
        log = (
            (run_dir / "logs" / "learner.out").read_text()
            if (run_dir / "logs" / "learner.out").exists()
            else ""
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-3000:]
        assert f"reached --max-steps {STEPS}" in proc.stdout, proc.stdout[-2000:]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        steps = stable_steps(run_dir / "checkpoints")
        assert steps and steps[-1].name == f"step_{STEPS:08d}" and all(verify_checkpoint(s) for s in steps)
        assert "torch.distributed.run" in log or "rank 1 of 2 joined" in log, log[-2000:]
        producer_log = (run_dir / "logs" / "default-p0.out").read_text()
        assert "loaded weights version" in producer_log, producer_log[-2000:]
        # again on the same run dir, stopped by --minutes: the ranks get the SIGTERM, rank 0 publishes and stops
        # the other, torchrun exits 0 (signalled itself it would stop them and exit 1)
        cmd = [*cmd[: cmd.index("--max-steps")], "--minutes", "0.4"]
        again = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
        )
        log = (run_dir / "logs" / "learner.out").read_text()
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:] + log[-3000:]
        assert f"learner resumed from step {STEPS}" in again.stdout, again.stdout[-2000:]
        assert (
            "signal SIGTERM: finishing the current step" in log
            and "did not stop" not in again.stdout + again.stderr
        )
        assert all(verify_checkpoint(s) for s in stable_steps(run_dir / "checkpoints"))
    finally:
        if running_embedded(run_dir):
            stop_embedded(run_dir)
