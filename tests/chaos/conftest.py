"""Helpers of the chaos suite: real ``python -m gspo`` processes, a Redis of their own, and the accounting
that proves nothing was lost and nothing trained twice.

Every service is a subprocess with its output in a file (so a failing test shows its tail); whatever a test
started is killed at teardown, by pid, if the test did not stop it itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from common.keys import PRODUCERS_GROUP, RunKeys
from common.redis_conn import RedisServer
from common.wire import DeadLetter, PromptTask, RolloutGroup, WireError, decode

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    out: Path  # stdout + stderr

    def text(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def tail(self, n_chars: int = 3000) -> str:
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n{self.text()[-n_chars:]}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack goes to the log
            self.proc.wait(10)
            raise AssertionError(f"{self.name} still running after {timeout_s}s\n{self.tail(8000)}") from None

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM (drain), then the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)


@dataclass
class Services:
    """Starts ``python -m gspo <kind>`` processes; kills the ones still running at teardown."""

    log_dir: Path
    started: list[Service] = field(default_factory=list)

    def start(self, kind: str, args: list[str], name: str, env: dict[str, str] | None = None) -> Service:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
        full_env.update(
            {
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO),
                "PYTHONFAULTHANDLER": "1",
                "GSPO_PIPELINE__GROUP_SIZE": "4",
                **(env or {}),
            }
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = self.log_dir / f"{name}.out"
        with out.open("wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "gspo", kind, *args], cwd=REPO, env=full_env,
                                    stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
        svc = Service(name, proc, out)
        self.started.append(svc)
        return svc

    def kill_leftovers(self) -> None:
        for s in self.started:
            if s.alive():
                s.proc.kill()
                s.proc.wait(10)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    svc = Services(tmp_path / "proc")
    yield svc
    svc.kill_leftovers()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis for this test alone (AOF on): it may be restarted, paused or have its clients killed."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.kill()


def restart(server: RedisServer, down_s: float) -> None:
    """Stop (SIGTERM: the AOF is flushed), stay down ``down_s``, start again on the same port and dir."""
    server.stop()
    time.sleep(down_s)
    server.proc = None
    server.start()


# --------------------------------------------------------------------------- command lines
def learner_args(redis_url: str | None, run_id: str, model: Path, run_dir: Path, *, max_steps: int,
                 batch_groups: int = 4, max_staleness: int = 2, publish_every: int = 2,
                 dataset: str = "addition", extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    url = ["--redis-url", redis_url] if redis_url else []
    return [*url, "--run", run_id, "--model", str(model), "--run-dir", str(run_dir), "--max-steps", str(max_steps),
            "-B", str(batch_groups), "-K", str(max_staleness), "--publish-every", str(publish_every),
            "--dataset", dataset, "--threads", "1", "--log-level", "INFO", *extra]  # fmt: skip


def producer_args(redis_url: str | None, run_id: str, model: Path, run_dir: Path, producer_id: str, *,
                  extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """K and B come from the learner (its state hash); G is the same for both sides through the env."""
    url = ["--redis-url", redis_url] if redis_url else []
    return [*url, "--run", run_id, "--model", str(model), "--run-dir", str(run_dir), "--producer-id", producer_id,
            "--max-new-tokens", "5", "--prompts-per-call", "4", "--claim-idle-ms", "1500", "--threads", "1",
            "--log-level", "INFO", *extra]  # fmt: skip


# --------------------------------------------------------------------------- waiting and reading results
def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, watch: tuple[Service, ...] = ()
) -> None:
    """Poll ``predicate``; fail early (with the log tail) if a watched service exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [s for s in watch if not s.alive()]
        if dead:
            raise AssertionError(f"{dead[0].name} exited while waiting for {what}\n{dead[0].tail()}")
        time.sleep(0.1)
    raise AssertionError(
        f"timed out after {timeout_s}s waiting for {what}\n" + "\n".join(s.tail() for s in watch)
    )


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def last_step(run_dir: Path) -> int:
    rows = metric_rows(run_dir)
    return rows[-1]["step"] if rows else 0


def lineage(run_dir: Path) -> dict[int, dict]:
    """Step -> the row that counts (a resumed run re-logs the steps after its checkpoint: the last one wins)."""
    out: dict[int, dict] = {}
    for row in metric_rows(run_dir):
        out[row["step"]] = row
    return out


def sync_client(url: str, **kw) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, **kw)


def _prompt_task_ids(r: redis.Redis, stream: str, ids: list[str]) -> set[str]:
    out = set()
    for i in ids:
        for _, f in r.xrange(stream, i, i):
            out.add(decode(f[b"m"], PromptTask).task_id)
    return out


def waiting_prompts(r: redis.Redis, keys: RunKeys) -> set[str]:
    """Task ids of prompts not yet done by any producer: pending (held) or never delivered."""
    pending = [
        str(p["message_id"].decode())
        for p in r.xpending_range(keys.prompts, PRODUCERS_GROUP, "-", "+", 100_000)
    ]
    group = next(g for g in r.xinfo_groups(keys.prompts) if g["name"] == PRODUCERS_GROUP.encode())
    last = group["last-delivered-id"].decode()
    undelivered = [i.decode() for i, _ in r.xrange(keys.prompts, f"({last}", "+")]
    return _prompt_task_ids(r, keys.prompts, pending + undelivered)


def dead_letters(r: redis.Redis, keys: RunKeys) -> list[DeadLetter]:
    return [decode(f[b"m"], DeadLetter) for _, f in r.xrange(keys.dead)]


def dead_group_ids(r: redis.Redis, keys: RunKeys) -> set[str]:
    """Group ids of well-formed rollout groups that were dead-lettered (e.g. made by another model)."""
    out = set()
    for d in dead_letters(r, keys):
        try:
            out.add(decode(d.payload, RolloutGroup).group_id)
        except WireError:
            continue  # garbage: not a group
    return out


def account_for_every_prompt(r: redis.Redis, run_id: str, run_dir: Path) -> dict[str, int]:
    """Nothing lost, nothing trained twice: every group id trained at most once over the run's lineage, and
    every prompt the feeder enqueued is trained, or still on its way (waiting prompt, rollout entry not yet
    trained), or dead-lettered as a group (wrong model), or one of the counted stale drops. Returns the counts (for the report)."""
    keys = RunKeys(run_id)
    rows = lineage(run_dir)
    assert sorted(rows) == list(range(1, max(rows) + 1)), sorted(rows)
    trained = [gid for s in sorted(rows) for gid in rows[s]["groups/ids"]]
    assert len(trained) == len(set(trained)), "a group was trained twice"
    enqueued = {f"{run_id}-{i:09d}" for i in range(int(r.hget(keys.prompt_cursor, "position")))}
    in_rollouts = set()
    for _, f in r.xrange(keys.rollouts):
        try:
            in_rollouts.add(decode(f[b"m"], RolloutGroup).group_id)
        except WireError:
            continue  # injected garbage (bad-input tests): dead-lettered, not a prompt
    waiting = waiting_prompts(r, keys)
    dead = dead_group_ids(r, keys)
    stale = sum(int(row["staleness/dropped"]) for row in rows.values())
    missing = enqueued - set(trained) - in_rollouts - waiting - dead
    assert len(missing) <= stale, (
        f"{len(missing)} prompts vanished, {stale} stale drops: {sorted(missing)[:5]}"
    )
    assert set(trained) <= enqueued
    return {"enqueued": len(enqueued), "trained": len(trained), "in_flight": len(in_rollouts - set(trained)),
            "waiting": len(waiting), "dead_lettered": len(dead), "stale_dropped": stale, "dropped_as_stale": len(missing),
            "duplicates_dropped": sum(int(row["duplicates/dropped"]) for row in rows.values())}  # fmt: skip


def report(name: str, figures: dict) -> None:
    """Append a result line for docs/reliability.md (CHAOS_REPORT=path), printed as well (-s)."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
