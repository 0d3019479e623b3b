"""GSPO policy loss with a decoupled, staleness-aware trust region (docs/objective.md).

Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071) clips one importance
ratio per *sequence*, the length-normalised likelihood ratio (§4, eq. 5-7):

    s_i(θ) = exp( (1/|y_i|) Σ_t [log πθ(y_i,t) − log π_old(y_i,t)] )
    J(θ)   = mean_i min( s_i A_i, clip(s_i, 1 − ε_lo, 1 + ε_hi) A_i )

and GSPO-token (§4.3) lets each token carry its own advantage while keeping the sequence ratio's
value:  s_i,t = sg[s_i] · πθ(y_i,t) / sg[πθ(y_i,t)].

Here "old" is the *proximal* policy (the learner's parameters at the start of this update,
recomputed), not the engine's behaviour policy. The behaviour/proximal gap, which grows with
staleness and with engine/trainer numeric mismatch, is moved into a capped, stop-gradient
sequence weight w_i (decoupled PPO: Hilton et al. 2022; AReaL), and the band widens with the
staleness k_i of the sample. Passing proximal := behaviour recovers the paper's
"old = behaviour" shortcut (w_i = 1). See docs/objective.md.

Everything here is pure tensor math: tensors in, ``PolicyLossOutput(loss, metrics, stats)`` out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

VARIANTS = ("gspo", "gspo_token", "grpo")
IS_MODES = ("truncate", "mask", "none")
# what the behaviour weight of the GSPO variants measures: the length-normalised (geometric-mean) sequence
# ratio, the full sequence likelihood ratio (product over tokens), or one ratio per token (TIS)
IS_LEVELS = ("geometric", "sequence", "token")

# exp(10) ≈ 2.2e4: any log-ratio is clamped here before exp so that no mismatch overflows (docs/objective.md).
MAX_LOG_RATIO = 10.0
# Group-normalised advantage denominator guard (docs/objective.md).
ADVANTAGE_STD_EPS = 1e-6


@dataclass(frozen=True)
class PolicyLossOutput:
    """loss: scalar to backprop. metrics: python floats (see ``metrics_from_stats``).
    stats: raw sums/counts/extremes behind the metrics; combine several calls with
    ``merge_stats`` and turn them into metrics with ``metrics_from_stats``."""

    loss: Tensor
    metrics: dict[str, float]
    stats: dict[str, float]


@dataclass(frozen=True)
class _Units:
    """What the clip and the behaviour weight act on: sequences (GSPO) or tokens (GRPO).
    All fields share one shape, (B,) or (B, T), and carry no gradient."""

    ratio: Tensor
    lower: Tensor
    upper: Tensor
    weight: Tensor
    truncated: Tensor  # bool
    masked: Tensor  # bool
    valid: Tensor  # bool
    staleness: Tensor


# ---------------------------------------------------------------------------------------------
# advantages


def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = (r_i − mean_g r) / (std_g r + 1e-6), groups of ``group_size`` consecutive rewards.

    GSPO eq. 6 (the GRPO group baseline). std is unbiased (N − 1). A group whose rewards are all
    equal gets exactly 0 (not a rounding residue of r − mean); group_size == 1 gives zeros.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {rewards.numel()} rewards")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    if group_size == 1:
        return torch.zeros_like(r)
    groups = r.reshape(-1, group_size)  # (n_groups, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    adv = centred / (groups.std(dim=1, correction=1, keepdim=True) + ADVANTAGE_STD_EPS)
    tied = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # (n_groups, 1)
    return torch.where(tied, torch.zeros_like(adv), adv).reshape(-1)


# ---------------------------------------------------------------------------------------------
# building blocks (each one line of docs/objective.md)


def mean_log_ratio(numerator: Tensor, denominator: Tensor, mask: Tensor) -> Tensor:
    """(1/L_i) Σ_t m_t (numerator − denominator), clamped at <= MAX_LOG_RATIO.  (B, T) -> (B,)

    Rows without response tokens give 0. Inputs must be finite where ``mask`` is False
    (``policy_loss`` sanitises them first)."""
    lengths = mask.sum(dim=-1).clamp(min=1)  # (B,)
    total = torch.where(mask, numerator - denominator, 0.0).sum(dim=-1)  # (B,)
    return (total / lengths).clamp(max=MAX_LOG_RATIO)


def clip_band(
    staleness: Tensor, clip_low: float, clip_high: float, clip_stale_scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(1 − ε_lo(k), 1 + ε_hi(k)) with ε(k) = ε · (1 + clip_stale_scale · k).  (B,) -> (B,), (B,)"""
    widen = 1.0 + clip_stale_scale * staleness.to(dtype)  # (B,)
    return 1.0 - clip_low * widen, 1.0 + clip_high * widen


def staleness_cap(staleness: Tensor, is_cap: float, is_cap_decay: float, dtype: torch.dtype) -> Tensor:
    """C(k) = is_cap · is_cap_decay^k.  (B,) -> (B,)"""
    return is_cap * torch.pow(is_cap_decay, staleness.to(dtype))


def correction_weights(log_rho: Tensor, cap: Tensor, is_mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """Behaviour correction from ρ = exp(log_rho) (log clamped at <= MAX_LOG_RATIO) and cap C.

    truncate: w = min(ρ, C); mask: w = 1 if 1/C <= ρ <= C else 0; none: w = 1.
    Returns (w, truncated, masked), the last two bool, all shaped like ``log_rho``."""
    rho = log_rho.clamp(max=MAX_LOG_RATIO).exp()
    never = torch.zeros_like(rho, dtype=torch.bool)
    if is_mode == "truncate":
        return torch.minimum(rho, cap), rho > cap, never
    if is_mode == "mask":
        keep = (rho >= 1.0 / cap) & (rho <= cap)
        return keep.to(rho.dtype), never, ~keep
    return torch.ones_like(rho), never, never


def clipped_surrogate(ratio: Tensor, advantages: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """min(r·A, clip(r, lower, upper)·A): the pessimistic clipped objective (GSPO eq. 5)."""
    return torch.minimum(ratio * advantages, torch.clamp(ratio, lower, upper) * advantages)


def token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over each row's response tokens; 0 for rows without any.  (B, T) -> (B,)"""
    return torch.where(mask, values, 0.0).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


def is_weights(
    proximal_logprobs: Tensor,
    behavior_logprobs: Tensor,
    mask: Tensor,
    staleness: Tensor,
    is_mode: str = "truncate",
    is_cap: float = 2.0,
    is_cap_decay: float = 1.0,
) -> Tensor:
    """Sequence-level behaviour weights w_i (B,), stop-gradient (the GSPO variants' w_i).

    ρ_i = exp((1/L_i) Σ_t m_t (log π_prox − log π_b)), C(k) = is_cap · is_cap_decay^k."""
    _check_choice("is_mode", is_mode, IS_MODES)
    _check_same_shape(
        proximal_logprobs, proximal_logprobs=proximal_logprobs, behavior_logprobs=behavior_logprobs
    )
    _check_mask_and_staleness(proximal_logprobs, mask, staleness)
    _check_cap(is_cap, is_cap_decay)
    dtype = torch.promote_types(proximal_logprobs.dtype, torch.float32)
    prox, behav = (_on_mask(x.detach().to(dtype), mask) for x in (proximal_logprobs, behavior_logprobs))
    cap = staleness_cap(staleness, is_cap, is_cap_decay, dtype)
    return correction_weights(mean_log_ratio(prox, behav, mask), cap, is_mode)[0]


# ---------------------------------------------------------------------------------------------
# the loss


def policy_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    staleness: Tensor,
    *,
    variant: str = "gspo",
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    clip_stale_scale: float = 0.0,
    is_mode: str = "truncate",
    is_cap: float = 2.0,
    is_cap_decay: float = 1.0,
    loss_denominator: float | None = None,
    is_level: str = "geometric",
) -> PolicyLossOutput:
    """Decoupled, staleness-aware GSPO / GSPO-token / GRPO loss (docs/objective.md).

    logprobs (B, T) current policy (with grad); proximal_logprobs (B, T) learner before this
    update; behavior_logprobs (B, T) inference engine; advantages (B,) or, for gspo_token/grpo,
    (B, T); mask (B, T) bool, response tokens; staleness (B,) int >= 0.

    GSPO:       ℓ_i = −w_i · min(s_i A_i, clip(s_i, 1 − ε_lo(k_i), 1 + ε_hi(k_i)) A_i)   (eq. 5-7)
    GSPO-token: the same per token with s_i,t = exp(sg[log s_i] + log πθ_t − sg[log πθ_t]) and
                A_i,t, token-mean per sequence (§4.3)
    GRPO:       token ratios exp(log πθ − log π_prox), token weights min(exp(log π_prox − log π_b), C),
                token-level clip, token-mean per sequence

    ``is_level`` (GSPO variants) chooses ρ_i: "geometric" (default) the length-normalised ratio above,
    "sequence" the full likelihood ratio exp(Σ_t (log π_prox − log π_b)), "token" one weight per token
    (TIS: w_i,t = min(ρ_i,t, C), applied to the token form of the surrogate, which has GSPO's value).

    loss = Σ_i ℓ_i / D over rows with >= 1 response token, D = their count unless
    ``loss_denominator`` is given (a global count across micro-batches/ranks).
    Masked positions never touch the value or the gradient, whatever they hold (NaN/inf included).
    Computation runs in at least float32: the 3e-4 band is below bf16 resolution.
    """
    _check_loss_args(logprobs, proximal_logprobs, behavior_logprobs, advantages, mask, staleness, variant)
    _check_scalars(clip_low, clip_high, clip_stale_scale, loss_denominator)
    _check_choice("is_mode", is_mode, IS_MODES)
    _check_choice("is_level", is_level, IS_LEVELS)
    _check_cap(is_cap, is_cap_decay)

    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logp = _on_mask(logprobs.to(dtype), mask)  # (B, T)
    prox = _on_mask(proximal_logprobs.detach().to(dtype), mask)  # (B, T)
    behav = _on_mask(behavior_logprobs.detach().to(dtype), mask)  # (B, T)
    valid = mask.any(dim=-1)  # (B,)
    adv = _sanitise_advantages(advantages.detach().to(dtype), mask, valid)  # (B,) or (B, T)

    log_s = mean_log_ratio(logp, prox, mask)  # (B,)  log s_i, with grad
    log_rho = mean_log_ratio(prox, behav, mask)  # (B,)  log ρ_i, no grad (geometric mean: the metrics)
    lower, upper = clip_band(staleness, clip_low, clip_high, clip_stale_scale, dtype)  # (B,), (B,)
    cap = staleness_cap(staleness, is_cap, is_cap_decay, dtype)  # (B,)

    if variant == "grpo":
        seq_loss, units = _grpo(logp, prox, behav, adv, mask, staleness, lower, upper, cap, is_mode)
    else:
        seq_loss, units = _gspo(
            log_s, _level_log_rho(log_rho, prox, behav, mask, is_level), logp, adv, mask, staleness,
            lower, upper, cap, is_mode, variant,
        )  # fmt: skip

    denominator = valid.sum().clamp(min=1) if loss_denominator is None else loss_denominator
    # Summing through where keeps the graph connected to logprobs: an empty batch gives a zero
    # with a grad_fn (and zero gradients), never NaN.
    loss = torch.where(valid, seq_loss, 0.0).sum() / denominator
    stats = _collect_stats(units, log_s.detach().exp(), log_rho, valid, staleness)
    return PolicyLossOutput(loss=loss, metrics=metrics_from_stats(stats), stats=stats)


def _gspo(
    log_s: Tensor,
    log_rho: Tensor,
    logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    staleness: Tensor,
    lower: Tensor,
    upper: Tensor,
    cap: Tensor,
    is_mode: str,
    variant: str,
) -> tuple[Tensor, _Units]:
    """Sequence-level weight and band; GSPO (eq. 5-7) or GSPO-token (§4.3).  -> (B,), units (B,)"""
    if log_rho.dim() == 2:  # is_level = "token": one weight per token, on the token form of the surrogate
        w_tok, trunc_tok, mask_tok = correction_weights(log_rho, cap[:, None], is_mode)  # (B, T) each
        token_adv = adv if adv.dim() == 2 else adv[:, None].expand_as(logp)  # (B, T)
        s_tok = torch.exp(log_s.detach()[:, None] + logp - logp.detach())  # (B, T), value s_i
        surrogate = clipped_surrogate(s_tok, token_adv, lower[:, None], upper[:, None])  # (B, T)
        seq_loss = -token_mean(w_tok * surrogate, mask)  # (B,)
        weight = token_mean(w_tok, mask)  # (B,) for the metrics: mean token weight
        truncated, masked = (mask & trunc_tok).any(-1), (mask & mask_tok).any(-1)
        units = _Units(log_s.detach().exp(), lower, upper, weight, truncated, masked, mask.any(-1), staleness)
        return seq_loss, units
    weight, truncated, masked = correction_weights(log_rho, cap, is_mode)  # (B,) each
    if variant == "gspo":
        seq_loss = -weight * clipped_surrogate(log_s.exp(), adv, lower, upper)  # (B,)
    else:
        token_adv = adv if adv.dim() == 2 else adv[:, None].expand_as(logp)  # (B, T)
        s_tok = torch.exp(log_s.detach()[:, None] + logp - logp.detach())  # (B, T), value s_i
        surrogate = clipped_surrogate(s_tok, token_adv, lower[:, None], upper[:, None])  # (B, T)
        seq_loss = -weight * token_mean(surrogate, mask)  # (B,)
    units = _Units(log_s.detach().exp(), lower, upper, weight, truncated, masked, mask.any(-1), staleness)
    return seq_loss, units


def _level_log_rho(log_rho: Tensor, prox: Tensor, behav: Tensor, mask: Tensor, is_level: str) -> Tensor:
    """log ρ as ``is_level`` measures it: (B,) geometric mean or full sum, or (B, T) per token."""
    if is_level == "geometric":
        return log_rho
    if is_level == "sequence":
        return torch.where(mask, prox - behav, 0.0).sum(dim=-1).clamp(max=MAX_LOG_RATIO)
    return torch.where(mask, prox - behav, 0.0).clamp(max=MAX_LOG_RATIO)


def _grpo(
    logp: Tensor,
    prox: Tensor,
    behav: Tensor,
    adv: Tensor,
    mask: Tensor,
    staleness: Tensor,
    lower: Tensor,
    upper: Tensor,
    cap: Tensor,
    is_mode: str,
) -> tuple[Tensor, _Units]:
    """Token-level ratio, weight and clip (the GRPO baseline).  -> (B,), units (B, T)"""
    ratio = (logp - prox).clamp(max=MAX_LOG_RATIO).exp()  # (B, T)
    weight, truncated, masked = correction_weights(prox - behav, cap[:, None], is_mode)  # (B, T)
    token_adv = adv if adv.dim() == 2 else adv[:, None]  # (B, T) or (B, 1)
    surrogate = clipped_surrogate(ratio, token_adv, lower[:, None], upper[:, None])  # (B, T)
    seq_loss = token_mean(-weight * surrogate, mask)  # (B,)
    per_token = [x[:, None].expand_as(ratio) for x in (lower, upper, staleness)]
    units = _Units(ratio.detach(), per_token[0], per_token[1], weight, truncated, masked, mask, per_token[2])
    return seq_loss, units


def _on_mask(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask, else 0: padding may hold NaN/inf, and 0 · NaN = NaN, so select, never multiply."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sanitise_advantages(adv: Tensor, mask: Tensor, valid: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    return torch.where(mask, adv, zero) if adv.dim() == 2 else torch.where(valid, adv, zero)


# ---------------------------------------------------------------------------------------------
# metrics: raw stats (mergeable across micro-batches and ranks) -> python floats

STAT_NAMES = (
    "count",  # sequences with >= 1 response token
    "units",  # what the clip/weight act on: sequences (gspo, gspo_token) or tokens (grpo)
    "clip_low_count",
    "clip_high_count",
    "is_weight_sum",
    "is_weight_sq_sum",
    "is_weight_max",
    "is_truncated_count",
    "is_masked_count",
    "seq_ratio_sum",
    "seq_ratio_min",
    "seq_ratio_max",
    "mismatch_abs_sum",
)


@torch.no_grad()
def _collect_stats(
    units: _Units, seq_ratio: Tensor, log_rho: Tensor, valid: Tensor, staleness: Tensor
) -> dict[str, float]:
    """Stats for the whole call and for each staleness bucket present ("name/k=K"), one host sync."""
    buckets = torch.unique(staleness[valid]).tolist()
    parts = [("", valid, units.valid)]
    for k in buckets:
        parts.append((f"/k={int(k)}", valid & (staleness == k), units.valid & (units.staleness == k)))
    values = [_selection_stats(units, seq_ratio, log_rho, rows, chosen) for _, rows, chosen in parts]
    flat = torch.stack([v.to(torch.float64) for part in values for v in part]).tolist()
    keys = [f"{name}{tag}" for tag, _, _ in parts for name in STAT_NAMES]
    return dict(zip(keys, flat, strict=True))


def _selection_stats(
    units: _Units, seq_ratio: Tensor, log_rho: Tensor, rows: Tensor, chosen: Tensor
) -> list[Tensor]:
    """Values of STAT_NAMES, in order, over selected rows (B,) and selected units."""
    weight = units.weight
    return [
        rows.sum(),
        chosen.sum(),
        (chosen & (units.ratio < units.lower)).sum(),
        (chosen & (units.ratio > units.upper)).sum(),
        torch.where(chosen, weight, 0.0).sum(),
        torch.where(chosen, weight.square(), 0.0).sum(),
        _masked_extreme(weight, chosen, torch.amax, -math.inf),
        (chosen & units.truncated).sum(),
        (chosen & units.masked).sum(),
        torch.where(rows, seq_ratio, 0.0).sum(),
        _masked_extreme(seq_ratio, rows, torch.amin, math.inf),
        _masked_extreme(seq_ratio, rows, torch.amax, -math.inf),
        torch.where(rows, log_rho.abs(), 0.0).sum(),
    ]


def _masked_extreme(x: Tensor, chosen: Tensor, reduce, identity: float) -> Tensor:
    filled = torch.where(chosen, x, identity).reshape(-1)
    return reduce(torch.cat([filled, filled.new_full((1,), identity)]))  # safe on empty input


def stat_kind(key: str) -> str:
    """How a raw stat combines across micro-batches and ranks: "min", "max" or "sum" (the one rule)."""
    name = key.partition("/")[0]
    return "min" if name.endswith("_min") else "max" if name.endswith("_max") else "sum"


_COMBINE = {"min": min, "max": max, "sum": lambda a, b: a + b}


def merge_stats(*parts: Mapping[str, float]) -> dict[str, float]:
    """Combine stats of several calls (micro-batches, ranks) by :func:`stat_kind`. Keys missing from a
    part count as empty."""
    merged: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            v = float(value)
            merged[key] = _COMBINE[stat_kind(key)](merged[key], v) if key in merged else v
    return merged


def metrics_from_stats(stats: Mapping[str, float]) -> dict[str, float]:
    """Metrics (python floats) from raw stats, overall and per staleness bucket ("clip_frac/k=2")."""
    tags = sorted({key.partition("/")[2] for key in stats}, key=lambda t: (t != "", len(t), t))
    metrics: dict[str, float] = {}
    for tag in tags:
        part = {key.partition("/")[0]: float(v) for key, v in stats.items() if key.partition("/")[2] == tag}
        suffix = f"/{tag}" if tag else ""
        metrics.update({f"{name}{suffix}": value for name, value in _metrics(part).items()})
    return metrics


def _metrics(s: Mapping[str, float]) -> dict[str, float]:
    n_seq, n_units = s["count"], s["units"]
    clipped = s["clip_low_count"] + s["clip_high_count"]
    return {
        "clip_frac": _ratio(clipped, n_units),
        "clip_frac_low": _ratio(s["clip_low_count"], n_units),
        "clip_frac_high": _ratio(s["clip_high_count"], n_units),
        "seq_ratio_mean": _ratio(s["seq_ratio_sum"], n_seq),
        "seq_ratio_min": s["seq_ratio_min"] if n_seq else 0.0,
        "seq_ratio_max": s["seq_ratio_max"] if n_seq else 0.0,
        "is_weight_mean": _ratio(s["is_weight_sum"], n_units),
        "is_weight_max": s["is_weight_max"] if n_units else 0.0,
        # normalised effective sample size (Σw)² / (N Σw²), in [0, 1]
        "is_ess": _ratio(s["is_weight_sum"] ** 2, n_units * s["is_weight_sq_sum"]),
        "is_truncated_frac": _ratio(s["is_truncated_count"], n_units),
        "is_masked_frac": _ratio(s["is_masked_count"], n_units),
        "mismatch_abs": _ratio(s["mismatch_abs_sum"], n_seq),
        "count": n_seq,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# argument checks (ValueError naming the argument)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_same_shape(reference: Tensor, **tensors: Tensor) -> None:
    if reference.dim() != 2:
        raise ValueError(f"log-prob tensors must be (B, T), got shape {tuple(reference.shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _check_mask_and_staleness(reference: Tensor, mask: Tensor, staleness: Tensor) -> None:
    if mask.shape != reference.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(reference.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if staleness.shape != reference.shape[:1]:
        raise ValueError(f"staleness has shape {tuple(staleness.shape)}, expected ({reference.shape[0]},)")
    if staleness.dtype == torch.bool or staleness.is_complex():
        raise ValueError(f"staleness must be an integer tensor, got {staleness.dtype}")
    if bool((staleness < 0).any()):
        raise ValueError("staleness must be >= 0 (learner version − generating weight version)")


def _check_loss_args(
    logprobs: Tensor,
    proximal: Tensor,
    behavior: Tensor,
    advantages: Tensor,
    mask: Tensor,
    staleness: Tensor,
    variant: str,
) -> None:
    _check_choice("variant", variant, VARIANTS)
    _check_same_shape(logprobs, logprobs=logprobs, proximal_logprobs=proximal, behavior_logprobs=behavior)
    _check_mask_and_staleness(logprobs, mask, staleness)
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected (B,) or (B, T) = {tuple(logprobs.shape)}"
        )
    if variant == "gspo" and advantages.dim() == 2:
        raise ValueError("advantages must be (B,) for variant 'gspo'; per-token advantages need 'gspo_token'")


def _check_scalars(
    clip_low: float, clip_high: float, clip_stale_scale: float, loss_denominator: float | None
) -> None:
    for name, value in (
        ("clip_low", clip_low),
        ("clip_high", clip_high),
        ("clip_stale_scale", clip_stale_scale),
    ):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if loss_denominator is not None and not loss_denominator > 0:
        raise ValueError(f"loss_denominator must be > 0, got {loss_denominator!r}")


def _check_cap(is_cap: float, is_cap_decay: float) -> None:
    if not is_cap > 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap!r}")
    if not is_cap_decay > 0:
        raise ValueError(f"is_cap_decay must be > 0, got {is_cap_decay!r}")
