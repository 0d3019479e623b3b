"""Learner step vs TRL's GRPOTrainer (GSPO: importance_sampling_level="sequence") on the same batch, CPU.

    python -m bench.learner_vs_trl [--trl-python bench/.trl-venv/bin/python] [--steps 5]
                                   [--hidden 256 --layers 4] [--threads 2]

TRL lives in its own venv (``bash bench/setup_trl_venv.sh`` creates bench/.trl-venv), never in the
project's. This script builds the tiny Qwen3 and the reference batch (4 groups x 8, prompt 16 tokens,
completions 16..112), times ``Trainer.train_step`` here, writes the batch as JSON and runs
bench/trl_peer.py with the TRL venv's python on the same model dir, batch and thread count; the peer
times GRPOTrainer's training part alone (generation replaced by the fixed batch). Both sides do one
forward+backward+AdamW step over all 32 sequences per step, fp32, with the proximal log-probs taken
from the detached current forward. Printed: both s/step and the ratio TRL/ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.learner_overhead import make_batch
from common.config import Settings
from learner.batching import TrainBatch
from learner.trainer import Trainer, batch_advantages
from modeling import build_tiny_model, load_model

HERE = Path(__file__).resolve().parent
DEFAULT_TRL_PYTHON = HERE / ".trl-venv" / "bin" / "python"
PEER = HERE / "trl_peer.py"


def write_batch_json(batch: TrainBatch, path: Path) -> None:
    """The batch as TRL needs it: token ids, group size and the same group-normalised advantages."""
    adv, _ = batch_advantages(batch)
    sizes = set(batch.group_sizes)
    if len(sizes) != 1:
        raise ValueError(f"TRL needs equal group sizes, got {sorted(sizes)}")
    doc = {
        "prompt_ids": batch.prompt_ids,
        "completion_ids": batch.completion_ids,
        "advantages": adv.tolist(),
        "group_size": sizes.pop(),
        "temperature": float(batch.temperatures[0]),
    }
    path.write_text(json.dumps(doc))


def run_peer(trl_python: Path, model_dir: Path, batch_path: Path, steps: int, threads: int) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_DISABLED="true",
        PYTHONPATH="",
    )
    cmd = [
        str(trl_python),
        str(PEER),
        "--model-dir",
        str(model_dir),
        "--batch",
        str(batch_path),
        "--steps",
        str(steps),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench/trl_peer.py failed (exit {proc.returncode}); its stderr is above")
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(last)


def timed_all(fn, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-python", type=Path, default=DEFAULT_TRL_PYTHON)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side per round (after a warm-up)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternate ours/TRL this many times (noisy machines)"
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()
    if not args.trl_python.exists():
        raise SystemExit(
            f"no TRL environment at {args.trl_python}: create it with `bash bench/setup_trl_venv.sh` "
            "(a separate venv with torch 2.13 CPU + trl; TRL never goes in the project venv), "
            "or pass --trl-python PATH"
        )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model", hidden=args.hidden, layers=args.layers, heads=4, intermediate=4 * args.hidden
        )
        batch = make_batch(args.groups, args.group_size, prompt_len=16)
        tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True))
        model = load_model(model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        # one update per batch, as TRL does with num_iterations=1
        trainer = Trainer(model, Settings.model_validate({"learner": {"n_minibatches": 1}}))
        batch_path = Path(tmp) / "batch.json"
        write_batch_json(batch, batch_path)
        ours_all, trl_all = [], []
        for r in range(args.rounds):  # interleaved, so that a busy spell on the machine hits both sides
            ours = timed_all(lambda: trainer.train_step(batch), args.steps)
            peer = run_peer(args.trl_python, model_dir, batch_path, args.steps, args.threads)
            ours_all += ours
            trl_all += peer["steps_s"]
            print(
                f"round {r + 1}/{args.rounds}: median ours {statistics.median(ours):.3f} s/step, "
                f"TRL {peer['s_per_step']:.3f} s/step",
                flush=True,
            )
    ours_s, trl_s = statistics.median(ours_all), statistics.median(trl_all)
    print(
        f"model: Qwen3 hidden {args.hidden} x {args.layers} layers ({n_params / 1e6:.2f}M params), fp32, "
        f"{args.threads} threads"
    )
    print(
        f"batch: {len(batch)} sequences ({args.groups} groups x {args.group_size}), {tokens} tokens "
        "(prompt 16, completions 16..112)"
    )
    print(f"{args.rounds} rounds x {args.steps} steps per side; median (min) s/step:")
    print(
        f"ours (learner.trainer.Trainer.train_step): {ours_s:.3f} s/step ({min(ours_all):.3f})  "
        f"({tokens / ours_s:,.0f} tok/s)"
    )
    print(
        f"TRL {peer['trl_version']} GRPOTrainer (GSPO, sequence level): {trl_s:.3f} s/step ({min(trl_all):.3f})  "
        f"({tokens / trl_s:,.0f} tok/s)"
    )
    ratio, ratio_min = trl_s / ours_s, min(trl_all) / min(ours_all)
    print(
        f"ratio TRL/ours = {ratio:.2f}x median, {ratio_min:.2f}x min  "
        f"({'ours faster' if ratio > 1 else 'ours NOT faster'})"
    )


if __name__ == "__main__":
    main()
