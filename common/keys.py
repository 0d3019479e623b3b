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

    @property
    def learner_state(self) -> str:
        """Hash written by the learner: version (policy version), consumed (groups taken), step, heartbeat."""
        return f"{self.prefix}:learner"

    @property
    def admitted_count(self) -> str:
        """Counter of groups admitted by producers (docs/architecture.md, "Admission control")."""
        return f"{self.prefix}:admitted"

    def admitted_group(self, group_id: str) -> str:
        """Marker that a group id was admitted once (a reclaimed prompt is not counted twice)."""
        return f"{self.prefix}:admitted:{group_id}"

    @property
    def prompt_cursor(self) -> str:
        """Hash: dataset position of the prompt feeder (so a resumed learner continues the dataset)."""
        return f"{self.prefix}:prompt_cursor"

    def all_patterns(self) -> list[str]:
        return [f"{self.prefix}:*"]


def key_table(run: str = "{run}") -> list[tuple[str, str, str]]:
    """(name, type, purpose) rows, used by ``gspo status --keys`` and the README."""
    p = f"{PREFIX}:{run}"
    return [
        (f"{p}:prompts", "stream", "PromptTask; consumer group 'producers'"),
        (f"{p}:rollouts", "stream", "RolloutGroup; consumer group 'learner'"),
        (f"{p}:checkpoints", "stream", "CheckpointAnnouncement, newest last"),
        (f"{p}:dead", "stream", "DeadLetter: original bytes + reason"),
        (f"{p}:latest", "string", "newest CheckpointAnnouncement"),
        (f"{p}:producers:<id>", "string+TTL", "ProducerHeartbeat of a live producer"),
        (f"{p}:learner", "hash", "learner version / consumed groups / step"),
        (f"{p}:admitted", "counter", "groups admitted (staleness admission control)"),
        (f"{p}:admitted:<group>", "string+TTL", "group already admitted (reclaims are not re-counted)"),
        (f"{p}:prompt_cursor", "hash", "dataset position of the prompt feeder"),
    ]
