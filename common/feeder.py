"""Putting prompts on the prompts stream (``gspo prompts load`` and the learner's feeder).

Prompts are appended without MAXLEN: an approximate trim would delete the *oldest* entries, which are the
ones not yet delivered to any producer, i.e. prompts would be lost silently. The stream is bounded instead by
``pipeline.prompts_maxlen`` as a capacity: an append that would take the stream past it is refused whole,
with the counts, before anything is written; the learner trims what producers have finished with.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.config import TaskSettings
from common.keys import PRODUCERS_GROUP, RunKeys
from common.streams import StreamClient
from common.tasks import PromptRow, TaskError, get_reward
from common.wire import PromptTask, encode


class PromptsFull(ValueError):
    """The prompts stream has no room for the prompts to append (nothing was appended)."""


def check_task_settings(task: TaskSettings) -> None:
    """Every reward of ``task.rewards`` resolves (a TaskError naming the one that does not)."""
    for r in task.rewards:
        try:
            get_reward(r.function)
        except TaskError as e:
            raise TaskError(f"task.rewards ({r.name}): {e}") from None


def task_for(row: PromptRow, task_id: str, task: TaskSettings | None = None) -> PromptTask:
    """The PromptTask of a dataset row: a string prompt as ``prompt``, chat messages as ``messages`` (with
    ``task.system_prompt`` put first when they have no system message), the rendering options and the rewards
    of ``task`` (the config's ``task`` section) carried along, so every producer renders and scores alike."""
    task = task or TaskSettings()
    meta = dict(row.meta, prompt_id=row.prompt_id)
    rewards = tuple((r.name, r.function, r.weight) for r in task.rewards)
    common = {"task_id": task_id, "task": row.task, "meta": meta, "rewards": rewards}
    if isinstance(row.prompt, str):
        if task.system_prompt:
            raise TaskError(
                f"row {row.prompt_id}: task.system_prompt applies to chat prompts (lists of messages), and this "
                "prompt is a string: give the dataset's prompts as [{role, content}] messages, or unset it"
            )
        return PromptTask(prompt=row.prompt, add_special_tokens=task.add_special_tokens, **common)
    messages = [dict(m) for m in row.prompt]
    if task.system_prompt and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": task.system_prompt})
    return PromptTask(
        prompt="",
        messages=tuple(messages),
        chat_template_kwargs=dict(task.chat_template_kwargs),
        **common,
    )


async def enqueue(
    streams: StreamClient,
    keys: RunKeys,
    rows: Iterable[tuple[str, PromptRow]],
    maxlen: int,
    chunk: int = 500,
    task: TaskSettings | None = None,
) -> int:
    """Append ``(task_id, row)`` pairs as PromptTasks (the task id is the group's idempotency key), all of them
    or none: :class:`PromptsFull` if the stream would then hold more than ``maxlen`` entries. ``task``: the
    config's prompt rendering and rewards (``task_for``)."""
    messages = [encode(task_for(row, task_id, task)) for task_id, row in rows]
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
