"""learner/tracking.py with fake tracker modules put in sys.modules: what each tracker is given (init, every
step's scalar metrics, the sample tables), the one-line error for a tracker whose package is missing, the
samples file and the per-reward means."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from common.wire import RolloutGroup, Sample
from learner.metrics import MetricsWriter
from learner.tracking import (
    SAMPLE_COLUMNS,
    SampleLog,
    TrackerError,
    component_means,
    open_trackers,
    sample_rows,
)
from modeling import build_char_tokenizer

ROW = {
    "step": 3,
    "reward/mean": 0.5,
    "loss": -0.1,
    "staleness/hist": {"0": 2},
    "groups/ids": ["a"],
    "x": None,
}


class Calls(list):
    def __call__(self, name):
        def record(*args, **kw):
            self.append((name, args, kw))
            return self

        return record


def fake_wandb(calls: Calls) -> types.ModuleType:
    m = types.ModuleType("wandb")
    run = types.SimpleNamespace(log=calls("run.log"), finish=calls("run.finish"))

    def init(**kw):
        calls.append(("init", (), kw))
        return run

    m.init = init
    m.Table = lambda columns, data: ("Table", tuple(columns), [list(r) for r in data])
    return m


def fake_mlflow(calls: Calls) -> types.ModuleType:
    m = types.ModuleType("mlflow")
    for name in ("set_experiment", "start_run", "log_dict", "log_metrics", "log_table", "end_run"):
        setattr(m, name, calls(name))
    return m


def fake_trackio(calls: Calls) -> types.ModuleType:
    m = types.ModuleType("trackio")
    for name in ("init", "log", "finish"):
        setattr(m, name, calls(name))
    m.Table = lambda columns, data: ("Table", tuple(columns), [list(r) for r in data])
    return m


def fake_tensorboard(calls: Calls) -> types.ModuleType:
    m = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, logdir):
            calls.append(("SummaryWriter", (logdir,), {}))

        add_scalar = staticmethod(calls("add_scalar"))
        add_text = staticmethod(calls("add_text"))
        close = staticmethod(calls("close"))

    m.SummaryWriter = SummaryWriter
    return m


def samples() -> list[dict]:
    return [
        {
            "step": 3,
            "group_id": "g",
            "prompt": "1+1=",
            "completion": "2</s>",
            "reward": 1.0,
            "finish_reason": "stop",
            "staleness": 1,
            "version": 2,
            "tokens": 2,
        }
    ]


def test_wandb_gets_the_config_each_steps_scalars_and_sample_tables(tmp_path, monkeypatch):
    calls = Calls()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    (t,) = open_trackers(["wandb"], "proj", "run-1", {"learner": {"lr": 1e-3}}, tmp_path)
    w = MetricsWriter(tmp_path, trackers=[t], progress=False)
    w.write(ROW)
    SampleLog(tmp_path, [t]).write(samples(), 3)
    w.close()
    assert calls[0] == (
        "init",
        (),
        {"project": "proj", "name": "run-1", "config": {"learner": {"lr": 1e-3}}, "dir": str(tmp_path)},
    )
    assert calls[1] == ("run.log", ({"step": 3.0, "reward/mean": 0.5, "loss": -0.1},), {"step": 3})
    name, (payload,), kw = calls[2]
    assert name == "run.log" and kw == {"step": 3}
    assert payload["samples"][1] == SAMPLE_COLUMNS and payload["samples"][2][0][3] == "2</s>"
    assert calls[-1][0] == "run.finish"
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward/mean"] == 0.5


def test_mlflow_gets_an_experiment_a_run_metrics_and_sample_artifacts(tmp_path, monkeypatch):
    calls = Calls()
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(calls))
    (t,) = open_trackers(["mlflow"], "proj", "run-1", {"a": 1}, tmp_path)
    t.log(ROW, 3)
    t.log_samples(samples(), 3)
    t.close()
    names = [c[0] for c in calls]
    assert names == ["set_experiment", "start_run", "log_dict", "log_metrics", "log_table", "end_run"]
    assert calls[1][2] == {"run_name": "run-1"}
    assert calls[3][1][0] == {"step": 3.0, "reward/mean": 0.5, "loss": -0.1} and calls[3][2] == {"step": 3}
    assert calls[4][2]["artifact_file"] == "samples/step_00000003.json"
    assert calls[4][2]["data"]["completion"] == ["2</s>"]


def test_trackio_and_tensorboard(tmp_path, monkeypatch):
    calls = Calls()
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(calls))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tensorboard(calls))
    trackers = open_trackers(["trackio", "tensorboard", "trackio"], "proj", "r", {}, tmp_path)
    assert [t.name for t in trackers] == ["trackio", "tensorboard"]  # each once
    for t in trackers:
        t.log(ROW, 3)
        t.log_samples(samples(), 3)
        t.close()
    names = [c[0] for c in calls]
    assert names[:2] == ["init", "SummaryWriter"]
    assert ("log", ({"step": 3.0, "reward/mean": 0.5, "loss": -0.1},), {"step": 3}) in calls
    assert calls[1][1] == (str(tmp_path / "tensorboard"),)
    assert ("add_scalar", ("reward/mean", 0.5, 3), {}) in calls
    text = [c for c in calls if c[0] == "add_text" and c[1][0] == "samples"]
    assert text and "2</s>" in text[0][1][1]
    assert names.count("finish") == 1 and names.count("close") == 1


@pytest.mark.parametrize(
    "tracker, module", [("wandb", "wandb"), ("mlflow", "mlflow"), ("trackio", "trackio")]
)
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(TrackerError) as e:
        open_trackers([tracker], "p", "r", {}, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"pip install 'gspo-pipeline[{tracker}]'" in msg and module in msg


def test_a_tracker_that_fails_to_start_closes_those_already_started(tmp_path, monkeypatch):
    calls = Calls()
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(calls))
    broken = types.ModuleType("wandb")

    def init(**kw):
        raise RuntimeError("no API key configured")

    broken.init = init
    monkeypatch.setitem(sys.modules, "wandb", broken)
    with pytest.raises(TrackerError, match="wandb could not start: RuntimeError: no API key configured"):
        open_trackers(["trackio", "wandb"], "p", "r", {}, tmp_path)
    assert [c[0] for c in calls] == ["init", "finish"]


def _group(gid: str, rewards: list[dict], k_version: int = 2) -> RolloutGroup:
    tok = build_char_tokenizer()
    ids = np.array(tok("12+34=").input_ids)
    samples = tuple(
        Sample(
            np.array(tok("46").input_ids + [tok.eos_token_id]),
            np.full(3, -0.1, np.float32),
            1.0,
            "stop",
            k_version,
            k_version,
            rewards=r,
        )
        for r in rewards
    )
    return RolloutGroup(gid, gid, ids, "addition", "p", "fp", samples)


def test_sample_rows_and_reward_means(tmp_path):
    tok = build_char_tokenizer()
    g1 = _group("g1", [{"exact": 1.0, "fmt": None}, {"exact": 0.0, "fmt": 0.5}])
    g2 = _group("g2", [{"exact": 1.0, "fmt": 1.0}])
    assert component_means([s for g in (g1, g2) for s in g.samples]) == {
        "reward/exact": 2 / 3,
        "reward/fmt": 0.75,
    }
    assert component_means(list(_group("g3", [{}]).samples)) == {}
    rows = sample_rows(tok, 7, [(g1, 1), (g2, 0)], n_groups=1)
    assert len(rows) == 2
    assert rows[0] == {
        "step": 7,
        "group_id": "g1",
        "prompt": "12+34=",
        "completion": "46</s>",
        "reward": 1.0,
        "finish_reason": "stop",
        "staleness": 1,
        "version": 2,
        "tokens": 3,
        "rewards": {"exact": 1.0, "fmt": None},
    }
    SampleLog(tmp_path, []).write(rows, 7)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["completion"] for x in lines] == ["46</s>", "46</s>"]
