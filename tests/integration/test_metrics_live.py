"""A real ``gspo learner`` and ``gspo producer`` (separate processes, tiny model, private Redis) serve
/metrics: after a few steps every metric the shipped Grafana dashboard queries is exported by one of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from common.redis_conn import free_port
from ops.launcher import LocalCluster, read_metrics, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]
DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "gspo-dashboard.json"
SMALL = {
    "GSPO_PIPELINE__BATCH_GROUPS": "2",
    "GSPO_PIPELINE__GROUP_SIZE": "4",
    "GSPO_PIPELINE__MAX_STALENESS": "1",
    "GSPO_PRODUCER__SAMPLING__MAX_NEW_TOKENS": "4",
    "GSPO_PRODUCER__PROMPTS_PER_CALL": "2",
    "GSPO_LEARNER__PUBLISH_EVERY": "1",
}


def dashboard_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    return {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"\bgspo_[a-z_]+", t["expr"])}


def scrape(port: int) -> dict[str, float]:
    """Sample name -> value of every ``gspo_*`` sample (HELP/TYPE lines alone do not count); {} if not up."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    except httpx.TransportError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line.startswith("gspo_"):
            name, value = line.rsplit(" ", 1)
            samples[name.split("{")[0]] = float(value)
    return samples


def test_every_dashboard_metric_is_exported_by_a_live_service(redis_url, run_id, tiny_model_dir, tmp_path):
    learner_port, producer_port = free_port(), free_port()
    cluster = LocalCluster(
        run=run_id,
        run_dir=tmp_path,
        redis_url=redis_url,
        model=str(tiny_model_dir),
        learner_args=["--metrics-port", str(learner_port)],
        producer_args=["--metrics-port", str(producer_port)],
        env=SMALL,
    )
    try:
        cluster.start_learner()
        cluster.add_producer()

        def progressed() -> bool:
            steps = scrape(learner_port).get("gspo_learner_step", 0)
            groups = scrape(producer_port).get("gspo_producer_groups_total", 0)
            return steps >= 3 and groups >= 6

        # the producer exports at each heartbeat (every 2 s): wait for one after the groups of 3 steps
        assert wait_until(progressed, 180), "no 3 learner steps and 6 producer groups on the endpoints"
        learner, producer = scrape(learner_port), scrape(producer_port)
    finally:
        codes = cluster.stop()
    assert all(c == 0 for c in codes.values()), (
        codes,
        (tmp_path / "logs" / "learner.out").read_text()[-3000:],
    )

    missing = dashboard_names() - set(learner) - set(producer)
    assert not missing, f"queried by the dashboard, exported by neither service: {sorted(missing)}"
    assert not set(learner) & set(producer), "a metric exported by both services"  # each its own only
    assert len(read_metrics(tmp_path / "metrics.jsonl")) >= 3
