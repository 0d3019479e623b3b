"""``gspo``: the command line of the pipeline. Importing this module must not import torch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from gspo.context import ConfigOpt, LogLevelOpt, RedisUrlOpt, RunDirOpt, RunOpt, fail, prepare, settings_from
from learner.cli import learner
from producer.cli import producer

app = typer.Typer(
    name="gspo",
    help="Asynchronous off-policy GSPO: producers generate, Redis carries, the learner trains and publishes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command(help="Run one producer (generation host).")(producer)
app.command(help="Run the learner.")(learner)

prompts_app = typer.Typer(help="Prompt datasets.", no_args_is_help=True)
redis_app = typer.Typer(help="The embedded Redis server of a run dir (local use).", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")
app.add_typer(redis_app, name="redis")
app.add_typer(config_app, name="config")


def _common(run, run_dir, redis_url, log_level) -> dict:
    return {
        "run": run,
        "run_dir": str(run_dir) if run_dir else None,
        "redis.url": redis_url,
        "log_level": log_level,
    }


@prompts_app.command("load")
def prompts_load(
    file: str = typer.Argument(
        ...,
        help="JSONL (one object per line with 'prompt' and the reward's fields, e.g. 'answer'), a Parquet "
        "file or directory, or hf:NAME_OR_DIR; options after '?': split, config, task, columns, cache_dir",
    ),
    repeat: int = typer.Option(1, "--repeat", min=1, help="enqueue the file this many times (epochs)"),
    redis_url: str = RedisUrlOpt,
    run: str = RunOpt,
    run_dir: Path = RunDirOpt,
    config: Path = ConfigOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Enqueue prompts for the producers (ids derive from the file content: loading twice trains once)."""
    from common.feeder import PromptsFull
    from common.tasks import TaskError

    source = file.partition("?")[0]
    if not source.startswith("hf:") and not Path(source).exists():
        raise fail(f"prompt file {source} does not exist")
    settings = prepare(
        config, _common(run, run_dir, redis_url, log_level), service="prompts", log_to_run_dir=False
    )
    try:
        n = asyncio.run(__import__("gspo.admin", fromlist=["x"]).load_prompts(settings, file, repeat))
    except (TaskError, PromptsFull) as e:
        raise fail(str(e)) from None
    typer.echo(f"enqueued {n} prompts on gspo:{settings.run}:prompts")


@app.command()
def status(
    redis_url: str = RedisUrlOpt,
    run: str = RunOpt,
    run_dir: Path = RunDirOpt,
    config: Path = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    log_level: str = LogLevelOpt,
) -> None:
    """Live producers, learner version, stream backlogs, newest checkpoint."""
    from gspo.admin import collect_status

    settings = prepare(
        config,
        _common(run, run_dir, redis_url, log_level),
        service="status",
        log_to_run_dir=False,
        read_only=True,
    )
    info = asyncio.run(collect_status(settings))
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    _print_status(info)


def _print_status(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ln = info["learner"]
    console.print(
        f"[bold]run[/] {info['run']}  learner step {ln.get('step', '-')} version {ln.get('version', '-')}"
        f"  admitted groups {info['admitted_groups']}"
    )
    t = Table("producer", "engine", "version", "state", "groups", "tok/s", "inflight", "age s")
    for p in info["producers"]:
        t.add_row(
            p["producer_id"],
            p["engine"],
            str(p["version"]),
            p["state"],
            str(p["groups_done"]),
            f"{p['tokens_per_s']:.0f}",
            str(p["inflight"]),
            str(p["age_s"]),
        )
    console.print(t if info["producers"] else "no live producers")
    s = Table("stream", "length", "backlog", "pending")
    for name, v in info["streams"].items():
        s.add_row(name, str(v["length"]), str(v.get("backlog", "")), str(v.get("pending", "")))
    console.print(s)
    ck = info["latest_checkpoint"]
    console.print(
        f"latest checkpoint: step {ck['step']} at {ck['path']}" if ck else "no checkpoint published yet"
    )


@redis_app.command("start")
def redis_start(run_dir: Path = RunDirOpt, config: Path = ConfigOpt) -> None:
    """Start (or reuse) the run's embedded Redis and print its URL."""
    from common.redis_conn import RedisUnavailable, ensure_embedded

    settings = settings_from(config, {"run_dir": str(run_dir) if run_dir else None})
    try:
        typer.echo(ensure_embedded(settings.run_dir))
    except RedisUnavailable as e:
        raise fail(str(e)) from None


@redis_app.command("stop")
def redis_stop(run_dir: Path = RunDirOpt, config: Path = ConfigOpt) -> None:
    """Stop the run's embedded Redis (its AOF data stays in RUN_DIR/redis)."""
    from common.redis_conn import stop_embedded

    settings = settings_from(config, {"run_dir": str(run_dir) if run_dir else None})
    typer.echo("stopped" if stop_embedded(settings.run_dir) else "not running")


@redis_app.command("url")
def redis_url_cmd(run_dir: Path = RunDirOpt, config: Path = ConfigOpt) -> None:
    """Print the URL of the run's embedded Redis if it is running (exit 1 if not)."""
    from common.redis_conn import running_embedded

    settings = settings_from(config, {"run_dir": str(run_dir) if run_dir else None})
    url = running_embedded(settings.run_dir)
    if not url:
        raise typer.Exit(1)
    typer.echo(url)


@config_app.command("show")
def config_show(
    config: Path = ConfigOpt,
    doc: bool = typer.Option(False, "--doc", help="list every field with default and meaning"),
) -> None:
    """Print the resolved configuration (credentials redacted)."""
    from common.config import describe_fields

    if doc:
        for name, default, text in describe_fields():
            typer.echo(f"{name:40s} {default:24s} {text}")
        return
    typer.echo(json.dumps(settings_from(config, {}).redacted(), indent=2))


def _register_optional() -> None:
    """Commands whose modules may be absent in a partial install."""
    try:
        from ops.cli import report, up
    except ImportError:
        return
    app.command(help="Run the whole pipeline locally: embedded Redis, learner and N producers.")(up)
    app.command(help="Plot and summarise one or more run dirs.")(report)


_register_optional()
