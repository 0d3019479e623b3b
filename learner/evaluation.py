"""Evaluation rounds: every ``learner.eval_every`` steps the eval prompts (``learner.eval_dataset``) are put on
the prompts stream like any others; producers generate and score them with their current weights, and the
learner takes their groups off the rollouts stream without training them.

An eval prompt's task id is ``{run}-eval-{step:09d}-{i:06d}`` (the step that started its round). The intake
counts each eval group as consumed (its admission slot is released) and acks it with the next checkpoint,
then hands it here. A round is reported in the metrics row of the step at which its last group arrived (or the
next row, when two rounds finish at once); one whose groups do not all arrive (a prompt dead-lettered) is
reported with what it has once a later round is complete, or once more than ``MAX_OPEN`` rounds are open:

- ``eval/reward``: mean reward over every sampled completion of the round (G per prompt);
- ``eval/reward/<name>``: each reward's own mean, with several rewards (``task.rewards``);
- ``eval/step``: the step that started the round; ``eval/groups`` / ``eval/prompts``: groups received of the
  prompts enqueued; ``eval/version``: mean weight version that generated them; ``eval/truncated``: the share
  of completions cut at ``max_new_tokens``; ``eval/tokens``: mean completion length.

Eval groups are sampled with the run's sampling parameters (temperature included), as TRL evaluates with the
generation settings of training. Rounds are kept in memory: after a learner restart, the groups of a round
started before it are counted and acked but not reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from common.wire import RolloutGroup
from learner.tracking import component_means

MAX_OPEN = 4  # rounds waiting for groups; an older one is then reported with what it has


@dataclass
class Round:
    step: int
    prompts: int
    groups: list[RolloutGroup] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        samples = [s for g in self.groups for s in g.samples]
        n = max(1, len(samples))
        out: dict[str, Any] = {
            "eval/step": self.step,
            "eval/prompts": self.prompts,
            "eval/groups": len(self.groups),
        }
        if samples:
            out["eval/reward"] = sum(float(s.reward) for s in samples) / n
            out["eval/version"] = sum(s.version_start for s in samples) / n
            out["eval/truncated"] = sum(s.finish_reason == "length" for s in samples) / n
            out["eval/tokens"] = sum(int(s.completion_ids.size) for s in samples) / n
            out.update(component_means(samples, prefix="eval/reward/"))
        return out


class Evaluator:
    def __init__(self, run: str, every: int):
        self.every = every
        self.prefix = f"{run}-eval-"
        self._id = re.compile(rf"^{re.escape(self.prefix)}(\d{{9}})-\d{{6}}$")
        self.rounds: dict[int, Round] = {}
        self.ready: list[Round] = []

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def started(self, step: int, prompts: int) -> None:
        """A round of ``prompts`` eval prompts was enqueued at ``step``."""
        self.rounds[step] = Round(step, prompts)
        while len(self.rounds) > MAX_OPEN:
            self.ready.append(self.rounds.pop(min(self.rounds)))

    def is_eval(self, group_id: str) -> bool:
        return group_id.startswith(self.prefix)

    def record(self, group: RolloutGroup) -> None:
        m = self._id.match(group.group_id)
        rnd = self.rounds.get(int(m.group(1))) if m else None
        if rnd is None:
            return  # a round this process did not start (before a restart) or already reported
        rnd.groups.append(group)
        if len(rnd.groups) >= rnd.prompts:  # complete: report it, and the older rounds with what they have
            for s in sorted(s for s in self.rounds if s <= rnd.step):
                self.ready.append(self.rounds.pop(s))

    def take_metrics(self) -> dict[str, Any]:
        """The metrics of the oldest reported round not yet returned (one per step row: two rounds finishing at
        once are in two successive rows), or {}. A round closed without any group has no row."""
        self.ready = [r for r in self.ready if r.groups]
        return self.ready.pop(0).metrics() if self.ready else {}
