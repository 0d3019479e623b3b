"""learner.gspo against hand computation (plain python/math), closed-form gradients and invariances.

The reference functions here re-derive docs/objective.md with floats and lists; they never call the
module's internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from learner.gspo import (
    IS_MODES,
    VARIANTS,
    PolicyLossOutput,
    group_advantages,
    is_weights,
    merge_stats,
    metrics_from_stats,
    policy_loss,
)

F64 = torch.float64
GARBAGE = (math.nan, math.inf, -math.inf, 1e30, -1e30, 123.0)
REQUIRED_METRICS = (
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "seq_ratio_mean",
    "seq_ratio_min",
    "seq_ratio_max",
    "is_weight_mean",
    "is_weight_max",
    "is_ess",
    "is_truncated_frac",
    "is_masked_frac",
    "mismatch_abs",
)


# ---------------------------------------------------------------------------------------------
# plain-python reference and batch building


@dataclass
class Seq:
    """One response: per-token log-probs under θ, proximal and behaviour; advantage; staleness."""

    lp: list[float]
    prox: list[float]
    beh: list[float]
    adv: float | list[float]
    k: int = 0


@dataclass
class Knobs:
    variant: str = "gspo"
    clip_low: float = 3e-4
    clip_high: float = 4e-4
    clip_stale_scale: float = 0.0
    is_mode: str = "truncate"
    is_cap: float = 2.0
    is_cap_decay: float = 1.0

    def kwargs(self) -> dict:
        return dict(self.__dict__)


def ref_weight(log_rho: float, k: int, kn: Knobs) -> float:
    rho = math.exp(min(log_rho, 10.0))
    cap = kn.is_cap * kn.is_cap_decay**k
    if kn.is_mode == "truncate":
        return min(rho, cap)
    if kn.is_mode == "mask":
        return 1.0 if 1.0 / cap <= rho <= cap else 0.0
    return 1.0


def ref_surrogate(ratio: float, adv: float, k: int, kn: Knobs) -> float:
    lo = 1.0 - kn.clip_low * (1.0 + kn.clip_stale_scale * k)
    hi = 1.0 + kn.clip_high * (1.0 + kn.clip_stale_scale * k)
    return min(ratio * adv, min(max(ratio, lo), hi) * adv)


def ref_seq_loss(q: Seq, kn: Knobs) -> float:
    n = len(q.lp)
    advs = q.adv if isinstance(q.adv, list) else [q.adv] * n
    if kn.variant == "grpo":
        terms = [
            -ref_weight(p - b, q.k, kn) * ref_surrogate(math.exp(min(x - p, 10.0)), a, q.k, kn)
            for x, p, b, a in zip(q.lp, q.prox, q.beh, advs, strict=True)
        ]
        return sum(terms) / n
    s = math.exp(min(sum(x - p for x, p in zip(q.lp, q.prox, strict=True)) / n, 10.0))
    w = ref_weight(sum(p - b for p, b in zip(q.prox, q.beh, strict=True)) / n, q.k, kn)
    return -w * sum(ref_surrogate(s, a, q.k, kn) for a in advs) / n


def ref_loss(seqs: list[Seq], kn: Knobs) -> float:
    losses = [ref_seq_loss(q, kn) for q in seqs if q.lp]
    return sum(losses) / len(losses)


def build(seqs: list[Seq], T: int, token_adv: bool = False, garbage_offset: int = 0) -> dict:
    """Padded float64 tensors; every padding position holds garbage (NaN, ±inf, 1e30, ...)."""
    B = len(seqs)
    tensors = {name: torch.empty(B, T, dtype=F64) for name in ("lp", "prox", "beh", "adv_tok")}
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, q in enumerate(seqs):
        n = len(q.lp)
        advs = q.adv if isinstance(q.adv, list) else [q.adv] * n
        for t in range(T):
            junk = GARBAGE[(i + t + garbage_offset) % len(GARBAGE)]
            for name, values in (("lp", q.lp), ("prox", q.prox), ("beh", q.beh), ("adv_tok", advs)):
                tensors[name][i, t] = values[t] if t < n else junk
        mask[i, :n] = True
    seq_adv = torch.tensor([q.adv if not isinstance(q.adv, list) else math.nan for q in seqs], dtype=F64)
    return {
        "logprobs": tensors["lp"].requires_grad_(),
        "proximal_logprobs": tensors["prox"],
        "behavior_logprobs": tensors["beh"],
        "advantages": tensors["adv_tok"] if token_adv else seq_adv,
        "mask": mask,
        "staleness": torch.tensor([q.k for q in seqs], dtype=torch.long),
    }


def run(batch: dict, kn: Knobs, **extra) -> tuple[PolicyLossOutput, torch.Tensor]:
    out = policy_loss(**batch, **kn.kwargs(), **extra)
    (grad,) = torch.autograd.grad(out.loss, batch["logprobs"])
    return out, grad


def hand_batch(token_adv: bool) -> list[Seq]:
    """Rows crafted so that, with HAND_KNOBS, each clip and weight branch is taken."""

    def adv(scalar: float, per_token: list[float]) -> float | list[float]:
        return per_token if token_adv else scalar

    return [
        # k=0: s = e^0.02 inside [0.9, 1.15]; ρ = e^0.4 ≈ 1.49 inside the cap 1.5
        Seq(
            [-1.0, -2.0, -0.5], [-1.05, -1.99, -0.52], [-1.35, -2.49, -0.92], adv(1.0, [1.0, -0.5, 2.0]), k=0
        ),
        # k=2: band [0.8, 1.3], C = 0.96: s = e^0.35 clipped high with A > 0; ρ = e^-0.05 below 1/C
        Seq([-0.6, -0.7], [-1.0, -1.0], [-0.9, -1.0], adv(0.7, [0.7, -1.1]), k=2),
        # k=1: band [0.85, 1.225], C = 1.2: s = e^-0.225 clipped low with A < 0; ρ = e^0.35 above C
        Seq(
            [-1.3, -1.2, -1.25, -1.15],
            [-1.0, -1.0, -1.0, -1.0],
            [-1.5, -1.3, -1.4, -1.2],
            adv(-1.2, [-1.2, 0.3, -0.4, 1.5]),
            k=1,
        ),
        # k=0: s = e^0.3 above the band but A < 0: the unclipped term is the minimum
        Seq([-0.2], [-0.5], [-0.3], adv(-0.5, [-0.5]), k=0),
        # no response tokens: contributes nothing
        Seq([], [], [], adv(0.9, []), k=3),
    ]


HAND_KNOBS = dict(clip_low=0.1, clip_high=0.15, clip_stale_scale=0.5, is_cap=1.5, is_cap_decay=0.8)
VARIANT_ADVANTAGES = [
    ("gspo", False),
    ("gspo_token", False),
    ("gspo_token", True),
    ("grpo", False),
    ("grpo", True),
]


# ---------------------------------------------------------------------------------------------
# exact values


@pytest.mark.parametrize("is_mode", IS_MODES)
@pytest.mark.parametrize(("variant", "token_adv"), VARIANT_ADVANTAGES)
def test_loss_matches_hand_computation(variant: str, token_adv: bool, is_mode: str) -> None:
    kn = Knobs(variant=variant, is_mode=is_mode, **HAND_KNOBS)
    seqs = hand_batch(token_adv)
    out = policy_loss(**build(seqs, T=6, token_adv=token_adv), **kn.kwargs())
    assert out.loss.item() == pytest.approx(ref_loss(seqs, kn), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("is_mode", IS_MODES)
def test_sequence_metrics_match_hand_computation(is_mode: str) -> None:
    kn = Knobs(variant="gspo", is_mode=is_mode, **HAND_KNOBS)
    seqs = hand_batch(token_adv=False)
    metrics = policy_loss(**build(seqs, T=6), **kn.kwargs()).metrics
    expected = ref_sequence_metrics([q for q in seqs if q.lp], kn)
    expected |= {
        f"{k}/k={b}": v
        for b in (0, 1, 2)
        for k, v in ref_sequence_metrics([q for q in seqs if q.lp and q.k == b], kn).items()
    }
    assert set(REQUIRED_METRICS) <= set(metrics)
    assert {"clip_frac/k=0", "is_ess/k=2", "is_weight_mean/k=1", "count/k=1"} <= set(metrics)
    assert "count/k=3" not in metrics  # the only k=3 row has no response tokens
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert all(isinstance(v, float) for v in metrics.values())


def ref_sequence_metrics(seqs: list[Seq], kn: Knobs) -> dict[str, float]:
    n = len(seqs)
    ratios, weights, log_rhos, low, high = [], [], [], 0, 0
    for q in seqs:
        s = math.exp(sum(x - p for x, p in zip(q.lp, q.prox, strict=True)) / len(q.lp))
        log_rho = sum(p - b for p, b in zip(q.prox, q.beh, strict=True)) / len(q.lp)
        low += s < 1 - kn.clip_low * (1 + kn.clip_stale_scale * q.k)
        high += s > 1 + kn.clip_high * (1 + kn.clip_stale_scale * q.k)
        ratios.append(s)
        log_rhos.append(log_rho)
        weights.append(ref_weight(log_rho, q.k, kn))
    caps = [kn.is_cap * kn.is_cap_decay**q.k for q in seqs]
    truncated = sum(math.exp(lr) > c for lr, c in zip(log_rhos, caps, strict=True))
    return {
        "clip_frac": (low + high) / n,
        "clip_frac_low": low / n,
        "clip_frac_high": high / n,
        "seq_ratio_mean": sum(ratios) / n,
        "seq_ratio_min": min(ratios),
        "seq_ratio_max": max(ratios),
        "is_weight_mean": sum(weights) / n,
        "is_weight_max": max(weights),
        "is_ess": sum(weights) ** 2 / (n * sum(w * w for w in weights)) if any(weights) else 0.0,
        "is_truncated_frac": truncated / n if kn.is_mode == "truncate" else 0.0,
        "is_masked_frac": weights.count(0.0) / n if kn.is_mode == "mask" else 0.0,
        "mismatch_abs": sum(abs(x) for x in log_rhos) / n,
        "count": float(n),
    }


def test_grpo_metrics_count_tokens() -> None:
    kn = Knobs(variant="grpo", is_mode="truncate", **HAND_KNOBS)
    seqs = hand_batch(token_adv=False)
    metrics = policy_loss(**build(seqs, T=6), **kn.kwargs()).metrics
    tokens = [(x, p, b, q.k) for q in seqs for x, p, b in zip(q.lp, q.prox, q.beh, strict=True)]
    bands = [(1 - 0.1 * (1 + 0.5 * k), 1 + 0.15 * (1 + 0.5 * k)) for *_, k in tokens]
    ratios = [math.exp(x - p) for x, p, _, _ in tokens]
    weights = [ref_weight(p - b, k, kn) for _, p, b, k in tokens]
    assert metrics["clip_frac_low"] == pytest.approx(
        sum(r < lo for r, (lo, _) in zip(ratios, bands, strict=True)) / 10
    )
    assert metrics["clip_frac_high"] == pytest.approx(
        sum(r > hi for r, (_, hi) in zip(ratios, bands, strict=True)) / 10
    )
    assert metrics["is_weight_mean"] == pytest.approx(sum(weights) / 10, rel=1e-12)
    assert metrics["is_weight_max"] == pytest.approx(max(weights), rel=1e-12)
    assert metrics["count"] == 4.0


# ---------------------------------------------------------------------------------------------
# gradients


def random_batch(seed: int, B: int = 6, T: int = 7, spread: float = 0.2) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 0  # one empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    prox = lp + spread * torch.randn(B, T, generator=g, dtype=F64)
    beh = prox + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    for x in (lp, prox, beh):
        x[~mask] = math.nan
    return {
        "logprobs": lp.requires_grad_(),
        "proximal_logprobs": prox,
        "behavior_logprobs": beh,
        "advantages": torch.randn(B, generator=g, dtype=F64),
        "mask": mask,
        "staleness": torch.randint(0, 4, (B,), generator=g),
    }


@pytest.mark.parametrize("is_mode", IS_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_equals_gspo_in_value_and_gradient(seed: int, is_mode: str) -> None:
    batch = random_batch(seed)
    kn = Knobs(clip_low=0.05, clip_high=0.08, clip_stale_scale=0.3, is_mode=is_mode, is_cap=1.3)
    seq, seq_grad = run(batch, kn)
    tok, tok_grad = run(batch, Knobs(**{**kn.kwargs(), "variant": "gspo_token"}))
    assert 0 < seq.metrics["clip_frac"] < 1  # both clipped and unclipped rows are exercised
    torch.testing.assert_close(tok.loss, seq.loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(tok_grad, seq_grad, rtol=1e-12, atol=1e-15)


def test_gspo_gradient_is_the_papers_closed_form() -> None:
    """∇ℓ = −w_i s_i A_i (1/|y_i|) Σ_t ∇log πθ / N when the unclipped term is the minimum, else 0."""
    g = torch.Generator().manual_seed(7)
    B, T, V, D = 6, 5, 11, 4
    weights_param = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)
    features = torch.randn(B, T, D, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([5, 3, 4, 2, 5, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = torch.log_softmax(features @ weights_param.T, -1).gather(-1, tokens[..., None])[..., 0]  # (B, T)

    # log s_i = delta_i (band [1 − 3e-4, 1 + 4e-4]); log ρ_i = offset_i (cap 2)
    delta = [1e-4, -2e-4, 1e-3, -1e-3, 1e-3, -1e-3]
    adv = [1.3, -0.7, 0.9, -0.4, -0.6, 0.5]
    offset = [0.1, -0.2, 0.3, 0.0, 0.9, -1.0]
    active = [True, True, False, False, True, True]  # rows 2, 3: the clipped term is the minimum
    prox = torch.where(mask, logp.detach() - torch.tensor(delta, dtype=F64)[:, None], math.nan)
    beh = torch.where(mask, prox - torch.tensor(offset, dtype=F64)[:, None], math.inf)
    logp.retain_grad()
    out = policy_loss(logp, prox, beh, torch.tensor(adv, dtype=F64), mask, torch.zeros(B, dtype=torch.long))
    out.loss.backward(retain_graph=True)

    expected = torch.zeros_like(weights_param)
    for i in range(B):
        if not active[i]:
            continue
        coef = -min(math.exp(offset[i]), 2.0) * math.exp(delta[i]) * adv[i] / (int(lengths[i]) * B)
        (score,) = torch.autograd.grad(logp[i, : lengths[i]].sum(), weights_param, retain_graph=True)
        expected += coef * score
    torch.testing.assert_close(weights_param.grad, expected, rtol=1e-10, atol=1e-14)
    assert out.metrics["clip_frac"] == pytest.approx(4 / 6)
    for i in (2, 3):
        assert torch.equal(logp.grad[i], torch.zeros(T, dtype=F64))  # exactly zero, not small
    for i in (0, 1, 4, 5):
        assert bool((logp.grad[i, : lengths[i]] != 0).all())
    assert bool((logp.grad[~mask] == 0).all())


# ---------------------------------------------------------------------------------------------
# staleness-aware band and cap, mask mode


@pytest.mark.parametrize(("delta", "adv"), [(1e-3, 1.0), (-1e-3, -1.0)])
def test_band_widens_with_staleness(delta: float, adv: float) -> None:
    """|log s| = 1e-3 is outside the paper's band at k=0 and inside ε(1 + 1·3) at k=3."""
    seqs = [Seq([-1.0 + delta, -2.0 + delta], [-1.0, -2.0], [-1.0, -2.0], adv, k=k) for k in (0, 3)]
    kn = Knobs(clip_stale_scale=1.0)
    out, grad = run(build(seqs, T=3), kn)
    assert out.metrics["clip_frac/k=0"] == 1.0
    assert out.metrics["clip_frac/k=3"] == 0.0
    assert torch.equal(grad[0], torch.zeros(3, dtype=F64))
    closed_form = -math.exp(delta) * adv / (2 * 2)  # −w s A / (L N), w = 1
    torch.testing.assert_close(grad[1, :2], torch.full((2,), closed_form, dtype=F64), rtol=1e-12, atol=0)
    assert out.loss.item() == pytest.approx(ref_loss(seqs, kn), rel=1e-12)
    unwidened, _ = run(build(seqs, T=3), Knobs(clip_stale_scale=0.0))
    assert unwidened.metrics["clip_frac"] == 1.0


def test_cap_decays_with_staleness() -> None:
    """ρ = e ≈ 2.72 everywhere: C(k) = 2 · 0.5^k truncates it to 2, 1, 0.5, 0.25."""
    seqs = [Seq([-1.0, -2.0], [-1.0, -2.0], [-2.0, -3.0], 1.0, k=k) for k in range(4)]
    batch = build(seqs, T=4)
    kn = Knobs(is_cap=2.0, is_cap_decay=0.5)
    w = is_weights(
        batch["proximal_logprobs"],
        batch["behavior_logprobs"],
        batch["mask"],
        batch["staleness"],
        "truncate",
        2.0,
        0.5,
    )
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=F64), rtol=1e-15, atol=0)
    out = policy_loss(**batch, **kn.kwargs())
    assert out.loss.item() == pytest.approx(-(2.0 + 1.0 + 0.5 + 0.25) / 4, rel=1e-14)  # s = 1, A = 1
    assert [out.metrics[f"is_weight_mean/k={k}"] for k in range(4)] == pytest.approx([2.0, 1.0, 0.5, 0.25])
    assert out.metrics["is_truncated_frac"] == 1.0


def test_mask_mode_zeroes_rows_outside_the_cap() -> None:
    """Kept iff 1/C(k) <= ρ <= C(k); C = 2 · 0.8^k."""
    log_rho = [0.0, 0.6, -0.6, 0.8, -0.8, 0.6]
    staleness = [0, 0, 0, 0, 0, 1]  # last row: C = 1.6 < e^0.6 ≈ 1.82
    keep = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    seqs = [
        Seq([-1.0, -1.5], [-1.0, -1.5], [-1.0 - r, -1.5 - r], 1.0 + i, k=k)
        for i, (r, k) in enumerate(zip(log_rho, staleness, strict=True))
    ]
    batch = build(seqs, T=3)
    w = is_weights(
        batch["proximal_logprobs"],
        batch["behavior_logprobs"],
        batch["mask"],
        batch["staleness"],
        "mask",
        2.0,
        0.8,
    )
    assert w.tolist() == keep
    out, grad = run(batch, Knobs(is_mode="mask", is_cap=2.0, is_cap_decay=0.8, clip_low=0.5, clip_high=0.5))
    assert out.metrics["is_masked_frac"] == pytest.approx(3 / 6)
    for i, kept in enumerate(keep):
        assert bool((grad[i, :2] != 0).all()) == bool(kept), i
    assert out.loss.item() == pytest.approx(-(1.0 + 2.0 + 3.0) / 6, rel=1e-14)  # s = 1, w = 1 on kept rows


# ---------------------------------------------------------------------------------------------
# behaviour == proximal, numerical guard, padding and order invariance


@pytest.mark.parametrize("is_mode", IS_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_behaviour_equal_to_proximal_gives_unit_weights(variant: str, is_mode: str) -> None:
    batch = random_batch(3)
    batch["behavior_logprobs"] = torch.where(batch["mask"], batch["proximal_logprobs"], -math.inf)
    kn = Knobs(variant=variant, is_mode=is_mode, clip_low=0.05, clip_high=0.08)
    out, grad = run(batch, kn)
    reference, reference_grad = run(batch, Knobs(**{**kn.kwargs(), "is_mode": "none"}))
    for key, value in {
        "is_weight_mean": 1.0,
        "is_weight_max": 1.0,
        "is_ess": 1.0,
        "mismatch_abs": 0.0,
        "is_truncated_frac": 0.0,
        "is_masked_frac": 0.0,
    }.items():
        assert out.metrics[key] == value, key
    assert torch.equal(out.loss, reference.loss)
    assert torch.equal(grad, reference_grad)


@pytest.mark.parametrize("is_mode", IS_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_huge_mismatches_give_finite_loss_and_gradients(variant: str, is_mode: str) -> None:
    """Differences of 1e4 nats in either direction, between θ and prox and between prox and b."""
    seqs = [
        Seq([1e4, 0.0], [0.0, 0.0], [-1e4, -1e4], 1.0, k=0),
        Seq([-1e4, -1e4], [0.0, 0.0], [1e4, 1e4], -1.0, k=1),
        Seq([1e4, -2.0], [0.0, -1e4], [-1e4, 1e4], -1.0, k=2),
        Seq([-1e4], [1e4], [0.0], 2.0, k=0),
    ]
    out, grad = run(build(seqs, T=4), Knobs(variant=variant, is_mode=is_mode, clip_stale_scale=0.5))
    assert math.isfinite(out.loss.item())
    assert bool(torch.isfinite(grad).all())
    assert all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize(("variant", "token_adv"), VARIANT_ADVANTAGES)
def test_padding_length_and_content_do_not_matter(variant: str, token_adv: bool) -> None:
    seqs = hand_batch(token_adv)
    kn = Knobs(variant=variant, is_mode="truncate", **HAND_KNOBS)
    short, short_grad = run(build(seqs, T=4, token_adv=token_adv), kn)
    long_batch = build(seqs, T=4 + 7, token_adv=token_adv, garbage_offset=3)
    long, long_grad = run(long_batch, kn)
    torch.testing.assert_close(long.loss, short.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(long_grad[:, :4], short_grad, rtol=1e-14, atol=0)
    assert bool((long_grad[~long_batch["mask"]] == 0).all())
    assert long.metrics == pytest.approx(short.metrics, rel=1e-14)


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_order_does_not_matter(variant: str) -> None:
    batch = random_batch(5, B=8)
    kn = Knobs(variant=variant, clip_low=0.05, clip_high=0.08, clip_stale_scale=0.5, is_cap=1.2)
    out, grad = run(batch, kn)
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    permuted = {name: t.detach()[perm] for name, t in batch.items()}
    permuted["logprobs"].requires_grad_()
    out_p, grad_p = run(permuted, kn)
    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad_p, grad[perm], rtol=1e-13, atol=1e-15)
    assert out_p.metrics == pytest.approx(out.metrics, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# group advantages


def test_group_advantages_exact_values_with_unbiased_std() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 2.0, 0.0, 2.0], dtype=F64)
    adv = group_advantages(rewards, 4)
    std_1 = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # N − 1
    std_2 = math.sqrt(4 * 1.0 / 3)
    expected = [(r - 2.5) / (std_1 + 1e-6) for r in (1, 2, 3, 4)] + [
        (r - 1.0) / (std_2 + 1e-6) for r in (0, 2, 0, 2)
    ]
    assert adv.tolist() == pytest.approx(expected, rel=1e-14)
    pair = group_advantages(torch.tensor([0.0, 2.0], dtype=F64), 2).tolist()
    assert pair == pytest.approx([-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6)], rel=1e-14)


def test_group_advantages_zero_std_groups_are_exactly_zero() -> None:
    # 0.3 · 3 / 3 is not exactly 0.3 in floating point: r − mean would leave a residue / 1e-6
    rewards = torch.tensor([0.3, 0.3, 0.3, 1.0, 2.0, 4.0, 0.1, 0.1, 0.1], dtype=F64)
    adv = group_advantages(rewards, 3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[6:].tolist() == [0.0, 0.0, 0.0]
    assert bool((adv[3:6] != 0).all())
    assert group_advantages(torch.tensor([1.0, 5.0, -2.0]), 1).tolist() == [0.0, 0.0, 0.0]
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.get_default_dtype()


@pytest.mark.parametrize(
    ("rewards", "group_size"), [(torch.zeros(5), 2), (torch.zeros(4), 0), (torch.zeros(2, 2), 2)]
)
def test_group_advantages_rejects_bad_shapes(rewards: torch.Tensor, group_size: int) -> None:
    with pytest.raises(ValueError, match="rewards|group_size"):
        group_advantages(rewards, group_size)


# ---------------------------------------------------------------------------------------------
# micro-batching: global denominator and mergeable stats


@pytest.mark.parametrize("variant", VARIANTS)
def test_global_loss_denominator_splits_exactly(variant: str) -> None:
    batch = random_batch(11, B=8)
    kn = Knobs(variant=variant, clip_low=0.05, clip_high=0.08, clip_stale_scale=0.5, is_cap=1.2)
    full, full_grad = run(batch, kn)
    n_valid = int(batch["mask"].any(-1).sum())
    halves = [
        {name: t.detach()[part].clone() for name, t in batch.items()} for part in (slice(0, 3), slice(3, 8))
    ]
    losses, grads, stats = [], [], []
    for half in halves:
        half["logprobs"].requires_grad_()
        out, grad = run(half, kn, loss_denominator=n_valid)
        losses.append(out.loss)
        grads.append(grad)
        stats.append(out.stats)
    torch.testing.assert_close(losses[0] + losses[1], full.loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=1e-13, atol=1e-15)
    assert merge_stats(*stats) == pytest.approx(full.stats, rel=1e-12)
    assert metrics_from_stats(merge_stats(*stats)) == pytest.approx(full.metrics, rel=1e-12)


@pytest.mark.parametrize("B", [0, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_without_response_tokens_gives_connected_zero(variant: str, B: int) -> None:
    garbage = torch.full((B, 4), math.nan, dtype=F64)
    logprobs = garbage.clone().requires_grad_()
    out = policy_loss(
        logprobs,
        garbage,
        garbage,
        torch.full((B,), math.nan, dtype=F64),
        torch.zeros(B, 4, dtype=torch.bool),
        torch.zeros(B, dtype=torch.long),
        variant=variant,
    )
    assert out.loss.item() == 0.0
    assert out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(B, 4, dtype=F64))
    assert all(out.metrics[key] == 0.0 for key in REQUIRED_METRICS)


def test_low_precision_inputs_are_computed_in_float32() -> None:
    batch = random_batch(2)
    bf16 = {
        name: (t.detach().to(torch.bfloat16) if t.is_floating_point() else t) for name, t in batch.items()
    }
    bf16["logprobs"].requires_grad_()
    out = policy_loss(**bf16)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert bf16["logprobs"].grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# argument validation


def _with(**changes) -> dict:
    batch = random_batch(0, B=3, T=4)
    return {**batch, **changes}


@pytest.mark.parametrize(
    ("changes", "options", "argument"),
    [
        ({}, {"variant": "ppo"}, "variant"),
        ({}, {"is_mode": "clip"}, "is_mode"),
        ({"proximal_logprobs": torch.zeros(3, 5, dtype=F64)}, {}, "proximal_logprobs"),
        ({"behavior_logprobs": torch.zeros(2, 4, dtype=F64)}, {}, "behavior_logprobs"),
        ({"mask": torch.ones(3, 4)}, {}, "mask"),
        ({"advantages": torch.zeros(4, dtype=F64)}, {}, "advantages"),
        ({"advantages": torch.zeros(3, 4, dtype=F64)}, {"variant": "gspo"}, "advantages"),
        ({"staleness": torch.tensor([0, -1, 2])}, {}, "staleness"),
        ({"staleness": torch.tensor([0, 1])}, {}, "staleness"),
        ({}, {"clip_low": -0.1}, "clip_low"),
        ({}, {"is_cap": 0.0}, "is_cap"),
        ({}, {"is_cap_decay": -1.0}, "is_cap_decay"),
        ({}, {"loss_denominator": 0}, "loss_denominator"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(changes: dict, options: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        policy_loss(**_with(**changes), **options)
