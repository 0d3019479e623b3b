"""The producer loop: prompts in, scored groups of completions with behaviour log-probs out.

Three stages joined by one-slot queues, so that Redis work overlaps the engine call:
- feed (producer/intake.py): top up the held prompts (own pending after a restart, prompts reclaimed
  from dead producers, then new ones; at most one engine call's worth) while the engine works, and admit
  them in order under the staleness bound (common/admission.py) once the engine is free: a group is
  admitted just before its engine call starts, so the learner meets groups in about the order admission
  predicted (a batch admitted a whole engine call early is overtaken by other producers' groups and goes
  stale). A refused prompt is held, never dropped or acked: pacing, not dropping.
- generate (producer/generate.py): one engine call samples G completions for each admitted prompt (or
  gives up on a prompt: ``PromptFailure``).
- append (producer/append.py): score each completion, then XADD one RolloutGroup per prompt, XACK the
  prompts and close their admissions in one atomic step; a failed prompt is dead-lettered and its slot
  released.
Background loops follow published checkpoints (producer/weights.py: verify, then load), write the
heartbeat (producer/heartbeat.py) with the metrics (producer/metrics.py), and keep the pending entries of
every prompt this producer owns fresh (``Intake.keep_alive``), so that neither it nor another producer
reclaims a prompt it is working on, however long the engine call. SIGTERM drains: no new prompts; admitted
batches are generated, appended and acked; held prompts stay pending and are reclaimed by another producer
after ``claim_idle_ms``. The parts are built in producer/assembly.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from common.admission import Admitter, GroupSizeMismatch
from common.config import Settings
from common.fingerprint import FingerprintError
from common.keys import PRODUCERS_GROUP, RunKeys
from common.manifest import CheckpointError
from common.redis_conn import RedisUnavailable, connect_async
from common.streams import RETRYABLE, StreamClient, describe_failure
from common.tasks import TaskError
from producer.append import Appender
from producer.assembly import ProducerError, build_producer
from producer.engines.base import Engine, EngineError
from producer.generate import Generator, sampling_from
from producer.heartbeat import Heartbeat
from producer.intake import Intake
from producer.metrics import MetricsExporter, ProducerMetrics
from producer.weights import CheckpointFollower, WeightSync

log = logging.getLogger(__name__)
PACED_POLL_S = 0.05  # how often a paced producer re-asks for admission (at once after a weight reload)
WEIGHTS_POLL_S = 0.5  # keys.latest is read at least this often; an announcement wakes the loop at once
WAKE_BLOCK_MS = 100  # longest blocking read of the checkpoints stream (a finished producer cuts it short)
WAKE_TTL_MS = 10_000  # the entry that cuts it short expires after this (should the exit not delete it)
STOP_GRACE_S = 15.0  # background loops get this long to finish their current Redis call / weight load


class Producer:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        tokenizer,
        streams: StreamClient,
        producer_id: str,
        follower: CheckpointFollower,
        admitter: Admitter,
        stop: asyncio.Event | None = None,
    ):
        self.settings, self.engine, self.streams, self.id = settings, engine, streams, producer_id
        self.keys = keys = RunKeys(settings.run)
        self.stop = stop or asyncio.Event()
        self.finished = asyncio.Event()  # the stages are done: background loops end after their current step
        self.metrics = m = ProducerMetrics(weight_version=engine.version)
        self.intake = Intake(settings, streams, producer_id, tokenizer, admitter, m)
        limit = settings.producer.max_prompt_tokens  # 0: only the engine's context limit applies
        self.generator = Generator(engine, settings.pipeline.group_size, sampling_from(settings), m, limit)
        self.appender = Appender(settings, streams, producer_id, tokenizer, engine, m, self.intake)
        self.weights = WeightSync(follower, engine, m)
        self.heartbeat = Heartbeat(streams, keys, producer_id, engine, m, settings.producer.heartbeat_ttl_s)
        self.paced = False
        self.engine_free = asyncio.Event()  # the generate stage waits for a batch: admit one now
        self.weights_changed = asyncio.Event()  # a reload happened: a paced producer re-asks at once
        # a stream of this process only (never one a restarted producer of the same id would find filled)
        self.wake_key = keys.wake(producer_id, uuid.uuid4().hex[:12])
        self._woke = False

    async def run(self) -> ProducerMetrics:
        """feed (read, admit) -> generate -> append (score, XADD, XACK), joined by one-slot queues so that
        taking/admitting the next batch and appending the previous one overlap the engine call."""
        await self.streams.ensure_group(self.keys.prompts, PRODUCERS_GROUP)
        await self.intake.take_own_pending()
        exporter = MetricsExporter(self.settings, self.id)
        batches: asyncio.Queue = asyncio.Queue(maxsize=1)
        results: asyncio.Queue = asyncio.Queue(maxsize=1)
        stages = [
            asyncio.create_task(self._feed_stage(batches), name="feed"),
            asyncio.create_task(self._generate_stage(batches, results), name="generate"),
            asyncio.create_task(self._append_stage(results), name="append"),
        ]
        background = [
            asyncio.create_task(
                self._every(self.heartbeat.every_s, lambda: self._beat(exporter)), name="heartbeat"
            ),
            asyncio.create_task(self._follow_weights(), name="weights"),
            asyncio.create_task(
                self._every(self.intake.keep_alive_every_s, self.intake.keep_alive), name="keep-alive"
            ),
        ]
        try:
            await _supervise(stages, background, self.finished, self._wake_follower)
        finally:
            exporter.close()
            self.appender.runner.close()
            await self.heartbeat.remove()
            if self._woke:
                await self.streams.call(lambda: self.streams.redis.delete(self.wake_key), "DEL wake")
        log.info("producer %s done: %s", self.id, self.metrics)
        return self.metrics

    @property
    def state(self) -> str:
        if self.stop.is_set():
            return "draining"
        return "generating" if self.generator.inflight else "paced" if self.paced else "idle"

    # ------------------------------------------------------------------ stages
    async def _feed_stage(self, out: asyncio.Queue) -> None:
        while not (self.stop.is_set() or self.intake.quota_reached):
            await self.intake.fill()  # read and prepare the next prompts during the engine call
            if not self.engine_free.is_set():
                await _pause(self.engine_free, PACED_POLL_S)
                continue  # (topping up again meanwhile)
            self.weights_changed.clear()
            batch = await self.intake.admit(lambda: self.engine.version)
            if batch:
                self.engine_free.clear()
                await out.put(batch)
            if self.intake.held and not batch:
                await self._paced_wait()
            else:
                self.paced = False
        await out.put(None)  # drain: what was admitted is still generated and appended

    async def _paced_wait(self) -> None:
        self.paced = True
        t0 = time.monotonic()
        # then ask again: new weights may be admissible at once (with K = 0 every step waits for them)
        await _pause_any((self.stop, self.weights_changed), PACED_POLL_S)
        self.metrics.paced_s_total += time.monotonic() - t0

    async def _generate_stage(self, inq: asyncio.Queue, out: asyncio.Queue) -> None:
        self.engine_free.set()
        while (batch := await inq.get()) is not None:
            inq.task_done()
            groups, gen_s = await self.generator.generate(batch)
            await out.put((batch, groups, gen_s))
            self.engine_free.set()
        await out.put(None)

    async def _append_stage(self, inq: asyncio.Queue) -> None:
        while (item := await inq.get()) is not None:
            await self.appender.append(*item)

    # ------------------------------------------------------------------ background
    async def _follow_weights(self) -> None:
        """Load each checkpoint as soon as it is announced: a blocking XREAD on the checkpoints stream (at most
        WAKE_BLOCK_MS per call) wakes the loop when the learner announces; keys.latest is also read every
        WEIGHTS_POLL_S whatever the stream holds (it may have been trimmed, or the announcement lost). The same
        read watches this process's wake stream, so that a finished producer stops at once (_wake_follower)."""
        stream = self.keys.checkpoints
        newest = await self.streams.latest_entries(stream, 1)
        last, woke, synced_at = (newest[0].id if newest else "0-0"), True, 0.0
        while not self.finished.is_set():
            if woke or time.monotonic() - synced_at >= WEIGHTS_POLL_S:
                synced_at = time.monotonic()
                if await self.weights.sync():
                    self.weights_changed.set()
            entries = await self.streams.wait_after(stream, last, WAKE_BLOCK_MS, wake=self.wake_key)
            woke = bool(entries)
            if entries:
                last = entries[-1].id

    async def _wake_follower(self) -> None:
        """The stages are done (``finished`` is set): end the weight follower's blocking XREAD now instead of
        letting the exit wait up to WAKE_BLOCK_MS for it. Its read also watches ``wake_key`` from id 0, so one
        entry there makes Redis answer it at once, with an ordinary reply, whether the read started before this
        entry or after it; the follower then sees ``finished`` and returns. Cancelling the read instead is not
        safe (a cancel landing as the reply arrives can be lost inside redis-py and hang the exit: _supervise),
        and CLIENT UNBLOCK needs a permission the per-run ACL user lacks. Best effort: should this fail, the
        follower still ends after its current read, as before. The entry expires after WAKE_TTL_MS and the exit
        deletes it."""
        pipe = self.streams.redis.pipeline(transaction=True)
        pipe.xadd(self.wake_key, {"wake": b"1"})
        pipe.pexpire(self.wake_key, WAKE_TTL_MS)
        try:
            await pipe.execute()
            self._woke = True
        except RedisError as e:
            log.debug("could not wake the weight follower (%s): it ends after its current read", e)

    async def _every(self, seconds: float, step: Callable[[], Awaitable[object]]) -> None:
        while not self.finished.is_set():
            await step()
            await _pause(self.finished, seconds)

    async def _beat(self, exporter: MetricsExporter) -> None:
        hb = self.heartbeat.make(self.state, self.generator.inflight)
        exporter.export(self.metrics, hb)  # first: whoever sees this heartbeat sees these metrics
        await self.heartbeat.write(hb)


# --------------------------------------------------------------------------- supervision
async def _supervise(
    stages: list[asyncio.Task],
    background: list[asyncio.Task],
    finished: asyncio.Event,
    wake: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Wait for ``stages``; the first failure of any task cancels all the others and is raised.

    After a normal end the background loops are asked to stop (``finished``, then ``wake``, which cuts their
    blocking reads short) and awaited, not cancelled: a cancel that lands as a Redis reply arrives can be lost
    inside redis-py (8.1), and the task then loops forever while the exit waits for it (seen after SIGTERM
    right behind a Redis pause)."""
    pending = set(stages) | set(background)
    failed = True
    try:
        while any(not t.done() for t in stages):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        failed = False
    finally:
        finished.set()
        if wake is not None and not failed:
            await wake()
        await _end(pending, grace_s=0.0 if failed else STOP_GRACE_S)


async def _end(tasks: set[asyncio.Task], grace_s: float) -> None:
    """Let ``tasks`` finish within ``grace_s``, then cancel what is left (bounded: never hangs the exit)."""
    if not tasks:
        return
    _, left = await asyncio.wait(tasks, timeout=grace_s) if grace_s > 0 else (set(), tasks)
    for t in left:
        t.cancel()
    if left:
        await asyncio.wait(left, timeout=5.0)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.warning("%s ended with %r while stopping", t.get_name(), t.exception())


async def _pause(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``event`` is set."""
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except TimeoutError:
        pass  # the normal case: the time is up


async def _pause_any(events: tuple[asyncio.Event, ...], seconds: float) -> None:
    """Sleep ``seconds`` or until one of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


# --------------------------------------------------------------------------- entry point
async def serve(settings: Settings, stop: asyncio.Event | None = None) -> ProducerMetrics:
    """Run one producer until ``stop`` is set or ``producer.max_groups`` groups are done."""
    client = connect_async(settings.redis)
    streams = StreamClient(client, settings.redis.retry_for_s, what="producer")
    try:
        producer = await build_producer(settings, streams, stop)
        try:
            return await producer.run()
        finally:
            await producer.engine.close()
    finally:
        await client.aclose()


def main(settings: Settings) -> int:
    """Entry point of ``gspo producer``: exit code 0 after a drain or max_groups; 2 with one error line (no
    traceback) on a stated failure, a Redis outage longer than ``redis.retry_for_s`` included."""
    from modeling import ModelLoadError

    stated = (
        ProducerError,
        GroupSizeMismatch,
        EngineError,
        ModelLoadError,
        FingerprintError,
        CheckpointError,
        TaskError,
        RedisUnavailable,
        *RETRYABLE,
    )
    try:
        asyncio.run(_main(settings))
    except stated as e:
        log.error("producer failed: %s", describe_failure(e))
        return 2
    return 0


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    await serve(settings, stop)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("%s: draining (finishing in-flight groups, then exiting)", sig.name)
    stop.set()
