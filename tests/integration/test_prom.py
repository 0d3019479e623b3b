"""common/prom.py: the /metrics endpoint shows what learner_observe / producer_observe were given."""

from __future__ import annotations

import socket

import httpx
import pytest

from common import prom


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(name: str) -> float | None:
    return prom.REGISTRY.get_sample_value(name)


def _scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text
    values = {}
    for line in text.splitlines():
        if line.startswith("gspo_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@pytest.fixture(scope="module")
def metrics_port() -> int:
    port = _free_port()
    assert prom.start_metrics_server(port, addr="127.0.0.1") is True
    return port


def test_port_zero_or_negative_starts_nothing():
    assert prom.start_metrics_server(0) is False
    assert prom.start_metrics_server(-1) is False


def test_learner_row_appears_on_the_endpoint(metrics_port):
    row = {
        "step": 42, "reward/mean": 0.625, "reward/std": 0.25, "gspo/clip_frac": 0.125, "staleness/mean": 1.5,
        "staleness/max": 3, "staleness/dropped": 2, "is/ess": 0.875, "throughput/tokens_per_s": 12345.5,
        "throughput/groups_per_s": 7.25, "stream/backlog": 96, "stream/pending": 32, "weights/publish_s": 4.5,
        "staleness/hist": [1, 2, 3], "loss": 0.01,
    }  # fmt: skip
    prom.learner_observe(row)
    got = _scrape(metrics_port)
    assert got["gspo_learner_step"] == 42
    assert got["gspo_reward_mean"] == 0.625
    assert got["gspo_reward_std"] == 0.25
    assert got["gspo_clip_frac"] == 0.125
    assert got["gspo_staleness_mean"] == 1.5
    assert got["gspo_staleness_max"] == 3
    assert got["gspo_staleness_dropped"] == 2
    assert got["gspo_is_ess"] == 0.875
    assert got["gspo_learner_tokens_per_second"] == 12345.5
    assert got["gspo_learner_groups_per_second"] == 7.25
    assert got["gspo_rollouts_backlog"] == 96
    assert got["gspo_rollouts_pending"] == 32
    assert got["gspo_weight_publish_seconds"] == 4.5


def test_keys_missing_from_a_row_keep_their_last_value(metrics_port):
    prom.learner_observe({"step": 7, "reward/mean": 0.5})
    prom.learner_observe({"step": 8})
    got = _scrape(metrics_port)
    assert got["gspo_learner_step"] == 8
    assert got["gspo_reward_mean"] == 0.5


def test_non_numeric_value_is_refused():
    with pytest.raises(TypeError, match="reward/mean"):
        prom.learner_observe({"reward/mean": "0.5"})
    with pytest.raises(TypeError, match="step"):
        prom.learner_observe({"step": True})


def test_producer_counters_accumulate_and_gauges_follow(metrics_port):
    groups0 = _sample("gspo_producer_groups_total")
    paced0 = _sample("gspo_producer_paced_seconds_total")
    prom.producer_observe(groups=3, paced_s=0.5, tokens_per_s=800.0, weight_version=5, weight_sync_s=1.25)
    prom.producer_observe(groups=2, paced_s=0.25)
    got = _scrape(metrics_port)
    assert got["gspo_producer_groups_total"] == groups0 + 5
    assert got["gspo_producer_paced_seconds_total"] == paced0 + 0.75
    assert got["gspo_producer_tokens_per_second"] == 800.0
    assert got["gspo_producer_weight_version"] == 5
    assert got["gspo_weight_sync_seconds"] == 1.25


def test_counters_refuse_to_go_down():
    with pytest.raises(ValueError, match="groups=-1"):
        prom.producer_observe(groups=-1)


def test_registry_exposes_the_documented_names():
    assert prom.metric_names() == {
        "gspo_learner_step", "gspo_reward_mean", "gspo_reward_std", "gspo_clip_frac", "gspo_staleness_mean",
        "gspo_staleness_max", "gspo_staleness_dropped", "gspo_is_ess", "gspo_learner_tokens_per_second",
        "gspo_learner_groups_per_second", "gspo_rollouts_backlog", "gspo_rollouts_pending",
        "gspo_weight_publish_seconds", "gspo_producer_groups_total", "gspo_producer_tokens_per_second",
        "gspo_producer_weight_version", "gspo_weight_sync_seconds", "gspo_producer_paced_seconds_total",
    }  # fmt: skip
