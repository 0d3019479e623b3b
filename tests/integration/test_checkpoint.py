"""Checkpoint publishing: atomic layout, HF-loadable weights, trainer-state round trip, no pickle."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from common.manifest import CheckpointError, read_manifest, stable_steps, verify_checkpoint
from learner.batching import build_batch
from learner.checkpoint import (
    load_trainer_state,
    newest_verified,
    prune,
    remove_stale_tmp,
    restore,
    take_snapshot,
    write_checkpoint,
)
from learner.trainer import Trainer
from modeling import load_model, load_tokenizer
from tests.integration.test_learner_step import hand_groups, settings


def trained(tiny_model_dir: Path) -> Trainer:
    model = load_model(tiny_model_dir)
    trainer = Trainer(model, settings(warmup_steps=5))
    trainer.train_step(build_batch(hand_groups(model)))
    return trainer


def publish(trainer: Trainer, root: Path, step: int, tiny_model_dir: Path) -> tuple[Path, str]:
    snap = take_snapshot(
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        step=step,
        counters={"consumed": 7, "prompt_cursor": 40},
        entry_ids=["1-0", "2-0"],
        trained_ids=["g0", "g1"],
    )
    return write_checkpoint(root, snap, trainer.model, load_tokenizer(tiny_model_dir), "fp", parent=step - 1)


def test_published_checkpoint_verifies_and_loads_with_from_pretrained(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    trainer = trained(tiny_model_dir)
    path, digest = publish(trainer, tmp_path, 1, tiny_model_dir)
    assert path == tmp_path / "step_00000001" and (path / "STABLE").exists()
    manifest = verify_checkpoint(path, expected_manifest_sha256=digest)
    assert (manifest.step, manifest.version, manifest.parent, manifest.model_fingerprint) == (1, 1, 0, "fp")
    assert read_manifest(path)[1] == digest
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state/tensors.safetensors"} <= set(
        manifest.files
    )
    loaded = AutoModelForCausalLM.from_pretrained(path)
    want = trainer.model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert not list(tmp_path.glob(".tmp-*"))


def test_snapshot_is_isolated_from_later_steps(tiny_model_dir, tmp_path) -> None:
    trainer = trained(tiny_model_dir)
    snap = take_snapshot(
        trainer.model, trainer.optimizer, trainer.scheduler, step=1, counters={}, entry_ids=[], trained_ids=[]
    )
    before = {k: v.clone() for k, v in snap.model_state.items()}
    trainer.train_step(build_batch(hand_groups(trainer.model, seed=5)))
    assert all(torch.equal(before[k], snap.model_state[k]) for k in before)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_trainer_state_round_trip(tiny_model_dir, tmp_path) -> None:
    trainer = trained(tiny_model_dir)
    path, _ = publish(trainer, tmp_path, 3, tiny_model_dir)
    state = load_trainer_state(path)
    assert (state.step, state.version, state.counters) == (3, 3, {"consumed": 7, "prompt_cursor": 40})
    assert state.entry_ids == ["1-0", "2-0"] and state.trained_ids == ["g0", "g1"]
    fresh = Trainer(load_model(path), settings(warmup_steps=5))
    torch.manual_seed(123)
    restore(fresh.optimizer, fresh.scheduler, state)
    a, b = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in a["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["state"][i][name]), (i, name)
    assert fresh.scheduler.state_dict() == trainer.scheduler.state_dict()
    assert fresh.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    assert torch.equal(torch.get_rng_state(), state.rng["torch_cpu"])
    # the restored trainer takes the same next step as the original
    batch = build_batch(hand_groups(trainer.model, seed=9))
    m1, m2 = trainer.train_step(batch), fresh.train_step(batch)
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-7)
    for (k, v), w in zip(trainer.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.allclose(v, w, atol=1e-7), k


class _Bomb:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_is_never_loaded(tiny_model_dir, tmp_path) -> None:
    trainer = trained(tiny_model_dir)
    path, _ = publish(trainer, tmp_path / "ckpt", 1, tiny_model_dir)
    marker = tmp_path / "marker"
    bomb = pickle.dumps(_Bomb(marker))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.pkl"):
        (path / "trainer_state" / name).write_bytes(bomb)
    load_trainer_state(path)  # ignores every non-safetensors/json file
    assert not marker.exists()
    (path / "trainer_state" / "tensors.safetensors").write_bytes(bomb)
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        load_trainer_state(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # and the manifest no longer matches
        verify_checkpoint(path)


def test_newest_verified_skips_corrupt_and_prune_keeps_the_newest(tiny_model_dir, tmp_path) -> None:
    trainer = trained(tiny_model_dir)
    for step in (1, 2, 3):
        publish(trainer, tmp_path, step, tiny_model_dir)
    (tmp_path / ".tmp-step_00000004").mkdir()
    assert remove_stale_tmp(tmp_path) == 1
    (tmp_path / "step_00000003" / "model.safetensors").write_bytes(b"garbage")
    assert newest_verified(tmp_path) == tmp_path / "step_00000002"
    assert [p.name for p in prune(tmp_path, keep=1)] == ["step_00000001", "step_00000002"]
    assert [p.name for p in stable_steps(tmp_path)] == ["step_00000003"]
    assert newest_verified(tmp_path) is None
