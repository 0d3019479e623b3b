"""Checkpoint publishing: atomic layout (published weights apart from the learner-private state), HF-loadable
weights, trainer-state round trip between a plain (one rank, ``learner.shard = "auto"``) and a sharded
(``"always"``) learner either way, the earlier layout, no pickle."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from common.manifest import (
    MANIFEST,
    CheckpointError,
    Manifest,
    hash_tree,
    read_manifest,
    stable_steps,
    verify_checkpoint,
)
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
from learner.sharded import full_value, is_sharded
from learner.trainer import Trainer
from modeling import load_model, load_tokenizer
from tests.integration.test_learner_step import hand_groups, settings


def trained(tiny_model_dir: Path, shard: str = "auto", proximal: str = "version") -> Trainer:
    model = load_model(tiny_model_dir)
    trainer = Trainer(model, settings_with(proximal, warmup_steps=5, shard=shard))
    trainer.train_step(build_batch(hand_groups(model)))
    return trainer


def settings_with(proximal: str, **learner):
    s = settings(**learner)
    s.loss = s.loss.model_copy(update={"proximal": proximal})
    return s


def state_of(root: Path) -> Path:
    """The learner-private state root the tests pair with a checkpoint root."""
    return root.parent / f"{root.name}-state"


def publish(trainer: Trainer, root: Path, step: int, tiny_model_dir: Path) -> tuple[Path, str]:
    snap = take_snapshot(
        trainer.model,
        trainer.optimizer,
        trainer.scheduler,
        step=step,
        counters={"consumed": 7, "prompt_cursor": 40},
        entry_ids=["1-0", "2-0"],
        trained_ids=["g0", "g1"],
        root=root,
        state_root=state_of(root),
    )
    return write_checkpoint(
        root,
        snap,
        trainer.model,
        load_tokenizer(tiny_model_dir),
        "fp",
        parent=step - 1,
        state_root=state_of(root),
    )


# the published weights and the private files: a plain model's (save_pretrained; the whole optimizer state in
# tensors.safetensors), a sharded one's (consolidated shards; this rank's shard of the AdamW state)
LAYOUTS = {
    "auto": ({"model.safetensors"}, ["state.json", "tensors.safetensors", "trained_ids.json"]),
    "always": (
        {"model-00001-of-00001.safetensors", "model.safetensors.index.json"},
        [
            "optimizer/shard-00001-model-00001-of-00001.safetensors",
            "state.json",
            "tensors.safetensors",
            "trained_ids.json",
        ],
    ),
}


@pytest.mark.parametrize("shard", ["auto", "always"])
def test_published_checkpoint_verifies_and_loads_with_from_pretrained(
    tiny_model_dir, tmp_path, shard
) -> None:
    from transformers import AutoModelForCausalLM

    trainer = trained(tiny_model_dir, shard)
    assert is_sharded(trainer.model) == (shard == "always")
    root = tmp_path / "ckpt"
    path, digest = publish(trainer, root, 1, tiny_model_dir)
    assert path == root / "step_00000001" and (path / "STABLE").exists()
    manifest = verify_checkpoint(path, expected_manifest_sha256=digest)
    assert (manifest.step, manifest.version, manifest.parent, manifest.model_fingerprint) == (1, 1, 0, "fp")
    assert read_manifest(path)[1] == digest
    # producers download what they load and nothing else: weights, config, generation config, tokenizer
    weights, private_files = LAYOUTS[shard]
    assert {*weights, "config.json", "generation_config.json", "tokenizer.json"} <= set(manifest.files)
    assert not [f for f in manifest.files if "shard" in f]
    assert not [f for f in manifest.files if "trainer" in f or f.startswith(("tensors", "state", "trained"))]
    assert sorted(p.name for p in path.iterdir()) == sorted({*manifest.files, MANIFEST, "STABLE"})
    # the optimizer and trainer state stay with the learner, verified the same way
    private = state_of(root) / "step_00000001"
    assert sorted(verify_checkpoint(private).files) == private_files
    assert ("format" in json.loads((private / "state.json").read_text())) == (shard == "always")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    want = trainer.model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, full_value(want[k])), k
    assert not list(root.glob(".tmp-*")) and not list(state_of(root).glob(".tmp-*"))


@pytest.mark.parametrize("shard", ["auto", "always"])
def test_snapshot_is_isolated_from_later_steps(tiny_model_dir, tmp_path, shard) -> None:
    """The weights published are those of the snapshot's step, though the write ends after another step."""
    from transformers import AutoModelForCausalLM

    trainer = trained(tiny_model_dir, shard)
    root = tmp_path / "ckpt"
    before = {k: full_value(v).clone() for k, v in trainer.model.state_dict().items()}
    snap = take_snapshot(trainer.model, trainer.optimizer, trainer.scheduler, step=1, counters={}, entry_ids=[],
                         trained_ids=[], root=root, state_root=state_of(root))  # fmt: skip
    trainer.train_step(build_batch(hand_groups(trainer.model, seed=5)))
    path, _ = write_checkpoint(root, snap, trainer.model, load_tokenizer(tiny_model_dir), "fp", parent=None,
                               state_root=state_of(root))  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(before[k], loaded[k]) for k in before)
    assert any(not torch.equal(before[k], full_value(v)) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize(
    ("saved", "resumed"), [("auto", "auto"), ("always", "always"), ("always", "auto"), ("auto", "always")]
)
def test_trainer_state_round_trip(tiny_model_dir, tmp_path, saved, resumed) -> None:
    """Saved by a plain or a sharded learner, resumed by either: the same optimizer, scheduler and RNG state,
    and the restored trainer takes exactly the step the original takes next. The proximal anchor is the
    recompute one: the version anchor's kept weights are not checkpointed, and its fallback after a resume is
    another (tested) step, tests/integration/test_proximal_version.py."""
    trainer = trained(tiny_model_dir, saved, proximal="recompute")
    path, _ = publish(trainer, tmp_path / "ckpt", 3, tiny_model_dir)
    state = load_trainer_state(path, state_of(tmp_path / "ckpt"))
    assert (state.step, state.version, state.counters) == (3, 3, {"consumed": 7, "prompt_cursor": 40})
    assert state.entry_ids == ["1-0", "2-0"] and state.trained_ids == ["g0", "g1"]
    assert state.whole_optimizer == (saved == "auto")
    fresh = Trainer(load_model(path), settings_with("recompute", warmup_steps=5, shard=resumed))
    assert is_sharded(fresh.model) == (resumed == "always")
    torch.manual_seed(123)
    restore(fresh.model, fresh.optimizer, fresh.scheduler, state)
    a, b = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert len(a["state"]) == len(b["state"]) > 0
    for i, st in a["state"].items():
        for name, t in st.items():
            assert torch.equal(full_value(t), full_value(b["state"][i][name])), (i, name)
    assert fresh.scheduler.state_dict() == trainer.scheduler.state_dict()
    assert fresh.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    assert torch.equal(torch.get_rng_state(), state.rng["torch_cpu"])
    # the restored trainer takes the same next step as the original
    batch = build_batch(hand_groups(trainer.model, seed=9))
    m1, m2 = trainer.train_step(batch), fresh.train_step(batch)
    assert m1["loss"] == m2["loss"] and m1["grad_norm"] == m2["grad_norm"]
    for (k, v), w in zip(trainer.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(full_value(v), full_value(w)), k


def test_a_whole_optimizer_state_resumes_on_a_sharded_model(tiny_model_dir, tmp_path) -> None:
    """A trainer state whose optimizer state is whole (no format: what the single-process learner wrote, the whole
    optimizer.state_dict() in tensors.safetensors): the sharded learner takes its shard of it."""
    from safetensors.torch import save_file

    from learner.checkpoint import flatten, rng_state

    root = tmp_path / "ckpt"
    path, _ = publish(trained(tiny_model_dir, "always"), root, 1, tiny_model_dir)
    plain = load_model(tiny_model_dir)  # an unsharded model and AdamW after one step, as that learner had
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    torch.manual_seed(5)
    for p in plain.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    d = state_of(root) / path.name
    state = json.loads((d / "state.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    state.pop("format")
    state["optimizer"] = flatten(optimizer.state_dict(), tensors, "optimizer")
    state["rng"] = flatten(rng_state(), tensors, "rng")
    save_file(tensors, str(d / "tensors.safetensors"))
    (d / "state.json").write_text(json.dumps(state))
    shutil.rmtree(d / "optimizer")

    loaded = load_trainer_state(path, state_of(root), verify=False)
    assert loaded.whole_optimizer and loaded.scheduler["last_epoch"] == 1
    fresh = Trainer(load_model(path), settings(warmup_steps=5, shard="always"))
    assert is_sharded(fresh.model)
    restore(fresh.model, fresh.optimizer, fresh.scheduler, loaded)
    want, got = optimizer.state_dict(), fresh.optimizer.state_dict()
    assert got["param_groups"][0]["weight_decay"] == 0.1 and got["param_groups"][0]["lr"] == 1e-2
    assert len(got["state"]) == len(want["state"]) > 0
    for i, st in want["state"].items():
        for name, t in st.items():
            assert torch.equal(full_value(got["state"][i][name]), t), (i, name)


class _Bomb:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_is_never_loaded(tiny_model_dir, tmp_path) -> None:
    trainer = trained(tiny_model_dir)
    root = tmp_path / "ckpt"
    path, _ = publish(trainer, root, 1, tiny_model_dir)
    private = state_of(root) / path.name
    marker = tmp_path / "marker"
    bomb = pickle.dumps(_Bomb(marker))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.pkl"):
        (private / name).write_bytes(bomb)
        (path / name).write_bytes(bomb)
    load_trainer_state(
        earlier_layout(path, private), state_of(root)
    )  # ignores every non-safetensors/json file
    path, _ = publish(trainer, root, 2, tiny_model_dir)
    private = state_of(root) / path.name
    for name in ("optimizer.pt", "trainer_state.pkl"):
        (private / name).write_bytes(bomb)
    load_trainer_state(path, state_of(root))  # the current layout: the same
    (private / "tensors.safetensors").write_bytes(bomb)
    with pytest.raises(
        CheckpointError, match="tensors.safetensors"
    ):  # the private manifest no longer matches
        load_trainer_state(path, state_of(root))
    earlier_layout(path, private)  # the bomb, hashed into the step's manifest
    with pytest.raises(CheckpointError, match="unreadable trainer state"):
        load_trainer_state(path, state_of(root))
    assert not marker.exists()


def test_newest_verified_skips_corrupt_and_prune_keeps_the_newest(tiny_model_dir, tmp_path) -> None:
    trainer = trained(tiny_model_dir)
    root, states = tmp_path / "ckpt", state_of(tmp_path / "ckpt")
    for step in (1, 2, 3, 4):
        publish(trainer, root, step, tiny_model_dir)
    (root / ".tmp-step_00000005").mkdir()
    (states / ".tmp-step_00000005").mkdir()
    assert remove_stale_tmp(root, states) == 2
    next((root / "step_00000004").glob("model*.safetensors")).write_bytes(b"garbage")
    shutil.rmtree(states / "step_00000003")  # a published step without its trainer state is not resumed from
    assert newest_verified(root, states) == root / "step_00000002"
    assert [p.name for p in prune(root, keep=2, state_root=states)] == ["step_00000001", "step_00000002"]
    assert [p.name for p in stable_steps(root)] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in states.iterdir()) == ["step_00000004"]
    assert newest_verified(root, states) is None


def earlier_layout(step_dir: Path, private: Path) -> Path:
    """Turn a published step into the earlier layout: its trainer state in ``trainer_state/``, in its manifest."""
    shutil.copytree(private, step_dir / "trainer_state", ignore=shutil.ignore_patterns(MANIFEST, "STABLE"))
    old = read_manifest(step_dir)[0]
    files = hash_tree(step_dir)
    (step_dir / MANIFEST).write_bytes(
        Manifest(old.step, old.version, old.parent, old.model_fingerprint, files, old.created_at).to_json()
    )
    shutil.rmtree(private)
    return step_dir


def test_a_step_of_the_earlier_layout_resumes(tiny_model_dir, tmp_path) -> None:
    trainer = trained(tiny_model_dir)
    root, states = tmp_path / "ckpt", state_of(tmp_path / "ckpt")
    path, _ = publish(trainer, root, 3, tiny_model_dir)
    want = load_trainer_state(path, states)
    earlier_layout(path, states / path.name)
    assert (
        "trainer_state/tensors.safetensors" in verify_checkpoint(path).files
        and not (states / path.name).exists()
    )
    assert newest_verified(root, states) == path
    got = load_trainer_state(path, states)
    assert (got.step, got.counters, got.entry_ids, got.trained_steps) == (
        want.step, want.counters, want.entry_ids, want.trained_steps
    )  # fmt: skip
    fresh = Trainer(load_model(path), settings(warmup_steps=5))
    restore(fresh.model, fresh.optimizer, fresh.scheduler, got)
    for i, st in trainer.optimizer.state_dict()["state"].items():
        for name, t in st.items():
            assert torch.equal(full_value(t), full_value(fresh.optimizer.state_dict()["state"][i][name])), (
                i,
                name,
            )
    # the next checkpoint is written in the current layout, and pruning removes the earlier one whole
    publish(fresh, root, 4, tiny_model_dir)
    assert (
        not (root / "step_00000004" / "trainer_state").exists()
        and (states / "step_00000004" / "STABLE").exists()
    )
    assert [p.name for p in prune(root, keep=1, state_root=states)] == ["step_00000003"]


def test_a_failed_write_leaves_neither_directory(tiny_model_dir, tmp_path, monkeypatch) -> None:
    trainer = trained(tiny_model_dir)
    root, states = tmp_path / "ckpt", state_of(tmp_path / "ckpt")
    publish(trainer, root, 1, tiny_model_dir)
    monkeypatch.setenv("LEARNER_TEST_FAULT", "enospc_at_publish:2")
    with pytest.raises(OSError, match="No space left"):
        publish(trainer, root, 2, tiny_model_dir)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    assert sorted(p.name for p in states.iterdir()) == ["step_00000001"]
    import learner.checkpoint as ckpt

    def fail_on_publish(tmp, final, *a):  # the private state is STABLE, the published dir fails
        if final.parent == root:
            raise OSError(28, "No space left on device")
        return seal(tmp, final, *a)

    seal = ckpt._seal
    monkeypatch.delenv("LEARNER_TEST_FAULT")
    monkeypatch.setattr(ckpt, "_seal", fail_on_publish)
    with pytest.raises(OSError):
        publish(trainer, root, 2, tiny_model_dir)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    assert sorted(p.name for p in states.iterdir()) == ["step_00000001"]
    assert json.loads((states / "step_00000001" / "state.json").read_text())["step"] == 1
