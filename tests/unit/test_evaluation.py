"""learner/evaluation.py: which eval round a group belongs to, when a round is reported, and its metrics."""

from __future__ import annotations

import numpy as np

from common.wire import RolloutGroup, Sample
from learner.evaluation import MAX_OPEN, Evaluator


def group(gid: str, reward: float, reason: str = "stop", version: int = 3) -> RolloutGroup:
    s = Sample(
        np.arange(4), np.full(4, -0.5, np.float32), reward, reason, version, version, rewards={"x": reward}
    )
    return RolloutGroup(gid, gid, np.arange(3), "t", "p", "fp", (s, s))


def eid(step: int, i: int) -> str:
    return f"run-eval-{step:09d}-{i:06d}"


def test_rounds_are_due_every_n_steps():
    ev = Evaluator("run", 3)
    assert [s for s in range(10) if ev.due(s)] == [3, 6, 9]
    assert (
        ev.is_eval(eid(3, 0))
        and not ev.is_eval("run-000000003")
        and not ev.is_eval("other-eval-000000003-000000")
    )


def test_a_round_is_reported_when_its_last_group_arrives():
    ev = Evaluator("run", 2)
    ev.started(2, 2)
    ev.record(group(eid(2, 0), 1.0))
    assert ev.take_metrics() == {}
    ev.record(group(eid(2, 1), 0.0, reason="length", version=4))
    m = ev.take_metrics()
    assert m == {
        "eval/step": 2,
        "eval/prompts": 2,
        "eval/groups": 2,
        "eval/reward": 0.5,
        "eval/version": 3.5,
        "eval/truncated": 0.5,
        "eval/tokens": 4.0,
        "eval/reward/x": 0.5,
    }
    assert ev.take_metrics() == {}
    ev.record(group(eid(2, 1), 1.0))  # a straggler of a reported round, or of a round before a restart
    ev.record(group(eid(8, 0), 1.0))
    assert ev.take_metrics() == {} and ev.rounds == {}


def test_an_incomplete_round_waits_for_a_later_complete_one_or_too_many_open():
    ev = Evaluator("run", 1)
    ev.started(1, 2)
    ev.started(2, 1)
    ev.record(group(eid(1, 0), 1.0))  # round 1 never gets its second group (dead-lettered prompt)
    assert ev.take_metrics() == {}
    ev.record(group(eid(2, 0), 0.0))  # round 2 completes: round 1 is reported too, with what it has
    first, second = ev.take_metrics(), ev.take_metrics()  # one per step row, oldest first
    assert (first["eval/step"], first["eval/groups"], first["eval/prompts"], first["eval/reward"]) == (
        1,
        1,
        2,
        1.0,
    )
    assert (second["eval/step"], second["eval/reward"]) == (2, 0.0)
    assert ev.take_metrics() == {} and ev.rounds == {}
    for s in range(3, 3 + MAX_OPEN + 1):
        ev.started(s, 1)
    assert sorted(ev.rounds) == list(range(4, 4 + MAX_OPEN))  # the oldest was closed with nothing: no row
    assert ev.take_metrics() == {}
