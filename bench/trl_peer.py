"""TRL's GRPOTrainer (GSPO) training step on a fixed batch: the peer of bench/learner_vs_trl.py.

Runs INSIDE the TRL venv (bench/.trl-venv, made by bench/setup_trl_venv.sh), never imports the project:

    bench/.trl-venv/bin/python bench/trl_peer.py --model-dir DIR --batch batch.json [--steps 5] [--threads 2]

GRPOConfig: use_cpu, importance_sampling_level="sequence", loss_type="grpo", beta 0,
epsilon 3e-4 / epsilon_high 4e-4, fp32 (bf16 off), no activation checkpointing; the whole batch (all
groups) is one optimizer step (per_device_train_batch_size = batch size, no gradient accumulation).
Generation and scoring are replaced by a function returning the fixed batch, so the timed part is
TRL's training step alone: forward (log-probs + entropy), GSPO loss, backward, grad clip, AdamW.
The last stdout line is JSON: {"s_per_step": median over steps after one warm-up, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def load_batch(path: Path) -> dict:
    doc = json.loads(path.read_text())
    n = len(doc["prompt_ids"])
    if n % doc["group_size"]:
        raise ValueError(f"{n} sequences are not whole groups of {doc['group_size']}")
    return doc


def trl_inputs(doc: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """What GRPOTrainer._generate_and_score_completions returns (trl 1.16): prompts left-padded,
    completions right-padded, masks, advantages; no old_per_token_logps (one update per batch: TRL
    then takes the detached current log-probs, like our learner)."""
    prompts, completions = doc["prompt_ids"], doc["completion_ids"]
    p_width, c_width = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.full((len(prompts), p_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), p_width), dtype=torch.long)
    completion_ids = torch.full((len(prompts), c_width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), c_width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        prompt_ids[i, p_width - len(p) :] = torch.tensor(p)
        prompt_mask[i, p_width - len(p) :] = 1
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(doc["advantages"], dtype=torch.float32),
        "num_items_in_batch": completion_mask.sum(),
    }


def build_trainer(model_dir: Path, doc: dict, out_dir: Path, steps: int):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    n, group = len(doc["prompt_ids"]), doc["group_size"]
    cfg = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        importance_sampling_level="sequence",
        loss_type="grpo",
        beta=0.0,
        epsilon=3e-4,
        epsilon_high=4e-4,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=group,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=max(map(len, doc["completion_ids"])),
        temperature=doc["temperature"],
        learning_rate=3e-4,
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": [f"{i:02d}+{i:02d}=" for i in range(max(n, 64))]})

    def zero_reward(completions, **_) -> list[float]:
        return [0.0] * len(completions)

    trainer = GRPOTrainer(
        model=model, reward_funcs=zero_reward, args=cfg, train_dataset=dataset, processing_class=tok
    )
    fixed = trl_inputs(doc, tok.pad_token_id)
    trainer._generate_and_score_completions = lambda _inputs: dict(fixed)  # the training part alone
    return trainer


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: on_step_begin .. on_step_end (training_step + clip + AdamW)."""

        def __init__(self) -> None:
            self.times_s: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times_s.append(time.perf_counter() - self._t0)

    return StepTimer()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--batch", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import trl

    doc = load_batch(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args.model_dir, doc, Path(tmp), steps=args.steps + 1)  # +1 warm-up
        timer = step_timer()
        trainer.add_callback(timer)
        trainer.train()
    if len(timer.times_s) != args.steps + 1:
        raise RuntimeError(f"expected {args.steps + 1} timed steps, got {len(timer.times_s)}")
    steps_s = timer.times_s[1:]
    print(
        json.dumps(
            {
                "s_per_step": statistics.median(steps_s),
                "min_s_per_step": min(steps_s),
                "steps_s": steps_s,
                "warmup_s": timer.times_s[0],
                "trl_version": trl.__version__,
                "threads": torch.get_num_threads(),
                "padded_shape": [
                    len(doc["prompt_ids"]),
                    max(map(len, doc["prompt_ids"])) + max(map(len, doc["completion_ids"])),
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
