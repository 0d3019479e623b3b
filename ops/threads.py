"""How many torch threads ``gspo up`` gives each process it starts on one machine.

The learner and the producers share the machine's cores. Each producer gets one thread (``--producer-threads``
overrides): on a small model its engine call is a chain of tiny kernels that a second thread barely speeds up.
The learner (each rank) gets the cores the producers leave **plus one** (``--learner-threads`` overrides): a
producer is busy only part of the time (on the reference task about half of it: it generates a batch in less time
than the learner trains one), so the learner shares one core with the producers rather than leave it idle while
they wait. On 2 cores with 1 producer that is 2 learner threads.

OpenMP threads of every process ``gspo up`` starts wait *passively* (``OMP_WAIT_POLICY=PASSIVE``, unless the
environment sets it): by default a thread that reaches a barrier first spins on its core for a while, which on a
machine shared by the learner and the producers burns the core the other process needed. On 2 cores, the reference
task: reward 0.8 at 111 s with passive waits against 129 s spinning (241 steps both; 0.38 vs 0.41 s per step).

The rule is measured, not assumed: ``python -m bench.e2e_vs_trl --only ours --learner-threads N`` runs the
reference task with N learner threads. On 2 cores, 2 learner threads against 1: 0.41 vs 0.45 s per step and
reward 0.8 at 96 s vs 109 s (README, "Benchmarks").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

OMP_WAIT_POLICY = "PASSIVE"  # what the processes gspo up starts get, unless the environment sets it


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; cgroup CPU quotas are not read)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    learner: int  # per rank
    producer: int  # per producer process
    cores: int
    rule: str

    def describe(self) -> str:
        wait = os.environ.get("OMP_WAIT_POLICY", OMP_WAIT_POLICY).lower()
        return (
            f"learner {self.learner} per rank, producers {self.producer} each ({self.rule}; {self.cores} cores); "
            f"OpenMP waits {wait}"
        )


def thread_plan(
    producers: int,
    learner_ranks: int = 1,
    learner_threads: int | None = None,
    producer_threads: int | None = None,
    cores: int | None = None,
) -> ThreadPlan:
    """Threads per learner rank and per producer for ``producers`` producers and ``learner_ranks`` ranks on
    ``cores`` cores (default: :func:`usable_cores`). Explicit values win; the rest follow the module rule."""
    cores = usable_cores() if cores is None else cores
    producer = producer_threads or 1
    if learner_threads:
        return ThreadPlan(learner_threads, producer, cores, "as given")
    shared = 1 if producers > 0 else 0  # one core shared with the producers (module docstring)
    left = min(cores, cores - producers * producer + shared)
    learner = max(1, left // max(1, learner_ranks))
    return ThreadPlan(learner, producer, cores, "learner: the cores the producers leave plus one")
