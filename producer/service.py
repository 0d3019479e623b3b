"""The producer loop: prompts in, scored groups of completions with behaviour log-probs out.

Three stages joined by one-slot queues, so that Redis work overlaps the engine call:
- feed: top up the held prompts (own pending after a restart, prompts reclaimed from dead producers,
  then new ones; at most one engine call's worth), admit them in order under the staleness bound
  (common/admission.py). A refused prompt is held, never dropped or acked: pacing, not dropping.
- generate: one engine call samples G completions for each admitted prompt of the batch.
- append: score each completion, XADD one RolloutGroup per prompt, and only then XACK the prompts.
Background tasks follow published checkpoints (verify, then load) and write the heartbeat.
SIGTERM drains: no new prompts; admitted batches are generated, appended and acked; held prompts stay
pending and are reclaimed by another producer after ``claim_idle_ms``.

Known trade-off: a prompt held while paced for longer than ``claim_idle_ms`` can be reclaimed by another
(equally paced) producer; both may then generate it. The group id is the idempotency key, so the
learner keeps one; only the work is duplicated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.admission import Admitter
from common.config import Settings
from common.fingerprint import FingerprintError, model_fingerprint
from common.keys import PRODUCERS_GROUP, RunKeys
from common.manifest import CheckpointError
from common.redis_conn import RedisUnavailable, connect_async
from common.streams import RETRYABLE, Entry, StreamClient, describe_failure
from common.tasks import RewardFn, TaskError, get_reward
from common.wire import ProducerHeartbeat, PromptTask, RolloutGroup, Sample, WireError, decode, encode
from producer.engines.base import Completion, Engine, EngineError, SamplingParams
from producer.weights import CheckpointFollower, cache_dir_for, local_checkpoint

log = logging.getLogger(__name__)
READ_BLOCK_MS = 500  # short enough that a drain request is noticed quickly
PACED_POLL_S = 0.1  # how often a paced producer re-asks for admission
WEIGHTS_POLL_S = 0.5  # how often keys.latest is read (one GET)
STOP_GRACE_S = 15.0  # background loops get this long to finish their current Redis call / weight load


class ProducerError(RuntimeError):
    """A producer set-up problem (no model, bad engine choice), in one line."""


@dataclass
class ProducerMetrics:
    groups_total: int = 0
    samples_total: int = 0
    tokens_total: int = 0
    generate_s_total: float = 0.0
    paced_s_total: float = 0.0
    weight_version: int = 0
    weight_syncs: int = 0
    weight_sync_s: float = 0.0  # duration of the last reload (verification excluded)
    checkpoints_refused: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0


@dataclass
class Held:
    """A prompt read from the stream and not yet generated (still pending: un-acked)."""

    entry: Entry  # the original stream entry (its bytes go to the dead-letter stream if scoring fails)
    task: PromptTask
    prompt_ids: list[int]
    reward: RewardFn = field(repr=False)


def default_producer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def sampling_from(settings: Settings) -> SamplingParams:
    s = settings.producer.sampling
    return SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens
    )


class Producer:
    def __init__(self, settings: Settings, engine: Engine, tokenizer, streams: StreamClient, producer_id: str,
                 follower: CheckpointFollower, stop: asyncio.Event | None = None):  # fmt: skip
        self.settings, self.engine, self.tokenizer, self.streams = settings, engine, tokenizer, streams
        self.id, self.follower = producer_id, follower
        self.keys = RunKeys(settings.run)
        self.stop = stop or asyncio.Event()
        self.finished = asyncio.Event()  # the stages are done: background loops end after their current step
        p = settings.pipeline
        self.admitter = Admitter(
            streams.redis, self.keys, p.max_staleness, p.batch_groups, p.prefill_min_groups
        )
        self.sampling = sampling_from(settings)
        self.metrics = ProducerMetrics(weight_version=engine.version)
        self.held: list[Held] = []
        self.inflight, self.paced, self.admitted_total = 0, False, 0
        self.started_at = time.time()
        self._claim_cursor, self._next_claim = "0-0", 0.0
        self._rate_mark = (time.monotonic(), 0, 0)  # (t, tokens, groups) at the previous heartbeat

    # ------------------------------------------------------------------ main loop
    async def run(self) -> ProducerMetrics:
        """Three stages joined by one-slot queues, so that taking/admitting the next batch and appending
        the previous one overlap the engine call: feed (read, admit) -> generate -> append (score, XADD, XACK)."""
        await self.streams.ensure_group(self.keys.prompts, PRODUCERS_GROUP)
        await self._take_own_pending()
        batches: asyncio.Queue = asyncio.Queue(maxsize=1)
        results: asyncio.Queue = asyncio.Queue(maxsize=1)
        stages = [asyncio.create_task(self._feed_stage(batches)),
                  asyncio.create_task(self._generate_stage(batches, results)),
                  asyncio.create_task(self._append_stage(results))]  # fmt: skip
        background = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._weights_loop())]
        try:
            await _supervise(stages, background, self.finished)
        finally:
            await self.streams.call(
                lambda: self.streams.redis.delete(self.keys.producer(self.id)), "DEL heartbeat"
            )
        log.info("producer %s done: %s", self.id, self.metrics)
        return self.metrics

    def _feeding_done(self) -> bool:
        cap = self.settings.producer.max_groups
        return self.stop.is_set() or (cap > 0 and self.admitted_total >= cap)

    def _room(self) -> int:
        """Prompts this producer may still take on (max_groups counts admitted and held ones too)."""
        cap = self.settings.producer.max_groups
        want = self.settings.producer.prompts_per_call
        if cap > 0:
            want = min(want, cap - self.admitted_total)
        return want - len(self.held)

    async def _feed_stage(self, out: asyncio.Queue) -> None:
        while not self._feeding_done():
            # the previous batch was taken by the engine: prepare the next one during its call
            await out.join()
            await self._fill()
            batch = await self._admit()
            if batch:
                self.admitted_total += len(batch)
                await out.put(batch)
            if self.held and not batch:
                await self._paced_wait()
            else:
                self.paced = False
        await out.put(None)  # drain: what was admitted is still generated and appended

    async def _generate_stage(self, inq: asyncio.Queue, out: asyncio.Queue) -> None:
        while (batch := await inq.get()) is not None:
            inq.task_done()
            self.inflight = len(batch)
            t0 = time.monotonic()
            groups = await self.engine.generate([h.prompt_ids for h in batch], self.settings.pipeline.group_size,
                                                self.sampling)  # fmt: skip
            gen_s = time.monotonic() - t0
            self.metrics.generate_s_total += gen_s
            await out.put((batch, groups, gen_s))
            self.inflight = 0
        await out.put(None)

    async def _append_stage(self, inq: asyncio.Queue) -> None:
        while (item := await inq.get()) is not None:
            await self._append(*item)

    @property
    def state(self) -> str:
        if self.stop.is_set():
            return "draining"
        return "generating" if self.inflight else "paced" if self.paced else "idle"

    async def _paced_wait(self) -> None:
        self.paced = True
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=PACED_POLL_S)
        except TimeoutError:
            pass  # the normal case: poll admission again
        self.metrics.paced_s_total += time.monotonic() - t0

    # ------------------------------------------------------------------ taking prompts
    async def _take_own_pending(self) -> None:
        """Prompts this id read before a restart and never acked: process them first."""
        entries = await self.streams.read_own_pending(self.keys.prompts, PRODUCERS_GROUP, self.id, count=1000)
        await self._hold(entries)
        if entries:
            log.info("resuming %d prompts left pending by a previous run of %s", len(entries), self.id)

    async def _fill(self) -> None:
        room = self._room()
        if room > 0 and time.monotonic() >= self._next_claim:
            room -= await self._reclaim(room)
        if room > 0:
            block = None if self.held else READ_BLOCK_MS
            entries = await self.streams.read(self.keys.prompts, PRODUCERS_GROUP, self.id, room, block)
            await self._hold(entries)

    async def _reclaim(self, room: int) -> int:
        """XAUTOCLAIM prompts idle longer than claim_idle_ms (their producer died)."""
        idle_ms = self.settings.producer.claim_idle_ms
        self._next_claim = time.monotonic() + max(0.5, idle_ms / 2000)
        entries, deleted, self._claim_cursor = await self.streams.autoclaim(
            self.keys.prompts, PRODUCERS_GROUP, self.id, idle_ms, count=room, start=self._claim_cursor
        )
        if deleted:
            log.warning(
                "%d pending prompts were trimmed before anyone generated them: %s", len(deleted), deleted[:5]
            )
            await self.streams.ack(self.keys.prompts, PRODUCERS_GROUP, deleted)
        mine = {h.entry.id for h in self.held}
        fresh = [e for e in entries if e.id not in mine]  # our own held prompts go idle while we are paced
        if fresh:
            log.info("reclaimed %d prompts from dead producers", len(fresh))
            self.metrics.reclaimed += len(fresh)
        return await self._hold(fresh)

    async def _hold(self, entries: list[Entry]) -> int:
        n = 0
        for e in entries:
            held = await self._prepare(e)
            if held is not None:
                self.held.append(held)
                n += 1
        return n

    async def _prepare(self, entry: Entry) -> Held | None:
        """Decode and tokenise one prompt; a poison message is dead-lettered (with the reason) and acked."""
        if entry.payload is None:
            await self.streams.ack(self.keys.prompts, PRODUCERS_GROUP, [entry.id])
            return None
        try:
            task = decode(entry.payload, PromptTask)
            reward = get_reward(task.task)
        except WireError as e:
            return await self._dead(entry, e.reason, str(e))
        except TaskError as e:
            return await self._dead(entry, "unknown_reward", str(e))
        ids = [int(x) for x in task.prompt_ids] if task.prompt_ids.size else self._tokenize(task.prompt)
        if not ids:
            return await self._dead(
                entry, "empty_prompt", f"task {task.task_id}: prompt tokenises to no tokens"
            )
        return Held(entry, task, ids, reward)

    def _tokenize(self, prompt: str) -> list[int]:
        # plain text, no chat template and no special tokens: the reference task's prompts are raw strings
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    async def _dead(self, entry: Entry, reason: str, detail: str) -> None:
        await self.streams.dead_letter(self.keys.dead, self.keys.prompts, PRODUCERS_GROUP, entry, reason, detail,
                                       self.id, self.settings.pipeline.dead_maxlen)  # fmt: skip
        self.metrics.dead_lettered += 1

    # ------------------------------------------------------------------ admission
    async def _admit(self) -> list[Held]:
        """Admit held prompts in order until the staleness bound refuses one (the rest stay held)."""
        batch: list[Held] = []
        cap = self.settings.producer.max_groups
        limit = cap - self.admitted_total if cap > 0 else len(self.held)
        for h in list(self.held)[: max(0, limit)]:
            # retrying is safe: the script marks the group id, so a lost reply cannot count it twice
            admission = await self.streams.call(
                lambda h=h: self.admitter.try_admit(h.task.task_id, self.engine.version), "EVALSHA admit"
            )
            if not admission.admitted:
                break
            batch.append(h)
            self.held.remove(h)
        return batch

    # ------------------------------------------------------------------ generation
    async def _append(self, batch: list[Held], groups: list[list[Completion]], gen_s: float) -> None:
        done: list[tuple[Held, RolloutGroup]] = []
        for h, comps in zip(batch, groups, strict=True):
            group = await self._score(h, comps, gen_s)
            if group is not None:
                done.append((h, group))
        if done:
            await self.streams.append_many(self.keys.rollouts, [encode(g) for _, g in done],
                                           self.settings.pipeline.rollouts_maxlen)  # fmt: skip
            # acked only once the groups are in the rollouts stream: a crash before this re-generates them
            await self.streams.ack(self.keys.prompts, PRODUCERS_GROUP, [h.entry.id for h, _ in done])
        self._count(done)

    async def _score(self, h: Held, comps: list[Completion], gen_s: float) -> RolloutGroup | None:
        samples = []
        for c in comps:
            text = self.tokenizer.decode([int(x) for x in c.token_ids], skip_special_tokens=True)
            try:
                reward = float(h.reward(text, h.task.meta))
            except Exception as e:  # noqa: BLE001 - user reward code: per-message boundary (dead letter + ack)
                await self._dead(h.entry, "reward_error", f"{type(e).__name__}: {e}")
                return None
            samples.append(Sample(c.token_ids, c.logprobs, reward, c.finish_reason, c.version_start, c.version_end,
                                  c.version_spans))  # fmt: skip
        s = self.sampling
        return RolloutGroup(
            group_id=h.task.task_id, prompt_id=str(h.task.meta.get("prompt_id", h.task.task_id)),
            prompt_ids=h.prompt_ids, task=h.task.task, producer_id=self.id, model_fingerprint=self.engine.fingerprint,
            samples=tuple(samples), temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, gen_time_s=gen_s,
        )  # fmt: skip

    def _count(self, done: list[tuple[Held, RolloutGroup]]) -> None:
        m = self.metrics
        m.groups_total += len(done)
        for _, g in done:
            m.samples_total += len(g.samples)
            m.tokens_total += sum(int(s.completion_ids.size) for s in g.samples)

    # ------------------------------------------------------------------ weights
    async def _weights_loop(self) -> None:
        while not self.finished.is_set():
            await self.sync_weights()
            await _pause(self.finished, WEIGHTS_POLL_S)

    async def sync_weights(self) -> bool:
        """Load the newest announced checkpoint if it is newer and verifies. True if weights changed."""
        refused_before = len(self.follower.refused)
        ckpt = await self.follower.newer_than(self.engine.version)
        self.metrics.checkpoints_refused += len(self.follower.refused) - refused_before
        if ckpt is None:
            return False
        t0 = time.monotonic()
        try:
            await self.engine.load_weights(ckpt.path, ckpt.version)
        except EngineError as e:
            self.follower.refused[(ckpt.version, ckpt.announcement.manifest_sha256)] = str(e)
            self.metrics.checkpoints_refused += 1
            log.error(
                "could not load checkpoint version %d (keeping version %d): %s",
                ckpt.version,
                self.engine.version,
                e,
            )
            return False
        m = self.metrics
        m.weight_sync_s, m.weight_syncs, m.weight_version = (
            time.monotonic() - t0,
            m.weight_syncs + 1,
            ckpt.version,
        )
        return True

    # ------------------------------------------------------------------ heartbeat
    async def _heartbeat_loop(self) -> None:
        ttl_s = self.settings.producer.heartbeat_ttl_s
        every_s = min(2.0, ttl_s / 3)
        exporter = _Exporter(self.settings, self.id)
        key = self.keys.producer(self.id)
        try:
            await self._beat(exporter, key, ttl_s, every_s)
        finally:
            exporter.close()

    async def _beat(self, exporter: _Exporter, key: str, ttl_s: float, every_s: float) -> None:
        while not self.finished.is_set():
            hb = self.heartbeat()
            exporter.export(self.metrics, hb)  # first: whoever sees this heartbeat sees these metrics
            await self.streams.call(
                lambda hb=hb: self.streams.redis.set(key, encode(hb), ex=max(1, int(ttl_s))), "SET heartbeat"
            )
            await _pause(self.finished, every_s)

    def heartbeat(self) -> ProducerHeartbeat:
        now, m = time.monotonic(), self.metrics
        t, tokens, groups = self._rate_mark
        dt = max(now - t, 1e-6)
        self._rate_mark = (now, m.tokens_total, m.groups_total)
        return ProducerHeartbeat(
            producer_id=self.id, host=socket.gethostname(), engine=self.engine.name, version=self.engine.version,
            groups_done=m.groups_total, tokens_per_s=(m.tokens_total - tokens) / dt,
            groups_per_s=(m.groups_total - groups) / dt, inflight=self.inflight,
            state=self.state, started_at=self.started_at,
        )  # fmt: skip


async def _supervise(
    stages: list[asyncio.Task], background: list[asyncio.Task], finished: asyncio.Event
) -> None:
    """Wait for ``stages``; the first failure of any task cancels all the others and is raised.

    After a normal end the background loops are asked to stop (``finished``) and awaited, not cancelled: a
    cancel that lands as a Redis reply arrives can be lost inside redis-py (8.1), and the task then loops
    forever while the exit waits for it (seen after SIGTERM right behind a Redis pause)."""
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


class _Exporter:
    """Heartbeat-time metrics: a JSONL line in RUN_DIR/metrics/ and, if metrics_port > 0, Prometheus gauges."""

    def __init__(self, settings: Settings, producer_id: str):
        self.path = Path(settings.run_dir) / "metrics" / f"producer-{producer_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.gauges, self.server = (
            _prometheus(settings.metrics_port, producer_id) if settings.metrics_port else ({}, None)
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def export(self, m: ProducerMetrics, hb: ProducerHeartbeat) -> None:
        row = {"time": time.time(), "state": hb.state, "tokens_per_s": hb.tokens_per_s, **asdict(m)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.gauges:
            g = self.gauges
            g["groups_total"].set(m.groups_total)
            g["tokens_per_s"].set(hb.tokens_per_s)
            g["weight_version"].set(m.weight_version)
            g["weight_sync_seconds"].set(m.weight_sync_s)
            g["paced_seconds_total"].set(m.paced_s_total)


def _prometheus(port: int, producer_id: str) -> tuple[dict, object]:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    names = ("groups_total", "tokens_per_s", "weight_version", "weight_sync_seconds", "paced_seconds_total")
    gauges = {
        n: Gauge(f"gspo_producer_{n}", n.replace("_", " "), ["producer"], registry=registry) for n in names
    }
    server, _ = start_http_server(port, registry=registry)
    return {n: g.labels(producer=producer_id) for n, g in gauges.items()}, server


# --------------------------------------------------------------------------- assembly
def base_model_dir(settings: Settings) -> str:
    return settings.producer.model or settings.learner.model


async def build_engine(
    settings: Settings, producer_id: str, follower: CheckpointFollower
) -> tuple[Engine, object]:
    """The engine and the tokenizer used to tokenise prompts and detokenise completions for rewards."""
    from modeling import load_tokenizer

    model_dir = base_model_dir(settings)
    p = settings.producer
    if p.engine == "transformers":
        from producer.engines.hf import HFEngine

        seed = (p.seed * 1_000_003 + zlib.crc32(producer_id.encode())) % 2**31
        engine = HFEngine(model_dir, device=p.device, dtype=p.dtype, seed=seed, threads=p.threads)
        return engine, engine.tokenizer
    from producer.engines.sglang import SGLangEngine

    engine = SGLangEngine(p.sglang_url, fingerprint=follower.base_fingerprint, timeout_s=p.sglang_timeout_s,
                          reload_mode=p.reload_mode, router_url=p.router_url)  # fmt: skip
    await engine.start()
    return engine, load_tokenizer(model_dir)


async def resolve_base_model(settings: Settings, streams: StreamClient, keys: RunKeys) -> str:
    """settings.producer.model, else settings.learner.model, else the announced checkpoint (its own base)."""
    model_dir = base_model_dir(settings)
    if not model_dir:
        ann = await CheckpointFollower(streams, keys, "").announced()
        if ann is None:
            raise ProducerError(
                "no model: pass --model (or set learner.model), or start the learner so it publishes one"
            )
        log.warning("no base model configured: using the announced checkpoint %s as the base", ann.path)
        # an announced URL is downloaded into the cache first
        local, _ = await asyncio.to_thread(local_checkpoint, ann, cache_dir_for(settings))
        settings.producer.model = model_dir = str(local)
    return model_dir


async def build_producer(
    settings: Settings, streams: StreamClient, stop: asyncio.Event | None = None
) -> Producer:
    """Engine, tokenizer and checkpoint follower wired into a :class:`Producer`, on the newest verified weights."""
    producer_id = settings.producer.producer_id or default_producer_id()
    keys = RunKeys(settings.run)
    model_dir = await resolve_base_model(settings, streams, keys)
    follower = CheckpointFollower(streams, keys, model_fingerprint(model_dir), cache_dir_for(settings))
    engine, tokenizer = await build_engine(settings, producer_id, follower)
    producer = Producer(settings, engine, tokenizer, streams, producer_id, follower, stop)
    try:
        await producer.sync_weights()  # start from the newest verified checkpoint, if any
    except BaseException:
        await engine.close()
        raise
    log.info(
        "producer %s: engine %s, model %s, weight version %d",
        producer_id,
        engine.name,
        model_dir,
        engine.version,
    )
    return producer


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

    try:
        asyncio.run(_main(settings))
    except (ProducerError, EngineError, ModelLoadError, FingerprintError, CheckpointError, TaskError,
            RedisUnavailable, *RETRYABLE) as e:  # fmt: skip
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
