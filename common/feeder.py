"""Putting prompts on the prompts stream (``gspo prompts load`` and the learner's feeder).

Prompts are appended without MAXLEN: an approximate trim would delete the *oldest* entries, which are the
ones not yet delivered to any producer, i.e. prompts would be lost silently. The stream is bounded instead by
``pipeline.prompts_maxlen`` as a capacity: an append that would take the stream past it is refused whole,
with the counts, before anything is written; the learner trims what producers have finished with.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow
from common.wire import PromptTask, encode


class PromptsFull(ValueError):
    """The prompts stream has no room for the prompts to append (nothing was appended)."""


def task_for(row: PromptRow, task_id: str) -> PromptTask:
    return PromptTask(
        task_id=task_id, prompt=row.prompt, task=row.task, meta=dict(row.meta, prompt_id=row.prompt_id)
    )


async def enqueue(
    streams: StreamClient, keys: RunKeys, rows: Iterable[tuple[str, PromptRow]], maxlen: int, chunk: int = 500
) -> int:
    """Append ``(task_id, row)`` pairs as PromptTasks (the task id is the group's idempotency key), all of them
    or none: :class:`PromptsFull` if the stream would then hold more than ``maxlen`` entries."""
    messages = [encode(task_for(row, task_id)) for task_id, row in rows]
    await streams.ensure_group(keys.prompts, PRODUCERS_GROUP)
    held = await streams.length(keys.prompts)
    if held + len(messages) > maxlen:
        raise PromptsFull(
            f"the prompts stream {keys.prompts} holds {held} entries; {len(messages)} more would exceed "
            f"pipeline.prompts_maxlen={maxlen}: nothing was enqueued (raise prompts_maxlen, or load fewer now "
            f"and the rest once producers have taken these)"
        )
    n = 0
    for start in range(0, len(messages), chunk):
        n += len(await streams.append_many(keys.prompts, messages[start : start + chunk], None))
    return n
