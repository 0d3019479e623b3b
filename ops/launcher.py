"""Local multi-process launcher: the same ``gspo learner`` / ``gspo producer`` commands a cluster runs,
as child processes of one supervisor on this machine. ``gspo up`` is built on it; tests use it to
scale producers up and down while the learner runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    """A learner and N producers for one run, started with the real CLI in separate processes."""

    run: str
    run_dir: Path
    redis_url: str
    model: str
    config_file: str | None = None
    learner_args: list[str] = field(default_factory=list)
    producer_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    learner: Child | None = None
    producers: dict[str, Child] = field(default_factory=dict)
    _next_id: int = 0

    def _base(self, service: str) -> list[str]:
        cmd = [sys.executable, "-m", "gspo", service, "--redis-url", self.redis_url, "--run", self.run]
        cmd += ["--run-dir", str(self.run_dir), "--model", self.model]
        if self.config_file:
            cmd += ["--config", self.config_file]
        return cmd

    def _spawn(self, name: str, cmd: list[str], threads: int) -> Child:
        log_path = self.run_dir / "logs" / f"{name}.out"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        env.pop("GSPO_REDIS_URL", None)  # the URL travels as a flag (never printed: logs redact it)
        out = log_path.open("ab")
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        out.close()
        log.info("started %s (pid %d), output in %s", name, proc.pid, log_path)
        return Child(name, proc, log_path)

    def start_learner(self, threads: int = 1) -> Child:
        cmd = self._base("learner") + ["--threads", str(threads)] + self.learner_args
        self.learner = self._spawn("learner", cmd, threads)
        return self.learner

    def add_producer(self, threads: int = 1) -> Child:
        pid = f"{self.run}-p{self._next_id}"
        self._next_id += 1
        cmd = self._base("producer") + ["--producer-id", pid, "--threads", str(threads)] + self.producer_args
        self.producers[pid] = self._spawn(pid, cmd, threads)
        return self.producers[pid]

    def remove_producer(self, timeout_s: float = 60.0) -> str | None:
        """Stop the newest producer gracefully (SIGTERM: it drains, acks, deregisters)."""
        live = [p for p in self.producers if self.producers[p].alive]
        if not live:
            return None
        pid = live[-1]
        _terminate(self.producers.pop(pid), timeout_s)
        return pid

    def scale_producers(self, n: int, threads: int = 1) -> None:
        while len(self.live_producers()) < n:
            self.add_producer(threads)
        while len(self.live_producers()) > n:
            self.remove_producer()

    def live_producers(self) -> list[str]:
        return [p for p, c in self.producers.items() if c.alive]

    def stop(self, timeout_s: float = 60.0) -> dict[str, int | None]:
        """SIGTERM everyone (producers first, so nothing is generated for a learner that is gone)."""
        codes: dict[str, int | None] = {}
        for pid in list(self.producers):
            codes[pid] = _terminate(self.producers.pop(pid), timeout_s)
        if self.learner is not None:
            codes["learner"] = _terminate(self.learner, timeout_s)
        return codes


def _terminate(child: Child, timeout_s: float) -> int | None:
    if child.alive:
        child.proc.send_signal(signal.SIGTERM)
        try:
            child.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", child.name, timeout_s)
            child.proc.kill()
            child.proc.wait()
    return child.proc.returncode


def read_metrics(path: Path) -> list[dict]:
    """All complete lines of a metrics.jsonl (a partially written last line is skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def tail_metrics(path: Path, offset: int) -> tuple[list[dict], int]:
    """New complete lines since byte ``offset``."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows, offset + end


def wait_until(pred, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll_s)
    return pred()
