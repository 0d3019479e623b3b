"""``gspo up`` / ``gspo report`` as real subprocesses: bad flags are refused in one line before anything is
created; the summary of a resumed run counts every learner run's time and says where the time went."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def gspo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    return subprocess.run([sys.executable, "-m", "gspo", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def learner_row(step: int, elapsed: float, started: float = 1000.0) -> dict:
    return {"step": step, "reward/mean": 0.5, "time/elapsed_s": elapsed, "time/unix": started + elapsed, "time/wait_s": 6.0, "time/step_s": 3.0,
            "time/publish_s": 0.5, "time/iter_s": 10.0, "weights/publish_s": 0.25}  # fmt: skip


@pytest.mark.parametrize("minutes", ["-1", "0"])
def test_up_refuses_a_minutes_budget_that_is_not_positive(tmp_path, minutes):
    r = gspo("up", "--run-dir", str(tmp_path / "run"), "--minutes", minutes, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --minutes must be > 0 (got {minutes}); omit it to run until --max-steps or Ctrl-C"
    ]
    assert not (tmp_path / "run").exists()  # refused before any run dir or Redis


def test_report_refuses_an_unknown_axis_in_one_line(tmp_path):
    run = tmp_path / "run"
    write_rows(run / "metrics.jsonl", [learner_row(1, 10.0), learner_row(2, 20.0)])
    r = gspo("report", str(run), "--x", "time", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --x time: unknown axis; use one of step, time/elapsed_s, time/unix"
    ]
    assert not (run / "report.png").exists()


def test_report_of_a_resumed_run_counts_every_learner_run_and_shows_where_time_went(tmp_path):
    run = tmp_path / "run"
    # a learner ran steps 1-4 for 40 s and was killed; the next one resumed from step 2 and ran 46 s (it waited
    # 45 s for rollouts first: its time/elapsed_s does not go back, its start time tells the two apart)
    rows = [learner_row(s, 10.0 * s) for s in (1, 2, 3, 4)]
    rows += [learner_row(s, t, started=2000.0) for s, t in ((3, 45.0), (4, 46.0))]
    write_rows(run / "metrics.jsonl", rows)
    # one producer: 20 s of wall time, 15 s generating, 2 s paced; restarted (totals start again), 10 s more
    prod = [{"time": 100.0, "generate_s_total": 1.0, "paced_s_total": 0.0},
            {"time": 120.0, "generate_s_total": 16.0, "paced_s_total": 2.0},
            {"time": 130.0, "generate_s_total": 0.5, "paced_s_total": 0.0},
            {"time": 140.0, "generate_s_total": 5.5, "paced_s_total": 3.0}]  # fmt: skip
    write_rows(run / "metrics" / "producer-p0.jsonl", prod)
    r = gspo("report", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"{run}: 4 steps in 86.0 s (over 2 learner runs); reward 0.5 -> 0.5" in out, out
    assert (
        "learner time (60.0 s): waiting for rollouts 60%, training 30%, publishing 5%, other 5%; "
        "checkpoint writes 0.25 s each, in the background" in out
    ), out
    # (15 + 5) s generating and (2 + 3) s paced over (20 + 10) s
    assert (
        "producer time (1 producer(s), 30.0 s): engine generating 67%, feed stage paced by admission control 17%"
        in out
    ), out
    assert "bottleneck: the learner waits for rollouts most of the time: generation limits the run" in out, (
        out
    )
