"""Learner steps under torchrun (any number of ranks), for tests/integration/test_learner_fsdp*.py.

``python -m torch.distributed.run --nproc-per-node N -m tests.support.fsdp_step MODEL_DIR OUT_DIR STEPS [k=v ...]``:
rank 0 builds the batch and broadcasts it as tensors, every rank trains its share of it (on the sharded model
with more than one rank or ``shard=always``, else on the plain one), STEPS times (from the second step on, the
samples of staleness 1 are anchored on the kept weights of the version before: loss.proximal = "version"), then
the gathered weights (``weights.safetensors``; after each step too: ``weights-<version>.safetensors``), the
whole optimizer state (``optimizer.safetensors``, flattened names: the same for a sharded and a plain model),
the last step's metrics (``metrics.json``) and each rank's bytes of parameters and AdamW state and whether its
model is sharded (``rank<r>_bytes.json``) are written. ``k=v``: learner settings (integers, floats, true/false
and strings; ``loss.k=v``: loss settings), and two that are not: ``resume=STEP_DIR`` starts from a published checkpoint (its weights, and
its trainer state from the private root ``<checkpoint root>-state``), as the learner resumes, and
``save=ROOT`` publishes a checkpoint of the last step under ``ROOT`` (private state: ``ROOT-state``), every rank
writing its shards with rank 0 as the learner does. The batch always comes from MODEL_DIR (the base model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def _value(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _state_root(root: Path) -> Path:
    return root.parent / f"{root.name}-state"


def _weights(trainer) -> dict[str, torch.Tensor]:
    from learner.sharded import full_value

    return {k: full_value(v).detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}


def _optimizer(trainer) -> dict[str, torch.Tensor]:
    """The whole optimizer state by flattened name (a collective for a sharded model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    _, osd = get_state_dict(trainer.model, trainer.optimizer, options=options)
    return {k: v.detach().clone().contiguous() for k, v in osd.items() if isinstance(v, torch.Tensor)}


def main(model_dir: str, out_dir: str, steps: str, *pairs: str) -> None:
    from learner import checkpoint as ckpt
    from learner.batching import build_batch
    from learner.distributed import broadcast_batch, init_from_env, shutdown
    from learner.sharded import is_sharded, local_bytes
    from learner.trainer import Trainer
    from modeling import load_model, load_tokenizer
    from tests.integration.test_learner_step import hand_groups, settings

    torch.set_num_threads(1)
    world = init_from_env("cpu")
    overrides = {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}
    resume = Path(overrides.pop("resume")) if "resume" in overrides else None
    save = Path(overrides.pop("save")) if "save" in overrides else None
    loss = {
        k.removeprefix("loss."): overrides.pop(k) for k in [k for k in overrides if k.startswith("loss.")]
    }
    s = settings(**overrides)
    s.loss = s.loss.model_copy(update=loss)
    batch = None
    if world.is_main:
        batch = build_batch(hand_groups(load_model(model_dir), n_groups=3, group_size=4, seed=11))
    batch = broadcast_batch(world, batch)  # the other ranks get it as tensors, as in the learner
    torch.manual_seed(0)
    trainer = Trainer(load_model(resume or model_dir), s, world)
    if (
        resume is not None
    ):  # as learner/service.py resumes: the optimizer, scheduler and RNG, then the version
        state = ckpt.load_trainer_state(resume, _state_root(resume.parent), verify=world.is_main)
        ckpt.restore(trainer.model, trainer.optimizer, trainer.scheduler, state)
        trainer.version = state.step
    out = Path(out_dir)
    for _ in range(int(steps)):
        metrics = trainer.train_step(batch)
        weights = _weights(trainer)
        if world.is_main:
            save_file(weights, str(out / f"weights-{trainer.version}.safetensors"))
    held = {
        "parameters": local_bytes(trainer.params),
        "optimizer": local_bytes(t for st in trainer.optimizer.state.values() for t in st.values()),
        "sharded": is_sharded(trainer.model),
    }
    optimizer = _optimizer(trainer)
    (out / f"rank{world.rank}_bytes.json").write_text(json.dumps(held))
    if world.is_main:
        save_file(weights, str(out / "weights.safetensors"))
        save_file(optimizer, str(out / "optimizer.safetensors"))
        (out / "metrics.json").write_text(json.dumps(metrics))
    if save is not None:
        step = trainer.version
        if world.is_main:
            snap = ckpt.take_snapshot(trainer.model, trainer.optimizer, trainer.scheduler, step=step, counters={},
                                      entry_ids=[], trained_ids=[], root=save, state_root=_state_root(save))  # fmt: skip
            ckpt.write_checkpoint(save, snap, trainer.model, load_tokenizer(model_dir), "fp", parent=None,
                                  state_root=_state_root(save))  # fmt: skip
        else:
            ckpt.write_shards(save, _state_root(save), step, trainer.model, trainer.optimizer)
    shutdown(world)


if __name__ == "__main__":
    main(*sys.argv[1:])
