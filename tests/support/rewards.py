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
