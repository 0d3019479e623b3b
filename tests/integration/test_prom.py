"""common/prom.py: each service's /metrics endpoint shows what learner_observe / producer_observe were given."""

from __future__ import annotations

import httpx
import pytest

from common import prom
from common.redis_conn import free_port


def _scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    values = {}
    for line in text.splitlines():
        if line.startswith("gspo_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@pytest.fixture(scope="module")
def ports():
    servers = {s: (free_port(), None) for s in ("learner", "producer")}
    for service, (port, _) in servers.items():
        servers[service] = (port, prom.start_metrics_server(port, addr="127.0.0.1", service=service))
    yield {service: port for service, (port, _) in servers.items()}
    for _, server in servers.values():
        server.shutdown()
        server.server_close()


def test_port_zero_starts_nothing():
    assert prom.start_metrics_server(0) is None
    assert prom.start_metrics_server(0, service="producer") is None


def test_learner_row_appears_on_the_learner_endpoint(ports):
    row = {
        "step": 42,
        "reward/mean": 0.625,
        "reward/std": 0.25,
        "gspo/clip_frac": 0.125,
        "staleness/mean": 1.5,
        "staleness/max": 3,
        "staleness/dropped": 2,
        "is/ess": 0.875,
        "throughput/tokens_per_s": 12345.5,
        "throughput/groups_per_s": 7.25,
        "stream/backlog": 96,
        "stream/pending": 32,
        "weights/publish_s": 4.5,
        "staleness/hist": [1, 2, 3],
        "loss": 0.01,
    }
    prom.learner_observe(row)
    got = _scrape(ports["learner"])
    want = {prom.LEARNER_KEYS[k].name: float(v) for k, v in row.items() if k in prom.LEARNER_KEYS}
    assert got == want  # every learner metric, and nothing of the producers


def test_keys_missing_from_a_row_keep_their_last_value(ports):
    prom.learner_observe({"step": 7, "reward/mean": 0.5})
    prom.learner_observe({"step": 8, "reward/mean": None})
    got = _scrape(ports["learner"])
    assert got["gspo_learner_step"] == 8
    assert got["gspo_reward_mean"] == 0.5


def test_non_numeric_value_is_refused_and_changes_nothing(ports):
    prom.learner_observe({"step": 9})
    with pytest.raises(TypeError, match="reward/mean"):
        prom.learner_observe({"step": 10, "reward/mean": "0.5"})
    with pytest.raises(TypeError, match="step"):
        prom.learner_observe({"step": True})
    assert _scrape(ports["learner"])["gspo_learner_step"] == 9


def test_producer_totals_are_counters_and_the_rest_gauges(ports):
    row = {
        "time": 1.0,
        "state": "idle",
        "groups_total": 5,
        "samples_total": 20,
        "paced_s_total": 0.75,
        "tokens_per_s": 800.0,
        "weight_version": 5,
        "weight_sync_s": 1.25,
    }
    prom.producer_observe(row)
    got = _scrape(ports["producer"])
    assert got == {
        "gspo_producer_groups_total": 5,
        "gspo_producer_paced_seconds_total": 0.75,
        "gspo_producer_tokens_per_second": 800.0,
        "gspo_producer_weight_version": 5,
        "gspo_weight_sync_seconds": 1.25,
    }
    text = httpx.get(f"http://127.0.0.1:{ports['producer']}/metrics", timeout=5.0).text
    assert "# TYPE gspo_producer_groups_total counter" in text
    assert "# TYPE gspo_producer_weight_version gauge" in text


def test_each_service_exposes_its_documented_names(ports):
    for service, port in ports.items():
        assert set(_scrape(port)) == prom.metric_names(service)
    assert not prom.metric_names("learner") & prom.metric_names("producer")
    assert prom.metric_names("learner") == {
        "gspo_learner_step",
        "gspo_reward_mean",
        "gspo_reward_std",
        "gspo_clip_frac",
        "gspo_staleness_mean",
        "gspo_staleness_max",
        "gspo_staleness_dropped",
        "gspo_is_ess",
        "gspo_learner_tokens_per_second",
        "gspo_learner_groups_per_second",
        "gspo_rollouts_backlog",
        "gspo_rollouts_pending",
        "gspo_weight_publish_seconds",
    }
    assert prom.metric_names("producer") == {
        "gspo_producer_groups_total",
        "gspo_producer_tokens_per_second",
        "gspo_producer_weight_version",
        "gspo_weight_sync_seconds",
        "gspo_producer_paced_seconds_total",
    }
