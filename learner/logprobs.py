"""Recomputing token log-probabilities of completions with the learner's parameters.

The value is the behaviour convention of the whole pipeline: ``log_softmax(raw_logits / T)`` at the
sampled token, T = the group's sampling temperature; top-p/top-k truncation is not applied (RL runs
use top_p = 1, top_k = -1, where this is exact).

Sequences are packed into rows (learner.packing) and forwarded with ``attention_mask=None``,
``use_cache=False`` and per-sequence position ids: transformers builds a block-diagonal causal mask
from the position-id resets, so packed equals one-by-one (tests/unit/test_packing.py: <= 1e-5 fp32).
Only the completion positions go through the LM head: the (tokens × vocab) logits of prompts are
never built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner.packing import PackedRows, completion_logit_index, pack

Tensor = torch.Tensor


@dataclass(frozen=True)
class PackedLogprobs:
    logprobs: list[Tensor]  # one (L_i,) float32 tensor per sequence
    entropy_sum: float  # Σ over completion tokens of the (temperature-scaled) policy entropy
    completion_tokens: int
    real_tokens: int
    computed_tokens: int


def _per_token_temperature(temperatures: float | Sequence[float], packed: PackedRows) -> Tensor:
    n = len(packed.placements)
    temps = (
        [float(temperatures)] * n
        if isinstance(temperatures, (int, float))
        else [float(t) for t in temperatures]
    )
    if len(temps) != n:
        raise ValueError(f"{len(temps)} temperatures for {n} sequences")
    if any(t <= 0 for t in temps):
        raise ValueError(f"temperatures must be > 0, got {temps}")
    lengths = torch.tensor([pl.completion_len for pl in packed.placements], dtype=torch.long)
    return torch.repeat_interleave(torch.tensor(temps, dtype=torch.float32), lengths)


def _completion_logits(model: torch.nn.Module, packed: PackedRows, rows: Tensor, cols: Tensor) -> Tensor:
    """Logits at the given positions only: backbone over the packed rows, LM head on the gathered
    hidden states. Falls back to the full forward for models whose head is not a plain projection."""
    device = next(model.parameters()).device
    ids, pos = packed.input_ids.to(device), packed.position_ids.to(device)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    backbone = getattr(model, "model", None)
    if head is None or softcap or backbone is None:
        logits = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits
        return logits[rows.to(device), cols.to(device)]
    hidden = backbone(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).last_hidden_state
    return head(hidden[rows.to(device), cols.to(device)])  # (N, V)


def packed_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    temperatures: float | Sequence[float],
    *,
    max_row_tokens: int = 4096,
    with_grad: bool = False,
    pad_id: int = 0,
) -> PackedLogprobs:
    """Completion log-probs per sequence plus the policy entropy (no grad) from the same logits."""
    packed = pack(sequences, max_row_tokens, pad_id)
    rows, cols, targets = completion_logit_index(packed)
    temps = _per_token_temperature(temperatures, packed)
    with torch.set_grad_enabled(with_grad):
        logits = _completion_logits(model, packed, rows, cols).float()  # (N, V)
        logp_all = torch.log_softmax(logits / temps.to(logits.device).unsqueeze(-1), dim=-1)  # (N, V)
        logp = logp_all.gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)  # (N,)
    with torch.no_grad():
        entropy_sum = float(-(logp_all.exp() * logp_all).sum()) if logp_all.numel() else 0.0
    lengths = [pl.completion_len for pl in packed.placements]
    return PackedLogprobs(
        logprobs=list(torch.split(logp, lengths)),
        entropy_sum=entropy_sum,
        completion_tokens=int(sum(lengths)),
        real_tokens=packed.real_tokens,
        computed_tokens=packed.computed_tokens,
    )


def token_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    temperatures: float | Sequence[float],
    *,
    max_row_tokens: int = 4096,
    with_grad: bool = False,
) -> list[Tensor]:
    """One float32 (L_i,) tensor of completion-token log-probs per (prompt_ids, completion_ids).

    ``temperatures``: one value for all sequences or one per sequence. Without ``with_grad`` the
    forward runs under no_grad and the tensors are detached."""
    return packed_logprobs(
        model, sequences, temperatures, max_row_tokens=max_row_tokens, with_grad=with_grad
    ).logprobs
