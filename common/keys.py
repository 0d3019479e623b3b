"""Every Redis name the pipeline uses, namespaced by run id.

Nothing else in the code base spells a key: producers, learner, CLI and tests all go through
:class:`RunKeys`, so a run's whole footprint is ``gspo:{run}:*`` (which is also the key pattern to
grant an ACL user limited to one run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRODUCERS_GROUP = "producers"
LEARNER_GROUP = "learner"
PREFIX = "gspo"
_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_run_name(run: str) -> str:
    if not _RUN_RE.match(run):
        raise ValueError(
            f"run name {run!r} is invalid: use 1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit"
        )
    return run


@dataclass(frozen=True)
class RunKeys:
    run: str

    def __post_init__(self) -> None:
        validate_run_name(self.run)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:{self.run}"

    # streams
    @property
    def prompts(self) -> str:
        """Stream of PromptTask messages; consumer group ``producers``."""
        return f"{self.prefix}:prompts"

    @property
    def rollouts(self) -> str:
        """Stream of RolloutGroup messages; consumer group ``learner``."""
        return f"{self.prefix}:rollouts"

    @property
    def checkpoints(self) -> str:
        """Stream of CheckpointAnnouncement messages (read without a group, by every producer)."""
        return f"{self.prefix}:checkpoints"

    @property
    def dead(self) -> str:
        """Dead-letter stream: DeadLetter messages holding the original bytes and the reason."""
        return f"{self.prefix}:dead"

    # plain keys
    @property
    def latest(self) -> str:
        """String: the newest CheckpointAnnouncement (msgpack)."""
        return f"{self.prefix}:latest"

    @property
    def producers(self) -> str:
        """Hash-free prefix: one ``{prefix}:producers:{id}`` key per live producer, with a TTL."""
        return f"{self.prefix}:producers"

    def producer(self, producer_id: str) -> str:
        return f"{self.producers}:{producer_id}"

    def wake(self, producer_id: str, instance: str) -> str:
        """Stream: an entry here ends the blocking read of one producer process's checkpoint follower at once
        (written when the producer finishes, with a short TTL; ``instance`` is unique per process)."""
        return f"{self.prefix}:wake:{producer_id}:{instance}"

    @property
    def learner_state(self) -> str:
        """Hash written by the learner: version (policy version), consumed (groups taken), step, heartbeat."""
        return f"{self.prefix}:learner"

    @property
    def admitted_count(self) -> str:
        """Counter of groups admitted by producers (docs/architecture.md, "Admission control")."""
        return f"{self.prefix}:admitted"

    @property
    def released_count(self) -> str:
        """Counter of admitted groups that ended without reaching the learner: dead-lettered by a producer
        (reward error, engine refusal, a group that does not encode) or expired. Never rolled back."""
        return f"{self.prefix}:released"

    @property
    def admissions_open(self) -> str:
        """Sorted set: group id -> unix time of its (re)admission, for every admitted group not yet appended
        to the rollouts stream nor dead-lettered (a reclaimed prompt re-uses its entry)."""
        return f"{self.prefix}:admissions:open"

    @property
    def admissions_version(self) -> str:
        """Sorted set: group id -> the producer's weight version at admission, same members as
        :attr:`admissions_open` (the learner waits for the ones about to turn stale)."""
        return f"{self.prefix}:admissions:version"

    @property
    def prompt_cursor(self) -> str:
        """Hash: dataset position of the prompt feeder (so a resumed learner continues the dataset)."""
        return f"{self.prefix}:prompt_cursor"
