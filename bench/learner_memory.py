"""Peak memory and time of one learner step: gradient checkpointing on/off, fp32 or bf16 autocast.

    python -m bench.learner_memory [--hidden 256 --layers 8] [--tokens 512] [--threads 1]

Each arm runs in its own process (the peak resident set size of a process only grows): one GSPO step on the
same batch (16 sequences of ``--tokens`` tokens, one mini-batch, one micro-batch) of a Qwen3 built in-process.
Printed per arm: the peak RSS above the process's size before the step, and the step's time. On a GPU the
same comparison would read torch.cuda.max_memory_allocated; this is the CPU figure.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = [(False, "fp32"), (True, "fp32"), (False, "bf16"), (True, "bf16")]


def _arm(model_dir: str, gc: bool, precision: str, tokens: int, threads: int) -> dict:
    import numpy as np
    import torch

    from common.config import Settings
    from common.wire import RolloutGroup, Sample
    from learner.batching import build_batch
    from learner.trainer import Trainer
    from modeling import load_model

    torch.set_num_threads(threads)
    rng = random.Random(0)
    prompt_len, completion_len = tokens // 8, tokens - tokens // 8
    groups = []
    for g in range(4):
        prompt = np.array([rng.randrange(4, 40) for _ in range(prompt_len)], np.int32)
        samples = tuple(
            Sample(np.array([rng.randrange(4, 40) for _ in range(completion_len)], np.int32),
                   np.full(completion_len, -3.0, np.float32), float(j % 2), "stop", 0, 0)
            for j in range(4)
        )  # fmt: skip
        groups.append((RolloutGroup(f"g{g}", f"p{g}", prompt, "addition", "bench", "fp", samples), 0))
    batch = build_batch(groups)
    s = Settings()
    s.learner = s.learner.model_copy(
        update={"n_minibatches": 1, "micro_batch_tokens": 16 * tokens, "gradient_checkpointing": gc,
                "precision": precision}
    )  # fmt: skip
    trainer = Trainer(load_model(model_dir), s)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    trainer.train_step(batch)
    step_s = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    return {
        "gradient_checkpointing": gc,
        "precision": precision,
        "peak_rss_mb": round(peak_mb),
        "step_s": round(step_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sequence (16 sequences)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arm", nargs=3, metavar=("MODEL_DIR", "GC", "PRECISION"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        print(json.dumps(_arm(a.arm[0], a.arm[1] == "1", a.arm[2], a.tokens, a.threads)))
        return
    from modeling import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", hidden=a.hidden, layers=a.layers, heads=8,
                                     intermediate=4 * a.hidden, max_positions=max(256, a.tokens))  # fmt: skip
        rows = []
        for gc, precision in ARMS:
            cmd = [sys.executable, "-m", "bench.learner_memory", "--tokens", str(a.tokens), "--threads",
                   str(a.threads), "--arm", str(model_dir), "1" if gc else "0", precision]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print(
        f"one step, 16 x {a.tokens} tokens, Qwen3 hidden {a.hidden} x {a.layers} layers, {a.threads} thread(s)"
    )
    print("| gradient checkpointing | precision | peak RSS above start | vs fp32 without | step time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['precision']} | {r['peak_rss_mb']} MB | "
              f"{r['peak_rss_mb'] / base:.2f}x | {r['step_s']} s |")  # fmt: skip


if __name__ == "__main__":
    main()
