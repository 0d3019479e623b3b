"""``gspo up`` and ``gspo report``. Torch is imported only when a model has to be built."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import typer

from gspo.context import ConfigOpt, LogLevelOpt, RedisUrlOpt, RunDirOpt, RunOpt, fail, prepare, settings_from

log = logging.getLogger("gspo.up")


def _default_model(run_dir: Path, target_reward: float, seed: int) -> Path:
    """The reference task's tiny model, warm-started until its sampled reward reaches the target (cached)."""
    path = run_dir / "base-model"
    marker = path / "warmstart.json"
    if marker.exists():
        return path
    from learner.warmstart import warm_start
    from modeling import build_tiny_model

    typer.echo(f"building the reference model and warm-starting it to sampled reward >= {target_reward} ...")
    build_tiny_model(run_dir / "init-model", seed=seed)
    result = warm_start(run_dir / "init-model", path, target_reward=target_reward, seed=seed)
    marker.write_text(json.dumps({"steps": result.steps, "sampled_reward": result.sampled_reward}))
    typer.echo(
        f"warm-start done: {result.steps} supervised steps, sampled reward {result.sampled_reward:.3f}"
    )
    return path


def up(
    run_dir: Path = RunDirOpt,
    producers: int = typer.Option(1, "--producers", "-n", min=0, help="producer processes to start"),
    max_steps: int = typer.Option(None, "--max-steps", help="stop after this many learner steps"),
    minutes: float = typer.Option(None, "--minutes", help="stop after this many minutes"),
    model: str = typer.Option(
        None, "--model", help="HF model dir [default: the reference task's tiny model]"
    ),
    redis_url: str = RedisUrlOpt,
    run: str = RunOpt,
    max_staleness: int = typer.Option(None, "--max-staleness", "-K"),
    warmstart_reward: float = typer.Option(
        0.2, "--warmstart-reward", help="target sampled reward of the warm-start"
    ),
    config: Path = ConfigOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Run the whole pipeline locally: Redis (embedded unless --redis-url), a learner and N producers,
    each a separate process started with the same commands a cluster uses. Ctrl-C stops cleanly."""

    overrides = {
        "run_dir": str(run_dir) if run_dir else None,
        "redis.url": redis_url,
        "run": run,
        "log_level": log_level,
        "pipeline.max_staleness": max_staleness,
    }
    from common.redis_conn import running_embedded, stop_embedded

    # whether this command starts (and so must stop) the run's embedded Redis
    pre = settings_from(config, {k: v for k, v in overrides.items() if k in ("run_dir", "redis.url")})
    owns_redis = not pre.redis.url and running_embedded(pre.run_dir) is None
    settings = prepare(config, overrides, service="up")
    try:
        _up(settings, config, producers, max_steps, minutes, model, warmstart_reward)
    finally:
        if owns_redis:
            stop_embedded(settings.run_dir)


def _up(settings, config, producers, max_steps, minutes, model, warmstart_reward) -> None:
    from ops.launcher import LocalCluster
    from ops.report import format_summary, plot_runs, summarize

    rd = Path(settings.run_dir).resolve()
    model_dir = (
        Path(model).resolve() if model else _default_model(rd, warmstart_reward, settings.learner.seed)
    )
    if not (model_dir / "config.json").exists():
        raise fail(f"model directory {model_dir} does not exist or has no config.json")
    (rd / "config.json").write_text(json.dumps(settings.redacted(), indent=2))
    # K and B go to the learner alone: producers take them from the learner-state hash it publishes
    learner_args = ["--max-staleness", str(settings.pipeline.max_staleness)]
    if max_steps:
        learner_args += ["--max-steps", str(max_steps)]
    cluster = LocalCluster(
        run=settings.run,
        run_dir=rd,
        redis_url=settings.redis.url,
        model=str(model_dir),
        config_file=str(config) if config else None,
        learner_args=learner_args,
    )
    cluster.start_learner()
    for _ in range(producers):
        cluster.add_producer()
    reason = _watch(cluster, rd, minutes)
    typer.echo(f"stopping ({reason}) ...")
    codes = cluster.stop()
    summary = summarize(rd)
    plot = plot_runs([rd], rd / "report.png")
    typer.echo(format_summary(summary))
    typer.echo(f"plot: {plot}\nrun dir: {rd}")
    bad = {k: v for k, v in codes.items() if v not in (0, None, -signal.SIGTERM)}
    if bad:
        raise fail(f"processes exited with errors: {bad} (see {rd / 'logs'})", code=1)


def _watch(cluster, run_dir: Path, minutes: float | None) -> str:
    from ops.launcher import tail_metrics

    deadline = time.monotonic() + minutes * 60 if minutes else None
    offset, last_print = 0, 0.0
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
    signal.signal(signal.SIGTERM, lambda *_: interrupted.append(1))
    while True:
        rows, offset = tail_metrics(run_dir / "metrics.jsonl", offset)
        if rows and time.monotonic() - last_print > 2.0:
            r = rows[-1]
            print(
                f"step {r.get('step'):>5}  reward {r.get('reward/mean', float('nan')):.3f}  "
                f"staleness {r.get('staleness/mean', float('nan')):.2f}  "
                f"tok/s {r.get('throughput/tokens_per_s', float('nan')):.0f}  "
                f"producers {len(cluster.live_producers())}",
                flush=True,
            )
            last_print = time.monotonic()
        if interrupted:
            return "interrupted"
        if cluster.learner is not None and not cluster.learner.alive:
            return f"learner exited with {cluster.learner.proc.returncode}"
        if deadline is not None and time.monotonic() > deadline:
            return "time budget reached"
        time.sleep(0.5)


def report(
    run_dirs: list[Path] = typer.Argument(..., help="one or more run dirs (several are overlaid)"),
    out: Path = typer.Option(None, "--out", "-o", help="PNG path [default: RUN_DIR/report.png]"),
    x: str = typer.Option("step", "--x", help="x axis: step or time/elapsed_s"),
) -> None:
    """Plots (reward, clip fraction, staleness histogram, IS ESS, tokens/s) and a text summary."""
    from ops.report import format_summary, plot_runs, summarize

    for d in run_dirs:
        if not (d / "metrics.jsonl").exists():
            raise fail(f"{d} has no metrics.jsonl")
    path = plot_runs(run_dirs, out or run_dirs[0] / "report.png", x_key=x)
    for d in run_dirs:
        typer.echo(format_summary(summarize(d)))
    typer.echo(f"plot: {path}")
    sys.stdout.flush()
