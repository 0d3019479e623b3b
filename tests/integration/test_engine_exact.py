"""learner.reuse_engine_logprobs: with loss.proximal = version, a sample whose engine computed its log-probs
the way the learner does (same transformers numerics) from one weight version takes them as its anchor instead
of the learner's no-grad pass. Checked against the real transformers engine: the training step is the same as
with the pass (to float rounding), the pass is skipped, and an engine with other numerics (bf16) is never
trusted."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.config import Settings
from common.wire import Limits, RolloutGroup, Sample
from learner.batching import build_batch
from learner.trainer import Trainer
from modeling import load_model, numerics_id
from producer.engines.base import SamplingParams
from producer.engines.hf import HFEngine


def _settings(reuse: bool) -> Settings:
    return Settings.model_validate(
        {
            "pipeline": {"max_staleness": 1},
            "loss": {"proximal": "version"},
            "learner": {"n_minibatches": 2, "reuse_engine_logprobs": reuse, "lr": 1e-3},
        }
    )


def _groups(engine: HFEngine, seed: int, n: int = 6, g: int = 4) -> list[RolloutGroup]:
    rng = random.Random(seed)
    tok = engine.tokenizer
    prompts = [
        tok.encode(f"{rng.randrange(100):02d}+{rng.randrange(100):02d}=", add_special_tokens=False)
        for _ in range(n)
    ]
    out = engine.generate_sync(prompts, g, SamplingParams(temperature=1.0, max_new_tokens=6))
    groups = []
    for i, (prompt, comps) in enumerate(zip(prompts, out, strict=True)):
        samples = tuple(
            Sample(
                c.token_ids,
                c.logprobs,
                rng.random(),
                c.finish_reason,
                c.version_start,
                c.version_end,
            )
            for c in comps
        )
        groups.append(
            RolloutGroup(
                f"s{seed}-g{i}", f"p{i}", np.array(prompt, np.int32), "addition", "test", "fp", samples,
                logprob_numerics=engine.numerics,
            )
        )  # fmt: skip
    return groups


def test_numerics_ids_match_between_the_engine_and_the_learner(tiny_model_dir) -> None:
    engine = HFEngine(tiny_model_dir, seed=0)
    trainer = Trainer(load_model(tiny_model_dir), _settings(True))
    assert engine.numerics == trainer.numerics == numerics_id("float32", "sdpa", "cpu")
    assert HFEngine(tiny_model_dir, seed=0, dtype="bfloat16").numerics != trainer.numerics
    assert Trainer(load_model(tiny_model_dir), _settings(False)).numerics is None
    bf16 = _settings(True).model_copy(deep=True)
    bf16.learner.precision = "bf16"
    assert Trainer(load_model(tiny_model_dir), bf16).numerics is None


def test_logprob_numerics_is_optional_on_the_wire() -> None:
    s = Sample(np.array([5, 6], np.int32), np.array([-0.5, -0.25], np.float32), 1.0, "stop", 3, 3)
    g = RolloutGroup("g", "p", np.array([1, 2], np.int32), "t", "prod", "fp", (s,), logprob_numerics="x/y")
    assert RolloutGroup.from_dict(g.to_dict(), Limits()).logprob_numerics == "x/y"
    plain = RolloutGroup("g", "p", np.array([1, 2], np.int32), "t", "prod", "fp", (s,))
    assert (
        "logprob_numerics" not in plain.to_dict()
    )  # a group of an undeclared engine is unchanged on the wire
    assert RolloutGroup.from_dict(plain.to_dict(), Limits()).logprob_numerics == ""


def test_reused_engine_logprobs_give_the_step_of_the_pass(tiny_model_dir) -> None:
    torch.manual_seed(0)
    engine = HFEngine(tiny_model_dir, seed=1)
    a = Trainer(load_model(tiny_model_dir), _settings(True))  # reuses the engine's log-probs
    b = Trainer(load_model(tiny_model_dir), _settings(False))  # recomputes them
    theta0 = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    # step 1: fresh groups of version 0 (the second mini-batch's anchor is version 0 again)
    first = _groups(engine, seed=1)
    batch = build_batch([(x, 0) for x in first], a.numerics)
    assert batch.engine_exact is not None and bool(batch.engine_exact.all())
    ma = a.train_step(batch)
    mb = b.train_step(build_batch([(x, 0) for x in first], b.numerics))
    # rewards are all distinct (no tied group is skipped): the second mini-batch's sequences took the engine's
    assert ma["proximal/from_engine"] == len(batch) - len(batch) // 2
    assert mb["proximal/from_engine"] == 0
    # step 2: groups of version 0 (k = 1: anchor = version 0) and of version 1 (k = 0)
    stale = _groups(engine, seed=2)
    engine.model.load_state_dict({n: p.detach() for n, p in a.model.named_parameters()}, strict=False)
    engine.version = 1
    fresh = _groups(engine, seed=3)
    pairs = [(x, 1) for x in stale] + [(x, 0) for x in fresh]
    ma = a.train_step(build_batch(pairs, a.numerics))
    mb = b.train_step(build_batch(pairs, b.numerics))
    # every stale sample (both mini-batches) and the fresh ones of the second
    n_stale = sum(len(x.samples) for x in stale)
    assert ma["proximal/from_engine"] > n_stale
    assert mb["proximal/from_engine"] == 0 and mb["proximal/missing_version"] == 0
    for key in ("loss", "gspo/clip_frac"):
        if key in ma:
            assert ma[key] == pytest.approx(mb[key], abs=1e-5), key
    # the same update, to float rounding, relative to how far the two steps moved the weights
    moved = sum(float((p.detach() - theta0[n]).norm() ** 2) for n, p in b.model.named_parameters()) ** 0.5
    apart = (
        sum(
            float((pa.detach() - pb.detach()).norm() ** 2)
            for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True)
        )
        ** 0.5
    )
    assert moved > 0
    assert apart <= 1e-3 * moved, (apart, moved)


def test_an_engine_with_other_numerics_is_recomputed(tiny_model_dir) -> None:
    engine = HFEngine(tiny_model_dir, seed=1, dtype="bfloat16")
    a = Trainer(load_model(tiny_model_dir), _settings(True))
    batch = build_batch([(x, 0) for x in _groups(engine, seed=4)], a.numerics)
    assert batch.engine_exact is None
    assert a.train_step(batch)["proximal/from_engine"] == 0


def test_a_sample_of_several_versions_is_recomputed(tiny_model_dir) -> None:
    engine = HFEngine(tiny_model_dir, seed=1)
    a = Trainer(load_model(tiny_model_dir), _settings(True))
    groups = _groups(engine, seed=5, n=2)
    s0 = groups[0].samples[0]
    mixed = Sample(s0.completion_ids, s0.logprobs, s0.reward, s0.finish_reason, 0, 1, ((0, 0, 1), (1, 1, 2)))
    g0 = RolloutGroup(**{**groups[0].__dict__, "samples": (mixed, *groups[0].samples[1:])})
    batch = build_batch([(g0, 0), (groups[1], 0)], a.numerics)
    assert batch.engine_exact is not None
    assert not bool(batch.engine_exact[0]) and bool(batch.engine_exact[1:].all())
