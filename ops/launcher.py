"""Local multi-process launcher: the same ``gspo learner`` / ``gspo producer`` commands a cluster runs,
as child processes of one supervisor on this machine. ``gspo up`` is built on it; tests use it to
scale producers up and down while the learner runs.

Producer supervision (:meth:`LocalCluster.supervise`, called by ``gspo up`` while it watches the run): a
producer that exits with anything but 0 (a crash, ``kill -9``, a stated failure) is started again under the
same producer id (so it takes back its own pending prompts first) after a backoff of 1 s, doubling with each
crash in the last ``crash_window_s`` up to 30 s. ``crash_loop`` crashes within ``crash_window_s`` is a crash
loop: the producer is not started again, with one message naming its last exit and its log. A producer
that exits 0 (``producer.max_groups`` reached, or drained on a signal) has finished and is left alone.
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

from ops.threads import OMP_WAIT_POLICY

log = logging.getLogger(__name__)
RESTART_BACKOFF_S = 1.0  # first restart delay; doubles with each recent crash
RESTART_BACKOFF_MAX_S = 30.0
CRASH_LOOP = 3  # crashes within CRASH_WINDOW_S: the producer is not restarted again
CRASH_WINDOW_S = 120.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    cmd: list[str] = field(default_factory=list)
    threads: int = 1
    ranks: int = 1  # > 1: a learner under torchrun (proc is torchrun, the ranks are its children)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Restarts:
    """The supervision record of one producer id."""

    crashes: list[float] = field(default_factory=list)  # time.monotonic() of each crash noticed
    codes: list[int] = field(default_factory=list)  # exit code of each crash
    restarts: int = 0
    restart_at: float | None = None  # a crash is waiting for its backoff to end
    gave_up: bool = False  # crash loop: not restarted any more
    finished: bool = False  # exited 0: not restarted


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log file (its end only is read), shortened to ``limit`` characters."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    restarts: dict[str, Restarts] = field(default_factory=dict)  # producer id -> supervision record
    restart_backoff_s: float = RESTART_BACKOFF_S
    crash_loop: int = CRASH_LOOP
    crash_window_s: float = CRASH_WINDOW_S
    _next_id: int = 0

    def _base(self, service: str) -> list[str]:
        cmd = [sys.executable, "-m", "gspo", service, "--redis-url", self.redis_url, "--run", self.run]
        cmd += ["--run-dir", str(self.run_dir), "--model", self.model]
        if self.config_file:
            cmd += ["--config", self.config_file]
        return cmd

    def _spawn(
        self, name: str, cmd: list[str], threads: int, extra_env: dict[str, str] | None = None
    ) -> Child:
        log_path = self.run_dir / "logs" / f"{name}.out"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            # the processes share the cores: an OpenMP thread that waits at a barrier sleeps instead of
            # spinning, so it leaves the core to the other processes (ops/threads.py; the environment wins)
            "OMP_WAIT_POLICY": OMP_WAIT_POLICY,
            **os.environ,
            **self.env,
            **(extra_env or {}),
            "OMP_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
        }
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
        return Child(name, proc, log_path, cmd, threads)

    def start_learner(self, threads: int = 1, ranks: int = 1) -> Child:
        """``gspo learner``; with ``ranks`` > 1 under torchrun on this machine (``--standalone``), each rank
        with ``threads`` threads. The run id then goes as GSPO_RUN: torchrun's parser would read a ``--run``
        after the module name as an abbreviation of its own ``--run-path``."""
        cmd = self._base("learner") + ["--threads", str(threads)] + self.learner_args
        extra_env = None
        if ranks > 1:
            i = cmd.index("--run")
            extra_env = {"GSPO_RUN": cmd[i + 1]}
            del cmd[i : i + 2]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   *cmd[1:]]  # fmt: skip
        self.learner = self._spawn("learner", cmd, threads, extra_env)
        self.learner.ranks = ranks
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

    # ------------------------------------------------------------------ supervision (gspo up)
    def supervise(self, now: float | None = None) -> list[str]:
        """Notice producers that exited, restart crashed ones whose backoff is over (module docstring).
        Returns what happened, one message per event, for the console."""
        now = time.monotonic() if now is None else now
        events = []
        for pid, child in list(self.producers.items()):
            if child.alive:
                continue
            rec = self.restarts.setdefault(pid, Restarts())
            if rec.gave_up or rec.finished:
                continue
            if rec.restart_at is None:  # an exit not seen before
                events.append(self._crashed(pid, child, rec, now))
            elif now >= rec.restart_at:
                rec.restart_at = None
                rec.restarts += 1
                self.producers[pid] = self._spawn(pid, child.cmd, child.threads)
                events.append(f"producer {pid} restarted (restart {rec.restarts})")
        return events

    def _crashed(self, pid: str, child: Child, rec: Restarts, now: float) -> str:
        code = child.proc.returncode
        if code == 0:
            rec.finished = True
            return f"producer {pid} finished (exit 0); not restarted"
        rec.crashes.append(now)
        rec.codes.append(code)
        recent = [t for t in rec.crashes if now - t <= self.crash_window_s]
        why = describe_exit(code)
        tail = last_line(child.log_path) if code > 0 else ""
        if tail:
            why += f": {tail}"
        if len(recent) >= self.crash_loop:
            rec.gave_up = True
            return (
                f"producer {pid} crashed {len(recent)} times within {self.crash_window_s:.0f} s (crash loop; last: "
                f"{why}); not restarting it: see {child.log_path}"
            )
        delay = min(RESTART_BACKOFF_MAX_S, self.restart_backoff_s * 2 ** (len(recent) - 1))
        rec.restart_at = now + delay
        return f"producer {pid} crashed ({why}); restarting it in {delay:.0f} s"

    def gave_up(self) -> list[str]:
        """Producer ids in a crash loop (not restarted any more)."""
        return [p for p, r in self.restarts.items() if r.gave_up]

    def restart_count(self) -> int:
        return sum(r.restarts for r in self.restarts.values())

    def producers_left(self) -> bool:
        """Whether any producer runs or will run again (alive, or waiting for its restart)."""
        return any(
            c.alive or (p in self.restarts and self.restarts[p].restart_at is not None)
            for p, c in self.producers.items()
        )

    def stop(self, timeout_s: float = 60.0) -> dict[str, int | None]:
        """SIGTERM everyone (producers first, so nothing is generated for a learner that is gone)."""
        codes: dict[str, int | None] = {}
        for pid in list(self.producers):
            codes[pid] = _terminate(self.producers.pop(pid), timeout_s)
        if self.learner is not None:
            codes["learner"] = _terminate(self.learner, timeout_s)
        return codes


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc; empty elsewhere)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def _terminate(child: Child, timeout_s: float) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout_s``. A learner under torchrun: its ranks get the SIGTERM (rank 0
    finishes its step, publishes and stops the others), so that torchrun sees them exit 0 and exits 0; torchrun
    itself, signalled, would stop them and exit 1."""
    if child.alive:
        ranks = _children(child.proc.pid) if child.ranks > 1 else []
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        if not ranks:
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


class LogTail:
    """New complete lines of a growing log file (``gspo up`` shows a few of the learner's on the console).
    Lines already in the file when the tail is made are skipped (logs are appended to across runs)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()
