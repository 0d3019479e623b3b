"""Publishing and restoring learner checkpoints (docs/architecture.md, "Checkpoints"), never with pickle.

Layout of ``<root>/step_XXXXXXXX/``: HF files (``save_pretrained`` safetensors, config, generation
config, tokenizer), ``trainer_state/`` and ``manifest.json``, then ``STABLE`` written last.

``trainer_state/``:
- ``tensors.safetensors``: every tensor of the optimizer and scheduler states and the RNG states;
- ``state.json``: the non-tensor structure, with ``{"__tensor__": name}`` where a tensor was, plus
  step, version, consumed, prompt cursor and the entry ids consumed since the previous checkpoint;
- ``trained_ids.json``: the group ids trained in the last window of steps (``learner/intake.py``,
  ``TrainedIds``) with the step each was trained at, ``{"format": 2, "ids": {group_id: step}}`` (drops
  duplicates after a resume); a plain list (the first format) is read as ids trained at the checkpoint's step.
The loader opens exactly these three names, with safetensors and json: a pickle planted anywhere
in the directory is never read.

The loop thread takes a :class:`Snapshot` (CPU clones of the weights and the optimizer state),
then the write runs on a background thread while the next step trains.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.manifest import (
    MANIFEST,
    STABLE,
    CheckpointError,
    Manifest,
    hash_tree,
    stable_steps,
    step_dir_name,
    verify_checkpoint,
)

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"
STATE_DIR = "trainer_state"
TENSORS_FILE, STATE_FILE, IDS_FILE = "tensors.safetensors", "state.json", "trained_ids.json"
IDS_FORMAT = 2  # trained_ids.json: {"format": 2, "ids": {group_id: step}}; format 1 was a plain list
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


def take_snapshot(model, optimizer, scheduler, *, step: int, counters: dict, entry_ids: list[str],
                  trained_ids: Mapping[str, int] | Iterable[str]) -> Snapshot:  # fmt: skip
    """CPU copies of everything a checkpoint holds (fast; the loop thread then moves on)."""
    return Snapshot(
        step=step, version=step, model_state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        optimizer=_clone(optimizer.state_dict()), scheduler=_clone(scheduler.state_dict()), rng=_clone(rng_state()),
        counters=dict(counters), entry_ids=list(entry_ids), trained_ids=trained_steps(trained_ids, step),
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
        "optimizer": flatten(snap.optimizer, tensors, "optimizer"),
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


def write_checkpoint(
    root: Path, snap: Snapshot, model, tokenizer, fingerprint: str, parent: int | None
) -> tuple[Path, str]:
    """Write ``step_XXXXXXXX`` atomically: temp dir, fsync, rename, STABLE. Returns (dir, manifest sha256).

    On an OSError (disk full, I/O error) the partial temp dir (or the renamed, never-STABLE dir) is removed
    before the error propagates: nothing half-written is left for a reader or a resume to trip on."""
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(snap.step)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    try:
        return _write_checkpoint(root, tmp, final, snap, model, tokenizer, fingerprint, parent)
    except OSError:
        for d in (tmp, final):
            if d.is_dir() and not (d / STABLE).exists():
                shutil.rmtree(d, ignore_errors=True)
        raise


def _write_checkpoint(root: Path, tmp: Path, final: Path, snap: Snapshot, model, tokenizer, fingerprint: str,
                      parent: int | None) -> tuple[Path, str]:  # fmt: skip
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=snap.model_state, safe_serialization=True)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    maybe_crash("checkpoint_write", snap.step)
    maybe_fault("enospc_at_publish", snap.step)
    write_trainer_state(tmp / STATE_DIR, snap)
    manifest = Manifest(step=snap.step, version=snap.version, parent=parent, model_fingerprint=fingerprint,
                        files=hash_tree(tmp), created_at=time.time())  # fmt: skip
    raw = manifest.to_json()
    (tmp / MANIFEST).write_bytes(raw)
    _fsync_tree(tmp)
    if final.exists():  # an unfinished (never STABLE) or superseded dir of the same step from a crashed run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(root)
    maybe_crash("before_stable", snap.step)
    (final / STABLE).write_bytes(b"")
    _fsync_path(final / STABLE)
    _fsync_path(final)
    return final, hashlib.sha256(raw).hexdigest()


def remove_stale_tmp(root: Path) -> int:
    n = 0
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p)
                n += 1
    return n


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` STABLE step dirs (the newest one is always kept)."""
    steps = stable_steps(root)
    doomed = steps[: max(0, len(steps) - max(1, keep))]
    for p in doomed:
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


def _read_trained(raw: Any, step: int) -> dict[str, int]:
    """trained_ids.json of either format: ``{"format": 2, "ids": {id: step}}`` or a list of ids (format 1)."""
    if isinstance(raw, list):
        return dict.fromkeys((str(x) for x in raw), step)
    if isinstance(raw, dict) and raw.get("format") == IDS_FORMAT and isinstance(raw.get("ids"), dict):
        return {str(g): int(s) for g, s in raw["ids"].items()}
    raise ValueError(f"{IDS_FILE}: neither a list of ids nor {{'format': {IDS_FORMAT}, 'ids': {{...}}}}")


def load_trainer_state(step_dir: Path) -> TrainerState:
    """Read trainer_state/ with safetensors + json only (no other file is opened)."""
    d = Path(step_dir) / STATE_DIR
    try:
        tensors = load_file(str(d / TENSORS_FILE))
        state = json.loads((d / STATE_FILE).read_text())
        trained = _read_trained(json.loads((d / IDS_FILE).read_text()), int(state["step"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{d}: unreadable trainer state ({type(e).__name__}: {e})") from None
    return TrainerState(
        step=int(state["step"]), version=int(state["version"]), counters=dict(state["counters"]),
        entry_ids=[str(x) for x in state["entry_ids"]], trained_ids=list(trained),
        optimizer=unflatten(state["optimizer"], tensors), scheduler=unflatten(state["scheduler"], tensors),
        rng=unflatten(state["rng"], tensors), trained_steps=trained,
    )  # fmt: skip


def restore(optimizer, scheduler, state: TrainerState) -> None:
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    torch.set_rng_state(state.rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [state.rng[k] for k in sorted(state.rng) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def newest_verified(root: Path) -> Path | None:
    """The newest STABLE step dir whose manifest verifies (older ones are tried if it does not)."""
    for p in reversed(stable_steps(root)):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", p, e)
    return None
