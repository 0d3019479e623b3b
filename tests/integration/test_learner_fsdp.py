"""The sharded learner under torchrun (gloo, CPU): 2 ranks take exactly the 1-rank steps on the same batch
(same loss and metrics, updated weights within 1e-5), each rank holding half of the parameters and AdamW state;
gradient checkpointing changes nothing. One rank trains the plain module (``learner.shard = "auto"``), and
the same rank sharded over a group of one (``learner.shard = "always"``) takes the same steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def torchrun_step(ranks: int, model_dir: Path, out: Path, *settings: str, steps: int | None = None) -> dict:
    """``tests/support/fsdp_step.py`` on ``ranks`` ranks: the last step's metrics (its other files are in ``out``)."""
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "tests.support.fsdp_step", str(model_dir), str(out), str(steps or STEPS), *settings]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


# lr 1e-4: Adam's first update is lr·g/(|g|+eps), so for gradient entries near eps the summation order
# (ranks vs one process) moves the update by a fraction of lr; 1e-4 keeps that below the 1e-5 bar.
# micro_batch_tokens 64 and two mini-batches: several micro-batches, a proximal pass, ranks with unequal counts.
# Two steps: the second anchors its samples of staleness 1 on the weights of version 0 (swapped into the shards).
SETTINGS = ("lr=0.0001", "micro_batch_tokens=64", "n_minibatches=2")
STEPS = 2


def sharded_ranks(out: Path) -> list[bool]:
    """Whether each rank of a ``torchrun_step`` trained a sharded model."""
    return [json.loads(p.read_text())["sharded"] for p in sorted(out.glob("rank*_bytes.json"))]


def test_two_ranks_take_the_one_rank_step(tiny_model_dir, tmp_path) -> None:
    want = torchrun_step(1, tiny_model_dir, tmp_path / "one", *SETTINGS)  # the plain module
    want_weights = load_file(str(tmp_path / "one" / "weights.safetensors"))
    assert want["gspo/sequences"] == 12 and want["grad_norm"] > 0
    assert (
        want["proximal/missing_version"] == 4
    )  # staleness 2 (4 samples): version -1 is not held; staleness 1 is
    assert sharded_ranks(tmp_path / "one") == [False]
    for name, ranks, extra in (
        ("one-sharded", 1, ("shard=always",)),  # FSDP2 over a group of one: the plain steps
        ("two", 2, ()),
        ("two-checkpointed", 2, ("gradient_checkpointing=true",)),
    ):
        got = torchrun_step(ranks, tiny_model_dir, tmp_path / name, *SETTINGS, *extra)
        assert sharded_ranks(tmp_path / name) == [True] * ranks, name
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), name
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), name
        for key in (
            "gspo/sequences",
            "gspo/clip_frac",
            "is/weight_mean",
            "gspo/seq_ratio_min",
            "tokens/real",
            "proximal/missing_version",
        ):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (name, key)
        got_weights = load_file(str(tmp_path / name / "weights.safetensors"))
        assert set(got_weights) == set(want_weights)
        assert max((got_weights[k] - v).abs().max().item() for k, v in want_weights.items()) <= 1e-5, name
        assert any((got_weights[k] - v).abs().max().item() > 0 for k, v in load_file(
            str(tiny_model_dir / "model.safetensors")).items() if k in got_weights), "the step changed nothing"  # fmt: skip
    one = json.loads((tmp_path / "one" / "rank0_bytes.json").read_text())
    one_sharded = json.loads((tmp_path / "one-sharded" / "rank0_bytes.json").read_text())
    halves = [json.loads((tmp_path / "two" / f"rank{r}_bytes.json").read_text()) for r in (0, 1)]
    for kind in ("parameters", "optimizer"):
        assert one_sharded[kind] == one[kind], kind  # a shard of everything
        assert sum(h[kind] for h in halves) == pytest.approx(one[kind], rel=0.01), kind
        assert max(h[kind] for h in halves) <= 0.55 * one[kind], kind


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only hosts refuse it")
def test_cpu_offload_on_a_cpu_only_host_is_one_clear_error(tiny_model_dir) -> None:
    from learner.sharded import ShardingError
    from learner.trainer import Trainer
    from modeling import load_model
    from tests.integration.test_learner_step import settings

    with pytest.raises(ShardingError, match=r"^learner.cpu_offload needs a GPU"):
        Trainer(load_model(tiny_model_dir), settings(cpu_offload=True))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_a_run_resumes_across_sharded_and_plain_learners(tiny_model_dir, tmp_path) -> None:
    """2 ranks (sharded optimizer state) → 1 plain rank (whole optimizer state) → 2 ranks, one checkpoint
    each, against one plain rank that never stopped: every resumed step is the uninterrupted step (weights
    and AdamW state within 1e-5), every published step loads with transformers. The proximal anchor is the
    recompute one: the version anchor's kept weights are not checkpointed (after a resume its first K steps fall
    back to the weights before the update, a different step by design)."""
    from transformers import AutoModelForCausalLM

    from common.manifest import verify_checkpoint

    run = (*SETTINGS, "loss.proximal=recompute")
    want = torchrun_step(1, tiny_model_dir, tmp_path / "uninterrupted", *run, steps=4)
    root = tmp_path / "ckpt"
    torchrun_step(2, tiny_model_dir, tmp_path / "a", *run, f"save={root}", steps=2)
    torchrun_step(1, tiny_model_dir, tmp_path / "b", *run, f"resume={root / 'step_00000002'}", f"save={root}",
                  steps=1)  # fmt: skip
    got = torchrun_step(2, tiny_model_dir, tmp_path / "c", *run, f"resume={root / 'step_00000003'}", steps=1)
    assert sharded_ranks(tmp_path / "b") == [False] and sharded_ranks(tmp_path / "c") == [True, True]
    # the sharded run's layout (consolidated weights, the optimizer state as DCP shards), then the plain one's
    # (save_pretrained weights, the whole optimizer state in tensors.safetensors)
    states = tmp_path / "ckpt-state"
    assert (root / "step_00000002" / "model.safetensors.index.json").exists()
    assert [p.name for p in (states / "step_00000002" / "optimizer").iterdir()]
    assert (root / "step_00000003" / "model.safetensors").exists()
    assert not (states / "step_00000003" / "optimizer").exists()
    for step, out in ((2, "a"), (3, "b")):
        path = root / f"step_{step:08d}"
        verify_checkpoint(path)
        verify_checkpoint(states / path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
        weights = load_file(str(tmp_path / out / "weights.safetensors"))
        assert all(torch.equal(loaded[k], v) for k, v in weights.items()), out
    for step, out in ((2, "a"), (3, "b"), (4, "c")):
        name = f"weights-{step}.safetensors"
        diff = _max_diff(
            load_file(str(tmp_path / out / name)), load_file(str(tmp_path / "uninterrupted" / name))
        )
        assert diff <= 1e-5, (out, diff)
    assert _max_diff(load_file(str(tmp_path / "c" / "optimizer.safetensors")),
                     load_file(str(tmp_path / "uninterrupted" / "optimizer.safetensors"))) <= 1e-5  # fmt: skip
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert got["gspo/sequences"] == want["gspo/sequences"]
