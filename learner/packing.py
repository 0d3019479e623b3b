"""Packing variable-length sequences into rows of at most ``max_row_tokens`` tokens.

Each sequence keeps position ids 0..n-1 inside its row; with ``attention_mask=None`` and no KV
cache, transformers turns the position-id resets into a block-diagonal causal mask, so packed
sequences never attend to each other (measured: see docs/architecture.md, "Packing"; checked in tests/unit/test_packing.py). Rows are
padded at the end to the longest row; the padding is its own segment (positions restart at 0),
so it is never attended to by real tokens either.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """Where one sequence lives: row, first column, prompt and completion lengths."""

    row: int
    start: int
    prompt_len: int
    completion_len: int


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # (R, T) long
    position_ids: torch.Tensor  # (R, T) long
    placements: list[Placement]  # one per input sequence, input order
    real_tokens: int

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def padding_frac(self) -> float:
        """Tokens computed for nothing (row padding), relative to the real tokens."""
        return (self.computed_tokens - self.real_tokens) / max(self.real_tokens, 1)


def plan_rows(lengths: Sequence[int], max_row_tokens: int) -> list[list[int]]:
    """Balanced packing: lists of sequence indices whose lengths sum to <= max_row_tokens (a longer
    sequence gets a row of its own), with near-equal row loads so that padding rows to the longest
    one wastes little. Longest first, each into the least-loaded row it fits (LPT), starting from
    ceil(total / max_row_tokens) rows and opening a new row only when none fits."""
    if max_row_tokens < 1:
        raise ValueError(f"max_row_tokens must be >= 1, got {max_row_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n_rows = -(-sum(lengths) // max_row_tokens)
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    # the least-loaded row has the most room: if the sequence does not fit there, it fits nowhere. A heap of
    # (load, row) pops the least-loaded row, lowest index first among equal loads.
    heap = [(0, r) for r in range(n_rows)]
    for i in order:
        n = lengths[i]
        if heap and heap[0][0] + n <= max_row_tokens:
            load, r = heap[0]
            rows[r].append(i)
            heapq.heapreplace(heap, (load + n, r))
        else:
            rows.append([i])
            heapq.heappush(heap, (n, len(rows) - 1))
    return [row for row in rows if row]


def pack(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], max_row_tokens: int, pad_id: int = 0
) -> PackedRows:
    """Pack (prompt_ids, completion_ids) pairs into padded rows with per-sequence position ids."""
    for p, _ in sequences:
        if len(p) < 1:
            raise ValueError(
                "every sequence needs at least one prompt token (it predicts the first completion token)"
            )
    lengths = [len(p) + len(c) for p, c in sequences]
    rows = plan_rows(lengths, max_row_tokens)
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    flat_ids: list[int] = []
    flat_pos: list[int] = []
    placements: list[Placement | None] = [None] * len(sequences)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            p, c = sequences[i]
            flat_ids.extend(p)
            flat_ids.extend(c)
            flat_pos.extend(range(lengths[i]))
            placements[i] = Placement(r, col, len(p), len(c))
            col += lengths[i]
        flat_ids.extend([pad_id] * (width - col))
        flat_pos.extend(range(width - col))  # padding: a segment of its own
    # one tensor per field built from plain lists (a small tensor op per sequence costs more than the copy)
    ids = torch.tensor(flat_ids, dtype=torch.long).view(len(rows), width)
    pos = torch.tensor(flat_pos, dtype=torch.long).view(len(rows), width)
    return PackedRows(ids, pos, placements, sum(lengths))  # type: ignore[arg-type]


def completion_logit_index(packed: PackedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets) of every completion token, input order: the logits at (row, col)
    predict the token ``targets`` (the token at col + 1)."""
    rows: list[int] = []
    cols: list[int] = []
    for pl in packed.placements:
        first = pl.start + pl.prompt_len - 1
        cols.extend(range(first, first + pl.completion_len))
        rows.extend([pl.row] * pl.completion_len)
    r = torch.tensor(rows, dtype=torch.long)
    c = torch.tensor(cols, dtype=torch.long)
    return r, c, packed.input_ids[r, c + 1]
