"""The sharded learner (FSDP2): what each rank holds, the step time of 2 ranks vs 1 on the same batch, and
what sharding costs one rank (the plain module vs FSDP2 over a group of one).

    python -m bench.fsdp [--hidden 256 --layers 4] [--steps 3] [--ranks 1 2 4] [--pair-steps 8]

Each configuration is a torchrun launch on this machine (gloo, CPU) of this module with ``--worker``: every
rank trains the same reference batch (bench/learner_overhead.py: 32 sequences, ~2.5k tokens) on its share
(the learner's own ``Trainer``), and reports the bytes it holds of parameters, gradients (measured after the
backward, before the optimizer step clears them) and AdamW state, and the wall time of each step.

- memory: per-rank bytes with N = 1, 2, 4 ranks against 1/N of the 1-rank bytes (the target: ≈ 1/N);
- time: the median step of 2 ranks × 1 thread vs 1 rank × 1 thread and 1 rank × 2 threads (the same two
  cores). The ratio is printed as it comes out, a slowdown as plainly as a speed-up. These launches shard
  every model, 1 rank included (``learner.shard = "always"``): they measure the sharded learner.
- 1 rank, plain vs sharded: one process (1 thread) holds two trainers on the same weights, the plain module
  (what a 1-rank learner trains, ``learner.shard = "auto"``) and FSDP2 over a group of one (``"always"``), and
  alternates their steps on the same batch (``--pair-steps`` each, after a warm-up step each), so both see the
  same load; the median and the minimum step of each, and their ratios. The 2-rank step is also given against
  this plain step: what a second rank buys over the learner one rank runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.harness import machine


def _settings(shard: str):
    from common.config import Settings

    s = Settings()
    s.learner = s.learner.model_copy(update={"lr": 1e-5, "micro_batch_tokens": 1024, "shard": shard})
    return s


def worker(model_dir: str, out: str, steps: int, threads: int) -> None:
    from bench.learner_overhead import make_batch
    from learner.distributed import broadcast_batch, init_from_env, shutdown
    from learner.logprobs import packed_logprobs
    from learner.sharded import local_bytes
    from learner.trainer import Trainer
    from modeling import load_model

    torch.set_num_threads(threads)
    world = init_from_env("cpu")
    batch = broadcast_batch(world, make_batch(8, 4, 16) if world.is_main else None)
    torch.manual_seed(0)
    trainer = Trainer(load_model(model_dir), _settings("always"), world)
    # gradients: one backward over this rank's share of the batch, measured before anything clears them
    mine = [i for i in range(len(batch)) if i % world.size == world.rank]
    res = packed_logprobs(trainer.model, batch.sequences(mine), 1.0, with_grad=True)
    sum(lp.sum() for lp in res.logprobs).backward()
    grads = local_bytes(p.grad for p in trainer.params)
    trainer.optimizer.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        torch.distributed.barrier()
        t0 = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - t0)
    held = {
        "parameters": local_bytes(trainer.params),
        "gradients": grads,
        "optimizer": local_bytes(t for st in trainer.optimizer.state.values() for t in st.values()),
        "step_s": times[1:],
    }
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(held))
    shutdown(world)


def pair_worker(model_dir: str, out: str, steps: int) -> None:
    """1 rank: the plain trainer and the one sharded over a group of one, steps alternated on the same batch."""
    from bench.learner_overhead import make_batch
    from learner.distributed import World, shutdown
    from learner.sharded import is_sharded
    from learner.trainer import Trainer
    from modeling import load_model

    torch.set_num_threads(1)
    batch = make_batch(8, 4, 16)
    trainers = {}
    for shard in ("auto", "always"):
        torch.manual_seed(0)
        trainers[shard] = Trainer(load_model(model_dir), _settings(shard))
    assert not is_sharded(trainers["auto"].model) and is_sharded(trainers["always"].model)
    times: dict[str, list[float]] = {shard: [] for shard in trainers}
    for _ in range(steps + 1):  # the first step of each is a warm-up
        for shard, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_step(batch)
            times[shard].append(time.perf_counter() - t0)
    Path(out, "pair.json").write_text(json.dumps({shard: t[1:] for shard, t in times.items()}))
    shutdown(World())  # the group of one the sharded trainer joined


def launch_pair(model_dir: Path, steps: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "bench.fsdp", "--pair", str(model_dir), out, str(steps)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"the 1-rank plain/sharded pair failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out, "pair.json").read_text())


def launch(ranks: int, threads: int, model_dir: Path, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "bench.fsdp", "--worker", str(model_dir), out, str(steps), str(threads)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"torchrun with {ranks} ranks failed:\n{done.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--pair-steps", type=int, default=8, help="steps of each 1-rank trainer, plain and sharded"
    )
    args = ap.parse_args()
    from modeling import build_tiny_model

    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "m", hidden=args.hidden, layers=args.layers,
                                     intermediate=4 * args.hidden, max_positions=512)  # fmt: skip
        n_params = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
        print(
            f"model: hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.2f} M parameters (fp32)\n"
        )
        print("per-rank bytes held (parameters + gradients + AdamW state), largest rank:")
        print(f"{'ranks':>5} {'params MB':>10} {'grads MB':>9} {'adamw MB':>9} {'total MB':>9} {'vs 1 rank':>10} "
              f"{'target 1/N':>10}")  # fmt: skip
        base = None
        runs: dict[tuple[int, int], list[dict]] = {}
        for n in args.ranks:
            runs[(n, 1)] = ranks = launch(n, 1, model_dir, args.steps)
            top = max(ranks, key=lambda r: r["parameters"] + r["gradients"] + r["optimizer"])
            total = top["parameters"] + top["gradients"] + top["optimizer"]
            base = base or total
            print(f"{n:>5} {top['parameters'] / 1e6:>10.2f} {top['gradients'] / 1e6:>9.2f} "
                  f"{top['optimizer'] / 1e6:>9.2f} {total / 1e6:>9.2f} {total / base:>10.3f} {1 / n:>10.3f}")  # fmt: skip
        two = None
        if 2 in args.ranks and 1 in args.ranks:
            runs[(1, 2)] = launch(1, 2, model_dir, args.steps)

            def step_s(key: tuple[int, int]) -> float:  # the slowest rank's median step
                return max(statistics.median(r["step_s"]) for r in runs[key])

            one1, one2, two = step_s((1, 1)), step_s((1, 2)), step_s((2, 1))
            print(f"\nstep time on the same batch (median of {args.steps}, after a warm-up step):")
            print(f"  1 rank  x 1 thread : {one1:.3f} s")
            print(f"  1 rank  x 2 threads: {one2:.3f} s")
            print(f"  2 ranks x 1 thread : {two:.3f} s")
            for label, ref in (("1 rank x 1 thread", one1), ("1 rank x 2 threads", one2)):
                verdict = "faster" if two < ref else "slower"
                print(
                    f"  2 ranks / {label}: {two / ref:.2f} (2 ranks are {verdict} by {abs(1 - two / ref):.0%})"
                )
        pair = launch_pair(model_dir, args.pair_steps)
        plain = (statistics.median(pair["auto"]), min(pair["auto"]))
        shard = (statistics.median(pair["always"]), min(pair["always"]))
        print(f"\n1 rank x 1 thread, the plain module vs sharded over a group of one (one process, steps "
              f"alternated, {args.pair_steps} each after a warm-up step):")  # fmt: skip
        print(f"  plain  : median {plain[0]:.3f} s, min {plain[1]:.3f} s")
        print(f"  sharded: median {shard[0]:.3f} s, min {shard[1]:.3f} s")
        print(f"  sharded / plain: {shard[0] / plain[0]:.2f} (medians), {shard[1] / plain[1]:.2f} (minima)")
        if two is not None:
            verdict = "faster" if two < plain[0] else "slower"
            print(f"  2 ranks x 1 thread / 1 rank plain (medians): {two / plain[0]:.2f} "
                  f"(2 ranks are {verdict} by {abs(1 - two / plain[0]):.0%})")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--pair":
        pair_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
