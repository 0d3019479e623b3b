"""``gspo producer``: options only; the service (torch, engines) is imported after parsing."""

from __future__ import annotations

from pathlib import Path

import typer

from gspo.context import ConfigOpt, LogLevelOpt, RedisUrlOpt, RunDirOpt, RunOpt, prepare


def producer(
    redis_url: str = RedisUrlOpt,
    run: str = RunOpt,
    engine: str = typer.Option(None, "--engine", help="transformers | sglang"),
    sglang_url: str = typer.Option(None, "--sglang-url", help="SGLang server URL (engine=sglang)"),
    model: str = typer.Option(
        None,
        "--model",
        help="HF model dir or cached hub id (default: the run's published checkpoint or base model)",
    ),
    group_size: int = typer.Option(None, "--group-size", "-G", help="completions per prompt"),
    producer_id: str = typer.Option(None, "--producer-id", help="unique id [default: host-pid]"),
    max_groups: int = typer.Option(None, "--max-groups", help="exit after this many groups"),
    temperature: float = typer.Option(None, "--temperature"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens"),
    reload_mode: str = typer.Option(
        None, "--reload-mode", help="finish | abort: in-flight requests on new weights"
    ),
    device: str = typer.Option(None, "--device", help="torch device of the transformers engine"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads"),
    metrics_port: int = typer.Option(None, "--metrics-port", help="Prometheus port (0 = off)"),
    prompts_per_call: int = typer.Option(
        None, "--prompts-per-call", help="prompts batched into one engine call"
    ),
    claim_idle_ms: int = typer.Option(
        None, "--claim-idle-ms", help="reclaim prompts pending this long from dead producers"
    ),
    seed: int = typer.Option(None, "--seed", help="sampling seed (mixed with the producer id)"),
    run_dir: Path = RunDirOpt,
    config: Path = ConfigOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Run one producer (one per generation host). SIGTERM drains in-flight work, then exits 0.

    K (max_staleness) and B (batch_groups) come from the learner (its learner-state hash); G must equal
    the learner's."""
    overrides = {
        "redis.url": redis_url,
        "run": run,
        "run_dir": str(run_dir) if run_dir else None,
        "log_level": log_level,
        "metrics_port": metrics_port,
        "producer.engine": engine,
        "producer.sglang_url": sglang_url,
        "producer.model": model,
        "pipeline.group_size": group_size,
        "producer.producer_id": producer_id,
        "producer.max_groups": max_groups,
        "producer.sampling.temperature": temperature,
        "producer.sampling.max_new_tokens": max_new_tokens,
        "producer.reload_mode": reload_mode,
        "producer.device": device,
        "producer.threads": threads,
        "producer.prompts_per_call": prompts_per_call,
        "producer.claim_idle_ms": claim_idle_ms,
        "producer.seed": seed,
    }
    settings = prepare(config, overrides, service="producer")
    from producer.service import main  # heavy: torch / transformers / httpx

    raise typer.Exit(main(settings))
