"""A producer's counters and their export: one JSONL row per heartbeat in ``RUN_DIR/metrics/``, handed to
``common/prom.py`` (the one metrics path of both services; its PRODUCER_KEYS maps these row keys to the
Prometheus names), which serves them on ``metrics_port`` if > 0."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import prom
from common.config import Settings
from common.wire import ProducerHeartbeat


@dataclass
class ProducerMetrics:
    groups_total: int = 0
    samples_total: int = 0
    tokens_total: int = 0
    generate_s_total: float = 0.0
    paced_s_total: float = 0.0
    weight_version: int = 0
    weight_syncs: int = 0
    weight_sync_s: float = 0.0  # duration of the last reload (verification excluded)
    checkpoints_refused: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0  # prompts taken over from dead producers (XAUTOCLAIM), never this producer's own
    # prompts this producer had, found pending for another one (reclaimed while this one was stalled for
    # longer than claim_idle_ms): dropped if held, generated but not appended if admitted
    lost_to_reclaim: int = 0
    # time.monotonic() of the start of the first engine call and of the end of the latest append (0: none yet):
    # the steady part of a run, start-up and shutdown left out (bench/producer_overhead.py). Clocks of this
    # process only: not exported
    first_generate_start: float = 0.0
    last_append_end: float = 0.0


LOCAL_ONLY = ("first_generate_start", "last_append_end")  # ProducerMetrics fields not exported


class MetricsExporter:
    """Writes ``producer-<id>.jsonl`` and feeds the producer's Prometheus endpoint (if ``metrics_port``)."""

    def __init__(self, settings: Settings, producer_id: str):
        self.path = Path(settings.run_dir) / "metrics" / f"producer-{producer_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.server = prom.start_metrics_server(settings.metrics_port, service="producer")

    def export(self, m: ProducerMetrics, hb: ProducerHeartbeat) -> None:
        counters = {k: v for k, v in asdict(m).items() if k not in LOCAL_ONLY}
        row = {"time": time.time(), "state": hb.state, "tokens_per_s": hb.tokens_per_s, **counters}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        prom.producer_observe(row)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
