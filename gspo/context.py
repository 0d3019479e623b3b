"""What every command does first: resolve config, set up logging, find (or start) Redis.

Kept free of torch so that ``--help`` and the light commands stay fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from common.config import ConfigError, Settings, load_settings, save_settings
from common.logs import setup_logging
from common.redis_conn import RedisUnavailable, check_reachable, ensure_embedded, redact_url, running_embedded

log = logging.getLogger(__name__)

ConfigOpt = typer.Option(None, "--config", "-c", envvar="GSPO_CONFIG", help="TOML config file")
RunOpt = typer.Option(None, "--run", help="run id (namespaces Redis keys) [default: default]")
RunDirOpt = typer.Option(None, "--run-dir", help="run directory [default: runs/default]")
RedisUrlOpt = typer.Option(
    None,
    "--redis-url",
    help="redis:// or rediss:// URL; omitted = embedded Redis in the run dir (env GSPO_REDIS_URL)",
)
LogLevelOpt = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR")


def split_list(value: str | None) -> list[str] | None:
    """A comma-separated flag value as a list (None stays None: the flag was not given)."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def fail(msg: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def settings_from(config: Path | None, overrides: dict[str, Any]) -> Settings:
    try:
        return load_settings(config, overrides)
    except ConfigError as e:
        raise fail(str(e)) from None


def prepare(
    config: Path | None,
    overrides: dict[str, Any],
    *,
    service: str,
    need_redis: bool = True,
    log_to_run_dir: bool = True,
    read_only: bool = False,
) -> Settings:
    """Resolve settings, configure logging, and make sure ``settings.redis.url`` points at a live server.

    ``read_only`` commands (``gspo status``) never create a run dir nor start an embedded server: without
    ``--redis-url`` they need the run's embedded Redis to be running already."""
    settings = settings_from(config, overrides)
    log_file = Path(settings.run_dir) / "logs" / f"{service}.log" if log_to_run_dir else None
    setup_logging(settings.log_level, log_file, name=service)
    if need_redis:
        try:
            if not settings.redis.url and read_only:
                settings.redis.url = _running_embedded_or_fail(Path(settings.run_dir))
            if not settings.redis.url:
                settings.redis.url = ensure_embedded(settings.run_dir)
                log.info("using the run's embedded Redis at %s", settings.redis.url)
            check_reachable(settings.redis)
        except RedisUnavailable as e:
            raise fail(str(e)) from None
        log.debug("redis: %s", redact_url(settings.redis.url))
    if log_file is not None:  # what this process runs with, credentials redacted, next to its log
        save_settings(settings, log_file.parent / f"{service}.config.json")
    return settings


def _running_embedded_or_fail(run_dir: Path) -> str:
    if not run_dir.is_dir():
        raise fail(f"run dir {run_dir} does not exist (pass the run's --run-dir, or --redis-url)")
    url = running_embedded(run_dir)
    if url is None:
        raise fail(
            f"the embedded Redis of {run_dir} is not running (the run has ended): start it with "
            f"'gspo redis start --run-dir {run_dir}' to inspect the run, or pass --redis-url"
        )
    return url
