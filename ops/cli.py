"""``gspo up`` and ``gspo report``. Torch is imported only when a model has to be built."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from gspo.context import (
    ConfigOpt,
    LogLevelOpt,
    RedisUrlOpt,
    RunDirOpt,
    RunOpt,
    fail,
    prepare,
    settings_from,
    split_list,
)

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
    learner_ranks: int = typer.Option(
        1,
        "--learner-ranks",
        min=1,
        help="learner processes (torchrun on this machine when > 1; the model is sharded over them, one process trains it plain)",
    ),
    max_steps: int = typer.Option(
        None, "--max-steps", help="stop after this many learner steps (the run's step count)"
    ),
    minutes: float = typer.Option(None, "--minutes", help="stop after this many minutes (> 0)"),
    model: str = typer.Option(
        None,
        "--model",
        help="HF model dir or hub id (local cache only) [default: the reference task's tiny model]",
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="the learner's prompts: a JSONL or Parquet path, hf:NAME_OR_DIR (options after '?') "
        "[default: learner.dataset, the addition task]",
    ),
    report_to: str = typer.Option(
        None, "--report-to", help="experiment trackers, comma-separated: wandb, mlflow, trackio, tensorboard"
    ),
    redis_url: str = RedisUrlOpt,
    run: str = RunOpt,
    max_staleness: int = typer.Option(None, "--max-staleness", "-K"),
    learner_threads: int = typer.Option(
        None,
        "--learner-threads",
        min=1,
        help="torch threads of the learner (each rank) [default: the rule in ops/threads.py]",
    ),
    producer_threads: int = typer.Option(
        None, "--producer-threads", min=1, help="torch threads of each producer [default: 1]"
    ),
    warmstart_reward: float = typer.Option(
        0.2, "--warmstart-reward", help="target sampled reward of the warm-start"
    ),
    fresh: bool = typer.Option(
        False,
        "--fresh",
        help="start the run over: delete its Redis keys (gspo:RUN:*), checkpoints and metrics first "
        "[default: resume the run dir's newest checkpoint]",
    ),
    config: Path = ConfigOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Run the whole pipeline locally: Redis (embedded unless --redis-url), a learner and N producers,
    each a separate process started with the same commands a cluster uses. A crashed producer is started
    again (with backoff; not after a crash loop). Ctrl-C stops cleanly."""
    if minutes is not None and not minutes > 0:
        raise fail(f"--minutes must be > 0 (got {minutes:g}); omit it to run until --max-steps or Ctrl-C")
    if max_steps is not None and max_steps < 1:
        raise fail(f"--max-steps must be >= 1 (got {max_steps}); omit it to run until --minutes or Ctrl-C")
    overrides = {
        "run_dir": str(run_dir) if run_dir else None,
        "redis.url": redis_url,
        "run": run,
        "log_level": log_level,
        "pipeline.max_staleness": max_staleness,
        "learner.dataset": dataset,
        "learner.report_to": split_list(report_to),
    }
    from common.redis_conn import running_embedded, stop_embedded

    # whether this command starts (and so must stop) the run's embedded Redis
    pre = settings_from(config, {k: v for k, v in overrides.items() if k in ("run_dir", "redis.url")})
    owns_redis = not pre.redis.url and running_embedded(pre.run_dir) is None
    settings = prepare(config, overrides, service="up")
    try:
        from ops.threads import thread_plan

        threads = thread_plan(producers, learner_ranks, learner_threads, producer_threads)
        typer.echo(f"threads: {threads.describe()}")
        _up(
            settings, config, producers, max_steps, minutes, model, warmstart_reward, fresh, learner_ranks,
            threads,
        )  # fmt: skip
    finally:
        if owns_redis:
            stop_embedded(settings.run_dir)


def _up(
    settings,
    config,
    producers,
    max_steps,
    minutes,
    model,
    warmstart_reward,
    fresh,
    learner_ranks,
    threads,
) -> None:
    from common.hub import ModelLoadError, resolve_model_dir
    from ops.launcher import LocalCluster, LogTail
    from ops.report import format_summary, plot_runs, summarize

    rd = Path(settings.run_dir).resolve()
    try:  # a directory, or a hub id from the local cache
        model_dir = (
            resolve_model_dir(model).resolve()
            if model
            else _default_model(rd, warmstart_reward, settings.learner.seed)
        )
    except ModelLoadError as e:
        raise fail(str(e)) from None
    if not (model_dir / "config.json").exists():
        raise fail(f"model directory {model_dir} does not exist or has no config.json")
    source = settings.learner.dataset.partition("?")[0]
    if source and source != "addition" and not source.startswith("hf:") and not Path(source).exists():
        raise fail(f"dataset {source} (learner.dataset / --dataset) does not exist")
    # K and B go to the learner alone: producers take them from the learner-state hash it publishes
    learner_args = ["--max-staleness", str(settings.pipeline.max_staleness)]
    learner_args += ["--dataset", settings.learner.dataset]  # --dataset or the config's
    if settings.learner.report_to:
        learner_args += ["--report-to", ",".join(settings.learner.report_to)]
    if fresh:  # before any process starts: no producer may read the old announcement or admission count
        from learner.reuse import wipe

        typer.echo(f"--fresh: {wipe(settings)}")
        learner_args.append("--no-resume")
    (rd / "config.json").write_text(json.dumps(settings.redacted(), indent=2))
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
    metrics_path = rd / "metrics.jsonl"
    since_offset = metrics_path.stat().st_size if metrics_path.exists() else 0
    since_unix = time.time()
    learner_log = LogTail(rd / "logs" / "learner.out")
    cluster.start_learner(threads=threads.learner, ranks=learner_ranks)
    for _ in range(producers):
        cluster.add_producer(threads=threads.producer)
    outcome = _watch(cluster, rd, minutes, max_steps, since_offset, learner_log)
    typer.echo(f"stopping ({outcome.reason}) ...")
    running = set(cluster.live_producers())
    codes = cluster.stop()
    summary = summarize(rd, since_offset=since_offset, since_unix=since_unix)
    plot = plot_runs([rd], rd / "report.png")
    typer.echo(format_summary(summary))
    restarts = cluster.restart_count()
    if restarts or cluster.gave_up():
        per = ", ".join(
            f"{p}: {r.restarts}" + (", then left down after a crash loop" if r.gave_up else "")
            for p, r in cluster.restarts.items()
            if r.restarts or r.gave_up
        )
        typer.echo(f"producer restarts: {restarts} ({per})")
    typer.echo(f"plot: {plot}\nrun dir: {rd}")
    learner_code = codes.get("learner")
    if outcome.failed:
        raise fail(outcome.failed, code=1)
    if learner_code not in (0, None, -signal.SIGTERM):
        raise fail(
            f"the learner exited with {learner_code} while stopping (see {rd / 'logs' / 'learner.out'})",
            code=1,
        )
    bad = {k: v for k, v in codes.items() if k in running and v not in (0, None, -signal.SIGTERM)}
    if bad:  # the run reached its goal: a producer that did not stop cleanly is reported, not fatal
        typer.echo(f"producers that did not stop cleanly: {bad} (see {rd / 'logs'})")


@dataclass
class Outcome:
    """Why ``gspo up`` stopped watching; ``failed``: the one error line when the run did not reach its goal."""

    reason: str
    failed: str | None = None


LEARNER_NEWS = ("resumed from step", "starting at step 0", "skipping checkpoint", "learner failed:")


def _learner_news(line: str) -> str | None:
    """The learner's log lines worth showing on the console (the rest stays in logs/learner.out)."""
    for marker in LEARNER_NEWS:
        i = line.find(marker)
        if i >= 0:
            text = line[i:]
            return text if text.startswith("learner") else f"learner {text}"
    return None


def _watch(
    cluster, run_dir: Path, minutes: float | None, max_steps: int | None, offset: int, learner_log
) -> Outcome:
    """Print progress, supervise producers, and return once the run reached its goal or cannot go on."""
    from ops.launcher import describe_exit, last_line, tail_metrics
    from ops.report import learner_time

    deadline = time.monotonic() + minutes * 60 if minutes else None
    last_print, first_step, announced = 0.0, None, False
    window: list[dict] = []  # rows since the last console line
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
    signal.signal(signal.SIGTERM, lambda *_: interrupted.append(1))
    last_step = None
    while True:
        for line in learner_log.lines():
            news = _learner_news(line)
            if news:
                announced = announced or "resumed" in news or "step 0" in news
                print(news, flush=True)
        for event in cluster.supervise():
            print(event, flush=True)
        rows, offset = tail_metrics(run_dir / "metrics.jsonl", offset)
        window += rows
        if rows:
            last_step = rows[-1].get("step")
            if first_step is None:
                first_step = rows[0].get("step")
                if not announced and isinstance(first_step, int) and first_step > 1:
                    print(f"learner resumed from step {first_step - 1}", flush=True)
        if window and time.monotonic() - last_print > 2.0:
            r = window[-1]
            shares = learner_time(window)
            wait = f"wait {100 * shares['wait']:.0f}%  " if shares else ""
            restarts = cluster.restart_count()
            print(
                f"step {r.get('step'):>5}  reward {r.get('reward/mean', float('nan')):.3f}  "
                f"staleness {r.get('staleness/mean', float('nan')):.2f}  "
                f"tok/s {r.get('throughput/tokens_per_s', float('nan')):.0f}  {wait}"
                f"producers {len(cluster.live_producers())}"
                + (f" (restarts {restarts})" if restarts else ""),
                flush=True,
            )
            last_print, window = time.monotonic(), []
        if interrupted:
            return Outcome("interrupted")
        learner = cluster.learner
        if learner is not None and not learner.alive:
            code = learner.proc.returncode
            rows, offset = tail_metrics(run_dir / "metrics.jsonl", offset)
            last_step = rows[-1].get("step") if rows else last_step
            for line in learner_log.lines():
                news = _learner_news(line)
                if news:
                    print(news, flush=True)
            if code == 0 and max_steps:
                return Outcome(
                    f"learner reached --max-steps {max_steps}"
                    + (f" at step {last_step}" if last_step else "")
                )
            if code == 0:
                return Outcome("the learner stopped (exit 0)")
            why = describe_exit(code)
            tail = last_line(learner.log_path)
            return Outcome(
                f"learner {why}",
                failed=f"the learner stopped with {why} (see {learner.log_path})"
                + (f": {tail}" if tail else ""),
            )
        if cluster.producers and not cluster.producers_left():
            why = [f"{p} crash-looped" for p in cluster.gave_up()]
            why += [f"{p} finished" for p, r in cluster.restarts.items() if r.finished]
            return Outcome(
                "no producer left",
                failed=f"no producer left to generate ({', '.join(why)}; see {run_dir / 'logs'}): the run "
                f"cannot progress",
            )
        if deadline is not None and time.monotonic() > deadline:
            return Outcome(f"--minutes {minutes:g} reached")
        time.sleep(0.5)


AXIS_HELP = "x axis: " + " | ".join(("step", "time/elapsed_s", "time/unix"))


def report(
    run_dirs: list[Path] = typer.Argument(..., help="one or more run dirs (several are overlaid)"),
    out: Path = typer.Option(None, "--out", "-o", help="PNG path [default: RUN_DIR/report.png]"),
    x: str = typer.Option("step", "--x", help=AXIS_HELP),
) -> None:
    """Plots (reward, clip fraction, staleness histogram, IS ESS, tokens/s) and a text summary."""
    from ops.report import AXES, format_summary, plot_runs, summarize

    if x not in AXES:
        raise fail(f"--x {x}: unknown axis; use one of {', '.join(AXES)}")
    for d in run_dirs:
        if not (d / "metrics.jsonl").exists():
            raise fail(f"{d} has no metrics.jsonl")
    path = plot_runs(run_dirs, out or run_dirs[0] / "report.png", x_key=x)
    for d in run_dirs:
        typer.echo(format_summary(summarize(d)))
    typer.echo(f"plot: {path}")
    sys.stdout.flush()
