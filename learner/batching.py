"""From stream entries to a training batch: decode and validate, then flatten groups into sequences.

``decode_entry`` turns one rollouts-stream entry into a :class:`TakenGroup` or raises
:class:`BadRollout` (reason + detail for the dead-letter stream). ``TrainBatch`` is the flat,
per-sequence view the step consumes; it converts to and from plain tensors so that rank 0 can
broadcast it to the other ranks without pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.streams import Entry
from common.wire import RolloutGroup, WireError, decode


class BadRollout(ValueError):
    """An entry that can never be trained on: dead-letter it with ``reason``."""

    def __init__(self, reason: str, detail: str, well_formed: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        # a decodable RolloutGroup (wrong model, bad token ids): a producer made it, so admission control
        # counted it; the learner counts it as consumed too, or each one would leak a slot of the bound
        self.well_formed = well_formed


@dataclass(frozen=True)
class TakenGroup:
    entry_id: str
    group: RolloutGroup

    @property
    def group_id(self) -> str:
        return self.group.group_id


def decode_entry(entry: Entry, fingerprint: str, vocab_size: int) -> TakenGroup:
    """Decode and check one entry: wire errors, wrong model, tokens the model cannot embed."""
    if entry.payload is None:
        raise BadRollout("deleted", "the entry was trimmed or deleted while pending")
    try:
        group = decode(entry.payload, expect=RolloutGroup)
    except WireError as e:
        raise BadRollout(e.reason, str(e)) from None
    if group.model_fingerprint != fingerprint:
        raise BadRollout(
            "wrong_fingerprint",
            f"group made with model {group.model_fingerprint!r}, learner has {fingerprint!r}",
            well_formed=True,
        )
    if group.prompt_ids.size == 0:
        raise BadRollout("invalid_value", "group has no prompt token ids", well_formed=True)
    for arr in [group.prompt_ids, *(s.completion_ids for s in group.samples)]:
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise BadRollout(
                "invalid_value",
                f"token id outside the model's vocabulary [0, {vocab_size})",
                well_formed=True,
            )
    return TakenGroup(entry.id, group)


@dataclass
class TrainBatch:
    """Sequences of one step, group after group (``group_sizes`` consecutive sequences per group)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    behaviour: list[torch.Tensor]  # (L_i,) float32 each
    rewards: torch.Tensor  # (N,) float64
    temperatures: torch.Tensor  # (N,) float64
    staleness: torch.Tensor  # (N,) int64
    truncated: torch.Tensor  # (N,) bool: finish_reason == "length"
    group_sizes: list[int]
    group_ids: list[str] = field(default_factory=list)  # rank 0 only (metrics)
    # (N,) bool, False drops a sequence from the loss (learner.truncated = "mask"); None keeps every one.
    # Derived on every rank from ``truncated``, so it is not broadcast.
    loss_mask: torch.Tensor | None = None
    # (N,) bool: True where the engine log-probs may stand for the learner's own pass under the weights that
    # generated the sequence (one weight version, the learner's numerics: build_batch); None = nowhere
    engine_exact: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    @property
    def loss_lengths(self) -> list[int]:
        """Completion lengths as the loss sees them: 0 for a sequence the loss mask drops."""
        if self.loss_mask is None:
            return self.completion_lengths
        return [
            len(c) if bool(keep) else 0 for c, keep in zip(self.completion_ids, self.loss_mask, strict=True)
        ]

    def sequences(self, idx: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        return [(self.prompt_ids[i], self.completion_ids[i]) for i in idx]

    # -------------------------------------------------------------- tensors (broadcast without pickle)
    def to_tensors(self) -> dict[str, torch.Tensor]:
        plen = torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.int64)
        clen = torch.tensor(self.completion_lengths, dtype=torch.int64)
        tokens = [t for p, c in zip(self.prompt_ids, self.completion_ids, strict=True) for t in (*p, *c)]
        return {
            "prompt_lens": plen,
            "completion_lens": clen,
            "tokens": torch.tensor(tokens, dtype=torch.int64),
            "behaviour": torch.cat(self.behaviour) if self.behaviour else torch.zeros(0),
            "rewards": self.rewards.to(torch.float64),
            "temperatures": self.temperatures.to(torch.float64),
            "staleness": self.staleness.to(torch.int64),
            "truncated": self.truncated.to(torch.int64),
            "group_sizes": torch.tensor(self.group_sizes, dtype=torch.int64),
            "engine_exact": (
                torch.zeros(len(self), dtype=torch.int64)
                if self.engine_exact is None
                else self.engine_exact.to(torch.int64)
            ),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> TrainBatch:
        plen, clen = t["prompt_lens"].tolist(), t["completion_lens"].tolist()
        tokens, prompts, completions, col = t["tokens"].tolist(), [], [], 0
        for p, c in zip(plen, clen, strict=True):
            prompts.append(tokens[col : col + p])
            completions.append(tokens[col + p : col + p + c])
            col += p + c
        return cls(
            prompt_ids=prompts,
            completion_ids=completions,
            behaviour=list(torch.split(t["behaviour"].to(torch.float32), clen)),
            rewards=t["rewards"],
            temperatures=t["temperatures"],
            staleness=t["staleness"],
            truncated=t["truncated"].bool(),
            group_sizes=t["group_sizes"].tolist(),
            engine_exact=t["engine_exact"].bool() if "engine_exact" in t else None,
        )


TENSOR_DTYPES = {
    "prompt_lens": torch.int64, "completion_lens": torch.int64, "tokens": torch.int64, "behaviour": torch.float32,
    "rewards": torch.float64, "temperatures": torch.float64, "staleness": torch.int64, "truncated": torch.int64,
    "group_sizes": torch.int64, "engine_exact": torch.int64,
}  # fmt: skip


def build_batch(groups: Sequence[tuple[RolloutGroup, int]], numerics: str | None = None) -> TrainBatch:
    """Flatten (group, staleness) pairs into a TrainBatch. ``numerics``: the learner's own
    (``Trainer.numerics``); a sample of a group stamped with the same, generated by one weight version, is
    marked ``engine_exact``."""
    prompts, completions, behaviour = [], [], []
    rewards, temps, stale, trunc, sizes, ids, exact = [], [], [], [], [], [], []
    for g, k in groups:
        prompt = g.prompt_ids.astype(np.int64).tolist()
        same = bool(numerics) and g.logprob_numerics == numerics
        oldest = g.version_min  # the staleness k counts from it: the anchor is version (learner's - k)
        for s in g.samples:
            one_version = s.version_start == s.version_end == oldest and all(
                v == oldest for v, *_ in s.version_spans
            )
            exact.append(same and one_version)
            prompts.append(prompt)
            completions.append(s.completion_ids.astype(np.int64).tolist())
            behaviour.append(torch.from_numpy(s.logprobs.astype(np.float32)))
            rewards.append(s.reward)
            temps.append(g.temperature)
            stale.append(k)
            trunc.append(s.finish_reason == "length")
        sizes.append(len(g.samples))
        ids.append(g.group_id)
    return TrainBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        behaviour=behaviour,
        rewards=torch.tensor(rewards, dtype=torch.float64),
        temperatures=torch.tensor(temps, dtype=torch.float64),
        staleness=torch.tensor(stale, dtype=torch.int64),
        truncated=torch.tensor(trunc, dtype=torch.bool),
        group_sizes=sizes,
        group_ids=ids,
        engine_exact=torch.tensor(exact, dtype=torch.bool) if any(exact) else None,
    )
