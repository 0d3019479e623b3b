"""The learner on real-model settings: gradient checkpointing that recomputes, bf16 autocast against fp32 (both
on the plain 1-rank model and on one sharded over a group of one), dropout switched off, attention
implementation and hub ids (offline cache only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.hub import ModelLoadError, resolve_model_dir
from learner.batching import build_batch
from learner.logprobs import token_logprobs
from learner.sharded import full_value, is_sharded
from learner.trainer import Trainer, batch_advantages
from modeling import load_model
from tests.integration.test_learner_step import hand_groups, settings


def _counting(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _step_with_grads(trainer: Trainer, batch) -> tuple[dict, dict[str, torch.Tensor]]:
    """One train_step; the gradients AdamW was given (after clipping), by parameter name."""
    grads: dict[str, torch.Tensor] = {}

    def capture(*_):
        grads.update(
            {
                n: full_value(p.grad.detach()).clone()  # a sharded model's gradients: gathered
                for n, p in trainer.model.named_parameters()
                if p.grad is not None
            }
        )

    handle = trainer.optimizer.register_step_pre_hook(capture)
    try:
        return trainer.train_step(batch), grads
    finally:
        handle.remove()


@pytest.mark.parametrize("shard", ["auto", "always"])
def test_gradient_checkpointing_recomputes_each_layer_and_changes_nothing(tiny_model_dir, shard) -> None:
    base = load_model(tiny_model_dir)
    batch = build_batch(hand_groups(base, n_groups=3))
    results = {}
    for gc in (False, True):
        s = settings(gradient_checkpointing=gc, micro_batch_tokens=64, shard=shard)
        # one mini-batch anchored on its own forward: no no-grad pass runs the layers, only forward and backward
        s.loss = s.loss.model_copy(update={"proximal": "recompute"})
        trainer = Trainer(load_model(tiny_model_dir), s)
        assert is_sharded(trainer.model) == (shard == "always")
        # the MLP of each decoder layer runs inside the checkpointed layer: once per forward, again per backward
        calls = [_counting(layer.mlp) for layer in trainer.model.model.layers]
        micro = len(trainer._micro_batches(batch, trainer._computed(batch, batch_advantages(batch)[0])))
        metrics, grads = _step_with_grads(trainer, batch)
        assert not trainer.model.training  # train mode only while the training forwards run
        results[gc] = (metrics, grads, [c[0] for c in calls], micro)
    (m0, g0, calls0, micro), (m1, g1, calls1, micro1) = results[False], results[True]
    assert micro == micro1 >= 2
    assert calls0 == [micro] * len(calls0)  # no recompute without checkpointing
    assert calls1 == [2 * micro] * len(calls1)  # each layer recomputed in the backward
    assert m0["loss"] == pytest.approx(m1["loss"], abs=1e-6)
    for name, g in g0.items():
        assert torch.allclose(g, g1[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("shard", ["auto", "always"])
def test_bf16_autocast_matches_fp32_with_fp32_master_weights(tiny_model_dir, shard) -> None:
    base = load_model(tiny_model_dir)
    batch = build_batch(hand_groups(base, n_groups=4, seed=3))
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(
            load_model(tiny_model_dir),
            settings(precision=precision, n_minibatches=1, grad_clip=1e9, shard=shard),
        )
        assert is_sharded(trainer.model) == (shard == "always")
        metrics, grads = _step_with_grads(trainer, batch)
        runs[precision] = (trainer, metrics, grads)
    (_, m32, g32), (t16, m16, g16) = runs["fp32"], runs["bf16"]
    # master weights, gradients and AdamW moments stay float32
    assert all(p.dtype == torch.float32 for p in t16.model.parameters())
    assert all(g.dtype == torch.float32 for g in g16.values())
    states = [s for st in t16.optimizer.state_dict()["state"].values() for s in st.values() if s.dim() > 0]
    assert states and all(s.dtype == torch.float32 for s in states)
    # bf16 really computed the forward (values differ from fp32) and agrees within bf16's precision
    seqs, temps = batch.sequences(list(range(len(batch)))), batch.temperatures.tolist()
    lp32 = torch.cat(token_logprobs(base, seqs, temps))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp16 = torch.cat(token_logprobs(base, seqs, temps))
    assert lp16.dtype == torch.float32 and not torch.equal(lp16, lp32)
    assert (lp16 - lp32).abs().max() < 0.05
    # one mini-batch: the gradient depends on the forward's precision alone (measured: cosine 1.0000, 0.9 % apart)
    assert m16["loss"] == pytest.approx(m32["loss"], abs=1e-3)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=0.03)
    flat32 = torch.cat([g32[n].flatten() for n in sorted(g32)])
    flat16 = torch.cat([g16[n].flatten() for n in sorted(g32)])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.999
    assert (flat16 - flat32).norm() / flat32.norm() < 0.05


def _with_config(src: Path, dest: Path, **fields) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(fields)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_dropout_is_switched_off_for_training(tiny_model_dir, tmp_path) -> None:
    model_dir = _with_config(tiny_model_dir, tmp_path / "dropout-model", attention_dropout=0.5)
    model = load_model(model_dir)
    assert model.model.layers[0].self_attn.attention_dropout == 0.5
    trainer = Trainer(model, settings())
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in trainer.model.model.layers)
    assert json.loads((model_dir / "config.json").read_text())["attention_dropout"] == 0.5  # config untouched
    batch = build_batch(hand_groups(model, n_groups=1))
    seqs, temps = batch.sequences(list(range(len(batch)))), batch.temperatures.tolist()
    trainer.model.train()
    a, b = (
        torch.cat(token_logprobs(trainer.model, seqs, temps)),
        torch.cat(token_logprobs(trainer.model, seqs, temps)),
    )
    assert torch.equal(a, b)  # deterministic in train mode


def test_attn_implementation_is_configurable(tiny_model_dir) -> None:
    assert load_model(tiny_model_dir, attn_implementation="eager").config._attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match="no_such_attention"):
        load_model(tiny_model_dir, attn_implementation="no_such_attention")


def _fake_hub_cache(cache: Path, repo: str, model_dir: Path) -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, root / "snapshots" / commit)
    return root / "snapshots" / commit


def test_hub_ids_come_from_the_local_cache_only(tiny_model_dir, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub_cache(tmp_path / "hub", "acme/tiny-qwen3", tiny_model_dir)
    assert resolve_model_dir("acme/tiny-qwen3") == snapshot
    assert resolve_model_dir(tiny_model_dir) == tiny_model_dir  # a directory is used as is
    model = load_model("acme/tiny-qwen3")
    want = load_model(tiny_model_dir).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    with pytest.raises(ModelLoadError) as e:
        resolve_model_dir("acme/not-downloaded")
    msg = str(e.value)
    assert "\n" not in msg and "'acme/not-downloaded'" in msg and "local Hugging Face cache" in msg
    assert "never downloaded" in msg
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing" / "dir"))
