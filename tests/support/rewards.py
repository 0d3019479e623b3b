"""Reward functions for tests, addressed as ``tests.support.rewards:<name>`` (a task's reward by
``module:function``; ``common/tasks.py``). Producer processes import them through ``PYTHONPATH``."""

from __future__ import annotations

from typing import Any

from common.tasks import addition_reward

SEEN: list[tuple[str, dict[str, Any]]] = []  # what ``recording`` was called with (in-process producers)


def flaky_addition(completion: str, meta: dict[str, Any]) -> float:
    """The addition reward, but raising on rows marked ``"fail": true`` (a reward function with a bug)."""
    if meta.get("fail"):
        raise ValueError(f"flaky reward refuses prompt {meta.get('prompt_id')}")
    return addition_reward(completion, meta)


def recording(completion: str, meta: dict[str, Any]) -> float:
    """Records its arguments; 1.0 when the finish reason reached it."""
    SEEN.append((completion, dict(meta)))
    return 1.0 if "finish_reason" in meta else 0.0


def two_arguments_only(completion, meta):  # an existing reward: positional (completion, meta), nothing else
    return float(len(completion))


BATCHES: list[dict[str, Any]] = []  # the keyword arguments ``trl_exact`` was called with


def trl_exact(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
    """TRL's form: 1.0 where the completion (text, or the assistant message of a chat prompt) is the answer."""
    BATCHES.append(
        dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer, **kwargs)
    )
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if t.strip() == str(a) else 0.0 for t, a in zip(texts, answer, strict=True)]


def only_named(completions, finish_reason) -> list[float | None]:
    """Names its arguments (no **kwargs): gets only those; None (does not apply) for a completion cut short."""
    return [None if f == "length" else float(len(c)) for c, f in zip(completions, finish_reason, strict=True)]


async def async_length(prompts, completions, **kwargs) -> list[float]:
    """An async batched reward (a judge called over the network, say)."""
    import asyncio

    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


SLEEP_S = {"value": 0.0}


def sleepy(completion: str, meta: dict[str, Any]) -> float:
    """Sleeps ``SLEEP_S['value']`` (or meta['sleep_s']) seconds in a worker thread, then scores 1."""
    import time

    time.sleep(float(meta.get("sleep_s", SLEEP_S["value"])))
    return 1.0


async def async_sleepy(completions, **kwargs) -> list[float]:
    import asyncio

    await asyncio.sleep(SLEEP_S["value"])
    return [1.0] * len(completions)


def wrong_count(completions, **kwargs) -> list[float]:
    return [1.0] * (len(completions) + 1)


def not_a_number(completion, meta):
    return "high"
