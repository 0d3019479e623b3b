"""Packing: row planning, and packed log-probs equal one-by-one forwards of the tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from learner.logprobs import packed_logprobs, token_logprobs
from learner.packing import completion_logit_index, pack, plan_rows


def test_plan_rows_balances_loads_under_the_cap() -> None:
    rows = plan_rows([5, 3, 7, 2, 9], 10)  # total 26 -> 3 rows; longest first into the lightest row
    assert rows == [[4], [2, 3], [0, 1]]  # 9 | 7+2 | 5+3
    assert sorted(plan_rows([12, 1], 10)) == [[0], [1]]  # an over-long sequence gets its own row


def test_pack_positions_restart_and_targets_are_the_completion_tokens() -> None:
    packed = pack([([5, 6], [7, 8, 9]), ([10], [11])], max_row_tokens=16, pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    rows, cols, targets = completion_logit_index(packed)
    assert cols.tolist() == [1, 2, 3, 5] and targets.tolist() == [7, 8, 9, 11]
    two = pack([([5, 6], [7, 8, 9]), ([10], [11])], max_row_tokens=5, pad_id=0)
    assert two.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]]
    assert two.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert two.padding_frac == pytest.approx(3 / 7)


def _one_by_one(model, sequences, temps) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for (p, c), t in zip(sequences, temps, strict=True):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0].float() / t  # (n, V)
            logp = torch.log_softmax(logits[len(p) - 1 : len(p) + len(c) - 1], dim=-1)
            out.append(logp.gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1))
    return out


def _random_sequences(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(3, 40) for _ in range(rng.randint(1, 12))],
            [rng.randrange(3, 40) for _ in range(rng.randint(0, 20))],
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("max_row_tokens", [24, 64, 4096])
def test_packed_logprobs_equal_one_by_one(tiny_model_dir, max_row_tokens: int) -> None:
    from modeling import load_model

    model = load_model(tiny_model_dir)
    seqs = _random_sequences(17, seed=max_row_tokens)
    temps = [0.7 + 0.1 * (i % 5) for i in range(len(seqs))]
    got = token_logprobs(model, seqs, temps, max_row_tokens=max_row_tokens)
    want = _one_by_one(model, seqs, temps)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(g.dtype == torch.float32 for g in got)
    err = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True) if w.numel())
    assert err <= 1e-5


def test_without_the_position_reset_sequences_would_leak(tiny_model_dir) -> None:
    """Guards the test above: the same packed row with continuing positions differs (so it would fail)."""
    from modeling import load_model

    model = load_model(tiny_model_dir)
    seqs = [([5, 6, 7], [8, 9, 10]), ([11, 12], [13, 14])]
    packed = pack(seqs, 4096)
    with torch.no_grad():
        leak = model(
            input_ids=packed.input_ids, position_ids=torch.arange(10).unsqueeze(0), use_cache=False
        ).logits
    second = torch.log_softmax(leak[0, 7:9], dim=-1).gather(-1, torch.tensor([[13], [14]])).squeeze(-1)
    assert (second - _one_by_one(model, seqs, [1.0, 1.0])[1]).abs().max() > 1e-3


def test_with_grad_gives_gradients_and_padding_waste_is_small(tiny_model_dir) -> None:
    from modeling import load_model

    model = load_model(tiny_model_dir)
    seqs = _random_sequences(64, seed=1)
    res = packed_logprobs(model, seqs, 1.0, max_row_tokens=256, with_grad=True)
    assert sum(lp.sum() for lp in res.logprobs).requires_grad
    assert res.real_tokens == sum(len(p) + len(c) for p, c in seqs)
    assert (res.computed_tokens - res.real_tokens) / res.real_tokens <= 0.10
    assert res.entropy_sum > 0
    assert token_logprobs(model, seqs[:2], 1.0)[0].requires_grad is False
