"""gspo report draws the per-staleness-bucket clip fraction and IS ESS next to the overall ones."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402

from ops.report import bucket_keys, plot_runs  # noqa: E402


def _rows(n: int = 30) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        r = {"step": s, "time/elapsed_s": 0.5 * s, "reward/mean": 0.3, "gspo/clip_frac": 0.5, "is/ess": 0.95}
        r.update(
            {"gspo/clip_frac/k=0": 0.4, "gspo/clip_frac/k=1": 0.9, "is/ess/k=1": 0.9, "is/ess/k=10": 0.8}
        )
        rows.append(r)
    return rows


def test_bucket_keys_are_found_and_ordered_by_k() -> None:
    rows = _rows(2)
    assert bucket_keys(rows, "gspo/clip_frac") == ["gspo/clip_frac/k=0", "gspo/clip_frac/k=1"]
    assert bucket_keys(rows, "is/ess") == ["is/ess/k=1", "is/ess/k=10"]
    assert bucket_keys(rows, "staleness/mean") == []


def test_report_plots_each_bucket(tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    labels: list[str] = []
    real_plot = Axes.plot

    def spy(self, *args, **kwargs):
        if "label" in kwargs:
            labels.append(f"{self.get_title() or ''}|{kwargs['label']}")
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    out = plot_runs([run], tmp_path / "report.png")
    assert out.exists() and out.stat().st_size > 10_000
    bucket_labels = sorted(x.split("|")[1] for x in labels if " k=" in x)
    assert bucket_labels == ["run k=0", "run k=1", "run k=1", "run k=10"]
