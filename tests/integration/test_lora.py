"""LoRA (learner.lora, peft): adapters train, producers get merged full weights, a resume restores exactly."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import Settings
from common.manifest import verify_checkpoint
from learner import checkpoint as ckpt
from learner.batching import build_batch
from learner.distributed import World
from learner.lora import LoraError
from learner.service import LearnerError, build_trainer, state_root
from modeling import build_tiny_model, load_model, load_tokenizer
from tests.integration.test_learner_step import hand_groups

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def lora_settings(tmp_path: Path, model_dir: Path, **lora) -> Settings:
    s = Settings()
    s.run_dir = str(tmp_path / "run")
    s.learner = s.learner.model_copy(
        update={
            "model": str(model_dir),
            "lr": 2e-2,
            "n_minibatches": 2,
            "lora": s.learner.lora.model_copy(update={**LORA, **lora}),
        }
    )
    s.loss = s.loss.model_copy(update={"clip_low": 0.2, "clip_high": 0.28})
    return s


def publish(trainer, s: Settings, step: int, model_dir: Path) -> Path:
    snap = ckpt.take_snapshot(
        trainer.model, trainer.optimizer, trainer.scheduler, step=step, counters={"consumed": step},
        entry_ids=[], trained_ids=[f"g{step}"], lora=trainer.lora_meta,
    )  # fmt: skip
    root = Path(s.run_dir) / "checkpoints"
    path, _ = ckpt.write_checkpoint(
        root, snap, trainer.model, load_tokenizer(model_dir), "fp", step - 1, state_root=state_root(s)
    )
    return path


def test_a_lora_step_publishes_base_plus_merged_delta_and_the_engine_loads_it(
    tiny_model_dir, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    from producer.engines.base import SamplingParams
    from producer.engines.hf import HFEngine

    s = lora_settings(tmp_path, tiny_model_dir)
    trainer = build_trainer(s, tiny_model_dir, World())
    base = load_model(tiny_model_dir).state_dict()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    trainer.train_step(build_batch(hand_groups(load_model(tiny_model_dir), n_groups=3)))
    path = publish(trainer, s, 1, tiny_model_dir)

    # producers get a plain model directory: base parameter names, no adapter files, nothing of the trainer
    published = load_file(str(path / "model.safetensors"))
    assert set(verify_checkpoint(path).files) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert not [p.name for p in path.iterdir() if "adapter" in p.name or "trainer" in p.name]
    assert set(published) <= set(base) and not [k for k in published if "lora" in k or "base_layer" in k]
    # the published weights are base + (alpha / r) · B @ A, computed here from the private adapter file
    adapters = load_file(str(state_root(s) / path.name / "adapter.safetensors"))
    changed = 0
    for key, w in published.items():
        module = key.removesuffix(".weight")
        a = adapters.get(f"{module}.lora_A.default.weight")
        want = (
            base[key]
            if a is None
            else base[key] + LORA["alpha"] / LORA["r"] * adapters[f"{module}.lora_B.default.weight"] @ a
        )
        assert torch.allclose(w, want, atol=1e-6, rtol=0), key
        changed += int(a is not None and not torch.equal(w, base[key]))
    assert changed == 3 * len(trainer.model.model.layers)  # every adapted layer moved in one step
    # and they equal peft's own merge (LoraLayer.merge) of a copy of the live model
    reference = copy.deepcopy(trainer.model)
    for m in reference.modules():
        if hasattr(m, "lora_A") and hasattr(m, "merge"):
            m.merge()
    by_peft = {
        k.replace(".base_layer.", "."): v for k, v in reference.state_dict().items() if "lora_" not in k
    }
    for key, w in published.items():
        assert torch.allclose(w, by_peft[key], atol=1e-6), key

    # what SGLang's /update_weights_from_disk and transformers read: a complete model dir with the merged weights
    loaded = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, published.get(k, base[k])), k
    # the transformers engine starts from the base and loads the published step in place
    engine = HFEngine(tiny_model_dir, seed=1)
    engine.load_weights_sync(path, 1)
    live = engine.model.state_dict()
    assert engine.version == 1 and all(torch.equal(live[k], v) for k, v in published.items())
    out = engine.generate_sync([[5, 6, 7]], 2, SamplingParams(temperature=1.0, max_new_tokens=4))
    assert len(out[0]) == 2 and all(c.version_start == 1 for c in out[0])


def _same_optimizer(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        for name, t in st.items():
            assert torch.equal(t, sb["state"][i][name]), (i, name)


def test_a_lora_run_resumes_adapters_and_optimizer_exactly(tiny_model_dir, tmp_path) -> None:
    s = lora_settings(tmp_path, tiny_model_dir)
    ref_model = load_model(tiny_model_dir)
    # fresh groups (staleness 0): every proximal anchor is then the resumed weights themselves (loss.proximal =
    # "version" holds no copies of versions before a resume, and falls back to the current weights for them)
    batches = [build_batch([(g, 0) for g, _ in hand_groups(ref_model, n_groups=3, seed=k)]) for k in range(3)]
    trainer = build_trainer(s, tiny_model_dir, World())
    trainer.train_step(batches[0])
    path = publish(trainer, s, 1, tiny_model_dir)
    private = state_root(s) / path.name
    assert {"adapter.safetensors", "adapter.json"} <= set(verify_checkpoint(private).files)
    meta = json.loads((private / "adapter.json").read_text())
    assert (
        meta["spec"]["r"] == 4
        and meta["base_model"] == str(tiny_model_dir)
        and len(meta["base_sha256"]) == 64
    )
    for b in batches[1:]:
        trainer.train_step(b)

    state = ckpt.load_trainer_state(path, state_root(s))
    resumed = build_trainer(s, path, World(), state)
    assert resumed.scheduler.state_dict() == state.scheduler
    for b in batches[1:]:
        resumed.train_step(b)
    _same_optimizer(trainer.optimizer, resumed.optimizer)
    live, again = trainer.model.state_dict(), resumed.model.state_dict()
    assert live.keys() == again.keys()
    for k, v in live.items():
        assert torch.equal(v, again[k]), k


def test_lora_resume_refuses_another_configuration_or_base(tiny_model_dir, tmp_path) -> None:
    s = lora_settings(tmp_path, tiny_model_dir)
    trainer = build_trainer(s, tiny_model_dir, World())
    trainer.train_step(build_batch(hand_groups(load_model(tiny_model_dir), n_groups=2)))
    path = publish(trainer, s, 1, tiny_model_dir)
    state = ckpt.load_trainer_state(path, state_root(s))

    with pytest.raises(
        LoraError, match=r"trained with learner.lora = .*'r': 4.*the config says .*'r': 8"
    ) as e:
        build_trainer(lora_settings(tmp_path, tiny_model_dir, r=8), path, World(), state)
    assert "\n" not in str(e.value)
    other = build_tiny_model(tmp_path / "other-base", seed=1)
    with pytest.raises(LoraError, match="is not the one these adapters were trained on") as e:
        build_trainer(lora_settings(tmp_path, other), path, World(), state)
    assert "\n" not in str(e.value)
    full = lora_settings(tmp_path, tiny_model_dir, r=0)
    with pytest.raises(LearnerError, match="has LoRA adapters .* but learner.lora.r = 0"):
        build_trainer(full, path, World(), state)
    no_base = lora_settings(tmp_path, tiny_model_dir)
    no_base.learner = no_base.learner.model_copy(update={"model": ""})
    with pytest.raises(LearnerError, match="learner.lora needs learner.model"):
        build_trainer(no_base, path, World(), state)
    with pytest.raises(LoraError, match=r"learner.lora: .*nope_proj.* not found") as e:
        build_trainer(
            lora_settings(tmp_path, tiny_model_dir, target_modules=["nope_proj"]), tiny_model_dir, World()
        )
    assert "\n" not in str(e.value)


def test_without_peft_lora_says_how_to_install_it(tiny_model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(LoraError, match=r"needs peft: pip install 'gspo-pipeline\[lora\]'") as e:
        build_trainer(lora_settings(tmp_path, tiny_model_dir), tiny_model_dir, World())
    assert "\n" not in str(e.value)


@pytest.mark.redis
async def test_a_lora_learner_publishes_for_producers_and_resumes(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
) -> None:
    from common.fingerprint import model_fingerprint
    from common.keys import RunKeys
    from common.wire import CheckpointAnnouncement, decode, encode
    from learner.service import main
    from producer.engines.hf import HFEngine
    from producer.weights import verify_announcement
    from tests.integration.test_learner_service import (
        learner_settings,
        make_groups,
        read_metrics,
        run_learner,
    )

    keys = RunKeys(run_id)
    for g in make_groups(tiny_model_dir, 8):
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    lora = {**LORA, "r": 2}
    s = learner_settings(run_id, redis_url, tmp_path / "run", tiny_model_dir, max_staleness=5, max_steps=2,
                         lora=lora, gradient_checkpointing=True, precision="bf16")  # fmt: skip
    assert await run_learner(main, s) == 0
    latest = decode(await aredis.get(keys.latest), expect=CheckpointAnnouncement)
    assert latest.step == 2
    # a producer verifies the announced step (its files only) and its engine loads the merged weights
    checked = verify_announcement(latest, model_fingerprint(tiny_model_dir))
    engine = HFEngine(tiny_model_dir, seed=0)
    engine.load_weights_sync(checked.path, checked.version)
    base = load_model(tiny_model_dir).state_dict()
    moved = [k for k, v in engine.model.state_dict().items() if not torch.equal(v, base[k])]
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in moved)
    assert (tmp_path / "run" / "learner-state" / "step_00000002" / "adapter.safetensors").exists()

    s4 = learner_settings(run_id, redis_url, tmp_path / "run", tiny_model_dir, max_staleness=5, max_steps=4,
                          lora=lora, gradient_checkpointing=True, precision="bf16")  # fmt: skip
    assert await run_learner(main, s4, resume=True) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert decode(await aredis.get(keys.latest), expect=CheckpointAnnouncement).step == 4
    # the same run with another adapter configuration is refused in one line (exit 2)
    s6 = learner_settings(run_id, redis_url, tmp_path / "run", tiny_model_dir, max_staleness=5, max_steps=6,
                          lora={**lora, "r": 4})  # fmt: skip
    assert await run_learner(main, s6, resume=True) == 2


def test_lora_with_the_version_anchor_keeps_only_adapter_copies(tiny_model_dir, tmp_path) -> None:
    """loss.proximal = "version" keeps the trained parameters of past versions: with LoRA, the adapters alone
    (the base is the same in every version). Version 0's adapters are the base model's exact numbers (B = 0), so
    anchoring on them equals anchoring on behaviour log-probs the base model computed."""
    from tests.integration.test_proximal_version import _stale_batch

    base = load_model(tiny_model_dir)
    fresh, stale = _stale_batch(base, 0, seed=1), _stale_batch(base, 1, seed=2)
    runs = {}
    for proximal in ("version", "behaviour"):
        s = lora_settings(tmp_path, tiny_model_dir)
        s.loss = s.loss.model_copy(update={"proximal": proximal, "clip_low": 3e-4, "clip_high": 4e-4})
        torch.manual_seed(0)  # the adapters' A is drawn at random (the learner seeds with learner.seed)
        trainer = build_trainer(s, tiny_model_dir, World())
        metrics = [trainer.train_step(b) for b in (fresh, stale)]
        runs[proximal] = (trainer, metrics)
    tv, mv = runs["version"]
    tb, mb = runs["behaviour"]
    assert sorted(tv._snapshots) == [0, 1] and mv[1]["proximal/missing_version"] == 0
    trainable = {n for n, p in tv.model.named_parameters() if p.requires_grad}
    assert all(set(w) == trainable for w in tv._snapshots.values())
    assert abs(mv[1]["gspo/clip_frac"] - mb[1]["gspo/clip_frac"]) < 1e-9
    live_b = dict(tb.model.named_parameters())
    for n, p in tv.model.named_parameters():
        torch.testing.assert_close(p, live_b[n], atol=2e-5, rtol=0)
