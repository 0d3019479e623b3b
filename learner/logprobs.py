"""Recomputing token log-probabilities of completions with the learner's parameters.

The value is the behaviour convention of the whole pipeline: ``log_softmax(raw_logits / T)`` at the
sampled token, T = the group's sampling temperature; top-p/top-k truncation is not applied (RL runs
use top_p = 1, top_k = -1, where this is exact).

Sequences are packed into rows (learner.packing) and forwarded with ``attention_mask=None``,
``use_cache=False`` and per-sequence position ids: transformers builds a block-diagonal causal mask
from the position-id resets, so packed equals one-by-one (tests/unit/test_packing.py: <= 1e-5 fp32).
Only the completion positions go through the LM head: the (tokens × vocab) logits of prompts are
never built. The completion positions themselves go through the head and the log-softmax in chunks of at
most ``chunk_tokens`` positions (default: as many as fit in ``LOGIT_CHUNK_BYTES`` of fp32 logits), so memory
stays bounded for 150k-token vocabularies: without grad each chunk's logits are freed before the next; with
grad and more than one chunk, each chunk is checkpointed (only its hidden states are kept; backward recomputes
its head and log-softmax), so the (tokens × vocab) tensor never exists, forward or backward. Chunked and
unchunked values and gradients agree to float rounding (tests/unit/test_logprobs_chunked.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from learner.packing import PackedRows, completion_logit_index, pack

Tensor = torch.Tensor
LOGIT_CHUNK_BYTES = (
    256 * 2**20
)  # fp32 logits of one chunk of completion positions (≈ 440 positions at 150k vocab)


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


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model computes: ``compute_device`` when set (a sharded model whose parameters are offloaded to
    the CPU, ``learner/sharded.py``), else the device of its parameters."""
    device = getattr(model, "compute_device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _completion_inputs(
    model: torch.nn.Module, ids: Tensor, pos: Tensor, rows: Tensor, cols: Tensor
) -> tuple[Callable[[Tensor], Tensor], Tensor, int]:
    """``(head, x, vocab)``: the logits at the given positions are ``head(x)``. Normally the backbone runs over
    the packed rows and ``x`` is the hidden states gathered at the positions, ``head`` the LM head; models whose
    head is not a plain projection (final-logit softcapping, no ``get_output_embeddings``/``model``) run the
    full forward instead, and ``x`` is their logits at the positions, ``head`` the identity."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    backbone = getattr(model, "model", None)
    if head is None or softcap or backbone is None:
        logits = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits
        x = logits[rows, cols]
        return (lambda t: t), x, int(x.shape[-1])
    hidden = backbone(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).last_hidden_state
    vocab = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", None)
    if vocab is None:
        vocab = int(head(hidden[:1, :1]).shape[-1])
    return head, hidden[rows, cols], int(vocab)


# The name a sharded model registers :func:`completion_logprobs` under as an FSDP forward method
# (``learner/sharded.py``): the backbone and the LM head are called separately here, so the root module's
# parameters (embeddings, final norm, head) must be gathered around this whole computation, not around
# ``forward``.
FORWARD_METHOD = "gspo_completion_logprobs"


def completion_logprobs(
    model: torch.nn.Module,
    ids: Tensor,
    pos: Tensor,
    rows: Tensor,
    cols: Tensor,
    targets: Tensor,
    temps: Tensor,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs at ``targets`` of the positions (rows, cols) of the packed rows ``ids`` and the entropy sum."""
    head, x, vocab = _completion_inputs(model, ids, pos, rows, cols)
    logp, entropy = chunked_logprobs(head, x, targets, temps, chunk_tokens=chunk_size(vocab, chunk_tokens))
    return logp.clone(), entropy  # not a view: FSDP hooks the backward of a sharded model on this output


def _chunk(
    head: Callable[[Tensor], Tensor], x: Tensor, targets: Tensor, temps: Tensor
) -> tuple[Tensor, Tensor]:
    """(log-probs at ``targets`` (n,), entropy sum (no grad)) of ``log_softmax(head(x).float() / temps)``."""
    logp_all = torch.log_softmax(head(x).float() / temps.unsqueeze(-1), dim=-1)  # (n, V)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum()
    return logp, entropy


def chunk_size(vocab: int, chunk_tokens: int | None = None) -> int:
    """Positions per chunk: ``chunk_tokens``, or as many as fit in ``LOGIT_CHUNK_BYTES`` of fp32 logits."""
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return chunk_tokens
    return max(1, LOGIT_CHUNK_BYTES // (4 * max(1, vocab)))


def chunked_logprobs(
    head: Callable[[Tensor], Tensor],
    x: Tensor,
    targets: Tensor,
    temps: Tensor,
    *,
    chunk_tokens: int,
) -> tuple[Tensor, Tensor]:
    """``log_softmax(head(x).float() / temps)[targets]`` (N,) and the entropy sum, ``chunk_tokens`` positions at
    a time. Under grad with more than one chunk, each chunk is checkpointed: backward recomputes that chunk's
    logits, so at most one chunk's (chunk × vocab) logits exist at a time, forward and backward."""
    n = x.shape[0]
    targets, temps = targets.to(x.device), temps.to(x.device)
    if n <= chunk_tokens:
        return _chunk(head, x, targets, temps)
    recompute = torch.is_grad_enabled()
    logps, entropy = [], x.new_zeros((), dtype=torch.float32)
    for a in range(0, n, chunk_tokens):
        b = min(n, a + chunk_tokens)
        if recompute:
            lp, ent = checkpoint(_chunk, head, x[a:b], targets[a:b], temps[a:b], use_reentrant=False)
        else:
            lp, ent = _chunk(head, x[a:b], targets[a:b], temps[a:b])
        logps.append(lp)
        entropy = entropy + ent.detach()
    return torch.cat(logps), entropy


def packed_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    temperatures: float | Sequence[float],
    *,
    max_row_tokens: int = 4096,
    with_grad: bool = False,
    pad_id: int = 0,
    chunk_tokens: int | None = None,
) -> PackedLogprobs:
    """Completion log-probs per sequence plus the policy entropy (no grad) from the same logits.

    ``chunk_tokens``: completion positions per LM-head/log-softmax chunk (default: ``LOGIT_CHUNK_BYTES`` of
    fp32 logits); the values do not depend on it beyond float rounding."""
    packed = pack(sequences, max_row_tokens, pad_id)
    rows, cols, targets = completion_logit_index(packed)
    temps = _per_token_temperature(temperatures, packed)
    device = model_device(model)
    inputs = [t.to(device) for t in (packed.input_ids, packed.position_ids, rows, cols, targets, temps)]
    with torch.set_grad_enabled(with_grad):
        registered = getattr(model, FORWARD_METHOD, None)  # a sharded model: its FSDP forward method
        if registered is not None:
            logp, entropy = registered(*inputs, chunk_tokens)
        else:
            logp, entropy = completion_logprobs(model, *inputs, chunk_tokens)
    entropy_sum = float(entropy) if logp.numel() else 0.0
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
    chunk_tokens: int | None = None,
) -> list[Tensor]:
    """One float32 (L_i,) tensor of completion-token log-probs per (prompt_ids, completion_ids).

    ``temperatures``: one value for all sequences or one per sequence. Without ``with_grad`` the
    forward runs under no_grad and the tensors are detached."""
    return packed_logprobs(
        model,
        sequences,
        temperatures,
        max_row_tokens=max_row_tokens,
        with_grad=with_grad,
        chunk_tokens=chunk_tokens,
    ).logprobs
