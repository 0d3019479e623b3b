"""``gspo report``: PNG plots and a text summary of one or more run dirs (overlaid for comparison)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ops.launcher import read_metrics

PANELS = (
    ("reward/mean", "mean reward"),
    ("gspo/clip_frac", "clip fraction"),
    ("is/ess", "IS effective sample size (normalised)"),
    ("throughput/tokens_per_s", "learner tokens/s"),
    ("staleness/mean", "mean staleness"),
)


SMOOTH = 20  # steps in the rolling mean drawn over the raw (faint) curve


def rolling_mean(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _series(rows: list[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float)):
            xs.append(r[x_key])
            ys.append(r[key])
    return xs, ys


def staleness_histogram(rows: list[dict]) -> Counter:
    total: Counter = Counter()
    for r in rows:
        for k, n in (r.get("staleness/hist") or {}).items():
            total[int(k)] += int(n)
    return total


def plot_runs(run_dirs: list[Path], out: Path, x_key: str = "step", labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [d.name for d in run_dirs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    runs = [read_metrics(d / "metrics.jsonl") for d in run_dirs]
    for ax, (key, title) in zip(axes.flat, PANELS, strict=False):
        for i, (rows, label) in enumerate(zip(runs, labels, strict=True)):
            xs, ys = _series(rows, key, x_key)
            if xs:
                color = f"C{i}"
                ax.plot(xs, ys, color=color, lw=0.6, alpha=0.3)
                ax.plot(xs, rolling_mean(ys, SMOOTH), color=color, lw=1.6, label=label)
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    ax = axes.flat[-1]
    width = 0.8 / max(len(runs), 1)
    for i, (rows, label) in enumerate(zip(runs, labels, strict=True)):
        hist = staleness_histogram(rows)
        if hist:
            ks = sorted(hist)
            ax.bar([k + i * width for k in ks], [hist[k] for k in ks], width=width, label=label)
    ax.set_title("staleness histogram (groups trained)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("staleness k")
    for a in axes.flat:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def summarize(run_dir: Path) -> dict:
    """Start/end reward (mean of the first/last 10 steps), steps, wall time, throughput, staleness."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return {"run_dir": str(run_dir), "steps": 0}

    def avg(key: str, part: list[dict]) -> float | None:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return round(sum(vals) / len(vals), 4) if vals else None

    head, tail = rows[:10], rows[-10:]
    return {
        "run_dir": str(run_dir),
        "steps": rows[-1].get("step"),
        "wall_s": round(rows[-1].get("time/elapsed_s", 0.0), 1),
        "reward_start": avg("reward/mean", head),
        "reward_end": avg("reward/mean", tail),
        "tokens_per_s": avg("throughput/tokens_per_s", rows),
        "gspo/clip_frac": avg("gspo/clip_frac", rows),  # the metrics.jsonl name (prom: gspo_clip_frac)
        "staleness_mean": avg("staleness/mean", rows),
        "dropped_stale": sum(int(r.get("staleness/dropped", 0) or 0) for r in rows),
    }


def format_summary(s: dict) -> str:
    if not s.get("steps"):
        return f"{s['run_dir']}: no steps recorded"
    return (
        f"{s['run_dir']}: {s['steps']} steps in {s['wall_s']} s; reward {s['reward_start']} -> {s['reward_end']}; "
        f"{s['tokens_per_s']} tok/s; gspo/clip_frac {s['gspo/clip_frac']}; staleness {s['staleness_mean']} "
        f"(dropped {s['dropped_stale']})"
    )
