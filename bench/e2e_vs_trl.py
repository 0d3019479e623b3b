"""End to end: the real pipeline (learner + producer processes over Redis, as ``gspo up`` runs them) vs
TRL's GRPOTrainer configured as GSPO, same model, task, batch geometry and wall-clock budget, CPU.

    python -m bench.e2e_vs_trl [--minutes 5] [--out bench/results/e2e_vs_trl]
                               [--trl-python bench/.trl-venv/bin/python] [--threads 2] [--producers 1]
    python -m bench.e2e_vs_trl --analyse-only [--out DIR]    # recompute the summary from a previous run

Both sides start from the same warm-started reference model (``bench.harness.reference_model``) and run
one after the other (ours first), each for ``--minutes`` of wall clock counted from the launch of its
processes (start-up, imports and model loading included):

* ours: Redis + ``gspo learner`` + ``--producers`` ``gspo producer`` processes via ops.launcher.LocalCluster
  (what ``gspo up`` starts; 1 torch thread each, its default), all settings at the project defaults
  (common/config.py). No K/B flags are passed to any process: both read the defaults.
* TRL: bench/trl_e2e_peer.py in TRL's own venv (``bash bench/setup_trl_venv.sh``), ``--threads`` torch
  threads, generating with transformers for real. Its settings are taken from the same defaults:
  32 prompts x G=8 per generation batch split into n_minibatches=2 optimizer steps, lr, AdamW betas,
  weight decay, grad clip, clip band (epsilon/epsilon_high), temperature, max_new_tokens, seed (prompt order).

A "step" on both sides is one batch of 32x8 completions (2 optimizer steps). Printed for both: seconds
and steps until the 50-step rolling mean reward (ops.report.rolling_mean: partial windows over the first
49 steps) first reaches 0.5 and 0.8, steady-state s/step, rolling reward at 5 minutes (or at the end of a
shorter budget), and ours/TRL ratios against the target: ``gspo up`` reaches 0.8 in at most half of TRL's
time. Writes summary.json and reward_vs_wall.png (overlay) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import machine, reference_model
from common.config import Settings
from ops.launcher import LocalCluster, read_metrics, wait_until
from ops.report import rolling_mean

HERE = Path(__file__).resolve().parent
DEFAULT_TRL_PYTHON = HERE / ".trl-venv" / "bin" / "python"
PEER = HERE / "trl_e2e_peer.py"
WINDOW = 50
THRESHOLDS = (0.5, 0.8)
REWARD_AT_S = 300.0
TARGET = "target: gspo up reaches 0.8 in at most half of TRL's time (ours/TRL <= 0.5)"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has used so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- the two runs
def run_ours(
    out: Path,
    model: Path,
    budget_s: float,
    producers: int,
    learner_threads: int | None = None,
    producer_threads: int | None = None,
    max_staleness: int | None = None,
) -> None:
    """The real pipeline for ``budget_s`` seconds from launch; metrics.jsonl + launch.json in ``out``.
    Threads: ``gspo up``'s rule (ops/threads.py) unless given; K: the default unless given."""
    from common.redis_conn import RedisServer
    from ops.threads import thread_plan

    if out.exists():
        shutil.rmtree(out)  # a stale run dir would be resumed from its checkpoints
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        plan = thread_plan(producers, 1, learner_threads, producer_threads)
        learner_args = [] if max_staleness is None else ["--max-staleness", str(max_staleness)]
        cluster = LocalCluster(
            run="e2e-ours", run_dir=out, redis_url=redis.url, model=str(model), learner_args=learner_args
        )
        try:
            t0 = time.time()
            (out / "launch.json").write_text(
                json.dumps(
                    {
                        "t0": t0,
                        "budget_s": budget_s,
                        "producers": producers,
                        "learner_threads": plan.learner,
                        "producer_threads": plan.producer,
                        "max_staleness": max_staleness,
                    }
                )
            )
            cluster.start_learner(threads=plan.learner)
            for _ in range(producers):
                cluster.add_producer(threads=plan.producer)
            wait_until(lambda: not cluster.learner.alive, budget_s - (time.time() - t0), poll_s=0.5)
            died = not cluster.learner.alive
            # CPU seconds each process used from launch to the end of the budget (start-up included)
            cpu = {"learner": _proc_cpu_s(cluster.learner.proc.pid)}
            cpu.update({pid: _proc_cpu_s(c.proc.pid) for pid, c in cluster.producers.items()})
            (out / "cpu.json").write_text(json.dumps({"wall_s": time.time() - t0, "cpu_s": cpu}))
            codes = cluster.stop()
        finally:
            cluster.stop()
            redis.stop()
    bad = {k: v for k, v in codes.items() if v not in (0, None, -signal.SIGTERM)}
    if died or bad:
        raise SystemExit(f"ours: processes exited early or with errors {codes} (logs in {out / 'logs'})")


def run_trl(out: Path, model: Path, budget_s: float, trl_python: Path, threads: int, s: Settings) -> dict:
    """bench/trl_e2e_peer.py in the TRL venv for ``budget_s`` seconds from launch; rows.jsonl in ``out``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_DISABLED="true",
        PYTHONPATH="",
    )
    t0 = time.time()
    (out / "launch.json").write_text(json.dumps({"t0": t0, "budget_s": budget_s, "threads": threads}))
    cmd = [
        str(trl_python),
        str(PEER),
        "--model-dir",
        str(model),
        "--out",
        str(out / "rows.jsonl"),
        "--budget-s",
        str(budget_s),
        "--t0",
        repr(t0),
        "--threads",
        str(threads),
        "--prompts-per-step",
        str(s.pipeline.batch_groups),
        "--group-size",
        str(s.pipeline.group_size),
        "--minibatches",
        str(s.learner.n_minibatches),
        "--max-new-tokens",
        str(s.producer.sampling.max_new_tokens),
        "--temperature",
        str(s.producer.sampling.temperature),
        "--lr",
        str(s.learner.lr),
        "--beta1",
        str(s.learner.betas[0]),
        "--beta2",
        str(s.learner.betas[1]),
        "--weight-decay",
        str(s.learner.weight_decay),
        "--grad-clip",
        str(s.learner.grad_clip),
        "--clip-low",
        str(s.loss.clip_low),
        "--clip-high",
        str(s.loss.clip_high),
        "--seed",
        str(s.learner.seed),
    ]
    log_path = out / "peer.log"
    cpu0 = _children_cpu_s()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            # the peer stops itself at the first optimizer step past the budget; allow that step to finish
            rc = proc.wait(timeout=budget_s + 300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(f"TRL peer did not stop within budget + 300 s (log: {log_path})") from None
    (out / "cpu.json").write_text(
        json.dumps({"wall_s": time.time() - t0, "cpu_s": {"trl": _children_cpu_s() - cpu0}})
    )
    if rc != 0:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise SystemExit(f"bench/trl_e2e_peer.py failed (exit {rc}); the end of {log_path} is above")
    last = [ln for ln in log_path.read_text().splitlines() if ln.startswith('{"trl_version"')][-1]
    info = json.loads(last)
    (out / "peer.json").write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- analysis
def series(rows: list[dict], t0: float, budget_s: float) -> list[dict]:
    """(t since launch, step, reward) per step, within the budget."""
    out = []
    for r in rows:
        if isinstance(r.get("reward/mean"), (int, float)) and isinstance(r.get("time/unix"), (int, float)):
            t = r["time/unix"] - t0
            if t <= budget_s:
                out.append({"t": t, "step": int(r["step"]), "reward": float(r["reward/mean"])})
    return out


def side_stats(pts: list[dict], budget_s: float) -> dict:
    if not pts:
        return {"steps": 0}
    rolled = rolling_mean([p["reward"] for p in pts], WINDOW)
    st: dict = {
        "steps": pts[-1]["step"],
        "end_s": pts[-1]["t"],
        "first_step_s": pts[0]["t"],
        "reward_first10": sum(p["reward"] for p in pts[:10]) / len(pts[:10]),
    }
    for thr in THRESHOLDS:
        hit = next((i for i, v in enumerate(rolled) if v >= thr), None)
        st[f"reach_{thr}"] = None if hit is None else {"s": pts[hit]["t"], "step": pts[hit]["step"]}
    skip = min(5, len(pts) // 5)  # warm-up steps left out of the steady state
    a, b = pts[skip], pts[-1]
    st["s_per_step"] = (b["t"] - a["t"]) / (b["step"] - a["step"]) if b["step"] > a["step"] else None
    horizon = min(REWARD_AT_S, budget_s)
    idx = max((i for i, p in enumerate(pts) if p["t"] <= horizon), default=None)
    st["reward_at"] = {
        "s": horizon,
        "rolling": rolled[idx] if idx is not None else None,
        "window": min(WINDOW, idx + 1) if idx is not None else 0,
    }
    return st


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def compare(ours: dict, trl: dict) -> dict:
    r: dict = {}
    for thr in THRESHOLDS:
        o, t = ours.get(f"reach_{thr}"), trl.get(f"reach_{thr}")
        r[f"time_to_{thr}"] = _ratio(o and o["s"], t and t["s"])
        r[f"steps_to_{thr}"] = _ratio(o and o["step"], t and t["step"])
    r["s_per_step"] = _ratio(ours.get("s_per_step"), trl.get("s_per_step"))
    r["reward_at"] = _ratio(
        (ours.get("reward_at") or {}).get("rolling"), (trl.get("reward_at") or {}).get("rolling")
    )
    return r


def verdict(ours: dict, trl: dict) -> str:
    o, t = ours.get("reach_0.8"), trl.get("reach_0.8")
    if o and t:
        ok = o["s"] <= 0.5 * t["s"]
        return f"{'MET' if ok else 'NOT MET'}: ours {o['s']:.0f} s vs TRL {t['s']:.0f} s (ratio {o['s'] / t['s']:.2f})"
    if o and not t:
        end = trl.get("end_s") or 0.0
        if o["s"] <= 0.5 * end:
            return f"MET: ours {o['s']:.0f} s; TRL did not reach 0.8 in its {end:.0f} s"
        return f"UNDETERMINED: ours {o['s']:.0f} s; TRL did not reach 0.8 in its {end:.0f} s (run longer)"
    if t and not o:
        return f"NOT MET: ours did not reach 0.8; TRL did in {t['s']:.0f} s"
    return "UNDETERMINED: neither side reached 0.8 within the budget (run longer)"


def _fmt_reach(x: dict | None) -> str:
    return "not reached" if not x else f"{x['s']:7.1f} s / {x['step']:4d} steps"


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def plot(out_png: Path, sides: dict[str, list[dict]], budget_s: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (label, pts) in enumerate(sides.items()):
        if not pts:
            continue
        ys = [p["reward"] for p in pts]
        for ax, xs in ((axes[0], [p["t"] for p in pts]), (axes[1], [p["step"] for p in pts])):
            ax.plot(xs, ys, color=f"C{i}", lw=0.6, alpha=0.3)
            ax.plot(
                xs, rolling_mean(ys, WINDOW), color=f"C{i}", lw=1.8, label=f"{label} ({WINDOW}-step rolling)"
            )
    for ax, xlabel in (
        (axes[0], "wall clock since launch (s)"),
        (axes[1], "step (batch of 32x8; 2 optimizer steps)"),
    ):
        for thr in THRESHOLDS:
            ax.axhline(thr, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_xlim(0, budget_s)
    axes[0].set_title("reward vs wall clock")
    axes[1].set_title("reward vs step")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def _cpu_per_step(side_dir: Path, st: dict) -> dict | None:
    """CPU seconds per step of a side's processes over its whole run (start-up included), from cpu.json."""
    info = _load(side_dir / "cpu.json")
    cpu = {k: v for k, v in (info.get("cpu_s") or {}).items() if v is not None}
    if not cpu or not st.get("steps"):
        return None
    steps = st["steps"]
    return {
        "per_step": sum(cpu.values()) / steps,
        "by_process": {k: v / steps for k, v in cpu.items()},
        "split": ", ".join(f"{k} {v / steps:.2f}" for k, v in cpu.items()) if len(cpu) > 1 else "",
        "cpu_s": cpu,
        "wall_s": info.get("wall_s"),
    }


def report(out: Path, settings: Settings, extra: dict) -> dict:
    ours_launch, trl_launch = _load(out / "ours" / "launch.json"), _load(out / "trl" / "launch.json")
    if not ours_launch or not trl_launch:
        raise SystemExit(f"{out} lacks ours/launch.json or trl/launch.json: run both sides first")
    budget_s = float(ours_launch["budget_s"])
    if abs(float(trl_launch["budget_s"]) - budget_s) > 1e-6:
        print(f"WARNING: budgets differ: ours {budget_s} s, TRL {trl_launch['budget_s']} s")
    pts = {
        "gspo up": series(read_metrics(out / "ours" / "metrics.jsonl"), ours_launch["t0"], budget_s),
        "TRL GRPOTrainer (GSPO)": series(
            read_metrics(out / "trl" / "rows.jsonl"), trl_launch["t0"], budget_s
        ),
    }
    ours, trl = (side_stats(p, budget_s) for p in pts.values())
    peer = _load(out / "trl" / "peer.json")
    ratios = compare(ours, trl)
    s = settings
    print(f"machine: {machine()}; load average now {_loadavg()}")
    print(
        f"budget {budget_s / 60:.2f} min per side (from process launch), run one after the other; same "
        f"reference model, addition task, {s.pipeline.batch_groups} prompts x G={s.pipeline.group_size} per step, "
        f"{s.learner.n_minibatches} optimizer steps per batch, lr {s.learner.lr}, clip band "
        f"({s.loss.clip_low}, {s.loss.clip_high}), max_new_tokens {s.producer.sampling.max_new_tokens}"
    )
    print(
        f"ours: learner ({ours_launch.get('learner_threads', 1)} torch threads) + {ours_launch.get('producers')} "
        f"producer process(es) ({ours_launch.get('producer_threads', 1)} each), K = "
        f"{ours_launch.get('max_staleness') if ours_launch.get('max_staleness') is not None else s.pipeline.max_staleness}; "
        f"TRL {peer.get('trl_version', '?')} (transformers {peer.get('transformers_version', '?')}, "
        f"torch {peer.get('torch_version', '?')}): one process, {trl_launch.get('threads')} torch threads"
    )
    horizon = ours.get("reward_at", {}).get("s", min(REWARD_AT_S, budget_s))
    rows = [("", "gspo up", "TRL", "ours/TRL")]
    for thr in THRESHOLDS:
        rows.append(
            (
                f"reach {thr} (s / steps)",
                _fmt_reach(ours.get(f"reach_{thr}")),
                _fmt_reach(trl.get(f"reach_{thr}")),
                f"{_fmt(ratios[f'time_to_{thr}'])} time, {_fmt(ratios[f'steps_to_{thr}'])} steps",
            )
        )
    rows.append(
        (
            "s/step (steady state)",
            _fmt(ours.get("s_per_step"), ".2f", " s"),
            _fmt(trl.get("s_per_step"), ".2f", " s"),
            _fmt(ratios["s_per_step"]),
        )
    )
    rows.append(
        (
            f"reward @ {horizon / 60:.2f} min (rolling)",
            _fmt((ours.get("reward_at") or {}).get("rolling"), ".3f"),
            _fmt((trl.get("reward_at") or {}).get("rolling"), ".3f"),
            _fmt(ratios["reward_at"]),
        )
    )
    rows.append(("steps in budget", str(ours.get("steps")), str(trl.get("steps")), ""))
    rows.append(
        ("first step at (s)", _fmt(ours.get("first_step_s"), ".1f"), _fmt(trl.get("first_step_s"), ".1f"), "")
    )
    rows.append(
        (
            "reward, first 10 steps",
            _fmt(ours.get("reward_first10"), ".3f"),
            _fmt(trl.get("reward_first10"), ".3f"),
            "",
        )
    )
    cpu = {side: _cpu_per_step(out / side, st) for side, st in (("ours", ours), ("trl", trl))}
    if cpu["ours"] and cpu["trl"]:
        rows.append(
            (
                "CPU s per step (all processes)",
                f"{cpu['ours']['per_step']:.2f} s ({cpu['ours']['split']})",
                f"{cpu['trl']['per_step']:.2f} s",
                _fmt(_ratio(cpu["ours"]["per_step"], cpu["trl"]["per_step"])),
            )
        )
        cores = os.cpu_count() or 1
        rows.append(
            (
                f"floor: CPU s per step / {cores} cores",
                f"{cpu['ours']['per_step'] / cores:.2f} s",
                f"{cpu['trl']['per_step'] / cores:.2f} s",
                "",
            )
        )
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    print(
        f"(rolling = {WINDOW}-step rolling mean of the per-step mean reward, partial windows before step {WINDOW}; "
        "times count from process launch)"
    )
    v = verdict(ours, trl)
    print(TARGET)
    print(f"verdict: {v}")
    png = plot(out / "reward_vs_wall.png", pts, budget_s)
    summary = {
        "machine": machine(),
        "load_average_end": _loadavg(),
        "budget_s": budget_s,
        "window": WINDOW,
        "thresholds": list(THRESHOLDS),
        "target": TARGET,
        "verdict": v,
        "ours": ours,
        "trl": trl,
        "ratios_ours_over_trl": ratios,
        "trl_peer": peer,
        "settings": {
            "batch_groups": s.pipeline.batch_groups,
            "group_size": s.pipeline.group_size,
            "max_staleness": s.pipeline.max_staleness,
            "n_minibatches": s.learner.n_minibatches,
            "lr": s.learner.lr,
            "betas": list(s.learner.betas),
            "weight_decay": s.learner.weight_decay,
            "grad_clip": s.learner.grad_clip,
            "clip_low": s.loss.clip_low,
            "clip_high": s.loss.clip_high,
            "temperature": s.producer.sampling.temperature,
            "max_new_tokens": s.producer.sampling.max_new_tokens,
            "seed": s.learner.seed,
        },
        "launch": {"ours": ours_launch, "trl": trl_launch},
        "cpu_per_step": cpu,
        **extra,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"plot: {png}\nsummary: {out / 'summary.json'}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget per side")
    ap.add_argument("--out", type=Path, default=Path("bench/results/e2e_vs_trl"))
    ap.add_argument("--cache", type=Path, default=Path("bench/results/cache"), help="reference model cache")
    ap.add_argument("--trl-python", type=Path, default=DEFAULT_TRL_PYTHON)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the TRL process")
    ap.add_argument(
        "--producers", type=int, default=1, help="producer processes of ours (gspo up's default: 1)"
    )
    ap.add_argument("--learner-threads", type=int, default=None, help="ours: [default: gspo up's rule]")
    ap.add_argument("--producer-threads", type=int, default=None, help="ours: [default: gspo up's rule]")
    ap.add_argument("-K", "--max-staleness", type=int, default=None, help="ours: [default: the project's]")
    ap.add_argument(
        "--only",
        choices=("ours", "trl"),
        default=None,
        help="run one side and report against the other side's previous run in --out",
    )
    ap.add_argument(
        "--analyse-only", action="store_true", help="recompute the summary from the runs in --out"
    )
    args = ap.parse_args()
    settings = Settings()  # the project defaults; TRL gets the same values
    if args.analyse_only:
        before = _load(args.out / "summary.json")
        report(args.out, settings, {k: before[k] for k in ("model", "load_average_start") if k in before})
        return
    if not args.trl_python.exists():
        raise SystemExit(
            f"no TRL environment at {args.trl_python}: create it with `bash bench/setup_trl_venv.sh` "
            "(a separate venv with trl; TRL never goes in the project venv), or pass --trl-python PATH"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    model = reference_model(args.cache).resolve()
    budget_s = args.minutes * 60
    load_start = _loadavg()
    print(f"model: {model}; budget {args.minutes} min per side; load average {load_start}", flush=True)
    if args.only != "trl":
        print("running ours (learner + producers) ...", flush=True)
        run_ours(
            args.out / "ours", model, budget_s, args.producers, args.learner_threads, args.producer_threads,
            args.max_staleness,
        )  # fmt: skip
    if args.only != "ours":
        print("running TRL GRPOTrainer (GSPO) ...", flush=True)
        run_trl(args.out / "trl", model, budget_s, args.trl_python, args.threads, settings)
    report(args.out, settings, {"model": str(model), "load_average_start": load_start})


if __name__ == "__main__":
    main()
