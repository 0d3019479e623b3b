"""Staleness study: which objective keeps learning per step when samples are K versions old.

Every cell (condition, arm, K, seed) trains the warm-started reference model for a fixed number of steps
in one process, with the project's own engine (``producer.engines.hf.HFEngine``) and trainer
(``learner.trainer.Trainer``) in *lockstep*: the batch of step v is generated with the learner's weights
of version max(0, v − K), so every sample from step K on is exactly K versions stale (the harshest case
the admission bound allows; a live pipeline mixes staleness 0..K). Nothing else differs between arms:
same prompts, same seeds, same batch (B × G), same learning rate unless the arm changes it.

Conditions:
  exact  engine and learner both compute in float32 (identical numbers at K = 0)
  bf16   the engine samples and reports log-probs in bfloat16 while the learner computes in float32:
         the CPU stand-in for a GPU inference engine's kernels (the measured mismatch, mean |log ρ| per
         token at K = 0, is reported beside the condition)

It runs unattended under a time budget, appends each finished cell to one results file (JSON lines),
skips cells already there on restart, and renders the table (mean ± std over seeds) and the plots.

    python -m bench.staleness_study [--budget-min 60] [--steps 300] [--seeds 3] [--ks 0,1,2,4]
                                    [--arms decoupled,shortcut,version] [--conditions exact,bf16]
    python -m bench.staleness_study --render        # table and plots from the results file only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ops.report import rolling_mean

# What every arm starts from: the learning rate and band the arms were defined against (the project's defaults
# before this study chose lr 1.5e-4 and clip_stale_scale 100), so that a change of the defaults never changes
# what an arm measures. The project's current defaults are the arm "version-band100-lr-half".
BASE = {"learner": {"lr": 3e-4}, "loss": {"clip_stale_scale": 0.0}}
# arm -> (settings overrides, description); every arm states its mini-batch count and anchor
ARMS: dict[str, tuple[dict, str]] = {
    "decoupled": (
        {"loss": {"proximal": "recompute"}, "learner": {"n_minibatches": 2}},
        "GSPO, ratio on the learner's weights before the update (recompute), 2 mini-batches",
    ),
    "shortcut": (
        {"loss": {"proximal": "behaviour"}, "learner": {"n_minibatches": 2}},
        "GSPO, ratio on the engine's log-probs (the paper's shortcut), 2 mini-batches",
    ),
    "version": (
        {"loss": {"proximal": "version"}, "learner": {"n_minibatches": 2}},
        "GSPO, ratio on the learner's copy of the generating weights (version), 2 mini-batches",
    ),
    "decoupled-nmb1": (
        {"loss": {"proximal": "recompute"}, "learner": {"n_minibatches": 1}},
        "recompute, 1 mini-batch",
    ),
    "decoupled-nmb4": (
        {"loss": {"proximal": "recompute"}, "learner": {"n_minibatches": 4}},
        "recompute, 4 mini-batches",
    ),
    "version-nmb1": (
        {"loss": {"proximal": "version"}, "learner": {"n_minibatches": 1}},
        "version, 1 mini-batch",
    ),
    "decoupled-band1": (
        {"loss": {"proximal": "recompute", "clip_stale_scale": 1.0}, "learner": {"n_minibatches": 2}},
        "recompute + band widened by (1 + k)",
    ),
    "decoupled-band0.5": (
        {"loss": {"proximal": "recompute", "clip_stale_scale": 0.5}, "learner": {"n_minibatches": 2}},
        "recompute + band widened by (1 + 0.5k)",
    ),
    "decoupled-band2": (
        {"loss": {"proximal": "recompute", "clip_stale_scale": 2.0}, "learner": {"n_minibatches": 2}},
        "recompute + band widened by (1 + 2k)",
    ),
    "decoupled-decay0.8": (
        {"loss": {"proximal": "recompute", "is_cap_decay": 0.8}, "learner": {"n_minibatches": 2}},
        "recompute + IS cap 2·0.8^k",
    ),
    "decoupled-seqis": (
        {"loss": {"proximal": "recompute", "is_level": "sequence"}, "learner": {"n_minibatches": 2}},
        "recompute + behaviour weight from the full sequence likelihood ratio (product over tokens), capped",
    ),
    "decoupled-tis": (
        {"loss": {"proximal": "recompute", "is_level": "token"}, "learner": {"n_minibatches": 2}},
        "recompute + one capped behaviour weight per token (TIS)",
    ),
    "decoupled-decay0.5": (
        {"loss": {"proximal": "recompute", "is_cap_decay": 0.5}, "learner": {"n_minibatches": 2}},
        "recompute + IS cap 2·0.5^k",
    ),
    "decoupled-mask": (
        {"loss": {"proximal": "recompute", "is_mode": "mask"}, "learner": {"n_minibatches": 2}},
        "recompute + sequences with ρ outside [1/2, 2] masked",
    ),
    "decoupled-lr-half": (
        {"loss": {"proximal": "recompute"}, "learner": {"n_minibatches": 2, "lr": 1.5e-4}},
        "recompute, lr 1.5e-4",
    ),
    "version-nmb4": (
        {"loss": {"proximal": "version"}, "learner": {"n_minibatches": 4}},
        "version, 4 mini-batches",
    ),
    "version-lr-half": (
        {"loss": {"proximal": "version"}, "learner": {"n_minibatches": 2, "lr": 1.5e-4}},
        "version, lr 1.5e-4",
    ),
    # the band widened to the drift of one update: a K = 1 sample has moved ~0.09 nats per token (mean
    # |log s| of the study), 300 times the paper's 3e-4, so scales of 0.5-2 leave every stale sequence
    # outside the band; 30 / 100 / 300 put ε(1) at ~0.01 / 0.03 / 0.09
    "version-band30": (
        {"loss": {"proximal": "version", "clip_stale_scale": 30.0}, "learner": {"n_minibatches": 2}},
        "version + band widened by (1 + 30k)",
    ),
    "version-band100": (
        {"loss": {"proximal": "version", "clip_stale_scale": 100.0}, "learner": {"n_minibatches": 2}},
        "version + band widened by (1 + 100k)",
    ),
    "version-band300": (
        {"loss": {"proximal": "version", "clip_stale_scale": 300.0}, "learner": {"n_minibatches": 2}},
        "version + band widened by (1 + 300k)",
    ),
    "version-band100-lr-half": (
        {
            "loss": {"proximal": "version", "clip_stale_scale": 100.0},
            "learner": {"n_minibatches": 2, "lr": 1.5e-4},
        },
        "version + band widened by (1 + 100k), lr 1.5e-4",
    ),
    "shortcut-lr-half": (
        {"loss": {"proximal": "behaviour"}, "learner": {"n_minibatches": 2, "lr": 1.5e-4}},
        "GSPO on the engine's log-probs (the paper's shortcut), lr 1.5e-4",
    ),
    "grpo": (
        {
            "loss": {"variant": "grpo", "proximal": "recompute", "clip_low": 0.2, "clip_high": 0.27},
            "learner": {"n_minibatches": 2},
        },
        "GRPO (token level, 0.2/0.27), recompute, 2 mini-batches",
    ),
}
CONDITIONS = {"exact": "float32", "bf16": "bfloat16"}
# arm -> the arm it computes exactly when every sample is fresh (K = 0): the version anchor of a fresh sample is
# the current weights, as for recompute, and a staleness-widened band is the plain band at k = 0
SAME_AT_K0 = {
    "version": "decoupled",
    "version-band30": "decoupled",
    "version-band100": "decoupled",
    "version-band300": "decoupled",
    "version-band100-lr-half": "version-lr-half",
}
ROLL = 50  # rolling window of the reward curve (steps)
THRESHOLDS = (0.6, 0.8)


def cell_key(cond: str, arm: str, k: int, seed: int) -> str:
    return f"{cond}/{arm}/k{k}/s{seed}"


def steps_to(values: list[float], threshold: float) -> int | None:
    """First step (1-based) whose ROLL-step rolling mean reaches ``threshold`` (a full window needed)."""
    for i, r in enumerate(rolling_mean(values, ROLL)):
        if i + 1 >= ROLL and r >= threshold:
            return i + 1
    return None


def run_cell(model_dir: Path, cond: str, arm: str, k: int, seed: int, steps: int, threads: int) -> dict:
    import torch

    from common.config import Settings
    from common.tasks import addition_reward, addition_rows
    from learner.batching import TrainBatch
    from learner.sharded import full_value
    from learner.trainer import Trainer
    from modeling import load_model
    from producer.engines.base import SamplingParams
    from producer.engines.hf import HFEngine

    torch.set_num_threads(threads)
    overrides, _ = ARMS[arm]
    cfg = {
        "pipeline": {"max_staleness": k},
        "learner": {"seed": seed, **BASE["learner"], **overrides.get("learner", {})},
        "loss": {**BASE["loss"], **overrides.get("loss", {})},
    }
    settings = Settings.model_validate(cfg)
    torch.manual_seed(seed)
    model = load_model(model_dir)
    trainer = Trainer(model, settings, pad_id=int(model.config.pad_token_id or 0))
    engine = HFEngine(model_dir, dtype=CONDITIONS[cond], seed=seed, decode="loop")
    tok = engine.tokenizer
    sp = settings.producer.sampling
    sampling = SamplingParams(temperature=sp.temperature, max_new_tokens=sp.max_new_tokens)
    B, G = settings.pipeline.batch_groups, settings.pipeline.group_size
    stop_ids = set(engine.eos_ids)
    # the trainer shards the model (a process group of one): snapshot plain tensors for the engine
    history = {0: {n: full_value(p.detach()).clone() for n, p in model.named_parameters()}}
    rows = addition_rows(seed=10_000 + seed)
    served = -1
    rewards, trace = [], []
    t0 = time.perf_counter()
    for v in range(steps):
        w = max(0, v - k)
        if w != served:
            engine.model.load_state_dict(history[w], strict=False)
            served = w
        batch_rows = [next(rows) for _ in range(B)]
        prompts = [tok.encode(r.prompt, add_special_tokens=False) for r in batch_rows]
        groups = engine.generate_sync(prompts, G, sampling)
        p_ids, c_ids, behav, rew, trunc = [], [], [], [], []
        for row, prompt, comps in zip(batch_rows, prompts, groups, strict=True):
            for c in comps:
                ids = [int(x) for x in c.token_ids]
                text_ids = ids[:-1] if c.finish_reason == "stop" and ids and ids[-1] in stop_ids else ids
                rew.append(addition_reward(tok.decode(text_ids, skip_special_tokens=False), row.meta))
                p_ids.append(list(prompt))
                c_ids.append(ids)
                behav.append(torch.from_numpy(c.logprobs.astype("float32")))
                trunc.append(c.finish_reason == "length")
        n = len(c_ids)
        batch = TrainBatch(
            prompt_ids=p_ids,
            completion_ids=c_ids,
            behaviour=behav,
            rewards=torch.tensor(rew, dtype=torch.float64),
            temperatures=torch.full((n,), float(sp.temperature), dtype=torch.float64),
            staleness=torch.full((n,), v - w, dtype=torch.int64),
            truncated=torch.tensor(trunc, dtype=torch.bool),
            group_sizes=[G] * B,
        )
        m = trainer.train_step(batch)
        history[v + 1] = {n_: full_value(p.detach()).clone() for n_, p in model.named_parameters()}
        for old in [x for x in history if x < v + 1 - k]:
            del history[old]
        rewards.append(sum(rew) / n)
        trace.append(
            {
                "reward": rewards[-1],
                "clip_frac": m.get("gspo/clip_frac", 0.0),
                "is_ess": m.get("is/ess", 1.0),
                "mismatch": m.get("mismatch/prox_vs_behaviour_abs", 0.0),
                "t": time.perf_counter() - t0,
            }
        )
    tail = rewards[-ROLL:]
    return {
        "key": cell_key(cond, arm, k, seed),
        "condition": cond,
        "arm": arm,
        "K": k,
        "seed": seed,
        "steps": steps,
        "reward_final": sum(tail) / len(tail),
        **{f"steps_to_{t}": steps_to(rewards, t) for t in THRESHOLDS},
        "clip_frac": statistics.fmean(x["clip_frac"] for x in trace),
        "is_ess": statistics.fmean(x["is_ess"] for x in trace),
        "mismatch": statistics.fmean(x["mismatch"] for x in trace),
        "wall_s": time.perf_counter() - t0,
        "rewards": rewards,
        "times": [x["t"] for x in trace],
    }


def load_results(out_dir: Path) -> dict[str, dict]:
    """Every finished cell of ``out_dir``'s results files (one per worker: results.jsonl, results-1.jsonl, ...)."""
    out = {}
    for path in sorted(out_dir.glob("results*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["key"]] = r
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _steps(values: list[int | None], budget: int) -> str:
    """Mean ± std of steps-to-threshold; a seed that never reached it counts as ">budget"."""
    reached = [v for v in values if v is not None]
    if not values:
        return "–"
    miss = len(values) - len(reached)
    if not reached:
        return f"> {budget} (0/{len(values)})"
    s = f"{statistics.fmean(reached):.0f}" + (
        f" ± {statistics.stdev(reached):.0f}" if len(reached) > 1 else ""
    )
    return s + (f" ({len(reached)}/{len(values)} seeds)" if miss else "")


def render(results: dict[str, dict], out: Path) -> str:
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for r in results.values():
        if r["arm"] in SAME_AT_K0 and r["K"] == 0:
            continue  # the same computation as another arm at K = 0 (see main)
        cells.setdefault((r["condition"], r["arm"], r["K"]), []).append(r)
    arms_run = {a for _, a, _ in cells}
    for (cond, arm, k), rs in list(cells.items()):
        if k == 0:
            for same in (a for a, base in SAME_AT_K0.items() if base == arm and a in arms_run):
                cells[(cond, same, 0)] = rs
    # the engine/learner mismatch of a condition: mean |log ρ| at K = 0 under an anchor the learner computes
    # (the behaviour anchor reports 0 by construction)
    measured: dict[str, list[float]] = {}
    for (c, a, k), rs in cells.items():
        if k == 0 and a != "shortcut":
            measured.setdefault(c, []).extend(r["mismatch"] for r in rs)
    mismatch0 = {c: statistics.fmean(v) for c, v in measured.items()}
    lines = []
    for cond in [c for c in CONDITIONS if any(key[0] == c for key in cells)]:
        mm = mismatch0.get(cond)
        lines.append(
            f"\n**{cond}** (engine {CONDITIONS[cond]}, learner float32; mean |log ρ| per token at K = 0: "
            + (f"{mm:.2e})" if mm is not None else "not measured)")
        )
        lines.append("")
        lines.append(
            "| arm | K | seeds | reward, last 50 steps | steps to 0.6 | steps to 0.8 | clip frac | IS ESS | mean abs log ρ |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for arm in ARMS:
            for k in sorted({key[2] for key in cells if key[0] == cond and key[1] == arm}):
                rs = cells[(cond, arm, k)]
                budget = rs[0]["steps"]
                lines.append(
                    f"| {arm} | {k} | {len(rs)} | {_ms([r['reward_final'] for r in rs])} | "
                    f"{_steps([r['steps_to_0.6'] for r in rs], budget)} | {_steps([r['steps_to_0.8'] for r in rs], budget)} | "
                    f"{statistics.fmean(r['clip_frac'] for r in rs):.3f} | {statistics.fmean(r['is_ess'] for r in rs):.3f} | "
                    f"{statistics.fmean(r['mismatch'] for r in rs):.2e} |"
                )
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    _plot(cells, out)
    return text


def _plot(cells: dict[tuple[str, str, int], list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = [c for c in CONDITIONS if any(key[0] == c for key in cells)]
    if not conds:
        return
    fig, axes = plt.subplots(1, len(conds), figsize=(6 * len(conds), 4.2), squeeze=False)
    for ax, cond in zip(axes[0], conds, strict=True):
        for arm in ARMS:
            ks = sorted({key[2] for key in cells if key[0] == cond and key[1] == arm})
            if not ks:
                continue
            means = [statistics.fmean(r["reward_final"] for r in cells[(cond, arm, k)]) for k in ks]
            stds = [
                statistics.stdev([r["reward_final"] for r in cells[(cond, arm, k)]])
                if len(cells[(cond, arm, k)]) > 1
                else 0.0
                for k in ks
            ]
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=arm)
        ax.set_title(f"{cond}: reward (last {ROLL} steps) vs staleness K")
        ax.set_xlabel("K (every sample K versions old)")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_k.png", dpi=110)
    plt.close(fig)
    # reward curves (rolling mean, averaged over seeds) for each K
    ks_all = sorted({key[2] for key in cells})
    fig, axes = plt.subplots(
        len(conds), len(ks_all), figsize=(4.2 * len(ks_all), 3.4 * len(conds)), squeeze=False
    )
    for i, cond in enumerate(conds):
        for j, k in enumerate(ks_all):
            ax = axes[i][j]
            for arm in ARMS:
                rs = cells.get((cond, arm, k))
                if not rs:
                    continue
                n = min(len(r["rewards"]) for r in rs)
                curves = [rolling_mean(r["rewards"][:n], ROLL) for r in rs]
                ax.plot(
                    range(1, n + 1), [statistics.fmean(c[t] for c in curves) for t in range(n)], label=arm
                )
            ax.set_title(f"{cond}, K = {k}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"reward ({ROLL}-step mean)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=60.0, help="stop starting new cells after this")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ks", default="0,1,2,4")
    ap.add_argument("--arms", default="decoupled,shortcut,version")
    ap.add_argument("--conditions", default="exact,bf16")
    ap.add_argument(
        "--cells",
        default="",
        help="explicit cells CONDITION/ARM/kK, comma-separated (instead of the product)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--workers", type=int, default=1, help="cells run in parallel (one process each)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/staleness_study"))
    ap.add_argument("--cache", type=Path, default=Path("bench/results/cache"))
    ap.add_argument("--render", action="store_true", help="only render the table and plots")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    conds = [c for c in args.conditions.split(",") if c]
    for name, chosen, known in (("arm", arms, ARMS), ("condition", conds, CONDITIONS)):
        bad = [x for x in chosen if x not in known]
        if bad:
            raise SystemExit(f"unknown {name}(s) {bad}; choose from {sorted(known)}")
    ks = [int(k) for k in args.ks.split(",")]
    if not args.render:
        from bench.harness import machine, reference_model

        args.cache.mkdir(parents=True, exist_ok=True)
        model = reference_model(args.cache)
        # seeds outermost: an interrupted study still has every cell at about the same number of seeds
        if args.cells:  # explicit cells, in this order, for each seed
            todo = [(*_parse_cell(x), s) for s in range(args.seeds) for x in args.cells.split(",") if x]
        else:
            todo = [(c, a, k, s) for s in range(args.seeds) for c in conds for k in ks for a in arms]
        done = load_results(args.out)
        # at K = 0 the version-anchored arms are the computation of "decoupled" (the anchor of a fresh sample is
        # the current weights either way: tests/integration/test_proximal_version.py; a staleness-widened band
        # is the plain band at k = 0); the table shows that cell once
        todo = [c for c in todo if cell_key(*c) not in done and not (c[1] in SAME_AT_K0 and c[2] == 0)]
        print(f"machine: {machine()}; {len(todo)} cells to run, {len(done)} done", flush=True)
        deadline = time.time() + args.budget_min * 60
        if args.workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            procs = [
                ctx.Process(target=_work, args=(todo[i :: args.workers], i, args, model, deadline))
                for i in range(args.workers)
            ]
            for pr in procs:
                pr.start()
            for pr in procs:
                pr.join()
        else:
            _work(todo, 0, args, model, deadline)
    print(render(load_results(args.out), args.out))
    print(
        f"\nresults: {args.out}/results*.jsonl; plots: {args.out / 'reward_vs_k.png'}, {args.out / 'reward_curves.png'}"
    )


def _parse_cell(text: str) -> tuple[str, str, int]:
    cond, arm, k = text.strip().split("/")
    if cond not in CONDITIONS or arm not in ARMS or not k.startswith("k"):
        raise SystemExit(f"bad cell {text!r}: CONDITION/ARM/kK, e.g. bf16/version/k1")
    return cond, arm, int(k[1:])


def _work(cells: list[tuple[str, str, int, int]], worker: int, args, model: Path, deadline: float) -> None:
    results_file = args.out / ("results.jsonl" if worker == 0 else f"results-{worker}.jsonl")
    for cond, arm, k, seed in cells:
        key = cell_key(cond, arm, k, seed)
        if time.time() > deadline:
            print(f"time budget of {args.budget_min} min spent: stopping before {key}", flush=True)
            return
        r = run_cell(model, cond, arm, k, seed, args.steps, args.threads)
        with results_file.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(
            f"{key}: reward {r['reward_final']:.3f}, steps to 0.6 {r['steps_to_0.6']}, "
            f"to 0.8 {r['steps_to_0.8']}, mismatch {r['mismatch']:.2e}, {r['wall_s']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
