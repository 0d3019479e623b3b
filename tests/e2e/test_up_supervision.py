"""``gspo up`` as an operator runs it: a producer killed with -9 is started again and the run still reaches its
--max-steps (exit 0); producers that cannot start end in one crash-loop message and a non-zero exit; a second
``gspo up`` on the run dir says that it resumed and reports its own steps and time; ``--fresh`` starts over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.manifest import stable_steps
from common.redis_conn import running_embedded, stop_embedded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def up_cmd(run_dir: Path, model: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "gspo", "up", "--run-dir", str(run_dir), "--model", str(model), *args]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    return dict(e, GSPO_PIPELINE__BATCH_GROUPS="4", **extra)


def gspo_up(run_dir: Path, model: Path, *args: str, timeout_s: float = 200, **extra: str):
    return subprocess.run(up_cmd(run_dir, model, *args), cwd=REPO, env=env(**extra), capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)  # fmt: skip


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def producer_pid(producer_id: str) -> int | None:
    """The pid of the running ``gspo producer --producer-id <id>`` (a child of gspo up)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"producer" in argv and producer_id.encode() in argv and b"--producer-id" in argv:
            return int(d.name)
    return None


@pytest.fixture
def run_dir(tmp_path: Path):
    d = tmp_path / "run"
    yield d
    if running_embedded(d):
        stop_embedded(d)


def test_a_killed_producer_is_restarted_and_the_run_reaches_max_steps(run_dir: Path, tiny_model_dir: Path):
    proc = subprocess.Popen(up_cmd(run_dir, tiny_model_dir, "--max-steps", "16", "--minutes", "3"), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(steps_logged(run_dir)) >= 2:
                break
            time.sleep(0.2)
        pid = producer_pid("default-p0")
        assert pid is not None and proc.poll() is None, "".join(out)
        # with one producer and K = 1 the learner can take at most (K + 1) B more groups: 2 steps, then it waits
        os.kill(pid, signal.SIGKILL)
        proc.wait(300)
        reader.join(10)
        stdout, stderr = "".join(out), proc.stderr.read()
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "producer default-p0 crashed (killed by SIGKILL); restarting it in 1 s" in stdout, stdout
        assert "producer default-p0 restarted (restart 1)" in stdout, stdout
        assert "stopping (learner reached --max-steps 16 at step 16)" in stdout, stdout
        assert "producer restarts: 1 (default-p0: 1)" in stdout, stdout
        assert "(restarts 1)" in stdout  # on the live line
        assert steps_logged(run_dir)[-1] == 16
        # where the time went
        assert "learner time (" in stdout and "waiting for rollouts" in stdout and "training" in stdout, (
            stdout
        )
        assert "producer time (1 producer(s)" in stdout and "engine generating" in stdout, stdout
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


def test_producers_in_a_crash_loop_end_the_run_with_one_message(run_dir: Path, tiny_model_dir: Path):
    # a device torch does not know: every producer process fails at once, the learner is fine
    done = gspo_up(
        run_dir, tiny_model_dir, "--max-steps", "5", "--minutes", "3", GSPO_PRODUCER__DEVICE="nodevice"
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    crashes = [ln for ln in done.stdout.splitlines() if ln.startswith("producer default-p0 crashed")]
    assert len(crashes) == 3, done.stdout
    assert "restarting it in 1 s" in crashes[0] and "restarting it in 2 s" in crashes[1], crashes
    assert "crash loop" in crashes[2] and "not restarting it" in crashes[2], crashes[2]
    assert "exit 1: RuntimeError: Expected one of cpu" in crashes[2], crashes[2]  # the cause, from its log
    assert "stopping (no producer left)" in done.stdout, done.stdout
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]  # the rest: up's INFO log
    assert len(errors) == 1 and errors[0].startswith("error: no producer left to generate"), done.stderr


def test_a_second_up_says_it_resumed_and_reports_its_own_steps_then_fresh_starts_over(
    run_dir: Path, tiny_model_dir: Path
):
    first = gspo_up(run_dir, tiny_model_dir, "--max-steps", "3")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "learner starting at step 0" in first.stdout, first.stdout
    assert "stopping (learner reached --max-steps 3 at step 3)" in first.stdout, first.stdout
    assert "this invocation: 3 steps (step 1 to 3)" in first.stdout, first.stdout

    second = gspo_up(run_dir, tiny_model_dir, "--max-steps", "6")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "learner resumed from step 3 (checkpoint" in second.stdout, second.stdout
    assert "this invocation: 3 steps (step 4 to 6)" in second.stdout, second.stdout
    assert "6 steps in" in second.stdout and "(over 2 learner runs)" in second.stdout, second.stdout
    assert "stopping (learner reached --max-steps 6 at step 6)" in second.stdout, second.stdout
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]

    third = gspo_up(run_dir, tiny_model_dir, "--max-steps", "2", "--fresh")
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert "--fresh: deleted" in third.stdout and "learner starting at step 0" in third.stdout, third.stdout
    assert steps_logged(run_dir) == [1, 2]
    assert [p.name for p in stable_steps(run_dir / "checkpoints")] == ["step_00000001", "step_00000002"]
