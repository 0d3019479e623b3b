"""The learner's parameters, gradients and AdamW state sharded over the ranks with FSDP2, and their checkpoints.

- :func:`shard_model`: ``fully_shard`` on every decoder layer (the model's ``_no_split_modules`` classes) and on
  the root, with a ``MixedPrecisionPolicy`` (compute in ``learner.precision``; fp32 master weights, gradient
  reduction and optimizer state) and an optional ``CPUOffloadPolicy`` (``learner.cpu_offload``). Each rank
  then keeps 1/N of every parameter, gradient and AdamW moment. Gradients are summed over ranks, not averaged:
  every rank's loss already carries the global denominator (``learner/trainer.py``). One rank trains the plain
  module unless it must shard (:func:`should_shard`: ``learner.shard = "always"`` or ``learner.cpu_offload``),
  then over a process group of one: with nothing to shard over, FSDP2 only adds its hooks and copies (the
  reference model's 1-rank step on a CPU took 1.18x as long sharded; ``make bench-fsdp`` measures the ratio).
- :func:`save_shards`: every rank writes its shard of the weights and of the (flattened) optimizer state with
  ``torch.distributed.checkpoint`` and a ``HuggingFaceStorageWriter`` (safetensors: no pickle). The
  optimizer's non-tensor entries (lr, betas, ...) are returned for the JSON trainer state.
- :func:`consolidate_weights`: the weight shards become the published Hugging Face checkpoint
  (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``), one tensor at a time: the whole
  model is never held in one process's memory. Runs on rank 0's checkpoint thread.
- :func:`load_optimizer`: any number of ranks read the optimizer shards back (DCP reshards them), so a run
  saved by 2 ranks resumes on 1 and the other way round; a plain (unsharded) module reads them whole.
  :func:`load_full_optimizer`: a whole optimizer state (what a plain 1-rank learner saves) onto a sharded
  model, each rank keeping its shard.
"""

from __future__ import annotations

import math
import shutil
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from learner import logprobs

WEIGHT_SHARDS_DIR = "weight_shards"  # inside the temp step dir; removed once consolidated
OPTIMIZER_DIR = "optimizer"  # inside trainer_state/
FILE_BYTES = 5 * 1024**3  # published weight files are split at about this size (as save_pretrained does)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ShardingError(ValueError):
    """A model the learner cannot shard, stated in one line."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes it names in ``_no_split_modules`` (HF models do)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ShardingError(
            f"{type(model).__name__} names no decoder layer class in _no_split_modules: cannot shard it per layer"
        )
    return layers


def should_shard(shard: str, cpu_offload: bool, world_size: int) -> bool:
    """Whether the full weights are sharded (``learner.shard``): always with more than one rank, with
    ``cpu_offload`` (an FSDP2 policy) or ``shard = "always"``; one rank otherwise trains the plain module."""
    if shard not in ("auto", "always"):
        raise ShardingError(f"learner.shard must be auto or always, got {shard!r}")
    return world_size > 1 or cpu_offload or shard == "always"


def shard_model(
    model: torch.nn.Module, precision: str = "fp32", cpu_offload: bool = False
) -> torch.nn.Module:
    """``fully_shard`` per decoder layer, then the root (embeddings, final norm, head); in place, returned."""
    if precision not in DTYPES:
        raise ShardingError(f"learner.precision must be one of {sorted(DTYPES)}, got {precision!r}")
    device = logprobs.model_device(model)
    if (
        cpu_offload
    ):  # FSDP2 offloads from an accelerator: on a CPU-only host the shards are in host memory anyway
        if not torch.cuda.is_available():
            raise ShardingError(
                "learner.cpu_offload needs a GPU (on a CPU-only host the shards are in host memory)"
            )
        device = torch.device("cuda", torch.cuda.current_device())  # the model may be loaded on the CPU
    layers = decoder_layers(model)
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    # the root's inputs include the sampling temperatures: they stay fp32 (the layers' inputs are cast)
    root_policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[precision], reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=root_policy, offload_policy=offload)
    for module in (*layers, model):  # sum over ranks: each rank's loss has the global denominator
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-scaled sum)
    model.compute_device = device  # parameters may now live on the CPU (offload): inputs go here
    # learner/logprobs.py calls the backbone and the LM head separately: that whole computation is the
    # root's forward for FSDP (gathers the root's parameters, hooks its backward)
    setattr(model, logprobs.FORWARD_METHOD, types.MethodType(logprobs.completion_logprobs, model))
    register_fsdp_forward_method(model, logprobs.FORWARD_METHOD)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered (unsharded) parameter of ``model``: the root keeps its parameters gathered after a
    forward until its backward, so after a no-grad forward its module would go on using those gathered copies
    even once the shards change (an optimizer step, weights copied in). Nothing to do for a plain module."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's full value (a collective: every rank calls it), a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (its shard of each sharded one)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def weight_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict of sharded tensors, without the second name of tied weights (lm_head.weight of a
    model with tied embeddings: safetensors refuses shared storage, and HF loaders re-tie it)."""
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in unique}


def file_index(weights: dict[str, torch.Tensor], file_bytes: int = FILE_BYTES) -> dict[str, int]:
    """Tensor name -> published file number (1..n), in order, a new file once ``file_bytes`` is reached."""
    out, index, size = {}, 1, 0
    for name, t in weights.items():
        n = math.prod(t.shape) * t.element_size()
        if size and size + n > file_bytes:
            index, size = index + 1, 0
        out[name] = index
        size += n
    return out


def save_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_dir: Path,
                optimizer_dir: Path) -> tuple[dict[str, Any], dict[str, int]]:  # fmt: skip
    """Every rank writes its shard of the weights (``step_dir/weight_shards``) and of the optimizer state
    (``optimizer_dir``); a collective. Returns the optimizer's non-tensor entries (JSON-able) and the file
    index of the published weights."""
    weights = weight_state(model)
    dcp.save(
        weights,
        storage_writer=HuggingFaceStorageWriter(str(step_dir / WEIGHT_SHARDS_DIR), save_distributed=True),
    )
    _, osd = get_state_dict(model, optimizer, options=_OPTIONS)
    tensors = {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(optimizer_dir), save_distributed=True))
    return _jsonable({k: v for k, v in osd.items() if k not in tensors}), file_index(weights)


def consolidate_weights(step_dir: Path, index: dict[str, int]) -> None:
    """The weight shards of ``step_dir`` → HF safetensors files + ``model.safetensors.index.json`` in
    ``step_dir``; the shards are removed. One tensor at a time is assembled in memory."""
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    shards = step_dir / WEIGHT_SHARDS_DIR
    consolidate_safetensors_files(str(shards), str(step_dir), fqn_to_index_mapping=index)
    shutil.rmtree(shards)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_dir: Path,
                   non_tensor: dict[str, Any]) -> None:  # fmt: skip
    """Read the optimizer shards written by any number of ranks into this rank's shard; a collective. A plain
    module (a 1-rank learner that does not shard) reads the whole of each tensor: the flattened names are the
    same (FSDP2 keeps the module's parameter names)."""
    _, osd = get_state_dict(model, optimizer, options=_OPTIONS)  # allocates the state (a zero-lr step)
    tensors = {k: v for k, v in osd.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(tensors) - set(_saved_names(optimizer_dir)))
    if missing:
        raise ValueError(
            f"{optimizer_dir}: no saved optimizer state for {missing[0]} (and {len(missing) - 1} more)"
        )
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(optimizer_dir)))
    set_state_dict(model, optimizer, model_state_dict={}, optim_state_dict={**_from_json(non_tensor), **tensors},
                   options=_OPTIONS)  # fmt: skip


def load_full_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A whole-model optimizer state keyed by parameter index (``optimizer.state_dict()`` of the unsharded
    learner, parameters in ``model.parameters()`` order), given whole to every rank: each keeps its shard."""
    names = dict(enumerate(n for n, p in model.named_parameters() if p.requires_grad))
    osd = {
        "state": {names[int(i)]: st for i, st in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_state_dict(model, optimizer, model_state_dict={}, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip
    # DCP gives tuples (betas) back as lists: the saved ones, so that the state is the one saved
    for group, saved in zip(optimizer.param_groups, osd["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if isinstance(v, tuple)})


def _saved_names(directory: Path) -> set[str]:
    """Tensor names in the safetensors headers of a DCP directory (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    return names


def _jsonable(obj: Any) -> Any:
    """lr, betas, flags ...: tuples become {"__tuple__": [...]} so that they come back as tuples."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} of the optimizer state as JSON")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj
