"""Async vs sync: the same task, model and compute (1 producer + 1 learner process), with
``max_staleness=0`` (generation and training alternate) vs ``max_staleness>=1`` (they overlap).

Prints wall time per learner step for each, the speed-up ratio (ideal with balanced generation and
training: 2x), and reward reached vs wall-clock; writes an overlay plot (x = seconds).

    python -m bench.async_vs_sync [--steps 60] [--out bench/results/async_vs_sync]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.harness import machine, reference_model, run_pipeline
from common.redis_conn import RedisServer
from ops.report import plot_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--async-k", type=int, default=1)
    ap.add_argument(
        "--learner-threads", type=int, default=None, help="default: gspo up's rule (ops/threads.py)"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/async_vs_sync"))
    ap.add_argument("--cache", type=Path, default=Path("bench/results/cache"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    model = reference_model(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        try:
            results = [
                run_pipeline(
                    "sync-k0",
                    args.out,
                    redis,
                    model,
                    steps=args.steps,
                    max_staleness=0,
                    learner_threads=args.learner_threads,
                ),
                run_pipeline(
                    f"async-k{args.async_k}",
                    args.out,
                    redis,
                    model,
                    steps=args.steps,
                    max_staleness=args.async_k,
                    learner_threads=args.learner_threads,
                ),
            ]
        finally:
            redis.stop()
    sync, asyn = results
    # steady state: learner clock from its first to its last step (process start-up excluded)
    per_step = {
        r.name: (r.rows[-1]["time/elapsed_s"] - r.rows[0]["time/elapsed_s"]) / (len(r.rows) - 1)
        for r in results
    }
    from ops.threads import thread_plan

    plan = thread_plan(1, learner_threads=args.learner_threads)
    print(
        f"machine: {machine()}; {args.steps} steps each; 1 producer + 1 learner process; threads: {plan.describe()}"
    )
    for r in results:
        print(
            f"{r.name:10s} wall {r.wall_s:7.1f} s  {per_step[r.name]:.3f} s/step  "
            f"reward first 10 steps {r.avg_head('reward/mean', 10):.3f}, last 10 {r.avg('reward/mean', 10):.3f}  "
            f"staleness {r.avg('staleness/mean'):.2f}"
        )
    ratio = per_step[sync.name] / per_step[asyn.name]
    print(f"speed-up async/sync (wall per step): {ratio:.2f}x  (ideal with balanced generation/training: 2x)")
    plot = plot_runs(
        [args.out / r.name for r in results], args.out / "reward_vs_wall.png", x_key="time/elapsed_s"
    )
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "steps": args.steps,
                "s_per_step": per_step,
                "speedup": ratio,
                "reward_last10": {r.name: r.avg("reward/mean", 10) for r in results},
            },
            indent=2,
        )
    )
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
