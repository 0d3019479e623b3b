"""A real instruct model end to end: ``gspo up --model`` on SmolLM2-135M-Instruct (converted offline from its
GGUF, tests/support/smollm2.py) with a chat-format dataset, synchronous (K = 0) so that every sample is fresh.
The learner's recomputed log-probs match the engine's (mismatch < 1e-3 at staleness 0), the run reaches
--max-steps, and its last published checkpoint loads with transformers and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.manifest import stable_steps, verify_checkpoint
from common.redis_conn import running_embedded, stop_embedded
from tests.support.smollm2 import smollm2_dir  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
STEPS = 3

CONFIG = """
[pipeline]
batch_groups = 2
group_size = 4

[producer]
prompts_per_call = 2

[producer.sampling]
max_new_tokens = 16

[learner]
prompts_ahead = 1
skip_zero_advantage = false  # the model rarely gets a sum right: compute every sequence, to measure them all
samples_every = 1
samples_groups = 1

[task]
system_prompt = "Answer with the number only."

[[task.rewards]]
function = "exact_match"
name = "exact"
"""


def test_gspo_up_trains_smollm2_on_a_chat_dataset(tmp_path: Path, smollm2_dir: Path) -> None:  # noqa: F811
    data = tmp_path / "train.jsonl"
    with data.open("w") as f:
        for a in range(2, 12):
            msg = [{"role": "user", "content": f"What is {a} + 7?"}]
            f.write(json.dumps({"prompt": msg, "answer": str(a + 7)}) + "\n")
    cfg = tmp_path / "task.toml"
    cfg.write_text(CONFIG)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    cmd = [sys.executable, "-m", "gspo", "up", "--run-dir", str(run_dir), "--model", str(smollm2_dir),
           "--dataset", str(data), "--config", str(cfg), "-K", "0", "--max-steps", str(STEPS),
           "--minutes", "12"]  # fmt: skip
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=840,
                           stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        if running_embedded(run_dir):
            stop_embedded(run_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, STEPS + 1))
    for x in rows:
        assert x["staleness/mean"] == 0.0
        # the engine's reported log-probs against the learner's recomputation of the same weights
        assert x["mismatch/prox_vs_behaviour_abs"] < 1e-3, x["mismatch/prox_vs_behaviour_abs"]
        assert 0.0 <= x["reward/exact"] <= 1.0
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("<|im_start|>system\nAnswer with") for s in samples)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    last = stable_steps(run_dir / "checkpoints")[-1]
    assert verify_checkpoint(last)
    model = AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(last)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
