"""Following published checkpoints: read the announcement, verify it, and only then hand it to the engine.

A checkpoint is loaded only if (docs/architecture.md, "Checkpoints"): it is STABLE, every file matches the manifest's sha256, the
manifest's bytes match the announced ``manifest_sha256``, the manifest's version equals the announced
one, and both the announced and the directory's model fingerprint equal the base model's (same
vocabulary and architecture). A refused checkpoint is logged once and remembered; the producer keeps
its current weights.

An announced URL (``learner.checkpoint_url``: ``s3://...``, ``gs://...``, ``file://...``) is first downloaded
into the local cache (``producer.cache_dir``) and verified there; the engine is given the local copy.
A download that fails with an I/O error is retried at the next poll (logged once per checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from common.config import Settings
from common.fingerprint import FingerprintError, model_fingerprint
from common.keys import RunKeys
from common.manifest import CheckpointError, Manifest, read_manifest, verify_checkpoint
from common.store import download_step, is_url
from common.streams import StreamClient
from common.wire import CheckpointAnnouncement, WireError, decode

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


def verify_announcement(ann: CheckpointAnnouncement, base_fingerprint: str,
                        cache_dir: str | Path | None = None) -> VerifiedCheckpoint:  # fmt: skip
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

    def __init__(self, streams: StreamClient, keys: RunKeys, base_fingerprint: str,
                 cache_dir: str | Path | None = None):  # fmt: skip
        self.streams, self.keys, self.base_fingerprint = streams, keys, base_fingerprint
        self.cache_dir = cache_dir  # where announced URLs are downloaded to
        self._download_failed: tuple[int, str] | None = None  # logged once, retried at every poll
        self.refused: dict[tuple[int, str], str] = {}  # (version, manifest sha) -> reason; never retried
        self._bad_raw: bytes | None = None

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
        if key in self.refused:
            return None
        try:
            return await asyncio.to_thread(verify_announcement, ann, self.base_fingerprint, self.cache_dir)
        except OSError as e:  # the store is unreachable (network, permissions): not the checkpoint's fault
            if key != self._download_failed:
                log.error("could not download checkpoint version %d from %s (retrying; keeping version %d): %s: %s",
                          ann.version, ann.path, version, type(e).__name__, e)  # fmt: skip
                self._download_failed = key
            return None
        except CheckpointError as e:
            self.refused[key] = str(e)
            log.error(
                "REFUSED checkpoint version %d (keeping current weights, version %d): %s",
                ann.version,
                version,
                e,
            )
            return None
