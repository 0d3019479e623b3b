"""Publishing and restoring learner checkpoints (docs/architecture.md, "Checkpoints"), never with pickle.

A step is two directories, each with a ``manifest.json`` (sha256 of every other file) and ``STABLE`` written last:

- the published ``<root>/step_XXXXXXXX/``, all that producers download and load: HF files (``save_pretrained``
  safetensors, config, generation config, tokenizer); with LoRA the merged full weights (learner/lora.py);
- the learner-private ``<state root>/step_XXXXXXXX/`` (``learner.state_dir``), written and made STABLE first, so
  a STABLE published step always has its state. Its files:
- ``optimizer/`` (a sharded model, ``learner/sharded.py``): the AdamW state, flattened to one tensor per
  parameter and moment (``state.<parameter>.exp_avg`` ...), one safetensors file per rank that wrote it, each
  holding that rank's shard (``torch.distributed.checkpoint``; any number of ranks reads it back);
- ``tensors.safetensors``: the tensors of the scheduler state and the RNG states, and of the whole optimizer
  state of an unsharded model (one plain rank, ``learner/sharded.py``: ``should_shard``; LoRA);
- ``state.json``: the non-tensor structure, with ``{"__tensor__": name}`` where a tensor was (the sharded
  optimizer's non-tensor entries, lr, betas ..., under ``optimizer``, with ``"format": 2``), plus step,
  version, consumed, prompt cursor and the entry ids consumed since the previous checkpoint;
- ``trained_ids.json``: the group ids trained in the last window of steps (``learner/intake.py``,
  ``TrainedIds``) with the step each was trained at, ``{"format": 2, "ids": {group_id: step}}`` (drops
  duplicates after a resume); a plain list (the first format) is read as ids trained at the checkpoint's step;
- with LoRA, ``adapter.safetensors`` (the adapter tensors) and ``adapter.json`` (their configuration and the
  base model's weight digest).
The loader opens exactly these names, with safetensors and json: a pickle planted anywhere in the directory is
never read. Steps of the earlier layout, whose state is the ``trainer_state/`` subdirectory of the published step,
still resume (the same files); new steps are written in this layout.

The weights of a sharded model are published as ``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``. Between two steps every rank writes its shards of the weights and of the
optimizer state into the two temp dirs (:func:`take_snapshot`, a collective); rank 0's :class:`Snapshot`
keeps CPU copies of the rest (an unsharded model, one plain rank or LoRA: of the weights and the optimizer state
too, the weights then published with ``save_pretrained``), and the write finishes on a background thread while
the next step trains: the weight shards are consolidated into the published HF files one tensor at a time, then
manifests, renames, STABLE. A step whose optimizer state is whole (no ``format``: a plain rank's, the earlier
single-process learner's, or a LoRA run's) resumes on a sharded model too: every rank takes its shard of it;
a sharded one resumes on a plain rank, which reads it whole (:func:`restore`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.manifest import (
    MANIFEST,
    STABLE,
    STEP_PREFIX,
    CheckpointError,
    Manifest,
    hash_tree,
    stable_steps,
    step_dir_name,
    verify_checkpoint,
)
from learner import sharded
from learner.lora import adapter_state_dict, is_lora, merged_state_dict

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"
STATE_DIR = "trainer_state"  # the earlier layout: the trainer state inside the published step
TENSORS_FILE, STATE_FILE, IDS_FILE = "tensors.safetensors", "state.json", "trained_ids.json"
ADAPTER_FILE, ADAPTER_META = "adapter.safetensors", "adapter.json"
IDS_FORMAT = 2  # trained_ids.json: {"format": 2, "ids": {group_id: step}}; format 1 was a plain list
STATE_FORMAT = 2  # state.json with the optimizer state in optimizer/ (sharded); without "format" it is inline
CRASH_ENV = "LEARNER_TEST_CRASH_AT"
FAULT_ENV = "LEARNER_TEST_FAULT"


def maybe_crash(point: str, step: int) -> None:
    """Test hook: ``LEARNER_TEST_CRASH_AT=point:step`` kills the process (as kill -9 would) right here."""
    if os.environ.get(CRASH_ENV) == f"{point}:{step}":
        log.warning("test hook %s=%s: exiting with 137", CRASH_ENV, os.environ[CRASH_ENV])
        os._exit(137)


def maybe_fault(point: str, step: int) -> None:
    """Test hook: ``LEARNER_TEST_FAULT=enospc_at_publish:2[,3...]`` makes the write of those steps' checkpoints
    fail with ENOSPC half-way (HF files written, trainer state not), as a full disk would."""
    name, _, steps = os.environ.get(FAULT_ENV, "").partition(":")
    if name == point and str(step) in steps.split(","):
        raise OSError(errno.ENOSPC, f"No space left on device (test hook {FAULT_ENV}={name}:{steps})")


# --------------------------------------------------------------------------- tensor <-> JSON structure
def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able structure with tensors replaced by ``{"__tensor__": key}`` (tensors go to ``tensors``)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in trainer_state ({prefix})")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


# --------------------------------------------------------------------------- snapshot
@dataclass
class Snapshot:
    step: int
    version: int
    model_state: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor]
    counters: dict[str, Any]  # consumed, prompt_cursor, ...
    entry_ids: list[str]  # rollout entries consumed since the previous checkpoint (acked once this is STABLE)
    trained_ids: dict[str, int]  # group id -> step trained at (ids given without a step: this step)
    created_at: float = field(default_factory=time.time)
    adapter: dict[str, torch.Tensor] | None = None  # LoRA: the adapter tensors (model_state is then merged)
    lora: dict | None = None  # LoRA: configuration and base model digest (learner/lora.py)
    # a sharded model: the published weight name -> file number; its weight and optimizer shards are in the temp
    # dirs, ``model_state`` is empty and ``optimizer`` holds the optimizer's non-tensor entries only
    weight_index: dict[str, int] | None = None


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def trained_steps(trained_ids: Mapping[str, int] | Iterable[str], step: int) -> dict[str, int]:
    """Group id -> step trained at, from a mapping, an object with ``steps()`` (``learner.intake.TrainedIds``),
    or plain ids (taken as trained at ``step``: at the latest then)."""
    if hasattr(trained_ids, "steps"):
        trained_ids = trained_ids.steps()
    if isinstance(trained_ids, Mapping):
        return {str(g): int(s) for g, s in trained_ids.items()}
    return dict.fromkeys((str(g) for g in trained_ids), int(step))


def tmp_dirs(root: Path, state_root: Path, step: int) -> tuple[Path, Path]:
    """The temp dirs of a step's published and private directories."""
    name = f"{TMP_PREFIX}{step_dir_name(step)}"
    return Path(root) / name, Path(state_root) / name


def write_shards(root: Path, state_root: Path, step: int, model, optimizer) -> tuple[dict, dict[str, int]]:
    """Every rank writes its shards of the weights (published temp dir) and of the optimizer state (private temp
    dir) of ``step``: a collective, all ranks call it; rank 0 first clears what a crashed run left there.
    Returns the optimizer's non-tensor entries and the published weight file index."""
    tmp, state_tmp = tmp_dirs(root, state_root, step)
    if dist.get_rank() == 0:
        for d in (tmp, state_tmp, Path(root) / step_dir_name(step)):
            shutil.rmtree(d, ignore_errors=True)  # never raise here: the other ranks wait at the barrier
    dist.barrier()
    return sharded.save_shards(model, optimizer, tmp, state_tmp / sharded.OPTIMIZER_DIR)


def take_snapshot(model, optimizer, scheduler, *, step: int, counters: dict, entry_ids: list[str],
                  trained_ids: Mapping[str, int] | Iterable[str], lora: dict | None = None,
                  root: Path | None = None, state_root: Path | None = None) -> Snapshot:  # fmt: skip
    """CPU copies of everything a checkpoint holds (fast; the loop thread then moves on). A model with LoRA
    adapters is published merged; its adapters (and ``lora``, their configuration) go to the private state.
    A sharded model writes its shards into the temp dirs under ``root`` and ``state_root`` instead
    (:func:`write_shards`; every other rank calls it at the same time)."""
    if sharded.is_sharded(model):
        if root is None or state_root is None:
            raise ValueError("a sharded model's snapshot needs the checkpoint roots")
        optim, index = write_shards(root, state_root, step, model, optimizer)
        return Snapshot(
            step=step, version=step, model_state={}, optimizer=optim, scheduler=_clone(scheduler.state_dict()),
            rng=_clone(rng_state()), counters=dict(counters), entry_ids=list(entry_ids),
            trained_ids=trained_steps(trained_ids, step), weight_index=index,
        )  # fmt: skip
    adapted = is_lora(model)
    if adapted and lora is None:
        raise ValueError("a LoRA model's snapshot needs its configuration (Trainer.lora_meta)")
    if adapted:
        model_state = merged_state_dict(model)
    else:
        model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return Snapshot(
        step=step, version=step, model_state=model_state,
        optimizer=_clone(optimizer.state_dict()), scheduler=_clone(scheduler.state_dict()), rng=_clone(rng_state()),
        counters=dict(counters), entry_ids=list(entry_ids), trained_ids=trained_steps(trained_ids, step),
        adapter=adapter_state_dict(model) if adapted else None, lora=dict(lora) if adapted else None,
    )  # fmt: skip


# --------------------------------------------------------------------------- writing
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        _fsync_path(p)
    _fsync_path(root)


def write_trainer_state(dest: Path, snap: Snapshot) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = {
        **({"format": STATE_FORMAT} if snap.weight_index is not None else {}),
        "optimizer": snap.optimizer
        if snap.weight_index is not None
        else flatten(snap.optimizer, tensors, "optimizer"),
        "scheduler": flatten(snap.scheduler, tensors, "scheduler"),
        "rng": flatten(snap.rng, tensors, "rng"),
    }
    save_file(tensors, str(dest / TENSORS_FILE))
    state = {
        "step": snap.step,
        "version": snap.version,
        "counters": snap.counters,
        "entry_ids": snap.entry_ids,
        **structure,
    }
    (dest / STATE_FILE).write_text(json.dumps(state))
    (dest / IDS_FILE).write_text(json.dumps({"format": IDS_FORMAT, "ids": snap.trained_ids}))
    if snap.adapter is not None:
        save_file({k: v.contiguous() for k, v in snap.adapter.items()}, str(dest / ADAPTER_FILE))
        (dest / ADAPTER_META).write_text(json.dumps(snap.lora))


def write_checkpoint(root: Path, snap: Snapshot, model, tokenizer, fingerprint: str, parent: int | None, *,
                     state_root: Path) -> tuple[Path, str]:  # fmt: skip
    """Write ``state_root/step_XXXXXXXX`` then ``root/step_XXXXXXXX`` atomically (temp dir, fsync, rename, STABLE
    each). Returns (published dir, sha256 of its manifest).

    On an OSError (disk full, I/O error) the partial temp dirs, the renamed but never-STABLE published dir and the
    private state of this step are removed before the error propagates: nothing half-written is left for a reader
    or a resume to trip on."""
    root.mkdir(parents=True, exist_ok=True)
    state_root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(snap.step)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    state_tmp, state_final = state_root / f"{TMP_PREFIX}{name}", state_root / name
    try:
        return _write_checkpoint(
            root, tmp, final, state_tmp, state_final, snap, model, tokenizer, fingerprint, parent
        )
    except OSError:
        published = (final / STABLE).exists()
        for d in (tmp, state_tmp) if published else (tmp, state_tmp, final, state_final):
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        raise


def _seal(tmp: Path, final: Path, snap: Snapshot, fingerprint: str, parent: int | None) -> str:
    """manifest, fsync, rename ``tmp`` to ``final``; returns the manifest's sha256 (STABLE is the caller's)."""
    manifest = Manifest(step=snap.step, version=snap.version, parent=parent, model_fingerprint=fingerprint,
                        files=hash_tree(tmp), created_at=time.time())  # fmt: skip
    raw = manifest.to_json()
    (tmp / MANIFEST).write_bytes(raw)
    _fsync_tree(tmp)
    if final.exists():  # an unfinished (never STABLE) or superseded dir of the same step from a crashed run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    return hashlib.sha256(raw).hexdigest()


def _mark_stable(final: Path) -> None:
    (final / STABLE).write_bytes(b"")
    _fsync_path(final / STABLE)
    _fsync_path(final)


def _write_checkpoint(root: Path, tmp: Path, final: Path, state_tmp: Path, state_final: Path, snap: Snapshot, model,
                      tokenizer, fingerprint: str, parent: int | None) -> tuple[Path, str]:  # fmt: skip
    # leftovers of a crashed run; a published dir of the same step (never resumed from) goes first, so that it
    # cannot pair with the new state if this write stops half-way (a sharded model's write_shards did that)
    if snap.weight_index is None:
        for d in (tmp, state_tmp, final):
            if d.exists():
                shutil.rmtree(d)
        model.save_pretrained(tmp, state_dict=snap.model_state, safe_serialization=True)
    else:  # the ranks' shards are in the temp dirs: the weights become the published HF files
        sharded.consolidate_weights(tmp, snap.weight_index)
        model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    maybe_crash("checkpoint_write", snap.step)
    maybe_fault("enospc_at_publish", snap.step)
    write_trainer_state(state_tmp, snap)
    _seal(state_tmp, state_final, snap, fingerprint, parent)
    _mark_stable(state_final)  # the private state first: a STABLE published step always has its state
    digest = _seal(tmp, final, snap, fingerprint, parent)
    maybe_crash("before_stable", snap.step)
    _mark_stable(final)
    return final, digest


def remove_stale_tmp(*roots: Path) -> int:
    n = 0
    for root in roots:
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(TMP_PREFIX) and p.is_dir():
                    shutil.rmtree(p)
                    n += 1
    return n


def prune(root: Path, keep: int, state_root: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` STABLE published step dirs (the newest one is always kept), and the
    private state of every step older than the oldest kept one. Returns the published dirs deleted."""
    steps = stable_steps(root)
    doomed = steps[: max(0, len(steps) - max(1, keep))]
    for p in doomed:
        shutil.rmtree(p)
    if state_root is not None and state_root.is_dir() and steps:
        oldest_kept = steps[len(doomed)].name
        for p in state_root.iterdir():
            if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name < oldest_kept:
                shutil.rmtree(p)
    return doomed


# --------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class TrainerState:
    step: int
    version: int
    counters: dict[str, Any]
    entry_ids: list[str]
    trained_ids: list[str]
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor]
    trained_steps: dict[str, int] = field(default_factory=dict)  # trained_ids with the step of each
    adapter: dict[str, torch.Tensor] | None = None  # LoRA adapter tensors
    lora: dict | None = None  # LoRA configuration and base model digest
    where: str = ""  # the directory read
    whole_optimizer: bool = (
        True  # ``optimizer`` is a whole state_dict(); else the sharded one's non-tensor entries
    )


def _read_trained(raw: Any, step: int) -> dict[str, int]:
    """trained_ids.json of either format: ``{"format": 2, "ids": {id: step}}`` or a list of ids (format 1)."""
    if isinstance(raw, list):
        return dict.fromkeys((str(x) for x in raw), step)
    if isinstance(raw, dict) and raw.get("format") == IDS_FORMAT and isinstance(raw.get("ids"), dict):
        return {str(g): int(s) for g, s in raw["ids"].items()}
    raise ValueError(f"{IDS_FILE}: neither a list of ids nor {{'format': {IDS_FORMAT}, 'ids': {{...}}}}")


def state_dir_for(step_dir: Path, state_root: Path, verify: bool = True) -> Path:
    """Where the trainer state of published ``step_dir`` lies: its private dir under ``state_root`` (verified
    against its manifest unless ``verify`` is False), or (earlier layout) the ``trainer_state/`` inside the step,
    covered by the step's own manifest. :class:`CheckpointError` when there is neither."""
    private = Path(state_root) / Path(step_dir).name
    if private.is_dir():
        if verify:
            verify_checkpoint(private)
        return private
    earlier = Path(step_dir) / STATE_DIR
    if earlier.is_dir():
        return earlier
    raise CheckpointError(
        f"checkpoint {step_dir} has no trainer state ({private} is missing: is learner.state_dir the run's?)"
    )


def load_trainer_state(step_dir: Path, state_root: Path, verify: bool = True) -> TrainerState:
    """Read the trainer state of a published step (:func:`state_dir_for`) with safetensors + json only (no other
    file is opened). ``verify=False`` skips hashing a private dir that :func:`newest_verified` just verified."""
    d = state_dir_for(step_dir, state_root, verify)
    try:
        tensors = load_file(str(d / TENSORS_FILE))
        state = json.loads((d / STATE_FILE).read_text())
        if state.get("format", 1) not in (1, STATE_FORMAT):
            raise CheckpointError(
                f"{d}: trainer state of format {state['format']!r}, not one this learner reads"
            )
        whole = "format" not in state
        trained = _read_trained(json.loads((d / IDS_FILE).read_text()), int(state["step"]))
        adapter = load_file(str(d / ADAPTER_FILE)) if (d / ADAPTER_FILE).exists() else None
        lora = json.loads((d / ADAPTER_META).read_text()) if adapter is not None else None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{d}: unreadable trainer state ({type(e).__name__}: {e})") from None
    return TrainerState(
        step=int(state["step"]), version=int(state["version"]), counters=dict(state["counters"]),
        entry_ids=[str(x) for x in state["entry_ids"]], trained_ids=list(trained),
        optimizer=unflatten(state["optimizer"], tensors) if whole else dict(state["optimizer"]),
        scheduler=unflatten(state["scheduler"], tensors), rng=unflatten(state["rng"], tensors), trained_steps=trained,
        adapter=adapter, lora=lora, where=str(d), whole_optimizer=whole,
    )  # fmt: skip


def restore(model, optimizer, scheduler, state: TrainerState) -> None:
    """The optimizer, scheduler and RNG states of ``state``, whichever way it was written and is resumed: a
    sharded optimizer state (``optimizer/``, written by any number of ranks) is read by every rank of a sharded
    model (a collective), each taking its shard, or whole by a plain one; a whole one (a plain 1-rank learner's,
    a LoRA run's, the earlier single-process learner's) is loaded as is by a plain model, or shared out by a
    sharded one."""
    optimizer_dir = Path(state.where) / sharded.OPTIMIZER_DIR
    try:
        if not state.whole_optimizer:
            sharded.load_optimizer(model, optimizer, optimizer_dir, state.optimizer)
        elif sharded.is_sharded(model):
            sharded.load_full_optimizer(model, optimizer, state.optimizer)
        else:
            optimizer.load_state_dict(state.optimizer)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(
            f"{state.where}: unreadable optimizer state ({type(e).__name__}: {e})"
        ) from None
    scheduler.load_state_dict(state.scheduler)
    torch.set_rng_state(state.rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [state.rng[k] for k in sorted(state.rng) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def newest_verified(root: Path, state_root: Path) -> Path | None:
    """The newest STABLE published step dir that verifies and whose trainer state verifies (older ones are tried
    if it does not)."""
    for p in reversed(stable_steps(root)):
        try:
            verify_checkpoint(p)
            state_dir_for(p, state_root)
            return p
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", p, e)
    return None
