"""Scoring: the reward functions of a prompt, run off the producer's event loop with a per-call timeout.

A prompt's rewards are its task's ``rewards`` (``(name, function, weight)``, from the config's ``task.rewards``)
or, when it carries none, its single reward ``task`` (weight 1). Each function is resolved with
``common.tasks.get_reward`` (a registered name or ``module:function``) and called in one of two forms:

- **per completion** (the original form): ``reward(completion: str, meta: dict) -> float``, once per sample;
  ``meta`` is a copy of the row's fields plus ``finish_reason``;
- **batched** (TRL's reward-function convention): a function with a parameter named ``completions`` is called
  once per group as ``f(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float|None]``,
  G items each: the prompt (a string, or the chat messages) repeated, the completion texts (for a chat prompt,
  ``[{"role": "assistant", "content": text}]`` as TRL passes them), the completion token ids, and every dataset
  column of the row as a list repeated G times, plus ``finish_reason`` (per sample) and ``task_id``. A function
  without ``**kwargs`` gets only the arguments it names. ``None`` means the reward does not apply to that
  sample.

Either form may be a coroutine function (``async def``). Sync functions run on a thread pool
(``producer.reward_threads``; a per-completion function scores a whole group in one pool call, so the thread
hand-off is paid per group, not per completion); coroutines on one event loop of their own, in a background
thread; so the producer's loop (heartbeat, keep-alive, admission) never waits for a reward. Every call (a
batched call, a group of a sync per-completion function, one completion of an async one) has a timeout
(``producer.reward_timeout_s``): a coroutine is cancelled; a sync function cannot be stopped and keeps its
thread until it returns (the prompt is dead-lettered all the same). A reward that raises, times out, returns
the wrong number of scores or a non-finite one fails its prompt: :class:`RewardFailure` (the append stage
dead-letters it as ``reward_error``).

The score of a sample is ``sum(weight × score)`` over the rewards that apply to it (``None`` counts 0, as TRL's
nansum); with several rewards, each one's own score travels in ``Sample.rewards`` for the learner's
``reward/<name>`` metrics.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from common.tasks import get_reward
from common.wire import PromptTask


class RewardFailure(Exception):
    """A reward function raised, timed out or returned something unusable (message: one line)."""


@dataclass(frozen=True)
class Reward:
    name: str
    function: str
    weight: float
    fn: Callable[..., Any]
    batched: bool
    takes: frozenset[str] | None  # keyword arguments a batched function accepts (None: any, it has **kwargs)


def is_batched(fn: Callable[..., Any]) -> bool:
    """A function with a parameter named ``completions`` takes a group at once (TRL's form)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "completions" in params


def _accepted(fn: Callable[..., Any]) -> frozenset[str] | None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def rewards_of(task: PromptTask) -> list[Reward]:
    """The rewards that score ``task`` (raises TaskError for one that cannot be resolved)."""
    specs = task.rewards or ((task.task, task.task, 1.0),)
    out = []
    for name, function, weight in specs:
        fn = get_reward(function)
        batched = is_batched(fn)
        out.append(Reward(name, function, float(weight), fn, batched, _accepted(fn) if batched else None))
    return out


@dataclass(frozen=True)
class Scored:
    totals: list[float]  # weighted sum per sample
    parts: list[
        dict[str, float | None]
    ]  # each reward's own score per sample ({} with a single legacy reward)


class DaemonPool(Executor):
    """A fixed pool of daemon threads. ``ThreadPoolExecutor``'s workers are joined at interpreter exit, so one
    reward that never returns (it timed out, its thread cannot be stopped) would keep the producer from exiting;
    these threads are not waited for."""

    def __init__(self, threads: int, name: str = "reward"):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._closed, self._threads = False, threads
        for i in range(threads):
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError("the reward pool is closed")
        fut: Future = Future()
        self._work.put((fut, fn, args, kwargs))
        return fut

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(e)

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        self._closed = True
        while cancel_futures:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(self._threads):  # one stop mark per thread: each takes one when idle and ends
            self._work.put(None)


class RewardRunner:
    """Runs reward calls on daemon threads (sync) or a private event loop (async), each with a timeout."""

    def __init__(self, threads: int = 8, timeout_s: float = 300.0):
        self.timeout_s = timeout_s
        self.pool = DaemonPool(threads)
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._athread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._aloop is None:
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name="reward-async", daemon=True)
                t.start()
                self._aloop, self._athread = loop, t
            return self._aloop

    async def call(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` off this loop, within the timeout; RewardFailure otherwise."""
        try:
            if inspect.iscoroutinefunction(fn):
                coro = fn(*args, **kwargs)
                fut = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._async_loop()))
            else:
                loop = asyncio.get_running_loop()
                fut = loop.run_in_executor(self.pool, functools.partial(self._sync, fn, args, kwargs))
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise RewardFailure(
                f"reward {label} took longer than producer.reward_timeout_s={self.timeout_s:g}s"
            ) from None
        except RewardFailure:
            raise
        except Exception as e:  # noqa: BLE001 - user code: any error fails this prompt only
            raise RewardFailure(f"reward {label} raised {type(e).__name__}: {e}") from None

    def _each(self, fn: Callable[..., Any], texts: Sequence[str], metas: Sequence[dict]) -> list[Any]:
        return [self._sync(fn, (text, meta), {}) for text, meta in zip(texts, metas, strict=True)]

    def _sync(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = fn(*args, **kwargs)
        if inspect.isawaitable(out):  # a callable object whose __call__ is async
            return asyncio.run_coroutine_threadsafe(_await(out), self._async_loop()).result(self.timeout_s)
        return out

    async def score(
        self,
        task: PromptTask,
        rewards: Sequence[Reward],
        texts: Sequence[str],
        completion_ids: Sequence[list[int]],
        finish_reasons: Sequence[str],
    ) -> Scored:
        """Every reward of one group, concurrently; RewardFailure if any fails."""
        calls = [self._one(task, r, texts, completion_ids, finish_reasons) for r in rewards]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                if isinstance(r, RewardFailure):
                    raise r
                raise RewardFailure(f"{type(r).__name__}: {r}")
        n = len(texts)
        totals = [0.0] * n
        parts: list[dict[str, float | None]] = [{} for _ in range(n)]
        for reward, scores in zip(rewards, results, strict=True):
            for i, v in enumerate(scores):  # type: ignore[arg-type]
                if v is not None:
                    totals[i] += reward.weight * v
                if task.rewards:
                    parts[i][reward.name] = v
        return Scored(totals, parts)

    async def _one(
        self,
        task: PromptTask,
        reward: Reward,
        texts: Sequence[str],
        completion_ids: Sequence[list[int]],
        finish_reasons: Sequence[str],
    ) -> list[float | None]:
        label = reward.function if reward.name == reward.function else f"{reward.name} ({reward.function})"
        n = len(texts)
        if not reward.batched:
            metas = [dict(task.meta, finish_reason=f) for f in finish_reasons]
            if inspect.iscoroutinefunction(reward.fn):  # concurrently on the reward loop, one timeout each
                calls = [self.call(label, reward.fn, t, m) for t, m in zip(texts, metas, strict=True)]
                raw = await asyncio.gather(*calls, return_exceptions=True)
                for r in raw:
                    if isinstance(r, BaseException):
                        raise r
            else:  # the group's completions in one pool call (one thread hop per group, not per completion)
                raw = await self.call(label, self._each, reward.fn, texts, metas)
            return [_score(label, v) for v in raw]
        kwargs = batch_kwargs(task, texts, completion_ids, finish_reasons)
        if reward.takes is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in reward.takes}
        out = await self.call(label, reward.fn, **kwargs)
        if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
            raise RewardFailure(f"reward {label} returned {type(out).__name__}, not a list of {n} scores")
        if len(out) != n:
            raise RewardFailure(f"reward {label} returned {len(out)} scores for {n} completions")
        return [_score(label, v) for v in out]

    def close(self) -> None:
        self.pool.shutdown()
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._aloop.stop)


async def _await(aw: Any) -> Any:
    return await aw


def _score(label: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)  # numpy / torch scalars
        except (TypeError, ValueError):
            raise RewardFailure(f"reward {label} returned {type(v).__name__}, not a number") from None
    v = float(v)
    if not math.isfinite(v):
        raise RewardFailure(f"reward {label} returned {v}")
    return v


def batch_kwargs(
    task: PromptTask,
    texts: Sequence[str],
    completion_ids: Sequence[list[int]],
    finish_reasons: Sequence[str],
) -> dict[str, Any]:
    """The keyword arguments of a batched reward for one group (TRL's names)."""
    n = len(texts)
    chat = bool(task.messages)
    prompt: Any = [dict(m) for m in task.messages] if chat else task.prompt
    completions: list[Any] = [[{"role": "assistant", "content": t}] for t in texts] if chat else list(texts)
    kwargs: dict[str, Any] = {k: [v] * n for k, v in task.meta.items()}
    kwargs.update(
        prompts=[prompt] * n,
        completions=completions,
        completion_ids=[list(c) for c in completion_ids],
        finish_reason=list(finish_reasons),
        task_id=[task.task_id] * n,
    )
    return kwargs
