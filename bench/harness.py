"""Shared harness of the end-to-end benchmarks: one warm-started reference model, one private Redis,
and runs of the real pipeline (learner + producers as separate processes, via ops.launcher)."""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from common.redis_conn import RedisServer
from ops.launcher import LocalCluster, read_metrics, wait_until


def machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def reference_model(cache_dir: Path, target_reward: float = 0.2, seed: int = 0) -> Path:
    """Tiny reference model, warm-started once and cached under ``cache_dir``."""
    out = cache_dir / f"ref-model-s{seed}-r{target_reward}"
    if (out / "warmstart.json").exists():
        return out
    from learner.warmstart import warm_start
    from modeling import build_tiny_model

    build_tiny_model(cache_dir / "init", seed=seed)
    res = warm_start(cache_dir / "init", out, target_reward=target_reward, seed=seed)
    (out / "warmstart.json").write_text(
        json.dumps({"steps": res.steps, "sampled_reward": res.sampled_reward})
    )
    return out


@dataclass
class RunResult:
    name: str
    rows: list[dict]
    wall_s: float

    def avg(self, key: str, last: int | None = None) -> float:
        rows = self.rows[-last:] if last else self.rows
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else float("nan")

    def avg_head(self, key: str, first: int) -> float:
        vals = [r[key] for r in self.rows[:first] if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else float("nan")


def run_pipeline(
    name: str,
    root: Path,
    redis: RedisServer,
    model: Path,
    *,
    steps: int,
    max_staleness: int,
    producers: int = 1,
    learner_args: tuple[str, ...] = (),
    producer_args: tuple[str, ...] = (),
    timeout_s: float = 900.0,
    learner_threads: int | None = None,
    producer_threads: int | None = None,
) -> RunResult:
    """Run the pipeline for ``steps`` learner steps. Threads per process follow ``gspo up``'s rule
    (ops/threads.py) unless given."""
    from ops.threads import thread_plan

    plan = thread_plan(producers, learner_threads=learner_threads, producer_threads=producer_threads)
    run_dir = root / name
    if run_dir.exists():  # a previous run's checkpoints would be resumed and its metrics read back
        shutil.rmtree(run_dir)
    k = ["--max-staleness", str(max_staleness)]
    cluster = LocalCluster(
        run=name.replace("/", "-"),
        run_dir=run_dir,
        redis_url=redis.url,
        model=str(model),
        learner_args=k + ["--max-steps", str(steps), *learner_args],
        producer_args=list(producer_args),
    )
    t0 = time.monotonic()
    cluster.start_learner(threads=plan.learner)
    for _ in range(producers):
        cluster.add_producer(threads=plan.producer)
    finished = wait_until(lambda: not cluster.learner.alive, timeout_s, poll_s=0.5)
    wall = time.monotonic() - t0
    cluster.stop()
    if not finished:
        raise RuntimeError(
            f"{name}: learner did not finish {steps} steps in {timeout_s}s (logs in {run_dir}/logs)"
        )
    if cluster.learner.proc.returncode != 0:
        raise RuntimeError(
            f"{name}: learner exited with {cluster.learner.proc.returncode} (logs in {run_dir}/logs)"
        )
    return RunResult(name, read_metrics(run_dir / "metrics.jsonl"), wall)
