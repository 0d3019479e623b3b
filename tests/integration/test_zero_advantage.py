"""Sequences the step need not compute: tied groups (advantage exactly 0) are skipped with the same loss,
gradients and weights; truncated completions follow learner.truncated (score, zero or mask)."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from common.wire import RolloutGroup, Sample
from learner.batching import build_batch
from learner.sharded import full_value
from learner.trainer import Trainer
from modeling import load_model
from tests.integration.test_learner_step import one_by_one, settings

# the tests wrap optimizer.step to read the gradients it sees
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def mixed_groups(
    model, n_groups: int = 4, group_size: int = 4, seed: int = 1
) -> list[tuple[RolloutGroup, int]]:
    """Half the groups tied (all rewards equal: A = 0), half with a spread; behaviour = recompute + noise."""
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(4, 40) for _ in range(rng.randint(3, 7))]
        tied = g % 2 == 0
        samples = []
        for j in range(group_size):
            comp = [rng.randrange(4, 40) for _ in range(rng.randint(1, 9))]
            lp = one_by_one(model, prompt, comp, 0.9).numpy()
            lp = np.minimum(lp + 0.05 * np.array([rng.uniform(-1, 1) for _ in comp], np.float32), 0.0)
            reward = 1.0 if tied else float(j % 2)
            samples.append(Sample(np.array(comp, np.int32), lp.astype(np.float32), reward, "stop", 0, 0))
        grp = RolloutGroup(
            f"g{g}",
            f"p{g}",
            np.array(prompt, np.int32),
            "addition",
            "test",
            "fp",
            tuple(samples),
            temperature=0.9,
        )
        out.append((grp, g % 2))
    return out


def step(model, batch, skip: bool, **learner):
    trainer = Trainer(model, settings(skip_zero_advantage=skip, **learner))
    grads: dict[str, torch.Tensor] = {}
    real_step = trainer.optimizer.step

    def capture(*a, **k):  # the gradients AdamW sees at its first step (later ones start from other weights)
        if not grads:
            grads.update(
                {
                    n: full_value(p.grad.detach()).clone()
                    for n, p in model.named_parameters()
                    if p.grad is not None
                }
            )
        return real_step(*a, **k)

    trainer.optimizer.step = capture
    metrics = trainer.train_step(batch)
    return metrics, grads, {n: full_value(p.detach()).clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_minibatches", [1, 2])
def test_skipping_zero_advantage_sequences_gives_the_same_step(tiny_model_dir, n_minibatches: int) -> None:
    torch.manual_seed(0)
    base = load_model(tiny_model_dir)
    batch = build_batch(mixed_groups(base))
    m_full, g_full, w_full = step(copy.deepcopy(base), batch, skip=False, n_minibatches=n_minibatches)
    m_skip, g_skip, w_skip = step(copy.deepcopy(base), batch, skip=True, n_minibatches=n_minibatches)

    assert m_full["sequences/skipped_zero_adv"] == 0
    assert m_skip["sequences/skipped_zero_adv"] == 8  # two tied groups of 4
    assert m_skip["frac_zero_std"] == m_full["frac_zero_std"] == 0.5
    assert m_skip["loss"] == pytest.approx(m_full["loss"], abs=1e-6)
    assert m_skip["tokens/real"] == m_full["tokens/real"]
    assert g_full.keys() == g_skip.keys() and g_full
    for name in g_full:
        torch.testing.assert_close(g_skip[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)
    # the rows are packed differently, so gradients differ by float rounding (~1e-9); Adam divides by
    # |g| + 1e-8, which can turn that into a visible change of elements whose gradient is ~1e-8: compare the
    # updates as a whole (their difference is a tiny fraction of the step)
    w0 = dict(base.named_parameters())
    for name in w_full:
        update = (w_full[name] - w0[name].detach()).norm()
        assert update > 0 or name.endswith("norm.weight"), name
        assert (w_skip[name] - w_full[name]).norm() <= 1e-2 * update + 1e-9, name


def test_an_all_tied_batch_still_steps_adamw_like_zero_gradients(tiny_model_dir) -> None:
    """Nothing to compute: the optimizer still steps (weight decay) exactly as with computed zero gradients."""
    torch.manual_seed(0)
    base = load_model(tiny_model_dir)
    groups = [(g, k) for g, k in mixed_groups(base) if all(s.reward == 1.0 for s in g.samples)]
    batch = build_batch(groups)
    _, g_full, w_full = step(copy.deepcopy(base), batch, skip=False, weight_decay=0.1)
    m_skip, g_skip, w_skip = step(copy.deepcopy(base), batch, skip=True, weight_decay=0.1)
    assert m_skip["sequences/skipped_zero_adv"] == len(batch)
    for name in w_full:
        assert torch.count_nonzero(g_full[name]) == 0 and torch.count_nonzero(g_skip[name]) == 0
        torch.testing.assert_close(w_skip[name], w_full[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- learner.truncated
def with_truncation(groups, truncated: set[tuple[int, int]]):
    """The same groups with the (group, sample) pairs in ``truncated`` marked finish_reason 'length'."""
    out = []
    for gi, (g, k) in enumerate(groups):
        samples = tuple(
            replace(s, finish_reason="length") if (gi, si) in truncated else s
            for si, s in enumerate(g.samples)
        )
        out.append((replace(g, samples=samples), k))
    return out


def test_truncated_mask_drops_those_sequences_from_the_loss_and_its_denominator(tiny_model_dir) -> None:
    torch.manual_seed(0)
    base = load_model(tiny_model_dir)
    groups = mixed_groups(base)
    cut = {(1, 0), (3, 1)}  # one sample in each untied group
    masked = build_batch(with_truncation(groups, cut))
    m_mask, g_mask, _ = step(copy.deepcopy(base), masked, skip=True, truncated="mask")
    # the reference: the same batch with those completions emptied (an empty completion is outside the loss),
    # advantages computed from the unchanged rewards
    ref_batch = build_batch(groups)
    flat = [gi * 4 + si for gi, si in sorted(cut)]
    for i in flat:
        ref_batch.completion_ids[i] = []
        ref_batch.behaviour[i] = ref_batch.behaviour[i][:0]
    m_ref, g_ref, _ = step(copy.deepcopy(base), ref_batch, skip=True)
    assert m_mask["sequences/masked_truncated"] == 2
    assert m_mask["loss"] == pytest.approx(m_ref["loss"], abs=1e-7)
    for name in g_ref:
        torch.testing.assert_close(g_mask[name], g_ref[name], rtol=1e-5, atol=1e-8, msg=name)
    m_score, _, _ = step(copy.deepcopy(base), masked, skip=True, truncated="score")
    assert m_score["sequences/masked_truncated"] == 0 and m_score["loss"] != pytest.approx(m_mask["loss"])


def test_truncated_zero_sets_their_reward_to_0_before_the_advantages(tiny_model_dir) -> None:
    torch.manual_seed(0)
    base = load_model(tiny_model_dir)
    groups = mixed_groups(base)
    cut = {(0, 0), (0, 1)}  # a tied group (all 1.0) that two truncations untie
    m_zero, g_zero, _ = step(
        copy.deepcopy(base), build_batch(with_truncation(groups, cut)), skip=True, truncated="zero"
    )
    rewritten = []
    for gi, (g, k) in enumerate(groups):
        samples = tuple(replace(s, reward=0.0) if (gi, si) in cut else s for si, s in enumerate(g.samples))
        rewritten.append((replace(g, samples=samples), k))
    m_ref, g_ref, _ = step(copy.deepcopy(base), build_batch(rewritten), skip=True)
    assert m_zero["frac_zero_std"] == m_ref["frac_zero_std"] == 0.25
    assert m_zero["loss"] == pytest.approx(m_ref["loss"], abs=1e-7)
    for name in g_ref:
        torch.testing.assert_close(g_zero[name], g_ref[name], rtol=1e-5, atol=1e-8, msg=name)
