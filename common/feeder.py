"""Putting prompts on the prompts stream (``gspo prompts load`` and the learner's feeder)."""

from __future__ import annotations

from collections.abc import Iterable

from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow
from common.wire import PromptTask, encode


def task_for(row: PromptRow, task_id: str) -> PromptTask:
    return PromptTask(task_id=task_id, prompt=row.prompt, task=row.task, meta=dict(row.meta, prompt_id=row.prompt_id))


async def enqueue(
    streams: StreamClient, keys: RunKeys, rows: Iterable[tuple[str, PromptRow]], maxlen: int, chunk: int = 500
) -> int:
    """Append ``(task_id, row)`` pairs as PromptTasks; the task id is the group's idempotency key."""
    await streams.ensure_group(keys.prompts, PRODUCERS_GROUP)
    n, batch = 0, []
    for task_id, row in rows:
        batch.append(encode(task_for(row, task_id)))
        if len(batch) >= chunk:
            n += len(await streams.append_many(keys.prompts, batch, maxlen))
            batch = []
    if batch:
        n += len(await streams.append_many(keys.prompts, batch, maxlen))
    return n
