"""Multi-rank learner plumbing (torch.distributed, launched by torchrun).

Rank 0 talks to Redis and broadcasts each batch as plain tensors (sizes first, then the data; no
pickle). Every rank trains a disjoint slice of the batch's sequences with the global loss
denominator; summing the gradients over ranks then gives exactly the 1-rank gradient (up to the
order of floating-point sums). gloo on CPU, nccl on GPU.
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

# command words broadcast before each batch
CMD_TRAIN, CMD_STOP = 1, 0


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "cpu") -> World:
    """Join the process group when launched with WORLD_SIZE > 1; else a 1-rank world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return World(dist.get_rank(), dist.get_world_size())


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


def all_reduce_grads(world: World, model: torch.nn.Module) -> None:
    """Sum gradients over ranks (each rank's loss already carries the global denominator)."""
    if world.size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


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
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
