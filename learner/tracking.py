"""Experiment trackers (``learner.report_to`` / ``--report-to``) and the sample completions of a run.

Trackers are optional: each is imported only when asked for, and a missing package stops the learner at start
with one line naming the extra to install (``pip install 'gspo-pipeline[wandb]'``). Every step's numeric
metrics go to each tracker under the keys of ``metrics.jsonl``; sample completions (``learner.samples_every``)
go to ``RUN_DIR/samples.jsonl`` and to each tracker as a table (W&B, trackio), a JSON artifact (MLflow) or
text (TensorBoard).

- ``wandb``: ``wandb.init(project=learner.report_project, name=run, config=<the config>, dir=RUN_DIR)``;
- ``mlflow``: experiment ``learner.report_project``, a run named ``run`` (``MLFLOW_TRACKING_URI`` as usual),
  the config as the artifact ``config.json``;
- ``trackio``: ``trackio.init(project=..., name=run, config=...)``;
- ``tensorboard``: event files under ``RUN_DIR/tensorboard`` (``torch.utils.tensorboard``, which needs the
  ``tensorboard`` package).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRACKERS = ("wandb", "mlflow", "trackio", "tensorboard")
SAMPLE_COLUMNS = (
    "step",
    "group_id",
    "prompt",
    "completion",
    "reward",
    "finish_reason",
    "staleness",
    "version",
    "tokens",
)


class TrackerError(RuntimeError):
    """A tracker that cannot start (its package is missing, or it refused to initialise), in one line."""


def _import(module: str, tracker: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(
            f"learner.report_to includes {tracker!r} but the {module.split('.')[0]} package is not installed: "
            f"pip install 'gspo-pipeline[{tracker}]'"
        ) from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a metrics row (lists, maps, strings and NaN left out)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


class Tracker:
    name = "tracker"

    def log(self, record: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, project: str, run: str, config: dict, run_dir: Path):
        self.wandb = _import("wandb", "wandb")
        self.run = self.wandb.init(project=project, name=run, config=config, dir=str(run_dir))

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(scalars(record), step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        table = self.wandb.Table(
            columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows]
        )
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, project: str, run: str, config: dict, run_dir: Path):
        self.mlflow = _import("mlflow", "mlflow")
        self.mlflow.set_experiment(project)
        self.run = self.mlflow.start_run(run_name=run)
        self.mlflow.log_dict(config, "config.json")

    def log(self, record: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(scalars(record), step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        data = {c: [r[c] for r in rows] for c in SAMPLE_COLUMNS}
        self.mlflow.log_table(data=data, artifact_file=f"samples/step_{step:08d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, project: str, run: str, config: dict, run_dir: Path):
        self.trackio = _import("trackio", "trackio")
        self.trackio.init(project=project, name=run, config=config)

    def log(self, record: dict[str, Any], step: int) -> None:
        self.trackio.log(scalars(record), step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        table_cls = getattr(self.trackio, "Table", None)
        if table_cls is None:  # an old trackio without tables: the samples stay in samples.jsonl
            return
        table = table_cls(columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows])
        self.trackio.log({"samples": table}, step=step)

    def close(self) -> None:
        self.trackio.finish()


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, project: str, run: str, config: dict, run_dir: Path):
        tb = _import("torch.utils.tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, record: dict[str, Any], step: int) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
        for r in rows:
            cells = (str(r[c]).replace("|", "\\|").replace("\n", "⏎") for c in SAMPLE_COLUMNS)
            lines.append("| " + " | ".join(cells) + " |")
        self.writer.add_text("samples", "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


_CLASSES: dict[str, type[Tracker]] = {
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
    "tensorboard": TensorBoardTracker,
}


def open_trackers(names: list[str], project: str, run: str, config: dict, run_dir: Path) -> list[Tracker]:
    """One tracker per name (duplicates once); a TrackerError names the first that cannot start."""
    out: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):
            if name not in _CLASSES:
                raise TrackerError(f"learner.report_to: unknown tracker {name!r}; use {', '.join(TRACKERS)}")
            try:
                out.append(_CLASSES[name](project, run, config, run_dir))
            except TrackerError:
                raise
            except Exception as e:  # noqa: BLE001 - a tracker's own start-up error, stated in one line
                raise TrackerError(f"{name} could not start: {type(e).__name__}: {e}") from None
    except TrackerError:
        for t in out:
            t.close()
        raise
    return out


class SampleLog:
    """Sample completions: one JSON object per completion in RUN_DIR/samples.jsonl, and to the trackers."""

    def __init__(self, run_dir: str | Path, trackers: list[Tracker]):
        self.path = Path(run_dir) / "samples.jsonl"
        self.trackers = trackers

    def write(self, rows: list[dict[str, Any]], step: int) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        for t in self.trackers:
            try:
                t.log_samples(rows, step)
            except Exception as e:  # noqa: BLE001 - a tracker hiccup must not stop training
                log.warning("%s: logging samples failed: %s: %s", t.name, type(e).__name__, e)


def component_means(samples: list[Any], prefix: str = "reward/") -> dict[str, float]:
    """``{prefix}<name>``: the mean of each reward's own score over the samples it applies to (not None)."""
    sums: dict[str, list[float]] = {}
    for s in samples:
        for name, v in (s.rewards or {}).items():
            if v is not None:
                sums.setdefault(name, []).append(float(v))
    return {f"{prefix}{name}": sum(vs) / len(vs) for name, vs in sorted(sums.items())}


def sample_rows(
    tokenizer: Any, step: int, groups: list[tuple[Any, int]], n_groups: int
) -> list[dict[str, Any]]:
    """Every completion of the first ``n_groups`` groups of a batch, as the SAMPLE_COLUMNS (text decoded with
    special tokens kept, so that a template's markers and the stop token show), plus each reward's own score."""
    rows = []
    for g, k in groups[:n_groups]:
        prompt = tokenizer.decode([int(x) for x in g.prompt_ids], skip_special_tokens=False)
        for s in g.samples:
            row = {
                "step": step,
                "group_id": g.group_id,
                "prompt": prompt,
                "completion": tokenizer.decode([int(x) for x in s.completion_ids], skip_special_tokens=False),
                "reward": float(s.reward),
                "finish_reason": s.finish_reason,
                "staleness": int(k),
                "version": int(s.version_start),
                "tokens": int(s.completion_ids.size),
            }
            if s.rewards:
                row["rewards"] = dict(s.rewards)
            rows.append(row)
    return rows
