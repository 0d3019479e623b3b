"""Per-step metrics: one JSON object per line in RUN_DIR/metrics.jsonl (flushed each line), a rich
progress line on a TTY, TensorBoard events when ``learner.tensorboard`` is on and tensorboard importable, and
the experiment trackers of ``learner.report_to`` (``learner/tracking.py``)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf: write null rather than an invalid line
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class MetricsWriter:
    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = False,
        progress: bool | None = None,
        trackers: list | None = None,
    ):
        self.trackers = list(trackers or [])
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard") if tensorboard else None
        self._console = None
        if progress if progress is not None else sys.stderr.isatty():
            from rich.console import Console

            self._console = Console(stderr=True)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        for t in self.trackers:
            try:
                t.log(record, step)
            except Exception as e:  # noqa: BLE001 - a tracker hiccup (network) must not stop training
                log.warning("%s: logging step %d failed: %s: %s", t.name, step, type(e).__name__, e)
        if self._console is not None:
            self._console.print(progress_line(record), highlight=False)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # noqa: BLE001
                log.warning("%s: closing failed: %s: %s", t.name, type(e).__name__, e)


def progress_line(r: dict[str, Any]) -> str:
    return (
        f"step {r.get('step')}  reward {r.get('reward/mean', 0):.3f}  loss {r.get('loss', 0):+.4f}  "
        f"clip {r.get('gspo/clip_frac', 0):.3f}  stale {r.get('staleness/mean', 0):.2f}  "
        f"{r.get('throughput/tokens_per_s', 0):.0f} tok/s  wait {r.get('time/wait_s', 0):.2f}s"
    )


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("learner.tensorboard is on but tensorboard is not installed: writing metrics.jsonl only")
        return None
    return SummaryWriter(str(path))
