"""Load: three producers and a learner for GSPO_SOAK_S seconds (default 30), sampling every process's RSS
and Redis's memory and stream lengths. Nothing may grow without bound: the second half's peaks stay within
15 % or 30 MB of the first half's, the streams stay trimmed and the dead-letter stream stays empty. Little
generation is wasted: groups dropped as too stale or as duplicates stay under 5 % of the groups admitted."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import pytest

from common.keys import LEARNER_GROUP, RunKeys
from common.wire import ProducerHeartbeat, decode
from tests.chaos.conftest import (
    account_for_every_prompt,
    last_step,
    learner_args,
    metric_rows,
    producer_args,
    report,
    sync_client,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]
SOAK_S = float(os.environ.get("GSPO_SOAK_S", "30"))
SAMPLE_EVERY_S = 2.0
MB = 1 << 20
B, K, PUBLISH_EVERY, PRODUCERS, PROMPTS_PER_CALL, PROMPTS_AHEAD = 4, 2, 2, 3, 4, 4


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def halves(self) -> tuple[float, float]:
        mid = len(self.values) // 2
        return max(self.values[:mid]), max(self.values[mid:])

    def growth_ok(self, rel: float = 0.15, abs_bytes: float = 30 * MB) -> bool:
        first, second = self.halves()
        return second - first < abs_bytes or second - first < rel * first


def test_three_producers_and_a_learner_hold_memory_and_streams_bounded(
    own_redis, services, run_id, tiny_model_dir, tmp_path
):
    url, run_dir, keys = own_redis.url, tmp_path / "run", RunKeys(run_id)
    r = sync_client(url)
    procs = [services.start("learner", learner_args(url, run_id, tiny_model_dir, run_dir, max_steps=0, batch_groups=B,
                                                    max_staleness=K, publish_every=PUBLISH_EVERY), "learner")]  # fmt: skip
    for i in range(PRODUCERS):
        procs.append(
            services.start("producer", producer_args(url, run_id, tiny_model_dir, run_dir, f"p{i}"), f"p{i}")
        )

    def all_up() -> bool:
        beats = [r.get(keys.producer(f"p{i}")) for i in range(PRODUCERS)]
        return last_step(run_dir) >= 1 and all(b and decode(b, ProducerHeartbeat).groups_done for b in beats)

    wait_until(all_up, 90, "every producer to make a group and the learner to step", tuple(procs))  # warm-up
    rss = {p.name: Series() for p in procs}
    redis_mem, xlen = Series(), {s: Series() for s in ("prompts", "rollouts", "dead")}
    step0, t_end = last_step(run_dir), time.monotonic() + SOAK_S
    while time.monotonic() < t_end:
        for p in procs:
            assert p.alive(), p.tail()
            rss[p.name].values.append(rss_bytes(p.proc.pid))
        redis_mem.values.append(int(r.info("memory")["used_memory"]))
        for s in xlen:
            xlen[s].values.append(r.xlen(getattr(keys, s)))
        time.sleep(SAMPLE_EVERY_S)
    steps = last_step(run_dir) - step0
    open_admissions = r.zcard(keys.admissions_open)  # groups admitted and still being generated
    pending = r.xpending(keys.rollouts, LEARNER_GROUP)["pending"]
    for p in procs:
        assert p.terminate() == 0, p.tail()

    for name, series in rss.items():
        assert series.growth_ok(), (name, [round(v / MB, 1) for v in series.values])
    assert redis_mem.growth_ok(), [v / MB for v in redis_mem.values]
    # trimmed after every publish: the rollouts stream holds at most the admission bound, the read-ahead and
    # what was consumed over two publish intervals (the one being written and the next; stale and duplicate
    # groups count: a step may consume more than B). The prompts stream is trimmed below the oldest prompt a
    # producer still holds; one paced for a while holds an old one, so its length swings (the feeder's backlog,
    # what producers hold, what others did meanwhile): it must stay within 4x that estimate, where an untrimmed
    # stream would hold every prompt enqueued (thousands)
    rows = metric_rows(run_dir)
    consumed = [int(row["consumed"]) for row in rows]
    per_interval = max(b - a for a, b in zip(consumed, consumed[PUBLISH_EVERY:], strict=False))
    rollouts_cap = (K + 1) * B + 2 * B + 2 * per_interval
    prompts_cap = 4 * (PROMPTS_AHEAD * B + PRODUCERS * 2 * PROMPTS_PER_CALL + 2 * per_interval)
    assert max(xlen["rollouts"].values) <= rollouts_cap, xlen["rollouts"].values
    assert max(xlen["prompts"].values) <= prompts_cap, xlen["prompts"].values
    assert max(xlen["prompts"].values) < consumed[-1] / 4  # trimmed indeed: far below what went through
    assert max(xlen["dead"].values) == 0
    assert steps >= 5, steps
    counts = account_for_every_prompt(r, run_id, run_dir)
    last_rows = [
        json.loads(f.read_text().splitlines()[-1]) for f in (run_dir / "metrics").glob("producer-*.jsonl")
    ]
    # generation wasted: groups generated, then dropped by the learner as too stale or as duplicates
    admitted = int(r.get(keys.admitted_count))
    wasted = counts["stale_dropped"] + counts["duplicates_dropped"]
    waste = wasted / admitted
    assert waste < 0.05, (wasted, admitted, counts)
    report("soak", {
        "soak_s": SOAK_S, "samples": len(redis_mem.values), "steps": steps, "groups_per_s": round(steps * B / SOAK_S, 2),
        "rss_mb": {n: [round(v / MB, 1) for v in s.halves()] for n, s in rss.items()},
        "redis_used_memory_mb": [round(v / MB, 2) for v in redis_mem.halves()],
        "xlen_max": {s: max(v.values) for s, v in xlen.items()}, "rollouts_cap": rollouts_cap,
        "prompts_cap": prompts_cap, "consumed_per_publish_interval_max": per_interval, "pending_at_end": pending,
        "open_admissions": open_admissions, "redis_keys": r.dbsize(), "admitted": admitted,
        "released": int(r.get(keys.released_count) or 0), "wasted": wasted, "waste_pct": round(100 * waste, 2),
        "producers_reclaimed": sum(row["reclaimed"] for row in last_rows),  # at their last heartbeat
        "producers_lost_to_reclaim": sum(row["lost_to_reclaim"] for row in last_rows),
        **counts,
    })  # fmt: skip
