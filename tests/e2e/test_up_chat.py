"""``gspo up --model DIR --dataset FILE`` with a chat model and a chat-format dataset, as a user brings them:
the tiny model with a chat template, a JSONL of chat messages, a system prompt, two weighted rewards (TRL's
batched form and the per-completion form), a stop string, an eval split every 2 steps and sample completions.
The run reaches --max-steps; metrics carry each reward and the eval reward; the samples show the rendered chat
prompts; ``gspo report`` plots it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.redis_conn import running_embedded, stop_embedded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]

CONFIG = """
[pipeline]
batch_groups = 4
group_size = 4

[producer]
prompts_per_call = 4

[producer.sampling]
max_new_tokens = 8
stop = ["="]

[learner]
prompts_ahead = 1
samples_every = 1
samples_groups = 1
eval_dataset = "{eval}"
eval_every = 2

[task]
system_prompt = "be brief"

[task.chat_template_kwargs]
enable_thinking = false

[[task.rewards]]
function = "tests.support.rewards:trl_exact"
name = "exact"

[[task.rewards]]
function = "exact_match"
name = "match"
weight = 0.5
"""


def chat_jsonl(path: Path, pairs: list[tuple[int, int]]) -> Path:
    with path.open("w") as f:
        for a, b in pairs:
            f.write(
                json.dumps({"prompt": [{"role": "user", "content": f"{a}+{b}"}], "answer": str(a + b)}) + "\n"
            )
    return path


def test_gspo_up_with_a_chat_model_and_a_chat_dataset(tmp_path: Path, chat_model_dir: Path):
    train = chat_jsonl(tmp_path / "train.jsonl", [(a, b) for a in range(6) for b in range(6)])
    evalset = chat_jsonl(tmp_path / "eval.jsonl", [(7, 1), (8, 1)])
    cfg = tmp_path / "task.toml"
    cfg.write_text(CONFIG.format(eval=evalset))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    env["PYTHONPATH"] = str(REPO)  # the test rewards (tests.support.rewards) are imported by module:function
    cmd = [sys.executable, "-m", "gspo", "up", "--run-dir", str(run_dir), "--model", str(chat_model_dir),
           "--dataset", str(train), "--config", str(cfg), "--max-steps", "8", "--minutes", "6"]  # fmt: skip
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540,
                           stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        if running_embedded(run_dir):
            stop_embedded(run_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "learner reached --max-steps 8" in r.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, 9))
    for x in rows:
        assert 0.0 <= x["reward/exact"] <= 1.0 and 0.0 <= x["reward/match"] <= 1.0
        assert x["reward/mean"] == pytest.approx(x["reward/exact"] + 0.5 * x["reward/match"])
    evals = [x for x in rows if "eval/reward" in x]
    assert evals, "no eval round was reported"
    assert evals[0]["eval/step"] == 2 and evals[0]["eval/groups"] == 2 and "eval/reward/exact" in evals[0]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {x["step"] for x in samples} == set(range(1, 9)) and len(samples) == 8 * 4
    for x in samples:
        assert x["prompt"].startswith("<s>system be brief</s><s>user ") and x["prompt"].endswith(
            "</s><s>assistant nothink "
        )
        assert set(x["rewards"]) == {"exact", "match"}
        if x["finish_reason"] == "stop" and not x["completion"].endswith("</s>"):
            assert x["completion"].endswith("=") and x["completion"].count("=") == 1  # cut at the stop string
    assert (run_dir / "report.png").stat().st_size > 0
    report = subprocess.run([sys.executable, "-m", "gspo", "report", str(run_dir)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "eval reward" in report.stdout
