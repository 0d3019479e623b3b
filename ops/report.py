"""``gspo report``: PNG plots and a text summary of one or more run dirs (overlaid for comparison)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ops.launcher import read_metrics, tail_metrics

AXES = ("step", "time/elapsed_s", "time/unix")  # x axes every metrics.jsonl row has

PANELS = (
    ("reward/mean", "mean reward"),
    ("eval/reward", "eval reward (learner.eval_dataset)"),
    ("gspo/clip_frac", "clip fraction"),
    ("is/ess", "IS effective sample size (normalised)"),
    ("throughput/tokens_per_s", "learner tokens/s"),
    ("staleness/mean", "mean staleness"),
)
SPARSE = ("eval/reward",)  # a value every few steps: drawn as points joined, no rolling mean
BUCKETED = ("gspo/clip_frac", "is/ess")  # panels that also draw each staleness bucket's "<key>/k=K" (dashed)
BUCKET_STYLES = ("--", ":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2)))
NOT_COMPONENTS = ("reward/mean", "reward/std")


def reward_components(rows: list[dict]) -> list[str]:
    """The ``reward/<name>`` keys of the rewards of ``task.rewards`` (each reward's own mean)."""
    keys = {k for r in rows for k in r if k.startswith("reward/") and k not in NOT_COMPONENTS}
    return sorted(keys)


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


def bucket_keys(rows: list[dict], key: str) -> list[str]:
    """``<key>/k=K`` keys present in ``rows`` (one per staleness bucket the learner trained), by K."""
    prefix = f"{key}/k="
    found = {k for r in rows for k in r if k.startswith(prefix) and k[len(prefix) :].isdigit()}
    return sorted(found, key=lambda k: int(k[len(prefix) :]))


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

    if x_key not in AXES:
        raise ValueError(f"unknown x axis {x_key!r}: use one of {', '.join(AXES)}")
    labels = labels or [d.name for d in run_dirs]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    runs = [read_metrics(d / "metrics.jsonl") for d in run_dirs]
    for ax, (key, title) in zip(axes.flat, PANELS, strict=False):
        for i, (rows, label) in enumerate(zip(runs, labels, strict=True)):
            xs, ys = _series(rows, key, x_key)
            if xs:
                color = f"C{i}"
                if key in SPARSE:
                    ax.plot(xs, ys, color=color, lw=1.2, marker="o", ms=3, label=label)
                    continue
                ax.plot(xs, ys, color=color, lw=0.6, alpha=0.3)
                ax.plot(xs, rolling_mean(ys, SMOOTH), color=color, lw=1.6, label=label)
            if key in BUCKETED:  # the same metric per staleness bucket: where staleness costs
                for j, bkey in enumerate(bucket_keys(rows, key)):
                    bx, by = _series(rows, bkey, x_key)
                    blabel = f"{label} {bkey.rpartition('/')[2]}"
                    # a bucket seen in few steps: its points, not a line across the gaps between them
                    if len(bx) * 2 < len(rows):
                        ax.plot(bx, by, color=f"C{i}", ls="none", marker="x", ms=4, label=blabel)
                        continue
                    ax.plot(
                        bx,
                        rolling_mean(by, SMOOTH),
                        color=f"C{i}",
                        ls=BUCKET_STYLES[j % len(BUCKET_STYLES)],
                        lw=1.1,
                        label=blabel,
                    )
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    ax = axes.flat[len(PANELS)]
    styles = ("-", "--", ":", "-.")
    for i, (rows, label) in enumerate(zip(runs, labels, strict=True)):
        for j, key in enumerate(reward_components(rows)):
            xs, ys = _series(rows, key, x_key)
            name = key.removeprefix("reward/")
            ax.plot(
                xs,
                rolling_mean(ys, SMOOTH),
                color=f"C{j}",
                ls=styles[i % 4],
                lw=1.4,
                label=f"{label}: {name}",
            )
    ax.set_title("each reward (task.rewards), rolling mean")
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


def segments(rows: list[dict]) -> list[list[dict]]:
    """The rows of each learner process. A process's start time (``time/unix - time/elapsed_s``) is the same on
    all its rows; a new one (a resume) also restarts ``time/elapsed_s`` at 0."""
    out: list[list[dict]] = []
    prev: dict | None = None
    for r in rows:
        if prev is None or _new_process(prev, r):
            out.append([])
        out[-1].append(r)
        prev = r
    return out


def _new_process(prev: dict, r: dict) -> bool:
    t0, t1 = prev.get("time/elapsed_s"), r.get("time/elapsed_s")
    if not isinstance(t0, (int, float)) or not isinstance(t1, (int, float)):
        return False
    if t1 < t0:
        return True
    u0, u1 = prev.get("time/unix"), r.get("time/unix")
    return isinstance(u0, (int, float)) and isinstance(u1, (int, float)) and abs((u1 - t1) - (u0 - t0)) > 1.0


def _wall(rows: list[dict]) -> float:
    """Learner seconds covered by ``rows``: each learner process's last ``time/elapsed_s``, summed."""
    return sum(max((r.get("time/elapsed_s") or 0.0) for r in seg) for seg in segments(rows))


def _sum(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows if isinstance(r.get(key), (int, float)))


def learner_time(rows: list[dict]) -> dict | None:
    """Shares of the learner loop's time: waiting for rollouts, training, publishing in the loop, the rest."""
    wait, train, publish = _sum(rows, "time/wait_s"), _sum(rows, "time/step_s"), _sum(rows, "time/publish_s")
    total = _sum(rows, "time/iter_s") or (wait + train + publish)
    if total <= 0:
        return None
    writes = [r["weights/publish_s"] for r in rows if isinstance(r.get("weights/publish_s"), (int, float))]
    writes = [w for w in writes if w > 0]
    return {
        "seconds": round(total, 1),
        "wait": wait / total,
        "train": train / total,
        "publish": publish / total,
        "other": max(0.0, 1 - (wait + train + publish) / total),
        "checkpoint_write_s": round(sum(writes) / len(writes), 2) if writes else None,
    }


def producer_time(run_dir: Path, since_unix: float | None = None) -> dict | None:
    """Producers' engine (generate) and admission-paced seconds over their wall time, from the running totals
    in ``RUN_DIR/metrics/producer-*.jsonl`` (rows at or after ``since_unix``; a restarted producer's totals start
    again at 0, so each process's rows are counted separately)."""
    wall = generate = paced = 0.0
    producers = 0
    for path in sorted((run_dir / "metrics").glob("producer-*.jsonl")):
        rows = [r for r in read_metrics(path) if isinstance(r.get("time"), (int, float))]
        rows = [r for r in rows if since_unix is None or r["time"] >= since_unix]
        if rows:
            producers += 1
        first = prev = None
        for r in [*rows, None]:
            restarted = (
                r is not None
                and prev is not None
                and r.get("generate_s_total", 0) < prev.get("generate_s_total", 0)
            )
            if first is not None and (r is None or restarted):
                wall += prev["time"] - first["time"]
                generate += prev.get("generate_s_total", 0) - first.get("generate_s_total", 0)
                paced += prev.get("paced_s_total", 0) - first.get("paced_s_total", 0)
                first = None
            if r is not None and first is None:
                first = r
            prev = r
    if wall <= 0:
        return None
    return {
        "producers": producers,
        "seconds": round(wall, 1),
        "generate": generate / wall,
        "paced": paced / wall,
    }


def summarize(run_dir: Path, since_offset: int | None = None, since_unix: float | None = None) -> dict:
    """Start/end reward (mean of the first/last 10 steps), steps, wall time, throughput, staleness, and where the
    time went. ``since_offset`` (a byte offset of metrics.jsonl) and ``since_unix`` pick the rows of one
    invocation (``gspo up``): its steps and time are reported beside the run's totals, and the time shares are
    computed over it."""
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path)
    if not rows:
        return {"run_dir": str(run_dir), "steps": 0}

    def avg(key: str, part: list[dict]) -> float | None:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return round(sum(vals) / len(vals), 4) if vals else None

    head, tail = rows[:10], rows[-10:]
    out = {
        "run_dir": str(run_dir),
        "steps": rows[-1].get("step"),
        "wall_s": round(_wall(rows), 1),
        "learner_runs": len(segments(rows)),
        "reward_start": avg("reward/mean", head),
        "reward_end": avg("reward/mean", tail),
        "tokens_per_s": avg("throughput/tokens_per_s", rows),
        "gspo/clip_frac": avg("gspo/clip_frac", rows),  # the metrics.jsonl name (prom: gspo_clip_frac)
        "staleness_mean": avg("staleness/mean", rows),
        "dropped_stale": sum(int(r.get("staleness/dropped", 0) or 0) for r in rows),
    }
    evals = [r for r in rows if isinstance(r.get("eval/reward"), (int, float))]
    if evals:
        out["eval_reward_first"] = round(evals[0]["eval/reward"], 4)
        out["eval_reward_last"] = round(evals[-1]["eval/reward"], 4)
        out["eval_rounds"] = len(evals)
    part = rows
    if since_offset is not None:
        part = tail_metrics(path, since_offset)[0]
        out["this"] = {
            "steps": len(part),
            "first_step": part[0].get("step") if part else None,
            "last_step": part[-1].get("step") if part else None,
            "wall_s": round(_wall(part), 1) if part else 0.0,
        }
    out["learner_time"] = learner_time(part)
    out["producer_time"] = producer_time(run_dir, since_unix)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def format_summary(s: dict) -> str:
    if not s.get("steps"):
        return f"{s['run_dir']}: no steps recorded"
    runs = s.get("learner_runs", 1)
    lines = [
        f"{s['run_dir']}: {s['steps']} steps in {s['wall_s']} s"
        + (f" (over {runs} learner runs)" if runs > 1 else "")
        + f"; reward {s['reward_start']} -> {s['reward_end']}; {s['tokens_per_s']} tok/s; gspo/clip_frac "
        f"{s['gspo/clip_frac']}; staleness {s['staleness_mean']} (dropped {s['dropped_stale']})"
    ]
    if s.get("eval_rounds"):
        lines.append(
            f"eval reward {s['eval_reward_first']} -> {s['eval_reward_last']} ({s['eval_rounds']} eval rounds)"
        )
    this = s.get("this")
    if this is not None:
        if this["steps"]:
            lines.append(
                f"this invocation: {this['steps']} steps (step {this['first_step']} to {this['last_step']}) in "
                f"{this['wall_s']} s"
            )
        else:
            lines.append("this invocation: no steps")
    lt, pt = s.get("learner_time"), s.get("producer_time")
    if lt:
        write = (
            f"; checkpoint writes {lt['checkpoint_write_s']} s each, in the background"
            if lt["checkpoint_write_s"]
            else ""
        )
        lines.append(
            f"learner time ({lt['seconds']} s): waiting for rollouts {_pct(lt['wait'])}, training "
            f"{_pct(lt['train'])}, publishing {_pct(lt['publish'])}, other {_pct(lt['other'])}{write}"
        )
    if pt:
        lines.append(
            f"producer time ({pt['producers']} producer(s), {pt['seconds']} s): engine generating "
            f"{_pct(pt['generate'])}, feed stage paced by admission control {_pct(pt['paced'])}"
        )
    hint = bottleneck(lt, pt)
    if hint:
        lines.append(f"bottleneck: {hint}")
    return "\n".join(lines)


def bottleneck(lt: dict | None, pt: dict | None) -> str | None:
    """One line on what limits the run, from the time shares (None when nothing dominates)."""
    waits = lt is not None and lt["wait"] >= 0.5
    paced = pt is not None and pt["paced"] >= 0.5
    if waits and paced:
        return (
            "the learner waits for rollouts while producers wait for admission: the staleness bound K and the "
            "time for new weights to reach producers (publish, poll, reload) limit the run; a larger K helps"
        )
    if waits:
        return (
            "the learner waits for rollouts most of the time: generation limits the run (more producers help)"
        )
    if paced:
        return "producers wait for admission most of the time: the learner (or the staleness bound K) limits the run"
    if lt is not None and lt["train"] >= 0.5:
        return "the learner trains most of the time: the learner limits the run"
    return None
