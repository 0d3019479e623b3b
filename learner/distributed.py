"""Multi-rank learner plumbing (torch.distributed, launched by torchrun).

Rank 0 talks to Redis and broadcasts each batch as plain tensors (sizes first, then the data; no
pickle). Every rank trains a disjoint share of the batch's sequences, balanced by token count
(:func:`split_by_tokens`), with the global loss denominator; FSDP2 (``learner/sharded.py``) sums the
gradient shards over ranks, which gives exactly the 1-rank gradient (up to the order of floating-point
sums). A learner started without torchrun joins a process group of one: a 1-rank learner trains the plain
module (no collective runs), and shards over that group with ``learner.shard = "always"`` or
``learner.cpu_offload``. gloo on CPU; on GPUs nccl for CUDA tensors and gloo for the CPU tensors of the
broadcasts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from learner.batching import TENSOR_DTYPES, TrainBatch
from learner.gspo import stat_kind

log = logging.getLogger(__name__)

# command words rank 0 broadcasts: train a batch, write the shards of a checkpoint, stop
CMD_TRAIN, CMD_STOP, CMD_SAVE = 1, 0, 2


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_device() -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` on a GPU host (torchrun sets LOCAL_RANK), else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def _backend(device: str) -> str:
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def init_from_env(device: str = "cpu") -> World:
    """Join the process group of a torchrun launch (WORLD_SIZE set), else a process group of one."""
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=_backend(device))
        log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
        return World(dist.get_rank(), dist.get_world_size())
    return ensure_single(device)


def ensure_single(device: str = "cpu") -> World:
    """A process group of one (in-process store, no port) unless one exists: FSDP2 needs a group (a 1-rank
    learner that shards)."""
    if not dist.is_initialized():
        dist.init_process_group(backend=_backend(device), store=dist.HashStore(), rank=0, world_size=1)
    return World(dist.get_rank(), dist.get_world_size())


def split_by_tokens(indices: list[int], tokens: list[int], ranks: int) -> list[list[int]]:
    """``indices`` shared out among ``ranks`` so that their token counts are as even as greedy gets (longest
    first, each to the least-loaded rank, ties to the lower rank); each share in ascending order. The same
    on every rank (it depends on the broadcast batch only)."""
    shares: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for i, n in sorted(zip(indices, tokens, strict=True), key=lambda x: (-x[1], x[0])):
        r = min(range(ranks), key=lambda j: (load[j], j))
        shares[r].append(i)
        load[r] += n
    return [sorted(s) for s in shares]


def broadcast_command(world: World, cmd: int) -> int:
    if world.size == 1:
        return cmd
    t = torch.tensor([cmd], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_batch(world: World, batch: TrainBatch | None) -> TrainBatch:
    """Rank 0 passes its batch, the others None; everyone returns the same batch (no group ids off rank 0)."""
    if world.size == 1:
        assert batch is not None
        return batch
    names = list(TENSOR_DTYPES)
    tensors = batch.to_tensors() if world.is_main else {}
    sizes = torch.tensor(
        [tensors[n].numel() for n in names] if world.is_main else [0] * len(names), dtype=torch.int64
    )
    dist.broadcast(sizes, src=0)
    out = {}
    for name, n in zip(names, sizes.tolist(), strict=True):
        t = (
            tensors[name].to(TENSOR_DTYPES[name]).contiguous()
            if world.is_main
            else torch.empty(n, dtype=TENSOR_DTYPES[name])
        )
        dist.broadcast(t, src=0)
        out[name] = t
    return batch if world.is_main else TrainBatch.from_tensors(out)


def broadcast_int(world: World, value: int) -> int:
    return broadcast_command(world, value)


def all_reduce_sum(world: World, values: list[float]) -> list[float]:
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def reduce_stats(world: World, stats: dict[str, float], keys: list[str]) -> dict[str, float]:
    """merge_stats over ranks, by the same rule (:func:`learner.gspo.stat_kind`).

    ``keys`` must be the same list on every rank (from the broadcast batch); missing keys count
    as empty."""
    if world.size == 1:
        return stats
    kinds = [stat_kind(k) for k in keys]
    identity = {"min": float("inf"), "max": float("-inf"), "sum": 0.0}
    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    out: dict[str, float] = {}
    for kind in ("sum", "min", "max"):
        chosen = [k for k, kk in zip(keys, kinds, strict=True) if kk == kind]
        t = torch.tensor([stats.get(k, identity[kind]) for k in chosen], dtype=torch.float64)
        dist.all_reduce(t, op=ops[kind])
        out.update(zip(chosen, t.tolist(), strict=True))
    return out


def shutdown(world: World) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
