"""The learner service: an asyncio loop around the (threaded) GSPO step.

- a reader task pulls rollout entries (this consumer's own pending ones first after a resume, then
  new ones), decodes and validates them while the current step trains in a thread; poison entries
  go to the dead-letter stream (acked there), good ones to a bounded queue;
- the loop takes B groups off the queue, dropping duplicates (group ids already trained) and groups
  staler than K, updates ``keys.learner_state`` and runs ``Trainer.train_step`` in a thread;
- every ``publish_every`` steps a snapshot is written on a background thread; once it is STABLE it
  is announced, and only then are the entries it covers acked (ack-after-commit: after a kill -9
  nothing is lost and nothing is trained twice) and the stream trimmed below the oldest pending id;
- the prompt feeder keeps ``prompts_ahead × B`` prompts queued, its cursor saved in every checkpoint.

Multi-rank (torchrun): rank 0 runs this loop and broadcasts batches; other ranks run ``follow``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections import Counter
from pathlib import Path

import torch

from common import prom
from common.config import Settings
from common.feeder import enqueue
from common.fingerprint import FingerprintError, model_fingerprint
from common.keys import LEARNER_GROUP, PRODUCERS_GROUP, RunKeys
from common.manifest import CheckpointError, step_dir_name
from common.redis_conn import RedisUnavailable, connect_async
from common.store import CheckpointUploadError, prune_remote, upload_step
from common.streams import RETRYABLE, Entry, StreamClient, describe_failure
from common.tasks import TaskError, dataset_rows
from common.wire import CheckpointAnnouncement, decode, encode
from learner import checkpoint as ckpt
from learner.batching import BadRollout, TakenGroup, build_batch, decode_entry
from learner.distributed import (
    CMD_STOP,
    CMD_TRAIN,
    World,
    broadcast_batch,
    broadcast_command,
    broadcast_int,
    init_from_env,
    shutdown,
)
from learner.metrics import MetricsWriter
from learner.trainer import Trainer
from modeling import ModelLoadError, load_model, load_tokenizer

log = logging.getLogger(__name__)
CONSUMER = "learner-0"
READ_BLOCK_MS = 1000
CHECKPOINTS_MAXLEN = 10_000


class LearnerError(RuntimeError):
    """A learner failure stated in one line (the CLI exits 2 with it, no traceback)."""


def ckpt_root(settings: Settings) -> Path:
    return Path(settings.learner.checkpoint_dir or Path(settings.run_dir) / "checkpoints")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resume_dir(settings: Settings, resume: bool | None) -> Path | None:
    """Newest verified STABLE checkpoint unless resume is False; resume=True without one is an error."""
    if resume is False:
        return None
    found = ckpt.newest_verified(ckpt_root(settings))
    if found is None and resume is True:
        raise LearnerError(f"--resume: no verified STABLE checkpoint under {ckpt_root(settings)}")
    return found


def build_trainer(settings: Settings, model_dir: Path, world: World) -> Trainer:
    model = load_model(model_dir, device=_device())
    ref = load_model(settings.learner.model, device=_device()) if settings.learner.kl_coef > 0 else None
    if ref is not None:
        ref.requires_grad_(False)
    pad = getattr(model.config, "pad_token_id", None)
    return Trainer(model, settings, world, ref_model=ref, pad_id=int(pad) if pad is not None else 0)


# set-up problems and a Redis outage longer than redis.retry_for_s: one error line, exit 2 (no traceback)
STATED_FAILURES = (LearnerError, ModelLoadError, FingerprintError, CheckpointError, TaskError, RedisUnavailable,
                   *RETRYABLE)  # fmt: skip


def main(settings: Settings, resume: bool | None = None) -> int:
    """Entry point of ``gspo learner``: 0 after max_steps or SIGTERM; 2 with one error line on a stated failure."""
    try:
        return _main(settings, resume)
    except STATED_FAILURES as e:
        log.error("learner failed: %s", describe_failure(e))
        return 2


def _main(settings: Settings, resume: bool | None) -> int:
    if settings.learner.threads:
        torch.set_num_threads(settings.learner.threads)
    torch.manual_seed(settings.learner.seed)
    world = init_from_env(_device())
    try:
        start = _resume_dir(settings, resume) if world.is_main else None
        step = broadcast_int(world, int(start.name.split("_")[1]) if start else -1)
        model_dir = ckpt_root(settings) / step_dir_name(step) if step >= 0 else Path(settings.learner.model)
        if step < 0 and not settings.learner.model:
            raise LearnerError(
                "learner.model (--model) is required when there is no checkpoint to resume from"
            )
        trainer = build_trainer(settings, model_dir, world)
        state = ckpt.load_trainer_state(model_dir) if step >= 0 else None
        if state is not None:
            ckpt.restore(trainer.optimizer, trainer.scheduler, state)
        if not world.is_main:
            follow(trainer, world)
            return 0
        return asyncio.run(Learner(settings, trainer, model_dir, state, world).run())
    finally:
        shutdown(world)


def follow(trainer: Trainer, world: World) -> None:
    """Ranks > 0: train on each broadcast batch until rank 0 says stop."""
    while broadcast_command(world, CMD_TRAIN) == CMD_TRAIN:
        trainer.train_step(broadcast_batch(world, None))


class Learner:
    def __init__(self, settings: Settings, trainer: Trainer, model_dir: Path, state: ckpt.TrainerState | None,
                 world: World = World()):  # fmt: skip
        self.s, self.trainer, self.world = settings, trainer, world
        self.keys = RunKeys(settings.run)
        self.root = ckpt_root(settings)
        self.tokenizer = load_tokenizer(model_dir)
        self.fingerprint = model_fingerprint(model_dir)
        self.vocab_size = int(trainer.model.get_input_embeddings().num_embeddings)
        self.step = state.step if state else 0
        self.consumed = int(state.counters.get("consumed", 0)) if state else 0
        self.prompt_cursor = int(state.counters.get("prompt_cursor", 0)) if state else 0
        self.trained_ids: set[str] = set(state.trained_ids) if state else set()
        self.restored_entry_ids = state.entry_ids if state else []
        self.last_published = self.step if state else None
        self.unacked: list[str] = []  # entries consumed since the last snapshot
        self.dead = 0
        self.publish_s = 0.0
        self.publish_failures = 0  # consecutive checkpoint writes that failed (disk full, I/O error)
        self.publish_failures_total = 0
        self.queue: asyncio.Queue[TakenGroup] = asyncio.Queue(maxsize=2 * settings.pipeline.batch_groups)
        self.stop = asyncio.Event()
        self.reader_stop = asyncio.Event()
        self.ckpt_task: asyncio.Task | None = None
        self._rows = None
        self.t_start = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        self.redis = connect_async(self.s.redis)
        self.streams = StreamClient(self.redis, self.s.redis.retry_for_s, what="learner")
        self.metrics = MetricsWriter(self.s.run_dir, tensorboard=self.s.learner.tensorboard)
        self._install_signals()
        if prom.start_metrics_server(self.s.metrics_port):
            log.info("Prometheus metrics on port %d", self.s.metrics_port)
        reader = None
        try:
            await self._start()
            reader = asyncio.create_task(self._reader(), name="rollout-reader")
            await self._loop(reader)
            await self._finish()
        finally:
            if reader is not None:
                await self._stop_reader(reader)
            broadcast_command(self.world, CMD_STOP)
            self.metrics.close()
            await self.redis.aclose()
        return 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._request_stop, sig)
            except (
                NotImplementedError,
                RuntimeError,
                ValueError,
            ):  # not the main thread (tests): no handlers
                return

    def _request_stop(self, sig: int) -> None:
        log.info("signal %s: finishing the current step, publishing, then exiting", signal.Signals(sig).name)
        self.stop.set()

    async def _start(self) -> None:
        await self.streams.ensure_group(self.keys.rollouts, LEARNER_GROUP)
        removed = ckpt.remove_stale_tmp(self.root)
        if removed:
            log.info("removed %d unfinished checkpoint dirs", removed)
        if self.last_published is not None:
            log.info("resumed from step %d (%d groups trained)", self.step, len(self.trained_ids))
            await self.streams.ack(self.keys.rollouts, LEARNER_GROUP, self.restored_entry_ids)
            await self._announce_if_missing()
            await self._trim()
        await self._set_state()

    def _done(self) -> bool:
        max_steps = self.s.learner.max_steps
        return self.stop.is_set() or (max_steps > 0 and self.step >= max_steps)

    async def _loop(self, reader: asyncio.Task) -> None:
        while not self._done():
            await self._feed()
            t_wait = time.perf_counter()
            taken = await self._take(reader)
            if taken is None:
                break
            wait_s = time.perf_counter() - t_wait
            await self._set_state(training=True)
            metrics = await self._train(taken)
            metrics["time/wait_s"] = wait_s
            if self.step % self.s.learner.publish_every == 0:
                await self._publish()
            await self._write_metrics(metrics)

    async def _finish(self) -> None:
        if self.step != self.last_published and self.step > 0:
            await self._publish()
        await self._await_checkpoint()
        if self.publish_failures:
            raise LearnerError(f"the final checkpoint (step {self.step}) could not be written: steps after "
                               f"{self.last_published} are not durable and will be retrained on resume")  # fmt: skip

    # ------------------------------------------------------------------ reading
    async def _reader(self) -> None:
        """Own pending entries first (a resumed run retrains them), then new ones, into the queue."""
        after, own = "0", True
        count = self.s.pipeline.batch_groups
        while not self.reader_stop.is_set():
            if own:
                entries = await self.streams.read_own_pending(
                    self.keys.rollouts, LEARNER_GROUP, CONSUMER, count, after
                )
                if not entries:
                    own = False
                    continue
                after = entries[-1].id
            else:
                entries = await self.streams.read(
                    self.keys.rollouts, LEARNER_GROUP, CONSUMER, count, READ_BLOCK_MS
                )
            for e in entries:
                if not await self._accept(e):
                    return  # stopping with the queue full: the entry stays pending for the next run

    async def _stop_reader(self, reader: asyncio.Task) -> None:
        """Let the reader finish its current read (at most READ_BLOCK_MS) instead of cancelling it: a cancel
        that lands as a blocking XREADGROUP returns can be lost inside redis-py (8.1), and the task then
        reads forever while the exit waits for it (seen: ~40% of SIGTERMs to an idle learner hung)."""
        self.reader_stop.set()
        done, _ = await asyncio.wait({reader}, timeout=READ_BLOCK_MS / 1000 + 10)
        if not done:  # stuck in connection retries (Redis down): cancelling a sleep is safe
            reader.cancel()
            done, _ = await asyncio.wait({reader}, timeout=5)
        if done and not reader.cancelled() and reader.exception() is not None:
            log.warning("the rollout reader had stopped with %r", reader.exception())

    async def _accept(self, entry: Entry) -> bool:
        """Dead-letter or queue one entry; False if the learner stopped while the queue was full."""
        try:
            taken = decode_entry(entry, self.fingerprint, self.vocab_size)
        except BadRollout as bad:
            self.dead += 1
            if bad.well_formed:  # admission control counted it: release its slot now, not at the next step
                self.consumed += (
                    1  # (a producer of another model could otherwise fill the bound before any step)
                )
                await self._set_consumed()
            await self.streams.dead_letter(self.keys.dead, self.keys.rollouts, LEARNER_GROUP, entry, bad.reason,
                                           bad.detail, CONSUMER, self.s.pipeline.dead_maxlen)  # fmt: skip
            return True
        while (
            not self.reader_stop.is_set()
        ):  # polled, not awaited: the reader is never cancelled (_stop_reader)
            try:
                self.queue.put_nowait(taken)
                return True
            except asyncio.QueueFull:
                await asyncio.sleep(0.05)
        return False

    async def _take(self, reader: asyncio.Task) -> _Taken | None:
        """B trainable groups (duplicates and too-stale ones are dropped, counted and acked later)."""
        taken = _Taken()
        last_log = time.monotonic()
        while len(taken.groups) < self.s.pipeline.batch_groups:
            if self.stop.is_set():
                return None
            try:
                tg = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except TimeoutError:
                if reader.done():
                    reader.result()  # re-raise the reader's error
                await self._feed()
                if time.monotonic() - last_log >= self.s.learner.wait_log_s:
                    last_log = time.monotonic()
                    await self._log_waiting(len(taken.groups))
                continue
            self._classify(tg, taken)
        return taken

    def _classify(self, tg: TakenGroup, taken: _Taken) -> None:
        self.consumed += 1
        taken.entry_ids.append(tg.entry_id)
        if tg.group_id in self.trained_ids or tg.group_id in taken.ids:
            taken.duplicates += 1
            return
        k = max(0, self.step - tg.group.version_min)
        if k > self.s.pipeline.max_staleness:
            taken.stale_dropped += 1
            taken.stale_ids.append(tg.group_id)
            return
        taken.ids.add(tg.group_id)
        taken.groups.append((tg.group, k))

    async def _log_waiting(self, have: int) -> None:
        async def count_alive() -> int:
            return len([k async for k in self.redis.scan_iter(match=f"{self.keys.producers}:*", count=100)])

        alive = await self.streams.call(count_alive, "SCAN producers")
        log.info("waiting for producers: %d/%d groups of the next batch, %d producers alive",
                 have, self.s.pipeline.batch_groups, alive)  # fmt: skip

    # ------------------------------------------------------------------ training
    async def _train(self, taken: _Taken) -> dict:
        batch = build_batch(taken.groups)
        t0 = time.perf_counter()
        metrics = await asyncio.to_thread(self._train_sync, batch)
        step_s = time.perf_counter() - t0
        self.step += 1
        ckpt.maybe_crash("after_step", self.step)
        self.unacked.extend(taken.entry_ids)
        self.trained_ids.update(batch.group_ids)
        await self._set_state()
        hist = Counter(int(k) for _, k in taken.groups)
        metrics.update({
            "step": self.step, "version": self.step, "consumed": self.consumed, "groups/ids": batch.group_ids,
            "groups/stale_ids": taken.stale_ids,
            "staleness/mean": sum(k * n for k, n in hist.items()) / max(1, len(taken.groups)),
            "staleness/max": max(hist, default=0), "staleness/hist": {str(k): n for k, n in sorted(hist.items())},
            "staleness/dropped": taken.stale_dropped, "duplicates/dropped": taken.duplicates, "dead/total": self.dead,
            "time/step_s": step_s, "throughput/tokens_per_s": metrics["tokens/real"] / step_s,
            "throughput/groups_per_s": len(taken.groups) / step_s,
        })  # fmt: skip
        return metrics

    def _train_sync(self, batch) -> dict:
        ckpt.maybe_crash("during_step", self.step + 1)
        broadcast_command(self.world, CMD_TRAIN)
        broadcast_batch(self.world, batch)
        return self.trainer.train_step(batch)

    async def _write_metrics(self, metrics: dict) -> None:
        metrics["stream/backlog"] = await self.streams.backlog(self.keys.rollouts, LEARNER_GROUP)
        metrics["stream/pending"] = await self.streams.pending_count(self.keys.rollouts, LEARNER_GROUP)
        metrics["weights/publish_s"] = self.publish_s
        metrics["weights/publish_failures"] = self.publish_failures_total
        metrics["time/unix"] = time.time()
        metrics["time/elapsed_s"] = time.monotonic() - self.t_start
        self.metrics.write(metrics)
        prom.learner_observe(metrics)

    async def _set_consumed(self) -> None:
        await self.streams.call(
            lambda: self.redis.hset(self.keys.learner_state, "consumed", self.consumed), "HSET consumed"
        )

    async def _set_state(self, training: bool = False) -> None:
        """``next_version``: the weights the next taken group will meet (admission control reads it)."""
        mapping = {"version": self.step, "next_version": self.step + int(training), "consumed": self.consumed,
                   "step": self.step, "updated_at": time.time()}  # fmt: skip
        await self.streams.call(
            lambda: self.redis.hset(self.keys.learner_state, mapping=mapping), "HSET learner state"
        )

    # ------------------------------------------------------------------ publishing
    async def _publish(self) -> None:
        """Snapshot now (CPU copies), write + announce + ack on a background task."""
        await self._await_checkpoint()
        t = self.trainer
        snap = ckpt.take_snapshot(t.model, t.optimizer, t.scheduler, step=self.step,
                                  counters={"consumed": self.consumed, "prompt_cursor": self.prompt_cursor},
                                  entry_ids=self.unacked, trained_ids=sorted(self.trained_ids))  # fmt: skip
        self.unacked = []
        parent, self.last_published = self.last_published, self.step
        self.ckpt_task = asyncio.create_task(self._write_and_announce(snap, parent))

    async def _await_checkpoint(self) -> None:
        if self.ckpt_task is not None:
            task, self.ckpt_task = self.ckpt_task, None
            await task

    async def _write_and_announce(self, snap: ckpt.Snapshot, parent: int | None) -> None:
        t0 = time.perf_counter()
        try:
            path, digest = await asyncio.to_thread(
                ckpt.write_checkpoint,
                self.root,
                snap,
                self.trainer.model,
                self.tokenizer,
                self.fingerprint,
                parent,
            )
        except OSError as e:
            self._publish_failed(snap, parent, e)
            return
        try:
            where = await asyncio.to_thread(self._published_at, path)
        except CheckpointUploadError as e:  # as a failed write: not announced nor acked, next publish retries
            self._publish_failed(snap, parent, e)
            return
        self.publish_failures = 0
        ckpt.maybe_crash("before_announce", snap.step)
        await self._announce(snap.step, where, digest)
        self.publish_s = time.perf_counter() - t0
        await self.streams.ack(self.keys.rollouts, LEARNER_GROUP, snap.entry_ids)
        ckpt.maybe_crash("after_ack", snap.step)
        await self._trim()
        for p in await asyncio.to_thread(ckpt.prune, self.root, self.s.learner.keep_checkpoints):
            log.debug("pruned %s", p)
        log.info("published step %d in %.2fs: %s", snap.step, self.publish_s, path)

    def _publish_failed(self, snap: ckpt.Snapshot, parent: int | None, e: Exception) -> None:
        """A checkpoint that could not be written (disk full, I/O error): nothing of it is acked. Its entries go
        back to the unacked list, so the next publish point covers them; a crash before then retrains them."""
        self.publish_failures += 1
        self.publish_failures_total += 1
        self.unacked = snap.entry_ids + self.unacked
        if self.last_published == snap.step:
            self.last_published = parent
        log.error("could not publish the checkpoint of step %d (%s: %s); partial files removed, its %d entries stay "
                  "unacked; training goes on and the next publish point retries", snap.step, type(e).__name__, e,
                  len(snap.entry_ids))  # fmt: skip

    def _published_at(self, step_dir: Path) -> str:
        """Where producers load a STABLE step from: its absolute local path, or (learner.checkpoint_url set)
        its upload there. Blocking: runs on the checkpoint thread."""
        url_root = self.s.learner.checkpoint_url
        if not url_root:
            return str(step_dir.resolve())
        url = upload_step(step_dir, url_root)
        try:
            prune_remote(url_root, self.s.learner.keep_checkpoints)
        except OSError as e:  # the new step is complete: announce it; the next publish prunes again
            log.warning("could not prune old checkpoints under %s: %s: %s", url_root, type(e).__name__, e)
        return url

    async def _announce(self, step: int, path: Path | str, digest: str) -> None:
        msg = encode(CheckpointAnnouncement(step=step, version=step, path=str(path), manifest_sha256=digest,
                                            model_fingerprint=self.fingerprint))  # fmt: skip
        await self.streams.append(self.keys.checkpoints, msg, CHECKPOINTS_MAXLEN)
        await self.streams.call(lambda: self.redis.set(self.keys.latest, msg), "SET latest")

    async def _announce_if_missing(self) -> None:
        """A crash between STABLE and the announcement: announce the restored step now."""
        raw = await self.streams.call(lambda: self.redis.get(self.keys.latest), "GET latest")
        if raw is not None and decode(raw, expect=CheckpointAnnouncement).step >= self.step:
            return
        path = self.root / step_dir_name(self.step)
        from common.manifest import read_manifest

        where = await asyncio.to_thread(self._published_at, path)  # uploaded again if checkpoint_url is set
        await self._announce(self.step, where, read_manifest(path)[1])

    async def _trim(self) -> None:
        """Drop entries older than everything still pending, from the rollouts stream (all of them are acked)
        and from the prompts stream (generated and acked by producers): both stay bounded however long the run."""
        for stream, group in ((self.keys.rollouts, LEARNER_GROUP), (self.keys.prompts, PRODUCERS_GROUP)):
            oldest = await self._oldest_unfinished(stream, group)
            if oldest is not None:
                await self.streams.trim_before(stream, oldest)

    async def _oldest_unfinished(self, stream: str, group: str) -> str | None:
        """The oldest entry ``group`` still needs: its oldest pending one, else its last delivered one."""
        found = [g for g in await self.streams.group_info(stream) if g.get("name") == group]
        if not found:
            return None
        if int(found[0].get("pending", 0)):
            info = await self.streams.call(lambda: self.redis.xpending(stream, group), f"XPENDING {stream}")
            return info["min"].decode() if isinstance(info["min"], bytes) else str(info["min"])
        last = str(found[0].get("last-delivered-id", "0-0"))
        return None if last in ("0-0", "0") else last

    # ------------------------------------------------------------------ prompt feeder
    async def _feed(self) -> None:
        """Keep prompts_ahead × B prompts queued for producers (task id = f"{run}-{position:09d}")."""
        if not self.s.learner.dataset:
            return
        target = self.s.learner.prompts_ahead * self.s.pipeline.batch_groups
        missing = target - await self.streams.backlog(self.keys.prompts, PRODUCERS_GROUP)
        if missing <= 0:
            return
        if self._rows is None:
            self._rows = dataset_rows(self.s.learner.dataset, self.s.learner.seed, start=self.prompt_cursor)
        pairs = [
            (f"{self.s.run}-{self.prompt_cursor + i:09d}", row)
            for i, row in enumerate(itertools.islice(self._rows, missing))
        ]
        await enqueue(self.streams, self.keys, pairs, self.s.pipeline.prompts_maxlen)
        self.prompt_cursor += len(pairs)
        cursor = {"position": self.prompt_cursor, "source": self.s.learner.dataset}
        await self.streams.call(
            lambda: self.redis.hset(self.keys.prompt_cursor, mapping=cursor), "HSET prompt cursor"
        )


class _Taken:
    def __init__(self) -> None:
        self.groups: list = []  # (RolloutGroup, staleness)
        self.ids: set[str] = set()
        self.entry_ids: list[str] = []
        self.duplicates = 0
        self.stale_dropped = 0
        self.stale_ids: list[str] = []  # group ids dropped as too stale (accounting: nothing silently lost)
