"""Publishing: from trained steps to STABLE, announced checkpoints and acked rollout entries.

A publish takes a snapshot between two steps (every rank writes its shards of the weights and the optimizer
state into the temp dir, rank 0 keeps CPU copies of the rest), then on a background task: write (a thread:
the weight shards consolidated into HF files, trainer state, fsync, rename, STABLE) → upload (``learner.checkpoint_url`` set: common/store.py)
→ announce (checkpoints stream and ``latest``) → ack the rollout entries the snapshot covers → trim the
rollouts and prompts streams → prune old checkpoints. A write or upload that fails (disk full, I/O error,
object store down) acks nothing: its entries wait for the next publish, which ``retry_due`` brings forward.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from common.config import Settings
from common.keys import LEARNER_GROUP, PRODUCERS_GROUP, RunKeys
from common.manifest import read_manifest, step_dir_name
from common.store import CheckpointUploadError, prune_remote, upload_step
from common.streams import StreamClient
from common.wire import CheckpointAnnouncement, decode, encode
from learner import checkpoint as ckpt
from learner import reuse
from learner.distributed import CMD_SAVE, broadcast_command, broadcast_int
from learner.trainer import Trainer

log = logging.getLogger(__name__)
CHECKPOINTS_MAXLEN = 10_000
RETRY_EVERY_S = 5.0  # a failed publish is tried again this long after it failed


class Publisher:
    """Owns what lies between a trained step and its acked entries: the unacked entry ids, the step of the
    newest checkpoint, the background write task and the failure counters."""

    def __init__(
        self,
        settings: Settings,
        streams: StreamClient,
        keys: RunKeys,
        root: Path,
        trainer: Trainer,
        tokenizer,
        fingerprint: str,
        last_published: int | None,
        retry_every_s: float = RETRY_EVERY_S,
        state_root: Path | None = None,
    ):
        self.s, self.streams, self.keys, self.root = settings, streams, keys, root
        # the learner-private trainer state of each step (default: RUN_DIR/learner-state)
        self.state_root = state_root if state_root is not None else reuse.state_root(settings)
        self.trainer, self.tokenizer, self.fingerprint = trainer, tokenizer, fingerprint
        self.retry_every_s = retry_every_s
        self.unacked: list[str] = []  # entries taken by trained steps that no STABLE checkpoint covers yet
        self.last_published = last_published  # step of the newest checkpoint written or being written
        self.task: asyncio.Task | None = None  # the background write of the newest snapshot
        self.publish_s = 0.0
        self.failures = 0  # consecutive publishes that failed
        self.failures_total = 0
        self._failed_at = 0.0  # time.monotonic() of the last failure

    def record(self, entry_ids: list[str]) -> None:
        """The entries one trained step took: unacked until a STABLE checkpoint covers that step."""
        self.unacked.extend(entry_ids)

    # ------------------------------------------------------------------ the ack rule
    async def _ack_stable(self, step: int, entry_ids: list[str]) -> None:
        """Ack ``entry_ids``, the rollout entries taken by the steps up to ``step``, whose checkpoint is STABLE.

        The learner's one ack rule (dead letters aside: they are acked as they are dead-lettered): an entry is
        acked only once the checkpoint holding the step that took it is STABLE. Until then a kill -9 leaves it
        pending, and the resumed run (from an older checkpoint, whose trained ids lack its group) takes it
        again; from then on that checkpoint's trained ids keep its group from being trained twice. Nothing is
        lost, nothing is trained twice.

        Called by a publish whose write (and upload) succeeded, once announced; and on resume, for the ids of
        the checkpoint resumed from (the previous run may have died between STABLE and this ack). A failed
        publish acks nothing: its ids go back to ``unacked`` and the next checkpoint covers them.
        """
        await self.streams.ack(self.keys.rollouts, LEARNER_GROUP, entry_ids)

    # ------------------------------------------------------------------ publishing
    async def publish(self, step: int, counters: dict, trained_ids) -> None:
        """Snapshot ``step`` now (the model must not be training), write + announce + ack in the background.
        The other ranks write their shards with rank 0 (they follow ``CMD_SAVE``)."""
        await self.wait()
        t = self.trainer
        broadcast_command(t.world, CMD_SAVE)
        broadcast_int(t.world, step)
        try:
            snap = await asyncio.to_thread(
                ckpt.take_snapshot,
                t.model,
                t.optimizer,
                t.scheduler,
                step=step,
                counters=counters,
                entry_ids=self.unacked,
                trained_ids=trained_ids,  # a TrainedIds keeps each id's step
                lora=t.lora_meta,
                root=self.root,
                state_root=self.state_root,
            )
        except (OSError, CheckpointException) as e:  # a rank could not write its shards (disk full ...)
            for d in ckpt.tmp_dirs(self.root, self.state_root, step):
                shutil.rmtree(d, ignore_errors=True)
            self._failed_shards(step, e)
            return
        self.unacked = []
        parent, self.last_published = self.last_published, step
        self.task = asyncio.create_task(self._write_and_announce(snap, parent))

    def retry_due(self, step: int) -> bool:
        """True when the last publish failed ``retry_every_s`` ago and ``step`` is unpublished.

        A failed publish is retried on this timer (the service asks between steps and while it waits for
        rollouts), not only at the next publish point: with no rollouts arriving (admission control may
        allow no producer another group) there is no next step, and the trained steps would stay unacked."""
        return (
            self.failures > 0
            and (self.task is None or self.task.done())
            and step != self.last_published
            and time.monotonic() - self._failed_at >= self.retry_every_s
        )

    async def wait(self) -> None:
        """Until the background write (if any) is over; re-raises what it raised (a Redis outage)."""
        if self.task is not None:
            task, self.task = self.task, None
            await task

    async def _write_and_announce(self, snap: ckpt.Snapshot, parent: int | None) -> None:
        t0 = time.perf_counter()
        try:
            model, tokenizer = self.trainer.model, self.tokenizer
            path, digest = await asyncio.to_thread(
                lambda: ckpt.write_checkpoint(
                    self.root, snap, model, tokenizer, self.fingerprint, parent, state_root=self.state_root
                )
            )
        except OSError as e:
            self._failed(snap, parent, e)
            return
        try:
            where = await asyncio.to_thread(self._published_at, path)
        except CheckpointUploadError as e:  # as a failed write: not announced nor acked
            self._failed(snap, parent, e)
            return
        self.failures = 0
        ckpt.maybe_crash("before_announce", snap.step)
        await self._announce(snap.step, where, digest)
        self.publish_s = time.perf_counter() - t0
        await self._ack_stable(snap.step, snap.entry_ids)
        ckpt.maybe_crash("after_ack", snap.step)
        await self.trim()
        for p in await asyncio.to_thread(
            ckpt.prune, self.root, self.s.learner.keep_checkpoints, self.state_root
        ):
            log.debug("pruned %s", p)
        log.info("published step %d in %.2fs: %s", snap.step, self.publish_s, path)

    def _failed_shards(self, step: int, e: BaseException) -> None:
        """The shards of ``step`` could not be written: as a failed write (nothing acked, retried later)."""
        self.failures += 1
        self.failures_total += 1
        self._failed_at = time.monotonic()
        log.error(
            "could not write the shards of the checkpoint of step %d (%s: %s); its entries stay unacked; "
            "training goes on and the publish is retried in %.0fs or at the next publish point",
            step,
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
            self.retry_every_s,
        )

    def _failed(self, snap: ckpt.Snapshot, parent: int | None, e: Exception) -> None:
        """A checkpoint that could not be written (disk full, I/O error) or uploaded: nothing of it is acked. Its
        entries go back to the unacked list, so the next publish covers them; a crash before then retrains them."""
        self.failures += 1
        self.failures_total += 1
        self._failed_at = time.monotonic()
        self.unacked = snap.entry_ids + self.unacked
        if self.last_published == snap.step:
            self.last_published = parent
        log.error(
            "could not publish the checkpoint of step %d (%s: %s); partial files removed, its %d entries stay "
            "unacked; training goes on and the publish is retried in %.0fs or at the next publish point",
            snap.step,
            type(e).__name__,
            e,
            len(snap.entry_ids),
            self.retry_every_s,
        )

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
        msg = encode(
            CheckpointAnnouncement(
                step=step,
                version=step,
                path=str(path),
                manifest_sha256=digest,
                model_fingerprint=self.fingerprint,
            )
        )
        # latest first: a producer woken by the stream entry then reads the new latest (producer/service.py)
        redis = self.streams.redis
        await self.streams.call(lambda: redis.set(self.keys.latest, msg), "SET latest")
        await self.streams.append(self.keys.checkpoints, msg, CHECKPOINTS_MAXLEN)

    # ------------------------------------------------------------------ resuming
    async def resume(self, step: int, entry_ids: list[str]) -> None:
        """After resuming from the STABLE checkpoint of ``step``: ack the entries it covers, announce it if a
        crash came between STABLE and its announcement, trim the streams."""
        await self._ack_stable(step, entry_ids)
        await self._announce_if_missing(step)
        await self.trim()

    async def _announce_if_missing(self, step: int) -> None:
        redis = self.streams.redis
        raw = await self.streams.call(lambda: redis.get(self.keys.latest), "GET latest")
        if raw is not None and decode(raw, expect=CheckpointAnnouncement).step >= step:
            return
        path = self.root / step_dir_name(step)
        where = await asyncio.to_thread(self._published_at, path)  # uploaded again if checkpoint_url is set
        await self._announce(step, where, read_manifest(path)[1])

    # ------------------------------------------------------------------ trimming
    async def trim(self) -> None:
        """Drop entries older than everything still pending, from the rollouts stream (all of them are acked)
        and from the prompts stream (generated and acked by producers): both stay bounded however long the run."""
        for stream, group in ((self.keys.rollouts, LEARNER_GROUP), (self.keys.prompts, PRODUCERS_GROUP)):
            oldest = await self._oldest_unfinished(stream, group)
            if oldest is not None:
                await self.streams.trim_before(stream, oldest)

    async def _oldest_unfinished(self, stream: str, group: str) -> str | None:
        """The oldest entry ``group`` still needs: its oldest pending one, else its last delivered one.

        XINFO comes first: its pending count may be stale by the time XPENDING runs (the last pending entry
        acked in between, XPENDING then has no min id): that is nothing pending, and every entry up to the
        last-delivered id XINFO saw was delivered and acked."""
        found = [g for g in await self.streams.group_info(stream) if g.get("name") == group]
        if not found:
            return None
        if int(found[0].get("pending", 0)):
            oldest = await self.streams.oldest_pending(stream, group)
            if oldest is not None:
                return oldest
        last = str(found[0].get("last-delivered-id", "0-0"))
        return None if last in ("0-0", "0") else last
