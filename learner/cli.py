"""``gspo learner``: options only; the service (torch) is imported after parsing."""

from __future__ import annotations

from pathlib import Path

import typer

from gspo.context import ConfigOpt, LogLevelOpt, RedisUrlOpt, RunDirOpt, RunOpt, prepare, split_list


def learner(
    redis_url: str = RedisUrlOpt,
    run: str = RunOpt,
    model: str = typer.Option(
        None,
        "--model",
        help="HF model dir or cached hub id to start from (ignored when resuming, except a LoRA run's base)",
    ),
    run_dir: Path = RunDirOpt,
    resume: bool = typer.Option(
        None,
        "--resume/--no-resume",
        help="resume from the newest STABLE checkpoint [default: auto]; --no-resume refuses a run a learner has used (see --fresh)",
    ),
    fresh: bool = typer.Option(
        False,
        "--fresh",
        help="start the run over: first delete its Redis keys (gspo:RUN:*), checkpoints and metrics files (stop its producers first)",
    ),
    max_steps: int = typer.Option(None, "--max-steps", help="stop after this many steps"),
    lr: float = typer.Option(None, "--lr"),
    batch_groups: int = typer.Option(None, "--batch-groups", "-B", help="groups per step"),
    max_staleness: int = typer.Option(None, "--max-staleness", "-K", help="drop groups staler than this"),
    publish_every: int = typer.Option(None, "--publish-every", help="publish a checkpoint every N steps"),
    variant: str = typer.Option(None, "--variant", help="gspo | gspo_token | grpo"),
    proximal: str = typer.Option(
        None, "--proximal", help="recompute | behaviour (ablation: ratio on engine log-probs)"
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="prompts to keep queued: 'addition', a JSONL or Parquet path, hf:NAME_OR_DIR (options after '?'), or '' (none)",
    ),
    report_to: str = typer.Option(
        None, "--report-to", help="experiment trackers, comma-separated: wandb, mlflow, trackio, tensorboard"
    ),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads"),
    metrics_port: int = typer.Option(None, "--metrics-port", help="Prometheus port (0 = off)"),
    config: Path = ConfigOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Run the learner: pull rollout groups, take GSPO steps, publish checkpoints."""
    overrides = {
        "redis.url": redis_url,
        "run": run,
        "run_dir": str(run_dir) if run_dir else None,
        "log_level": log_level,
        "metrics_port": metrics_port,
        "learner.model": model,
        "learner.max_steps": max_steps,
        "learner.lr": lr,
        "pipeline.batch_groups": batch_groups,
        "pipeline.max_staleness": max_staleness,
        "learner.publish_every": publish_every,
        "loss.variant": variant,
        "loss.proximal": proximal,
        "learner.dataset": dataset,
        "learner.threads": threads,
        "learner.report_to": split_list(report_to),
    }
    settings = prepare(config, overrides, service="learner")
    from learner.service import main  # heavy: torch / transformers

    raise typer.Exit(main(settings, resume=resume, fresh=fresh))
