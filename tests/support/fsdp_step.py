"""Learner steps under torchrun (any number of ranks), for tests/integration/test_learner_fsdp.py.

``python -m torch.distributed.run --nproc-per-node N -m tests.support.fsdp_step MODEL_DIR OUT_DIR STEPS [k=v ...]``:
rank 0 builds the batch and broadcasts it as tensors, every rank trains its share of it on the sharded model,
STEPS times (from the second step on, the samples of staleness 1 are anchored on the kept weights of the
version before: loss.proximal = "version"), then the gathered weights (``weights.safetensors``), the last
step's metrics (``metrics.json``) and each rank's bytes of parameters and AdamW state (``rank<r>_bytes.json``)
are written. ``k=v``: learner settings (integers, floats and true/false).
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
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(model_dir: str, out_dir: str, steps: str, *pairs: str) -> None:
    from learner.batching import build_batch
    from learner.distributed import broadcast_batch, init_from_env, shutdown
    from learner.sharded import full_value, local_bytes
    from learner.trainer import Trainer
    from modeling import load_model
    from tests.integration.test_learner_step import hand_groups, settings

    torch.set_num_threads(1)
    world = init_from_env("cpu")
    overrides = {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}
    batch = None
    if world.is_main:
        batch = build_batch(hand_groups(load_model(model_dir), n_groups=3, group_size=4, seed=11))
    batch = broadcast_batch(world, batch)  # the other ranks get it as tensors, as in the learner
    torch.manual_seed(0)
    trainer = Trainer(load_model(model_dir), settings(**overrides), world)
    for _ in range(int(steps)):
        metrics = trainer.train_step(batch)
    held = {
        "parameters": local_bytes(trainer.params),
        "optimizer": local_bytes(t for st in trainer.optimizer.state.values() for t in st.values()),
    }
    weights = {k: full_value(v).detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    out = Path(out_dir)
    (out / f"rank{world.rank}_bytes.json").write_text(json.dumps(held))
    if world.is_main:
        save_file(weights, str(out / "weights.safetensors"))
        (out / "metrics.json").write_text(json.dumps(metrics))
    shutdown(world)


if __name__ == "__main__":
    main(*sys.argv[1:])
