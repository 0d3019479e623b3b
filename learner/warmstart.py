"""Supervised warm-start of the reference task's tiny model, so that RL starts with signal.

A randomly initialised model never samples a correct sum, so every group has zero reward variance
and GSPO has nothing to learn from. A short supervised phase on ``"AA+BB=" -> sum</s>`` is stopped
as soon as the *sampled* reward (temperature 1) reaches a target, which is more robust than a fixed
step count (the reward after N steps varies a lot between seeds).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from common.tasks import addition_prompt, addition_reward
from modeling import load_model, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStartResult:
    steps: int
    sampled_reward: float
    path: Path


def _batch(tok, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt+answer+EOS rows; labels only on the answer and EOS."""
    rows, labels = [], []
    for _ in range(size):
        row = addition_prompt(rng.randrange(100), rng.randrange(100))
        p = tok.encode(row.prompt, add_special_tokens=False)
        a = tok.encode(row.meta["answer"], add_special_tokens=False) + [tok.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((size, width), tok.pad_token_id)
    lab = torch.full((size, width), -100)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


@torch.no_grad()
def sampled_reward(model, tok, n_prompts: int = 128, seed: int = 1234, max_new_tokens: int = 6) -> float:
    """Mean exact-match reward of temperature-1 samples on fresh prompts."""
    rng = random.Random(seed)
    rows = [addition_prompt(rng.randrange(100), rng.randrange(100)) for _ in range(n_prompts)]
    enc = tok([r.prompt for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(addition_reward(t, r.meta) for t, r in zip(texts, rows, strict=True)) / n_prompts


def warm_start(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    target_reward: float = 0.2,
    max_steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    eval_every: int = 50,
    seed: int = 0,
) -> WarmStartResult:
    """Train until the sampled reward reaches ``target_reward`` (or ``max_steps``); save to ``out_dir``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    reward, step = 0.0, 0
    for step in range(1, max_steps + 1):
        model.train()
        ids, lab = _batch(tok, rng, batch_size)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0:
            reward = sampled_reward(model, tok, seed=seed + step)
            log.info("warm-start step %d: loss %.3f, sampled reward %.3f", step, loss.item(), reward)
            if reward >= target_reward:
                break
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return WarmStartResult(step, reward, out)
