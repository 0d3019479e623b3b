"""Verifiable tasks: reward functions (a registry addressable by name or ``module:function``) and
prompt sources (the built-in reference task, JSONL files).

A reward function has the signature ``reward(completion: str, meta: dict) -> float`` where ``meta``
holds the fields of the dataset row that the reward needs (e.g. ``answer``).
"""

from __future__ import annotations

import importlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

RewardFn = Callable[[str, dict[str, Any]], float]
_REGISTRY: dict[str, RewardFn] = {}


class TaskError(ValueError):
    """Unknown reward, or a dataset row that does not fit its task."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """Resolve a reward by registry name or ``package.module:function``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise TaskError(f"reward {name!r} cannot be imported: {e}") from None
        if not callable(fn):
            raise TaskError(f"reward {name!r} is not callable")
        _REGISTRY[name] = fn
        return fn
    raise TaskError(f"unknown reward {name!r}; known: {sorted(_REGISTRY)} or 'module:function'")


# --------------------------------------------------------------------------- rewards
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _normalise_number(text: str) -> str | None:
    """The last number in ``text`` in canonical decimal form ("007" -> "7", "2.50" -> "2.5")."""
    found = _NUM_RE.findall(text.replace(",", ""))
    if not found:
        return None
    return format(Decimal(found[-1]).normalize(), "f")


@register_reward("math_exact")
def math_exact(completion: str, meta: dict[str, Any]) -> float:
    """1.0 if the final number in the completion (or its ``\\boxed{}``/``####`` answer) equals ``meta['answer']``."""
    if "answer" not in meta:
        raise TaskError("math_exact needs an 'answer' field")
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    hashes = completion.rsplit("####", 1)[1] if "####" in completion else None
    candidate = boxed[-1] if boxed else hashes if hashes is not None else completion
    got = _normalise_number(candidate)
    want = _normalise_number(str(meta["answer"]))
    return 1.0 if got is not None and got == want else 0.0


@register_reward("exact_match")
def exact_match(completion: str, meta: dict[str, Any]) -> float:
    """1.0 if the stripped completion equals ``meta['answer']`` exactly."""
    if "answer" not in meta:
        raise TaskError("exact_match needs an 'answer' field")
    return 1.0 if completion.strip() == str(meta["answer"]).strip() else 0.0


# --------------------------------------------------------------------------- reference task
ADDITION_CHARS = "0123456789+="


@register_reward("addition")
def addition_reward(completion: str, meta: dict[str, Any]) -> float:
    """Reference task: 1.0 iff the completion (up to EOS, no spaces) is exactly the sum."""
    if "answer" not in meta:
        raise TaskError("addition needs an 'answer' field")
    return 1.0 if completion.strip() == str(meta["answer"]) else 0.0


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    prompt: str
    task: str
    meta: dict[str, Any]


def addition_prompt(a: int, b: int) -> PromptRow:
    """``"AA+BB="`` with zero-padded operands; the answer is the plain decimal sum."""
    return PromptRow(f"add-{a:02d}-{b:02d}", f"{a:02d}+{b:02d}=", "addition", {"answer": str(a + b)})


def addition_rows(seed: int, start: int = 0) -> Iterator[PromptRow]:
    """An endless, reproducible stream of two-digit additions; ``start`` skips ahead (resume)."""
    rng = random.Random(seed)
    i = 0
    while True:
        a, b = rng.randrange(100), rng.randrange(100)
        if i >= start:
            yield addition_prompt(a, b)
        i += 1


def jsonl_rows(path: str | Path, default_task: str = "math_exact") -> Iterator[PromptRow]:
    """Rows of a JSONL file: ``{"prompt": ..., "answer": ..., ["task"], ["id"], ...}``; all other fields go to meta."""
    path = Path(path)
    if not path.exists():
        raise TaskError(f"dataset {path} does not exist")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise TaskError(f"{path}:{lineno}: each line needs a string 'prompt' field")
            task = obj.pop("task", default_task)
            get_reward(task)
            pid = str(obj.pop("id", f"{path.stem}-{lineno}"))
            prompt = obj.pop("prompt")
            yield PromptRow(pid, prompt, task, obj)


def dataset_rows(source: str, seed: int = 0, start: int = 0) -> Iterator[PromptRow]:
    """``addition`` (built-in, endless) or a JSONL path (cycled, endless); skips ``start`` rows."""
    if source == "addition":
        yield from addition_rows(seed, start)
        return
    rows = list(jsonl_rows(source))
    if not rows:
        raise TaskError(f"dataset {source} has no rows")
    i = start
    while True:
        epoch, j = divmod(i, len(rows))
        r = rows[j]
        yield PromptRow(f"{r.prompt_id}@{epoch}", r.prompt, r.task, r.meta)
        i += 1
