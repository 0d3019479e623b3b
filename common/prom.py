"""Prometheus metrics of the learner and the producers (torch-free): the one metrics path of both services.

Each service writes JSONL rows (the learner ``RUN_DIR/metrics.jsonl``, a producer
``RUN_DIR/metrics/producer-<id>.jsonl``) and hands every row to :func:`learner_observe` /
:func:`producer_observe`. A metric has one JSONL name (the key the learner or producer writes, and the
one ``ops/report.py`` reads) and one Prometheus name; :data:`LEARNER_KEYS` and :data:`PRODUCER_KEYS`
below are the one mapping between the two (``ops/README.md``, "Prometheus and Grafana", lists the
Prometheus names). ``ops/grafana/gspo-dashboard.json`` queries exactly these names: a test checks it
against the tables, another against a live learner and producer.

Each service has a registry of its own, so a learner never exposes producer metrics (the dashboard
counts producers by ``gspo_producer_weight_version``) and a producer never exposes learner ones. A
metric reads 0 until its first row. ``--metrics-port 0`` (the default) starts nothing: the JSONL
stays the source of truth, this endpoint is a live view of it. Prometheus adds the ``instance`` label,
so producers need no label of their own. In a multi-rank learner only rank 0 serves (the ranks share a
port).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from numbers import Real

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    name: str  # the Prometheus name; a counter is exposed with ``_total`` appended
    doc: str
    counter: bool = False  # the JSONL value is a running total

    @property
    def sample(self) -> str:
        return f"{self.name}_total" if self.counter else self.name


# metrics.jsonl key -> Prometheus metric (keys absent from a row keep their last value)
LEARNER_KEYS: dict[str, Metric] = {
    "step": Metric("gspo_learner_step", "last learner step (= policy version)"),
    "reward/mean": Metric("gspo_reward_mean", "mean reward of the last batch"),
    "reward/std": Metric("gspo_reward_std", "std of the rewards of the last batch"),
    "gspo/clip_frac": Metric("gspo_clip_frac", "fraction of sequences whose ratio was clipped"),
    "staleness/mean": Metric("gspo_staleness_mean", "mean staleness (versions) of the groups trained on"),
    "staleness/max": Metric("gspo_staleness_max", "max staleness (versions) of the groups trained on"),
    "staleness/dropped": Metric("gspo_staleness_dropped", "groups dropped as too stale in the last step"),
    "is/ess": Metric("gspo_is_ess", "normalised effective sample size of the behaviour IS weights"),
    "throughput/tokens_per_s": Metric("gspo_learner_tokens_per_second", "tokens trained/s (last step)"),
    "throughput/groups_per_s": Metric("gspo_learner_groups_per_second", "groups trained/s (last step)"),
    "stream/backlog": Metric("gspo_rollouts_backlog", "rollout groups not yet delivered to the learner"),
    "stream/pending": Metric("gspo_rollouts_pending", "rollout groups delivered but not acked"),
    "weights/publish_s": Metric("gspo_weight_publish_seconds", "time to write and announce a checkpoint"),
}

# producer-<id>.jsonl key -> Prometheus metric
PRODUCER_KEYS: dict[str, Metric] = {
    "groups_total": Metric("gspo_producer_groups", "rollout groups appended", counter=True),
    "paced_s_total": Metric("gspo_producer_paced_seconds", "seconds paced by admission", counter=True),
    "tokens_per_s": Metric("gspo_producer_tokens_per_second", "completion tokens generated/s (recent)"),
    "weight_version": Metric("gspo_producer_weight_version", "policy version the engine serves"),
    "weight_sync_s": Metric("gspo_weight_sync_seconds", "time the last weight reload took (load only)"),
}


class _LatestRow:
    """A collector exposing the latest value of each key of one service's metrics rows."""

    def __init__(self, keys: dict[str, Metric]):
        self.keys = keys
        self.values = dict.fromkeys(keys, 0.0)  # every metric is exposed from the start

    def observe(self, row: dict) -> None:
        new = {k: _number(k, row[k]) for k in self.keys if row.get(k) is not None}
        self.values.update(new)  # all checked first: a bad row changes nothing

    def collect(self):
        for key, m in self.keys.items():
            family = CounterMetricFamily if m.counter else GaugeMetricFamily
            yield family(m.name, m.doc, value=self.values[key])


def _registry(keys: dict[str, Metric]) -> tuple[CollectorRegistry, _LatestRow]:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    latest = _LatestRow(keys)
    registry.register(latest)
    return registry, latest


_SERVICES = {"learner": _registry(LEARNER_KEYS), "producer": _registry(PRODUCER_KEYS)}


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def learner_observe(row: dict) -> None:
    """Take one metrics.jsonl row of the learner; keys the row lacks keep their last value."""
    _SERVICES["learner"][1].observe(row)


def producer_observe(row: dict) -> None:
    """Take one producer-<id>.jsonl row (running totals, not increments); keys it lacks keep their value."""
    _SERVICES["producer"][1].observe(row)


def registry(service: str) -> CollectorRegistry:
    """The registry of ``service`` ("learner" or "producer")."""
    return _SERVICES[service][0]


def metric_names(service: str) -> set[str]:
    """The sample names ``service`` exposes (counters with their ``_total`` suffix)."""
    keys = LEARNER_KEYS if service == "learner" else PRODUCER_KEYS
    return {m.sample for m in keys.values()}


def start_metrics_server(port: int, addr: str = "0.0.0.0", service: str = "learner"):
    """Serve ``service``'s ``/metrics`` on ``port`` in a daemon thread and return the server (``shutdown()``
    stops it); ``port <= 0`` starts nothing and returns None."""
    if port <= 0:
        return None
    server, _ = start_http_server(port, addr=addr, registry=registry(service))
    log.info("Prometheus metrics of the %s on http://%s:%d/metrics", service, addr, port)
    return server
