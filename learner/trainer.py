"""One learner step: advantages, packed log-prob recompute, GSPO loss, backward, AdamW.

``Trainer.train_step(batch)`` is the whole step, the same code for 1 rank and N ranks. With N > 1 ranks the
model is sharded with FSDP2 (``learner/sharded.py``: each rank holds 1/N of the parameters, gradients and
AdamW state); one rank trains the plain module unless ``learner.shard = "always"`` or ``learner.cpu_offload``
(then it shards over a process group of one). Each rank trains its share of every mini-batch's sequences,
shared out by token count so that the ranks finish together; every micro-batch loss is divided by the number
of valid sequences of the *whole* mini-batch, and the gradient shards are summed over ranks, so N ranks take
exactly the 1-rank step, and a sharded rank of one the plain step (tests/integration/test_learner_fsdp.py).
FSDP gathers each layer's parameters in every forward, a collective: a rank with fewer micro-batches than
another runs empty ones (a one-token forward whose loss is multiplied by 0), so that all ranks run as many
forwards and backwards.

Proximal log-probs (docs/objective.md): the detached values of the same forward for the first mini-batch
(no update has happened yet), and one no-grad pass over the later mini-batches before the first update;
``loss.proximal = "behaviour"`` uses the engine's log-probs instead (ablation).

The model (``prepare_model``): every dropout probability is set to 0 at start-up, so the recomputed log-probs are
deterministic; ``learner.lora.r > 0`` injects adapters (learner/lora.py); ``learner.gradient_checkpointing``
enables transformers' per-layer checkpointing. The model is in train mode only for the forwards that backward
follows (transformers checkpoints layers only in train mode), in eval mode otherwise. ``learner.precision =
"bf16"`` runs those forwards under ``torch.autocast(bfloat16)``: parameters, gradients and AdamW state stay
float32 (the master weights), and the log-softmax and the loss are computed in float32 (docs/objective.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from common.config import Settings
from learner import sharded
from learner.batching import TrainBatch
from learner.distributed import World, all_reduce_sum, ensure_single, reduce_stats, split_by_tokens
from learner.gspo import STAT_NAMES, group_advantages, merge_stats, metrics_from_stats, policy_loss
from learner.logprobs import model_device, packed_logprobs, token_logprobs
from learner.packing import plan_rows
from modeling import ModelLoadError, disable_dropout, numerics_id

log = logging.getLogger(__name__)
Tensor = torch.Tensor

# Packed rows of at most twice the longest sequence of the micro-batch, and never more than 512 tokens: the
# packed-sequence mask is a full N×N per row, so attention costs N per token. Measured on a 2-core CPU for one
# fwd+bwd of the same tokens: 6×512 0.62 s vs 1×2560 1.01 s; for ~12-token sequences (the reference task)
# rows of 2× the longest were 1.18-1.25× faster than rows of 512, for 32-128-token ones 1.14-1.30×.
ROW_TOKENS = 512
ROW_LONGEST_FACTOR = 2

# gspo metric name -> namespaced JSONL name (docs/objective.md)
_METRIC_NAMES = {
    "clip_frac": "gspo/clip_frac", "clip_frac_low": "gspo/clip_frac_low", "clip_frac_high": "gspo/clip_frac_high",
    "seq_ratio_mean": "gspo/seq_ratio_mean", "seq_ratio_min": "gspo/seq_ratio_min", "seq_ratio_max": "gspo/seq_ratio_max",
    "is_weight_mean": "is/weight_mean", "is_weight_max": "is/weight_max", "is_ess": "is/ess",
    "is_truncated_frac": "is/truncated_frac", "is_masked_frac": "is/masked_frac",
    "mismatch_abs": "mismatch/prox_vs_behaviour_abs", "count": "gspo/sequences",
}  # fmt: skip


def lr_lambda(warmup_steps: int, schedule: str, total_steps: int):
    """Multiplier of the base LR after ``s`` optimizer steps: linear warm-up, then the schedule."""

    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        frac = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def pad_rows(values: Sequence[Tensor], width: int) -> Tensor:
    """Right-pad 1-D tensors with zeros into (B, width) float32: one op (and one backward node), not one
    slice copy per row."""
    if not values:
        return torch.zeros((0, width), dtype=torch.float32)
    out = torch.nn.utils.rnn.pad_sequence([v.to(torch.float32) for v in values], batch_first=True)
    if out.shape[1] > width:
        raise ValueError(f"a row of {out.shape[1]} values does not fit width {width}")
    return torch.nn.functional.pad(out, (0, width - out.shape[1])) if out.shape[1] < width else out


def length_mask(lengths: Sequence[int], width: int) -> Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


def batch_advantages(batch: TrainBatch) -> tuple[Tensor, float]:
    """A_i per sequence (group-normalised within each group) and the fraction of tied groups."""
    sizes = batch.group_sizes
    if sizes and all(g == sizes[0] for g in sizes):  # the usual case: one call over (n_groups, G)
        r = batch.rewards.to(torch.float64)
        groups = r.reshape(len(sizes), sizes[0])
        tied_groups = int((groups == groups[:, :1]).all(dim=1).sum())
        return group_advantages(r, sizes[0]).to(torch.float32), tied_groups / len(sizes)
    parts, tied, start = [], 0, 0
    for g in sizes:
        r = batch.rewards[start : start + g].to(torch.float64)
        parts.append(group_advantages(r, g))
        tied += int(bool((r == r[0]).all()))
        start += g
    adv = torch.cat(parts).to(torch.float32) if parts else torch.zeros(0)
    return adv, tied / max(1, len(batch.group_sizes))


def stat_keys(batch: TrainBatch, computed: Sequence[int] | None = None) -> list[str]:
    """Every stats key policy_loss can emit for the ``computed`` sequences (same list on every rank)."""
    chosen = set(range(len(batch)) if computed is None else computed)
    valid = torch.tensor([n > 0 and i in chosen for i, n in enumerate(batch.loss_lengths)], dtype=torch.bool)
    buckets = sorted(int(k) for k in torch.unique(batch.staleness[valid]).tolist())
    return [f"{n}{tag}" for tag in ["", *(f"/k={k}" for k in buckets)] for n in STAT_NAMES]


def apply_truncation_policy(batch: TrainBatch, policy: str) -> TrainBatch:
    """``learner.truncated``: "score" keeps the reward of completions cut at max_new_tokens; "zero" sets it to
    0 before the group advantages; "mask" keeps their reward in the group's advantages (as TRL does) but
    drops them from the loss: their completion counts as empty, so they leave the denominator too."""
    if policy == "score" or not bool(batch.truncated.any()):
        return batch
    if policy == "zero":
        return replace(batch, rewards=torch.where(batch.truncated, 0.0, batch.rewards.to(torch.float64)))
    if policy == "mask":
        return replace(batch, loss_mask=~batch.truncated)
    raise ValueError(f"learner.truncated must be score, zero or mask, got {policy!r}")


def prepare_model(model: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """Dropout off, LoRA adapters (``learner.lora.r > 0``), gradient checkpointing; returned in eval mode."""
    ls = settings.learner
    dropped = disable_dropout(model)
    if dropped:  # the ratio to the proximal policy and the recompute must not see random masks
        log.warning("dropout set to 0 for training (%d places: %s)", len(dropped), ", ".join(dropped[:4]))
    if ls.lora.r > 0:
        from learner.lora import apply_lora

        model = apply_lora(model, ls.lora)
    if ls.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ModelLoadError(
                f"learner.gradient_checkpointing: {type(model).__name__} does not support it"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.eval()


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        settings: Settings,
        world: World = World(),
        ref_model: torch.nn.Module | None = None,
        pad_id: int = 0,
    ):
        ls = settings.learner
        if ls.lora.r > 0 and world.size > 1:
            raise ModelLoadError(
                "learner.lora trains on one learner rank only (the sharded learner trains full weights): "
                "run the LoRA learner without torchrun, or set learner.lora.r = 0"
            )
        self.settings, self.world, self.pad_id = settings, world, pad_id
        model = prepare_model(model, settings)
        # full weights: sharded with FSDP2 over the ranks; one rank trains the plain module unless it must shard
        # (learner.shard = "always" or cpu_offload: then over a group of one); a LoRA model is never sharded
        shards = ls.lora.r == 0 and sharded.should_shard(ls.shard, ls.cpu_offload, world.size)
        if shards:
            if world.size == 1:
                ensure_single(str(model_device(model)))
            model = sharded.shard_model(model, ls.precision, ls.cpu_offload)
        self.model = model
        # how this learner computes log-probs (modeling.numerics_id), where an engine can match it: the plain
        # full-weight module in fp32. A rollout group stamped with the same numerics, generated by one weight
        # version, brings the log-probs the version anchor's no-grad pass would recompute (to float rounding):
        # build_batch marks those samples and _proximal takes them (learner.reuse_engine_logprobs)
        self.numerics: str | None = None
        dtype = next(model.parameters()).dtype
        if (
            ls.reuse_engine_logprobs
            and ls.lora.r == 0
            and not shards
            and ls.precision == "fp32"
            and dtype == torch.float32
        ):
            attn = getattr(model.config, "_attn_implementation", None) or ls.attn_implementation
            self.numerics = numerics_id("float32", attn, str(model_device(model)))
        # LoRA dropout acts in the training forward only: the proximal log-probs of every mini-batch then come from
        # the no-grad pass (in eval mode), not from the (randomly masked) training forward itself
        self.stochastic = ls.lora.r > 0 and ls.lora.dropout > 0
        # LoRA: {"spec", "base_model", "base_sha256"}, stored with every checkpoint's adapters (learner/service.py)
        self.lora_meta: dict | None = None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=ls.lr, betas=tuple(ls.betas), weight_decay=ls.weight_decay
        )
        total = ls.max_steps * ls.n_minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(ls.warmup_steps, ls.schedule, total)
        )
        self.ref_model = ref_model.eval() if ref_model is not None else None
        # policy version of the current weights (the learner sets it to the step it resumed from); with
        # loss.proximal = "version" the weights of the last K + 1 versions are kept (detached copies of this
        # rank's shards, where the shards are, or of the plain parameters) to recompute each sample's log-probs
        # under the weights that generated it
        self.version = 0
        self._snapshots: dict[int, dict[str, Tensor]] = {}
        if ls.kl_coef > 0 and self.ref_model is None:
            raise ValueError("learner.kl_coef > 0 needs a frozen reference model")
        if ref_model is not None:
            disable_dropout(ref_model)

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        """``learner.precision``: bf16 autocast around forwards (fp32 master weights, fp32 log-softmax and loss)."""
        device = model_device(
            self.model
        ).type  # where it computes (a sharded model's shards may be in host memory)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.settings.learner.precision == "bf16"):
            yield

    @contextlib.contextmanager
    def _training_mode(self) -> Iterator[None]:
        """Train mode for the forwards that backward follows (transformers' gradient checkpointing needs it)."""
        self.model.train()
        try:
            yield
        finally:
            self.model.eval()

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = apply_truncation_policy(batch, self.settings.learner.truncated)
        adv, frac_tied = batch_advantages(batch)
        lengths = batch.loss_lengths
        computed = self._computed(batch, adv)
        minibatches = _split(len(batch), self.settings.learner.n_minibatches)
        plans = self._plans(batch, minibatches, computed)
        self._keep_snapshot()
        prox, missing, reused = self._proximal(batch, plans)
        acc = _Accumulator()
        for mb, plan in zip(minibatches, plans, strict=True):
            # every valid sequence of the mini-batch counts, computed or skipped: the loss is their mean
            denominator = sum(1 for i in mb if lengths[i] > 0)
            if denominator == 0:
                continue
            mine = plan[self.world.rank]
            with self._training_mode():
                for micro in mine:
                    self._micro_step(batch, micro, adv, prox, denominator, acc)
                for _ in range(max(len(p) for p in plan) - len(mine)):
                    self._empty_pass(with_grad=True)
            self._optimizer_step(acc)
        metrics = self._metrics(batch, acc, stat_keys(batch, computed))
        metrics.update(_batch_metrics(batch, frac_tied))
        in_loss = sum(1 for n in lengths if n > 0)
        metrics["sequences/skipped_zero_adv"] = float(in_loss - len(computed))
        metrics["sequences/masked_truncated"] = float(
            sum(1 for a, b in zip(batch.completion_lengths, lengths, strict=True) if a != b)
        )
        metrics["tokens/real"] = float(
            sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids, strict=True))
        )
        if self.settings.loss.proximal == "version":
            metrics["proximal/missing_version"] = float(missing)
            metrics["proximal/from_engine"] = float(reused)
        metrics["time/train_s"] = time.perf_counter() - t0
        self.version += 1
        return metrics

    def _computed(self, batch: TrainBatch, adv: Tensor) -> list[int]:
        """Sequences that need a forward/backward: those in the loss, except tied ones. With A_i exactly 0 and
        no KL term, every variant's loss term is -w·min(s·0, clip(s)·0) = 0 (s is finite: log-ratios are
        clamped before exp), so its gradient is exactly 0; late in a run most groups are tied (frac_zero_std
        ~0.75 on the reference task). Tied sequences stay in the loss denominator, so the step is the same
        (tests/integration/test_zero_advantage.py)."""
        in_loss = [i for i, n in enumerate(batch.loss_lengths) if n > 0]
        if not self.settings.learner.skip_zero_advantage or self.ref_model is not None:
            return in_loss
        return [i for i in in_loss if float(adv[i]) != 0.0]

    def _plans(self, batch: TrainBatch, minibatches: list[list[int]], computed: list[int]):
        """For each mini-batch, each rank's micro-batches: the computed sequences shared out by token count
        (the same on every rank: each rank plans all of them and runs its own)."""
        chosen, plans = set(computed), []
        for mb in minibatches:
            idx = [i for i in mb if i in chosen]
            tokens = [len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in idx]
            shares = split_by_tokens(idx, tokens, self.world.size)
            plans.append([self._micro_batches(batch, share) for share in shares])
        return plans

    def _empty_pass(self, with_grad: bool) -> None:
        """A one-token forward (and a backward of 0 × its output): this rank's part of the parameter gathers
        and gradient reductions of a micro-batch other ranks run. It adds exactly 0 to every gradient."""
        out = packed_logprobs(self.model, [([self.pad_id], [self.pad_id])], 1.0, with_grad=with_grad)
        if with_grad:
            (out.logprobs[0].sum() * 0.0).backward()

    def _micro_batches(self, batch: TrainBatch, idx: list[int]) -> list[list[int]]:
        sizes = [len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in idx]
        return [
            [idx[j] for j in sorted(row)]
            for row in plan_rows(sizes, self.settings.learner.micro_batch_tokens)
        ]

    def _row_tokens(self, batch: TrainBatch, idx: list[int]) -> int:
        longest = max(len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for i in idx)
        return max(longest, min(ROW_TOKENS, ROW_LONGEST_FACTOR * longest))

    def _keep_snapshot(self) -> None:
        """loss.proximal = "version": copy the current weights as version ``self.version``; drop versions no
        sample can come from any more (older than K before this one: the intake drops staler groups)."""
        if self.settings.loss.proximal != "version":
            return
        oldest = self.version - self.settings.pipeline.max_staleness
        for v in [v for v in self._snapshots if v < oldest]:
            del self._snapshots[v]
        if self.settings.pipeline.max_staleness > 0 and self.version not in self._snapshots:
            sharded.reshard(self.model)  # each rank keeps a copy of its shards
            # the trained parameters only: frozen ones (a LoRA base) are the same in every version
            self._snapshots[self.version] = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }

    def _proximal(self, batch: TrainBatch, plans) -> tuple[dict[int, Tensor], int, int]:
        """log π_prox per sequence index, how many sequences lacked their generating version's weights, and how many
        took their engine log-probs instead of a pass (``engine_exact``).

        A sequence absent from the dict takes the detached value of its own forward. With ``recompute`` that
        is exact for the first mini-batch (no optimizer step has happened yet, so the current parameters are
        the proximal ones): only the later mini-batches need the no-grad pass. With ``version`` the anchor of
        a sample of staleness k is the learner's copy of the weights of version ``self.version − k`` (the ones
        that generated it); k = 0 in the first mini-batch is its own forward again. A version the learner
        does not hold (the first K steps after a resume) falls back to the weights before this update.

        ``plans``: each mini-batch's micro-batches per rank (:meth:`_plans`). Every rank runs its own sequences
        of each version, then empty passes up to the rank with the most micro-batches of that version (a
        forward is a collective of the sharded model)."""
        mode, rank = self.settings.loss.proximal, self.world.rank
        if mode == "behaviour":
            return {i: batch.behaviour[i] for plan in plans for micro in plan[rank] for i in micro}, 0, 0
        # version: the engine's log-probs of a sample it computed with the learner's numerics from one weight
        # version are that version's log-probs (to float rounding): no pass needed (build_batch, engine_exact)
        exact = batch.engine_exact if mode == "version" and self.numerics is not None else None
        by_rank: list[dict[int, list[int]]] = [{} for _ in range(self.world.size)]
        out: dict[int, Tensor] = {}
        reused = 0
        for m, plan in enumerate(plans):
            for r, micros in enumerate(plan):
                for i in (i for micro in micros for i in micro):
                    k = int(batch.staleness[i]) if mode == "version" else 0
                    if k == 0 and m == 0 and not self.stochastic:
                        continue
                    if exact is not None and bool(exact[i]):
                        out[i] = batch.behaviour[i]
                        reused += 1
                        continue
                    by_rank[r].setdefault(self.version - k, []).append(i)
        missing = 0
        for version in sorted({v for versions in by_rank for v in versions}):
            weights = self._snapshots.get(version) if version != self.version else None
            if version != self.version and weights is None:
                missing += sum(len(versions.get(version, [])) for versions in by_rank)
            micros = [self._micro_batches(batch, sorted(versions.get(version, []))) for versions in by_rank]
            with _swapped_weights(self.model, weights), self._autocast():
                for micro in micros[rank]:
                    lps = token_logprobs(
                        self.model,
                        batch.sequences(micro),
                        batch.temperatures[micro].tolist(),
                        max_row_tokens=self._row_tokens(batch, micro),
                    )
                    out.update(zip(micro, lps, strict=True))
                for _ in range(max(len(m) for m in micros) - len(micros[rank])):
                    self._empty_pass(with_grad=False)
        sharded.reshard(self.model)
        return out, missing, reused

    def _micro_step(
        self,
        batch: TrainBatch,
        idx: list[int],
        adv: Tensor,
        prox: dict[int, Tensor],
        denominator: int,
        acc: _Accumulator,
    ) -> None:
        temps = batch.temperatures[idx].tolist()
        with self._autocast():
            res = packed_logprobs(
                self.model,
                batch.sequences(idx),
                temps,
                max_row_tokens=self._row_tokens(batch, idx),
                with_grad=True,
                pad_id=self.pad_id,
            )
        lengths = [len(batch.completion_ids[i]) for i in idx]
        width = max(1, max(lengths))
        logp = pad_rows(res.logprobs, width)  # (b, T)
        mask = length_mask(lengths, width).to(logp.device)  # (b, T)
        behaviour = pad_rows([batch.behaviour[i] for i in idx], width).to(logp.device)
        proximal = logp.detach()
        if any(i in prox for i in idx):  # later mini-batches: the values from before the first update
            proximal = pad_rows(
                [prox[i] if i in prox else lp.detach() for i, lp in zip(idx, res.logprobs, strict=True)],
                width,
            ).to(logp.device)
        staleness = batch.staleness[idx].to(logp.device)
        loss_cfg = self.settings.loss
        out = policy_loss(
            logp,
            proximal,
            behaviour,
            adv[idx].to(logp.device),
            mask,
            staleness,
            variant=loss_cfg.variant,
            clip_low=loss_cfg.clip_low,
            clip_high=loss_cfg.clip_high,
            clip_stale_scale=loss_cfg.clip_stale_scale,
            is_mode=loss_cfg.is_mode,
            is_cap=loss_cfg.is_cap,
            is_cap_decay=loss_cfg.is_cap_decay,
            loss_denominator=float(denominator),
            is_level=loss_cfg.is_level,
        )
        loss = out.loss
        kl = self._kl_term(batch, idx, temps, logp, mask, denominator) if self.ref_model is not None else None
        if kl is not None:
            loss = loss + self.settings.learner.kl_coef * kl
        loss.backward()
        acc.add(out.stats, float(out.loss.detach()), float(kl.detach()) if kl is not None else 0.0, res)

    def _kl_term(
        self,
        batch: TrainBatch,
        idx: list[int],
        temps: list[float],
        logp: Tensor,
        mask: Tensor,
        denominator: int,
    ) -> Tensor:
        """k3 estimator of KL(π_θ || π_ref) (Schulman 2020): exp(r) − r − 1, r = log π_ref − log π_θ;
        token mean per sequence, summed over sequences / global denominator."""
        with self._autocast():
            ref = token_logprobs(
                self.ref_model, batch.sequences(idx), temps, max_row_tokens=self._row_tokens(batch, idx)
            )
        r = pad_rows(ref, logp.shape[1]).to(logp.device) - logp
        k3 = torch.where(mask, torch.exp(r) - r - 1.0, 0.0)
        per_seq = k3.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / denominator

    def _optimizer_step(self, acc: _Accumulator) -> None:
        for p in self.params:  # nothing computed on this rank (all skipped): a zero gradient, as computed
            if p.grad is None:  # AdamW would skip a parameter whose grad is None (no decay, no moment update)
                p.grad = torch.zeros_like(p)
        norm = float(
            sharded.full_value(torch.nn.utils.clip_grad_norm_(self.params, self.settings.learner.grad_clip))
        )
        acc.grad_norms.append(norm)
        if math.isfinite(norm):
            self.optimizer.step()
        else:
            acc.skipped += 1
            log.warning("non-finite gradient norm %s: optimizer step skipped", norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ metrics
    def _metrics(self, batch: TrainBatch, acc: _Accumulator, keys: list[str]) -> dict[str, float]:
        stats = reduce_stats(self.world, merge_stats(*acc.stats), keys)
        sums = all_reduce_sum(
            self.world,
            [acc.loss, acc.kl, acc.entropy_sum, acc.completion_tokens, acc.real_tokens, acc.computed_tokens],
        )
        loss, kl, entropy_sum, completion_tokens, real, computed = sums
        n_updates = max(1, len(acc.grad_norms))
        metrics: dict[str, float] = {}
        for name, value in (metrics_from_stats(stats) if stats else {}).items():
            base, _, bucket = name.partition("/")
            metrics[_METRIC_NAMES[base] + (f"/{bucket}" if bucket else "")] = value
        metrics.update(
            {
                "loss": loss / n_updates,
                "kl": kl / n_updates,
                "entropy": entropy_sum / max(1.0, completion_tokens),
                "grad_norm": sum(acc.grad_norms) / n_updates,
                "grad/skipped_steps": float(acc.skipped),
                "lr": self.scheduler.get_last_lr()[0],
                "padding/frac": (computed - real) / max(1.0, real),
                "tokens/real": real,
                "tokens/completion": completion_tokens,
            }
        )
        return metrics


class _Accumulator:
    def __init__(self) -> None:
        self.stats: list[dict[str, float]] = []
        self.loss = self.kl = self.entropy_sum = 0.0
        self.completion_tokens = self.real_tokens = self.computed_tokens = 0.0
        self.grad_norms: list[float] = []
        self.skipped = 0

    def add(self, stats: dict[str, float], loss: float, kl: float, res) -> None:
        self.stats.append(stats)
        self.loss += loss
        self.kl += kl
        self.entropy_sum += res.entropy_sum
        self.completion_tokens += res.completion_tokens
        self.real_tokens += res.real_tokens
        self.computed_tokens += res.computed_tokens


@contextlib.contextmanager
def _swapped_weights(model: torch.nn.Module, weights: dict[str, Tensor] | None):
    """Run the model with ``weights`` (same names, shapes and sharding as its parameters) in place of its own.
    The values are exchanged in place, one parameter at a time (a sharded model gathers each parameter from
    the storage FSDP allocated for it, which cannot be re-pointed): ``weights`` holds the model's own values
    meanwhile, and both are exchanged back on exit. The extra memory is one parameter's shard. None: the
    model's own weights."""
    if weights is None:
        yield
        return
    sharded.reshard(model)  # the shards are the registered parameters, and what the next forward gathers
    params = {n: p for n, p in model.named_parameters() if n in weights}

    def exchange() -> None:
        sharded.reshard(model)
        with torch.no_grad():
            for n, p in params.items():
                held = p.detach().clone()
                p.copy_(weights[n])
                weights[n].copy_(held)

    exchange()
    try:
        yield
    finally:
        exchange()


def _split(n: int, parts: int) -> list[list[int]]:
    """Contiguous, near-equal chunks of range(n) (mini-batches)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts) if bounds[i + 1] > bounds[i]]


def _batch_metrics(batch: TrainBatch, frac_tied: float) -> dict[str, float]:
    lengths = torch.tensor(batch.completion_lengths, dtype=torch.float64)
    r = batch.rewards.to(torch.float64)
    return {
        "reward/mean": float(r.mean()) if r.numel() else 0.0,
        "reward/std": float(r.std(correction=0)) if r.numel() else 0.0,
        "frac_zero_std": frac_tied,
        "length/mean": float(lengths.mean()) if lengths.numel() else 0.0,
        "length/max": float(lengths.max()) if lengths.numel() else 0.0,
        "length/truncated_frac": float(batch.truncated.double().mean()) if lengths.numel() else 0.0,
        "groups": float(len(batch.group_sizes)),
        "sequences": float(len(batch)),
    }
