"""Following published checkpoints: read the announcement, verify it, and only then hand it to the engine.

A checkpoint is loaded only if (docs/architecture.md, "Checkpoints"): it is STABLE, every file matches the manifest's sha256, the
manifest's bytes match the announced ``manifest_sha256``, the manifest's version equals the announced
one, and both the announced and the directory's model fingerprint equal the base model's (same
vocabulary and architecture). A refused checkpoint is logged once and remembered; the producer keeps
its current weights.

An announced URL (``learner.checkpoint_url``: ``s3://...``, ``gs://...``, ``file://...``) is first downloaded
into the local cache (``producer.cache_dir``) and verified there; the engine is given the local copy.
A download that fails with an I/O error is retried at the next poll (logged once per checkpoint).

:class:`WeightSync` puts the newest verified checkpoint into the engine; a checkpoint the engine fails
to load is refused like one that fails verification (never retried).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import Settings
from common.fingerprint import FingerprintError, model_fingerprint
from common.keys import RunKeys
from common.manifest import CheckpointError, Manifest, read_manifest, verify_checkpoint
from common.store import download_step, is_url
from common.streams import StreamClient
from common.wire import CheckpointAnnouncement, WireError, decode
from producer.engines.base import Engine, EngineError
from producer.metrics import ProducerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifiedCheckpoint:
    version: int
    path: str
    announcement: CheckpointAnnouncement


def cache_dir_for(settings: Settings) -> Path:
    return Path(settings.producer.cache_dir or Path(settings.run_dir) / "checkpoint-cache")


def local_checkpoint(ann: CheckpointAnnouncement, cache_dir: str | Path | None) -> tuple[Path, Manifest]:
    """The announced step as a verified local dir (downloaded into ``cache_dir`` if announced by URL)."""
    if not is_url(ann.path):
        return Path(ann.path), verify_checkpoint(ann.path, ann.manifest_sha256)
    if cache_dir is None:
        raise CheckpointError(f"checkpoint {ann.path} is a URL and this producer has no cache dir")
    local = download_step(ann.path, cache_dir, ann.manifest_sha256)  # verified against the announced sha
    return local, read_manifest(local)[0]


def verify_announcement(
    ann: CheckpointAnnouncement, base_fingerprint: str, cache_dir: str | Path | None = None
) -> VerifiedCheckpoint:
    """Raise :class:`CheckpointError` naming the first defect (blocking: hashes every file); OSError if a
    URL cannot be downloaded."""
    local, manifest = local_checkpoint(ann, cache_dir)
    if manifest.version != ann.version:
        raise CheckpointError(
            f"checkpoint {ann.path}: manifest version {manifest.version} != announced {ann.version}"
        )
    for what, fp in (("announced", ann.model_fingerprint), ("manifest", manifest.model_fingerprint)):
        if fp != base_fingerprint:
            raise CheckpointError(
                f"checkpoint {ann.path}: {what} model fingerprint {fp} != base model's {base_fingerprint}"
            )
    try:
        on_disk = model_fingerprint(local)
    except FingerprintError as e:
        raise CheckpointError(f"checkpoint {ann.path}: {e}") from None
    if on_disk != base_fingerprint:
        raise CheckpointError(
            f"checkpoint {ann.path}: files' model fingerprint {on_disk} != base model's {base_fingerprint}"
        )
    return VerifiedCheckpoint(ann.version, str(local), ann)


class CheckpointFollower:
    """Polls ``keys.latest`` (one cheap GET) and returns newer checkpoints once they verify."""

    def __init__(
        self, streams: StreamClient, keys: RunKeys, base_fingerprint: str, cache_dir: str | Path | None = None
    ):
        self.streams, self.keys, self.base_fingerprint = streams, keys, base_fingerprint
        self.cache_dir = cache_dir  # where announced URLs are downloaded to
        self._download_failed: tuple[int, str] | None = None  # logged once, retried at every poll
        self._refused: dict[tuple[int, str], str] = {}  # (version, manifest sha) -> reason; never retried
        self._bad_raw: bytes | None = None

    @property
    def refusals(self) -> int:
        """Checkpoints refused so far (failed verification or failed to load)."""
        return len(self._refused)

    def refuse(self, ckpt: VerifiedCheckpoint, reason: str) -> None:
        """Record that ``ckpt`` verified but could not be loaded: it is not offered again."""
        self._refused[(ckpt.version, ckpt.announcement.manifest_sha256)] = reason

    async def announced(self) -> CheckpointAnnouncement | None:
        raw = await self.streams.call(lambda: self.streams.redis.get(self.keys.latest), "GET latest")
        if raw is None:
            return None
        try:
            msg = decode(raw, CheckpointAnnouncement)
        except WireError as e:
            if raw != self._bad_raw:  # said once per bad value, not at every poll
                log.error("ignoring an undecodable checkpoint announcement at %s: %s", self.keys.latest, e)
                self._bad_raw = raw
            return None
        return msg  # type: ignore[return-value]

    async def newer_than(self, version: int) -> VerifiedCheckpoint | None:
        """The newest announced checkpoint if it is newer than ``version`` and verifies, else None."""
        ann = await self.announced()
        if ann is None or ann.version <= version:
            return None
        key = (ann.version, ann.manifest_sha256)
        if key in self._refused:
            return None
        try:
            return await asyncio.to_thread(verify_announcement, ann, self.base_fingerprint, self.cache_dir)
        except OSError as e:  # the store is unreachable (network, permissions): not the checkpoint's fault
            if key != self._download_failed:
                log.error(
                    "could not download checkpoint version %d from %s (retrying; keeping version %d): %s: %s",
                    ann.version,
                    ann.path,
                    version,
                    type(e).__name__,
                    e,
                )
                self._download_failed = key
            return None
        except CheckpointError as e:
            self._refused[key] = str(e)
            log.error(
                "REFUSED checkpoint version %d (keeping current weights, version %d): %s",
                ann.version,
                version,
                e,
            )
            return None


class WeightSync:
    """Keeps the engine on the newest announced checkpoint that verifies and loads."""

    def __init__(self, follower: CheckpointFollower, engine: Engine, metrics: ProducerMetrics):
        self.follower, self.engine, self.metrics = follower, engine, metrics

    async def sync(self) -> bool:
        """Load the newest announced checkpoint if it is newer and verifies. True if weights changed."""
        refused_before = self.follower.refusals
        ckpt = await self.follower.newer_than(self.engine.version)
        self.metrics.checkpoints_refused += self.follower.refusals - refused_before
        if ckpt is None:
            return False
        t0 = time.monotonic()
        try:
            await self.engine.load_weights(ckpt.path, ckpt.version)
        except EngineError as e:
            self.follower.refuse(ckpt, str(e))
            self.metrics.checkpoints_refused += 1
            log.error(
                "could not load checkpoint version %d (keeping version %d): %s",
                ckpt.version,
                self.engine.version,
                e,
            )
            return False
        m = self.metrics
        m.weight_sync_s = time.monotonic() - t0
        m.weight_syncs += 1
        m.weight_version = ckpt.version
        return True
