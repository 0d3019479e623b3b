"""The behaviour weight's level (``is_level``) against hand computation: the full sequence likelihood ratio
and per-token weights (TIS), beside the default length-normalised ratio."""

from __future__ import annotations

import math

import pytest
import torch

from learner.gspo import policy_loss

F64 = torch.float64
# two sequences (3 and 2 response tokens), advantages of both signs
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]
PROX = [[-1.1, -0.4, -2.2], [-0.2, -1.0, 0.0]]
BEHAV = [[-1.3, -0.45, -2.0], [-0.6, -0.9, 0.0]]
MASK = [[True, True, True], [True, True, False]]
ADV = [1.0, -0.7]
BAND = (0.2, 0.28)
CAP = 1.5


def _loss(level: str, mode: str = "truncate"):
    logp = torch.tensor(LOGP, dtype=F64, requires_grad=True)
    out = policy_loss(
        logp,
        torch.tensor(PROX, dtype=F64),
        torch.tensor(BEHAV, dtype=F64),
        torch.tensor(ADV, dtype=F64),
        torch.tensor(MASK),
        torch.tensor([1, 2]),
        clip_low=BAND[0],
        clip_high=BAND[1],
        is_cap=CAP,
        is_mode=mode,
        is_level=level,
    )
    out.loss.backward()
    return out, logp.grad


def _surrogate(i: int) -> float:
    n = sum(MASK[i])
    s = math.exp(sum(LOGP[i][t] - PROX[i][t] for t in range(n)) / n)
    return min(s * ADV[i], min(max(s, 1 - BAND[0]), 1 + BAND[1]) * ADV[i])


def test_sequence_level_weight_is_the_full_likelihood_ratio() -> None:
    out, _ = _loss("sequence")
    expected = 0.0
    for i in range(2):
        n = sum(MASK[i])
        rho = math.exp(sum(PROX[i][t] - BEHAV[i][t] for t in range(n)))
        expected += -min(rho, CAP) * _surrogate(i)
    assert out.loss.item() == pytest.approx(expected / 2, rel=1e-12)


def test_token_level_weights_each_token() -> None:
    out, grad = _loss("token")
    expected = 0.0
    for i in range(2):
        n = sum(MASK[i])
        w = [min(math.exp(PROX[i][t] - BEHAV[i][t]), CAP) for t in range(n)]
        expected += -sum(w) / n * _surrogate(i)  # the token form has s_i's value at every token
    assert out.loss.item() == pytest.approx(expected / 2, rel=1e-12)
    assert grad[1, 2].item() == 0.0  # padding gets no gradient


def test_levels_agree_when_behaviour_is_the_proximal_policy() -> None:
    global BEHAV
    saved, BEHAV = BEHAV, PROX
    try:
        results = {level: _loss(level) for level in ("geometric", "sequence", "token")}
    finally:
        BEHAV = saved
    ref_loss, ref_grad = results["geometric"]
    for level in ("sequence", "token"):
        loss, grad = results[level]
        assert loss.loss.item() == pytest.approx(ref_loss.loss.item(), rel=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_geometric_and_sequence_levels_differ_on_a_mismatch() -> None:
    assert _loss("geometric")[0].loss.item() != pytest.approx(_loss("sequence")[0].loss.item())


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="is_level"):
        _loss("bogus")
