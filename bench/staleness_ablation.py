"""Staleness ablation: reward after a fixed number of steps, and clip/IS metrics, for
decoupled GSPO (ratio on the recomputed proximal policy) vs GSPO anchored on the engine's log-probs
(``old = behaviour``) vs GRPO, at max_staleness 0, 1, 2, 4.

Staleness is produced for real: several producers run ahead of the learner up to the admission bound.

    python -m bench.staleness_ablation [--steps 40] [--ks 0,1,2,4] [--producers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.harness import machine, reference_model, run_pipeline
from common.redis_conn import RedisServer
from ops.report import plot_runs

# (learner flags, environment): every arm states its mini-batch count, so changing a default does not
# silently change an arm
ARMS = {
    "gspo-decoupled": (("--variant", "gspo", "--proximal", "recompute"), {"GSPO_LEARNER__N_MINIBATCHES": "1"}),
    "gspo-decoupled-nmb2": (("--variant", "gspo", "--proximal", "recompute"), {"GSPO_LEARNER__N_MINIBATCHES": "2"}),
    "gspo-behaviour": (("--variant", "gspo", "--proximal", "behaviour"), {"GSPO_LEARNER__N_MINIBATCHES": "1"}),
    "grpo": (("--variant", "grpo", "--proximal", "recompute"),
             {"GSPO_LEARNER__N_MINIBATCHES": "1", "GSPO_LOSS__CLIP_LOW": "0.2", "GSPO_LOSS__CLIP_HIGH": "0.27"}),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ks", default="0,1,2,4")
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--arms", default="", help="comma-separated subset of: " + ", ".join(ARMS))
    ap.add_argument("--out", type=Path, default=Path("bench/results/staleness"))
    ap.add_argument("--cache", type=Path, default=Path("bench/results/cache"))
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    only = set(filter(None, args.arms.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    model = reference_model(args.cache)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        try:
            for k in ks:
                for arm, (flags, env) in ARMS.items():
                    if only and arm not in only:
                        continue
                    saved = dict(os.environ)
                    os.environ.update(env)
                    try:
                        r = run_pipeline(
                            f"{arm}-k{k}",
                            args.out,
                            redis,
                            model,
                            steps=args.steps,
                            max_staleness=k,
                            producers=args.producers,
                            learner_args=flags,
                        )
                    finally:
                        os.environ.clear()
                        os.environ.update(saved)
                    table.append(
                        {
                            "arm": arm,
                            "K": k,
                            "reward_last20": r.avg("reward/mean", 20),
                            "clip_frac": r.avg("gspo/clip_frac"),
                            "is_ess": r.avg("is/ess"),
                            "staleness_mean": r.avg("staleness/mean"),
                            "mismatch": r.avg("mismatch/prox_vs_behaviour_abs"),
                            "wall_s": r.wall_s,
                        }
                    )
                    print(json.dumps(table[-1]), flush=True)
        finally:
            redis.stop()
    print(f"\nmachine: {machine()}; {args.steps} steps per run; {args.producers} producers + 1 learner")
    print("| arm | K | reward (last 20 steps) | clip frac | IS ESS | staleness mean | mean abs log rho |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(
            f"| {t['arm']} | {t['K']} | {t['reward_last20']:.3f} | {t['clip_frac']:.3f} | {t['is_ess']:.3f} | "
            f"{t['staleness_mean']:.2f} | {t['mismatch']:.4f} |"
        )
    (args.out / "table.json").write_text(json.dumps({"machine": machine(), "rows": table}, indent=2))
    for k in ks:
        arms = [a for a in ARMS if (args.out / f"{a}-k{k}" / "metrics.jsonl").exists()]
        plot_runs([args.out / f"{a}-k{k}" for a in arms], args.out / f"k{k}.png", labels=arms)


if __name__ == "__main__":
    main()
