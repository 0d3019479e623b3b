"""TRL's GRPOTrainer configured as GSPO, training on the reference addition task for a wall-clock budget:
the peer of bench/e2e_vs_trl.py.

Runs INSIDE the TRL venv (bench/.trl-venv, made by bench/setup_trl_venv.sh), never imports the project:

    bench/.trl-venv/bin/python bench/trl_e2e_peer.py --model-dir DIR --out rows.jsonl --budget-s 300
        [--t0 UNIX_TIME] [--threads 2] [--lr 3e-4] [--max-new-tokens 16] ...

Unlike bench/trl_peer.py (training step alone), TRL generates for real here (transformers
``model.generate`` inside GRPOTrainer, CPU, fp32) and scores with the re-implemented task reward.

Batch geometry, matching the project's learner step (common/config.py defaults): one generation batch
is 32 prompts x G=8 = 256 completions, split into 2 optimizer steps of 128 completions each
(per_device_train_batch_size=128, steps_per_generation=2, gradient_accumulation_steps=1,
num_iterations=1), like the learner's ``n_minibatches=2`` split of its 32x8 batch. TRL then computes
the old log-probs once at generation time, so the second optimizer step is clipped against them, as
the learner's recomputed proximal policy is.

One JSONL row per *batch* (= one project learner step = 2 optimizer steps), written when its last
optimizer step ends: ``{"step", "opt_step", "reward/mean", "time/elapsed_s", "time/unix", ...}``;
``time/elapsed_s`` counts from ``--t0`` (the launch of this process by the benchmark). The row's keys
follow the project's metrics.jsonl, so ops/report.py can read the file too. The last stdout line is a
JSON summary.
"""

from __future__ import annotations

import time

T_IMPORT = time.time()  # before torch/transformers/trl imports: start-up is part of the budget

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def addition_rows(seed: int, n: int) -> list[dict]:
    """The project's prompt stream (common/tasks.py ``addition_rows``/``addition_prompt``), re-implemented:
    ``"AA+BB="`` with zero-padded operands drawn by ``random.Random(seed).randrange(100)`` twice; the
    answer is the plain decimal sum. The same seed gives the same rows as the learner's feeder."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({"prompt": f"{a:02d}+{b:02d}=", "answer": str(a + b)})
    return rows


def addition_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """Re-implementation of common/tasks.py ``addition_reward``: 1.0 iff the completion (decoded up to
    EOS, special tokens skipped, stripped) is exactly the sum, else 0.0."""
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSONL, one row per batch")
    ap.add_argument("--budget-s", type=float, required=True, help="stop after this many seconds from --t0")
    ap.add_argument(
        "--t0", type=float, default=None, help="unix time the budget counts from (default: process start)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer steps per generation batch")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--clip-low", type=float, default=3e-4)
    ap.add_argument("--clip-high", type=float, default=4e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset-rows", type=int, default=50_000)
    args = ap.parse_args()
    t0 = args.t0 if args.t0 is not None else T_IMPORT

    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    n_completions = args.prompts_per_step * args.group_size
    if n_completions % args.minibatches:
        raise SystemExit(f"{n_completions} completions do not split into {args.minibatches} mini-batches")
    cfg_kwargs = dict(
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        importance_sampling_level="sequence",
        loss_type="grpo",
        beta=0.0,
        epsilon=args.clip_low,
        epsilon_high=args.clip_high,
        num_generations=args.group_size,
        per_device_train_batch_size=n_completions // args.minibatches,
        steps_per_generation=args.minibatches,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=args.beta1,
        adam_beta2=args.beta2,
        weight_decay=args.weight_decay,
        max_grad_norm=args.grad_clip,
        max_steps=10_000_000,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    rows = addition_rows(args.seed, args.dataset_rows)
    dataset = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    # the producer tokenises prompts with add_special_tokens=False; TRL calls the tokenizer with the default
    # (True): they must agree, i.e. this tokenizer adds nothing (no BOS)
    probe = rows[0]["prompt"]
    if tok(probe)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]:
        raise SystemExit(
            "the tokenizer adds special tokens to prompts; TRL would not see the project's prompts"
        )

    batch_rewards: list[float] = []  # mean reward of each generation batch, in order

    def reward(completions, answer, **kw) -> list[float]:
        r = addition_reward(completions, answer, **kw)
        batch_rewards.append(sum(r) / len(r))
        return r

    reward.__name__ = "addition"

    deadline = t0 + args.budget_s
    out = args.out.open("w")

    class Recorder(TrainerCallback):
        """A row per generation batch (after its last optimizer step); stops the run at the deadline."""

        def on_step_end(self, _args, state, control, **kwargs):
            now = time.time()
            if state.global_step % args.minibatches == 0 and batch_rewards:
                step = state.global_step // args.minibatches
                row = {
                    "step": step,
                    "opt_step": state.global_step,
                    "reward/mean": batch_rewards[-1],
                    "time/elapsed_s": now - t0,
                    "time/unix": now,
                    "generation_batches": len(batch_rewards),
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
            if now >= deadline:
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, **cfg_kwargs)
        if cfg.generation_batch_size != n_completions:
            raise SystemExit(f"generation batch {cfg.generation_batch_size} != {n_completions} completions")
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=cfg, train_dataset=dataset, processing_class=tok
        )
        trainer.add_callback(Recorder())
        t_train = time.time()
        trainer.train()
        t_end = time.time()
    out.close()
    print(
        json.dumps(
            {
                "trl_version": trl.__version__,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "threads": torch.get_num_threads(),
                "startup_s": t_train - t0,
                "end_s": t_end - t0,
                "opt_steps": trainer.state.global_step,
                "batches": len(batch_rewards),
                "generation_batch": cfg.generation_batch_size,
                "per_device_train_batch_size": cfg.per_device_train_batch_size,
                "steps_per_generation": cfg.steps_per_generation,
                "optim": str(cfg.optim),
                "lr_scheduler_type": str(cfg.lr_scheduler_type),
            }
        )
    )


if __name__ == "__main__":
    main()
