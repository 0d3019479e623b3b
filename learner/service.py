"""The learner service: an asyncio loop around the (threaded) GSPO step.

One iteration, as in the README diagram: feed → take → train → publish → metrics.

- feed (``learner.feeder``): keep ``prompts_ahead × B`` prompts queued for producers;
- take (``learner.intake``): B trainable groups off the rollouts stream, read, validated and queued by a
  reader task while the previous step trains; duplicates and groups staler than K are dropped and counted;
- train: ``Trainer.train_step`` in a thread, ``keys.learner_state`` (``learner.state``) updated around it;
- publish (``learner.publisher``): every ``publish_every`` steps, and again a few seconds after a failed
  publish, a checkpoint is written in the background; once STABLE it is announced, and only then are the
  entries it covers acked (after a kill -9 nothing is lost and nothing is trained twice);
- metrics: one metrics.jsonl row (and Prometheus gauges) per step.

Multi-rank (torchrun): rank 0 runs this loop and broadcasts batches and checkpoint writes; other ranks run
``follow``. Each rank holds a shard of the model (``learner/sharded.py``); a 1-rank learner holds the plain
model unless ``learner.shard = "always"`` or ``learner.cpu_offload``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from common import prom
from common.config import Settings
from common.feeder import PromptsFull
from common.fingerprint import FingerprintError, model_fingerprint
from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import CheckpointError, step_dir_name
from common.redis_conn import RedisUnavailable, connect_async
from common.streams import RETRYABLE, StreamClient, describe_failure
from common.tasks import TaskError
from learner import checkpoint as ckpt
from learner import reuse
from learner.batching import TrainBatch, build_batch
from learner.distributed import (
    CMD_SAVE,
    CMD_STOP,
    CMD_TRAIN,
    World,
    broadcast_batch,
    broadcast_command,
    broadcast_int,
    init_from_env,
    local_device,
    shutdown,
)
from learner.evaluation import Evaluator
from learner.feeder import PromptFeeder
from learner.intake import Intake, TakenBatch
from learner.lora import LoraError
from learner.metrics import MetricsWriter
from learner.publisher import Publisher
from learner.sharded import ShardingError, should_shard
from learner.state import LearnerState
from learner.tracking import SampleLog, TrackerError, component_means, open_trackers, sample_rows
from learner.trainer import Trainer
from modeling import ModelLoadError, load_model, load_tokenizer, resolve_model_dir

log = logging.getLogger(__name__)


class LearnerError(RuntimeError):
    """A learner failure stated in one line (the CLI exits 2 with it, no traceback)."""


def ckpt_root(settings: Settings) -> Path:
    return reuse.checkpoint_root(settings)


def state_root(settings: Settings) -> Path:
    return reuse.state_root(settings)


def _device() -> str:
    return local_device()


def _resume_dir(settings: Settings, resume: bool | None, fresh: bool = False) -> Path | None:
    """The checkpoint to start from: None to start at step 0 from ``learner.model``.

    - ``fresh``: the run's keys, checkpoints and metrics are deleted first (learner/reuse.py), then step 0;
    - ``resume`` False (``--no-resume``): step 0, refused in one line if a learner has used the run before
      (its state would mix with the new run's: learner/reuse.py);
    - ``resume`` True: the newest verified STABLE checkpoint, an error without one;
    - ``resume`` None (auto): the newest verified STABLE checkpoint, else step 0, refused if Redis announces a
      checkpoint of the run (the producers would keep those weights and the new steps would never reach them).
    """
    if fresh:
        if resume is True:
            raise LearnerError("--fresh deletes the checkpoints --resume would start from: pass one of them")
        log.warning("--fresh: %s", reuse.wipe(settings))
        return None
    root = ckpt_root(settings)
    if resume is False:
        state = reuse.find_used(settings)
        if state.used:
            raise LearnerError(
                f"--no-resume, but run {settings.run!r} was used before: {state.describe()}; starting at step 0 "
                f"on top of that would mix two runs: pass --resume to continue it, or --fresh to delete all of "
                f"it and start over"
            )
        return None
    found = ckpt.newest_verified(root, state_root(settings))
    if found is None and resume is True:
        raise LearnerError(f"--resume: no verified STABLE checkpoint under {root}")
    if found is None:
        state = reuse.find_used(settings)
        if state.announced_step is not None:
            raise LearnerError(
                f"no verified checkpoint under {root} to resume from, but Redis announces step "
                f"{state.announced_step} of run {settings.run!r} ({RunKeys(settings.run).latest}): starting at "
                f"step 0 would mix two runs: restore the checkpoints (or point learner.checkpoint_dir at them), "
                f"or pass --fresh to delete the run's state and start over"
            )
    return found


def build_trainer(
    settings: Settings, model_dir: Path, world: World, state: ckpt.TrainerState | None = None
) -> Trainer:
    """The trainer on the weights of ``model_dir`` (the base model, or the published step resumed from), with the
    optimizer, scheduler and RNG of ``state``. A LoRA run always starts from ``learner.model`` (its base) and
    takes its adapters from ``state``: published weights are merged and cannot be split again."""
    ls = settings.learner
    lora = ls.lora.r > 0
    if state is not None and lora != (state.lora is not None):
        had = f"LoRA adapters (learner.lora = {state.lora['spec']})" if state.lora else "no LoRA adapters"
        raise LearnerError(
            f"checkpoint {model_dir} has {had}, but learner.lora.r = {ls.lora.r}: resume with the run's settings, "
            f"or start a new run (--fresh)"
        )
    if lora and not ls.model:
        raise LearnerError("learner.lora needs learner.model (--model): the base model, also when resuming")
    device = _device()
    # full weights to be sharded: loaded in host memory, moved to this rank's GPU one module at a time as they are
    # sharded (learner/sharded.py); a model that is not (LoRA, one rank by default) is loaded where it computes
    shards = not lora and should_shard(ls.shard, ls.cpu_offload, world.size)
    model = load_model(
        ls.model if lora else model_dir,
        device="cpu" if shards else device,
        attn_implementation=ls.attn_implementation,
    )
    ref = None
    if ls.kl_coef > 0:
        ref = load_model(ls.model, device=device, attn_implementation=ls.attn_implementation)
        ref.requires_grad_(False)
    pad = getattr(model.config, "pad_token_id", None)
    trainer = Trainer(model, settings, world, ref_model=ref, pad_id=int(pad) if pad is not None else 0)
    if lora:
        from learner import lora as adapters

        digest = adapters.base_weights_digest(ls.model)
        trainer.lora_meta = {"spec": adapters.spec(ls.lora), "base_model": ls.model, "base_sha256": digest}
        if state is not None:
            adapters.check_resume(state.lora, trainer.lora_meta, state.where)
            adapters.load_adapter_state(trainer.model, state.adapter, state.where)
    if state is not None:
        ckpt.restore(trainer.model, trainer.optimizer, trainer.scheduler, state)
    return trainer


# set-up problems and a Redis outage longer than redis.retry_for_s: one error line, exit 2 (no traceback)
STATED_FAILURES = (
    LearnerError,
    LoraError,
    ShardingError,
    ModelLoadError,
    FingerprintError,
    CheckpointError,
    TaskError,
    TrackerError,
    RedisUnavailable,
    *RETRYABLE,
)


def main(settings: Settings, resume: bool | None = None, fresh: bool = False) -> int:
    """Entry point of ``gspo learner``: 0 after max_steps or SIGTERM; 2 with one error line on a stated failure.
    ``resume`` and ``fresh``: see :func:`_resume_dir`."""
    try:
        return _main(settings, resume, fresh)
    except STATED_FAILURES as e:
        log.error("learner failed: %s", describe_failure(e))
        return 2


def _main(settings: Settings, resume: bool | None, fresh: bool = False) -> int:
    if settings.learner.threads:
        torch.set_num_threads(settings.learner.threads)
    torch.manual_seed(settings.learner.seed)
    world = init_from_env(_device())
    try:
        start = _resume_dir(settings, resume, fresh) if world.is_main else None
        step = broadcast_int(world, int(start.name.split("_")[1]) if start else -1)
        if step < 0 and not settings.learner.model:
            raise LearnerError(
                "learner.model (--model) is required when there is no checkpoint to resume from"
            )
        model_dir = (
            ckpt_root(settings) / step_dir_name(step)
            if step >= 0
            else resolve_model_dir(settings.learner.model)
        )
        # rank 0's _resume_dir verified it (newest_verified); other ranks read the same files
        state = ckpt.load_trainer_state(model_dir, state_root(settings), verify=False) if step >= 0 else None
        trainer = build_trainer(settings, model_dir, world, state)
        trainer.version = max(step, 0)  # the weights' policy version (loss.proximal = "version" keys on it)
        if not world.is_main:
            follow(trainer, world, ckpt_root(settings), state_root(settings))
            return 0
        return asyncio.run(Learner(settings, trainer, model_dir, state, world).run())
    finally:
        shutdown(world)


def follow(trainer: Trainer, world: World, root: Path, private_root: Path) -> None:
    """Ranks > 0: train on each broadcast batch and write their shards of each checkpoint until rank 0 says
    stop. SIGTERM and SIGINT are ignored here: rank 0 gets them too (torchrun forwards them), finishes its
    step, publishes and then says stop; if rank 0 dies instead, the next collective fails and this rank exits."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    while (cmd := broadcast_command(world, CMD_TRAIN)) != CMD_STOP:
        if cmd == CMD_TRAIN:
            trainer.train_step(broadcast_batch(world, None))
        elif cmd == CMD_SAVE:
            step = broadcast_int(world, -1)
            try:
                ckpt.write_shards(root, private_root, step, trainer.model, trainer.optimizer)
            except (OSError, CheckpointException) as e:  # rank 0 sees it too: that publish fails
                log.error("could not write the shards of step %d: %s", step, str(e).splitlines()[0])


class Learner:
    def __init__(
        self,
        settings: Settings,
        trainer: Trainer,
        model_dir: Path,
        state: ckpt.TrainerState | None,
        world: World = World(),
    ):
        self.s, self.trainer, self.world = settings, trainer, world
        self.restored = state
        self.model_dir = model_dir
        self.keys = RunKeys(settings.run)
        self.redis = connect_async(settings.redis)
        self.streams = StreamClient(self.redis, settings.redis.retry_for_s, what="learner")
        step, counters = (state.step, state.counters) if state else (0, {})
        trained_ids = state.trained_steps if state else {}  # id -> step trained at
        fingerprint = model_fingerprint(model_dir)
        vocab_size = int(trainer.model.get_input_embeddings().num_embeddings)
        self.state = LearnerState(
            self.streams, self.keys, settings.pipeline, step, int(counters.get("consumed", 0))
        )
        lr = settings.learner
        self.evaluator = Evaluator(settings.run, lr.eval_every) if lr.eval_every else None
        self.intake = Intake(
            settings,
            self.streams,
            self.keys,
            self.state,
            fingerprint,
            vocab_size,
            trained_ids,
            self.evaluator,
        )
        self.feeder = PromptFeeder(settings, self.streams, self.keys, int(counters.get("prompt_cursor", 0)))
        self.tokenizer = load_tokenizer(model_dir)
        self.publisher = Publisher(
            settings,
            self.streams,
            self.keys,
            ckpt_root(settings),
            trainer,
            self.tokenizer,
            fingerprint,
            last_published=step if state else None,
        )
        self.stop = asyncio.Event()
        self.t_start = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        lr = self.s.learner
        try:
            trackers = open_trackers(
                lr.report_to, lr.report_project, self.s.run, self.s.redacted(), Path(self.s.run_dir)
            )
        except BaseException:
            await self.redis.aclose()
            raise
        self.metrics = MetricsWriter(self.s.run_dir, tensorboard=lr.tensorboard, trackers=trackers)
        self.samples = SampleLog(self.s.run_dir, trackers)
        self._install_signals()
        if prom.start_metrics_server(self.s.metrics_port):
            log.info("Prometheus metrics on port %d", self.s.metrics_port)
        try:
            await self._start()
            self.intake.start()
            await self._loop()
            await self._finish()
        finally:
            await self.intake.stop()
            broadcast_command(self.world, CMD_STOP)
            self.metrics.close()
            await self.redis.aclose()
        return 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._request_stop, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                return  # not the main thread (tests): no handlers

    def _request_stop(self, sig: int) -> None:
        log.info("signal %s: finishing the current step, publishing, then exiting", signal.Signals(sig).name)
        self.stop.set()

    async def _start(self) -> None:
        await self.streams.ensure_group(self.keys.rollouts, LEARNER_GROUP)
        removed = ckpt.remove_stale_tmp(self.publisher.root, self.publisher.state_root)
        if removed:
            log.info("removed %d unfinished checkpoint dirs", removed)
        if self.restored is not None:
            log.info(
                "resumed from step %d (checkpoint %s, %d groups trained)",
                self.state.step,
                self.model_dir,
                len(self.intake.trained_ids),
            )
            await self.publisher.resume(self.state.step, self.restored.entry_ids)
        else:
            log.info("starting at step 0 from %s", self.model_dir)
        checkpoint_cursor = int(self.restored.counters.get("prompt_cursor", 0)) if self.restored else 0
        log.info("prompt feeder: %s", await self.feeder.restore(checkpoint_cursor))
        await self.state.write()

    def _done(self) -> bool:
        max_steps = self.s.learner.max_steps
        return self.stop.is_set() or (max_steps > 0 and self.state.step >= max_steps)

    async def _loop(self) -> None:
        while not self._done():
            t_iter = time.perf_counter()
            await self.feeder.feed()
            t_wait = time.perf_counter()
            taken = await self.intake.take(self.stop, self._idle)
            if taken is None:
                break
            wait_s = time.perf_counter() - t_wait
            metrics = await self._train(taken)
            metrics["time/wait_s"] = wait_s
            step = self.state.step
            t_publish = time.perf_counter()
            if step % self.s.learner.publish_every == 0 or self.publisher.retry_due(step):
                await self._publish()
            # where the loop's time went (gspo up's summary): waiting for rollouts (time/wait_s), training
            # (time/step_s), publishing in the loop (snapshot, and waiting for the previous background write)
            metrics["time/publish_s"] = time.perf_counter() - t_publish
            await self._observe(taken, metrics)
            metrics["time/iter_s"] = time.perf_counter() - t_iter
            await self._write_metrics(metrics)

    async def _observe(self, taken: TakenBatch, metrics: dict) -> None:
        """Each reward's own mean, eval rounds (start one when due; report a finished one), sample completions."""
        step = self.state.step
        metrics.update(component_means([s for g, _ in taken.groups for s in g.samples]))
        if taken.evals:
            metrics["eval/groups_taken"] = taken.evals
        if self.evaluator is not None:
            if self.evaluator.due(step):
                try:
                    n = await self.feeder.enqueue_eval(step)
                except PromptsFull as e:
                    log.warning("eval round of step %d skipped: %s", step, e)
                else:
                    self.evaluator.started(step, n)
                    log.info("eval round of step %d: %d prompts enqueued", step, n)
            metrics.update(self.evaluator.take_metrics())
        every = self.s.learner.samples_every
        if every and step % every == 0:
            rows = sample_rows(self.tokenizer, step, taken.groups, self.s.learner.samples_groups)
            await asyncio.to_thread(self.samples.write, rows, step)

    async def _idle(self) -> None:
        """Each second ``take`` waits for rollouts: top the prompts up, retry a failed publish when due."""
        await self.feeder.feed()
        if self.publisher.retry_due(self.state.step):
            await self._publish()

    async def _finish(self) -> None:
        step, publisher = self.state.step, self.publisher
        if step != publisher.last_published and step > 0:
            await self._publish()
        await publisher.wait()
        if publisher.failures:
            raise LearnerError(
                f"the final checkpoint (step {step}) could not be written: steps after "
                f"{publisher.last_published} are not durable and will be retrained on resume"
            )

    # ------------------------------------------------------------------ training
    async def _train(self, taken: TakenBatch) -> dict:
        await self.state.write(training=True)
        batch = build_batch(taken.groups, self.trainer.numerics)
        t0 = time.perf_counter()
        metrics = await asyncio.to_thread(self._train_sync, batch)
        step_s = time.perf_counter() - t0
        self.state.step += 1
        step = self.state.step
        ckpt.maybe_crash("after_step", step)
        self.publisher.record(taken.entry_ids)
        self.intake.mark_trained(batch.group_ids)
        await self.state.write()
        hist = Counter(int(k) for _, k in taken.groups)
        metrics.update(
            {
                "step": step,
                "version": step,
                "consumed": self.state.consumed,
                "groups/ids": batch.group_ids,
                "groups/stale_ids": taken.stale_ids,
                "staleness/mean": sum(k * n for k, n in hist.items()) / max(1, len(taken.groups)),
                "staleness/max": max(hist, default=0),
                "staleness/hist": {str(k): n for k, n in sorted(hist.items())},
                "staleness/dropped": taken.stale_dropped,
                "duplicates/dropped": taken.duplicates,
                "dead/total": self.intake.dead,
                "time/step_s": step_s,
                "throughput/tokens_per_s": metrics["tokens/real"] / step_s,
                "throughput/groups_per_s": len(taken.groups) / step_s,
            }
        )
        return metrics

    def _train_sync(self, batch: TrainBatch) -> dict:
        ckpt.maybe_crash("during_step", self.state.step + 1)
        broadcast_command(self.world, CMD_TRAIN)
        broadcast_batch(self.world, batch)
        return self.trainer.train_step(batch)

    # ------------------------------------------------------------------ publishing, metrics
    async def _publish(self) -> None:
        # ``consumed`` as of the step published: groups of a batch still being taken are read again on resume
        counters = {
            "consumed": self.state.consumed - self.intake.in_hand,
            "prompt_cursor": self.feeder.cursor,
        }
        await self.publisher.publish(self.state.step, counters, self.intake.trained_ids)

    async def _write_metrics(self, metrics: dict) -> None:
        metrics["stream/backlog"] = await self.streams.backlog(self.keys.rollouts, LEARNER_GROUP)
        metrics["stream/pending"] = await self.streams.pending_count(self.keys.rollouts, LEARNER_GROUP)
        metrics["weights/publish_s"] = self.publisher.publish_s
        metrics["weights/publish_failures"] = self.publisher.failures_total
        metrics["time/unix"] = time.time()
        metrics["time/elapsed_s"] = time.monotonic() - self.t_start
        self.metrics.write(metrics)
        prom.learner_observe(metrics)
