"""Prometheus metrics of the learner and the producers (torch-free).

One private registry holds every metric under a stable ``gspo_*`` name; ``ops/prometheus.yml`` scrapes
it and ``ops/grafana/gspo-dashboard.json`` queries exactly these names (a test checks that).
``--metrics-port 0`` (the default) starts nothing: the JSONL in the run dir stays the source of truth,
this endpoint is a live view of it.

Each process exposes its own values; Prometheus adds the ``instance`` label, so producers need no
label of their own. In a multi-rank learner only rank 0 should serve (the ranks share a port).
"""

from __future__ import annotations

import logging
import math
from numbers import Real

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...


def _gauge(name: str, doc: str) -> Gauge:
    return Gauge(name, doc, registry=REGISTRY)


# ---------------------------------------------------------------- learner (one row of metrics.jsonl)
LEARNER_STEP = _gauge("gspo_learner_step", "last learner step (= policy version)")
REWARD_MEAN = _gauge("gspo_reward_mean", "mean reward of the last batch")
REWARD_STD = _gauge("gspo_reward_std", "std of the rewards of the last batch")
CLIP_FRAC = _gauge("gspo_clip_frac", "fraction of sequences whose ratio was clipped")
STALENESS_MEAN = _gauge("gspo_staleness_mean", "mean staleness (versions) of the groups trained on")
STALENESS_MAX = _gauge("gspo_staleness_max", "max staleness (versions) of the groups trained on")
STALENESS_DROPPED = _gauge("gspo_staleness_dropped", "groups dropped as too stale in the last step")
IS_ESS = _gauge("gspo_is_ess", "normalised effective sample size of the behaviour importance weights")
LEARNER_TOKENS_PER_S = _gauge("gspo_learner_tokens_per_second", "tokens trained per second (last step)")
LEARNER_GROUPS_PER_S = _gauge("gspo_learner_groups_per_second", "groups trained per second (last step)")
ROLLOUTS_BACKLOG = _gauge("gspo_rollouts_backlog", "rollout groups not yet delivered to the learner")
ROLLOUTS_PENDING = _gauge("gspo_rollouts_pending", "rollout groups delivered but not acked")
WEIGHT_PUBLISH_S = _gauge("gspo_weight_publish_seconds", "time to write and announce the last checkpoint")

# metrics.jsonl key -> gauge (keys absent from a row leave the gauge as it was)
LEARNER_KEYS: dict[str, Gauge] = {
    "step": LEARNER_STEP,
    "reward/mean": REWARD_MEAN,
    "reward/std": REWARD_STD,
    "gspo/clip_frac": CLIP_FRAC,
    "staleness/mean": STALENESS_MEAN,
    "staleness/max": STALENESS_MAX,
    "staleness/dropped": STALENESS_DROPPED,
    "is/ess": IS_ESS,
    "throughput/tokens_per_s": LEARNER_TOKENS_PER_S,
    "throughput/groups_per_s": LEARNER_GROUPS_PER_S,
    "stream/backlog": ROLLOUTS_BACKLOG,
    "stream/pending": ROLLOUTS_PENDING,
    "weights/publish_s": WEIGHT_PUBLISH_S,
}

# ---------------------------------------------------------------- producer
PRODUCER_GROUPS = Counter(
    "gspo_producer_groups", "rollout groups appended to the rollouts stream", registry=REGISTRY
)
PRODUCER_TOKENS_PER_S = _gauge(
    "gspo_producer_tokens_per_second", "completion tokens generated per second (recent)"
)
PRODUCER_WEIGHT_VERSION = _gauge("gspo_producer_weight_version", "policy version the engine currently serves")
WEIGHT_SYNC_S = _gauge("gspo_weight_sync_seconds", "time the last weight reload took (verify + load)")
PRODUCER_PACED_S = Counter(
    "gspo_producer_paced_seconds", "seconds spent waiting for admission (staleness bound)", registry=REGISTRY
)


def metric_names() -> set[str]:
    """Every sample name this module exposes (counters with their ``_total`` suffix)."""
    names = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name.startswith("gspo_") and not sample.name.endswith("_created"):
                names.add(sample.name)
    return names


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> bool:
    """Serve ``/metrics`` on ``port`` in a daemon thread; ``port <= 0`` starts nothing and returns False."""
    if port <= 0:
        return False
    start_http_server(port, addr=addr, registry=REGISTRY)
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)
    return True


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def learner_observe(metrics: dict) -> None:
    """Set the learner gauges from one metrics.jsonl row; keys the row lacks are left unchanged."""
    for key, gauge in LEARNER_KEYS.items():
        if key in metrics and metrics[key] is not None:
            gauge.set(_number(key, metrics[key]))


def producer_observe(
    *,
    groups: int = 0,
    paced_s: float = 0.0,
    tokens_per_s: float | None = None,
    weight_version: int | None = None,
    weight_sync_s: float | None = None,
) -> None:
    """Count ``groups`` new groups and ``paced_s`` seconds of pacing; set the gauges given."""
    if groups < 0 or paced_s < 0 or math.isnan(paced_s):
        raise ValueError(f"counters only grow: groups={groups}, paced_s={paced_s}")
    if groups:
        PRODUCER_GROUPS.inc(groups)
    if paced_s:
        PRODUCER_PACED_S.inc(paced_s)
    if tokens_per_s is not None:
        PRODUCER_TOKENS_PER_S.set(tokens_per_s)
    if weight_version is not None:
        PRODUCER_WEIGHT_VERSION.set(weight_version)
    if weight_sync_s is not None:
        WEIGHT_SYNC_S.set(weight_sync_s)
