"""Following published checkpoints: read the announcement, verify it, and only then hand it to the engine.

A checkpoint is loaded only if (DESIGN §6): it is STABLE, every file matches the manifest's sha256, the
manifest's bytes match the announced ``manifest_sha256``, the manifest's version equals the announced
one, and both the announced and the directory's model fingerprint equal the base model's (same
vocabulary and architecture). A refused checkpoint is logged once and remembered; the producer keeps
its current weights.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from common.fingerprint import FingerprintError, model_fingerprint
from common.keys import RunKeys
from common.manifest import CheckpointError, verify_checkpoint
from common.streams import StreamClient
from common.wire import CheckpointAnnouncement, WireError, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifiedCheckpoint:
    version: int
    path: str
    announcement: CheckpointAnnouncement


def verify_announcement(ann: CheckpointAnnouncement, base_fingerprint: str) -> VerifiedCheckpoint:
    """Raise :class:`CheckpointError` naming the first defect (blocking: hashes every file)."""
    manifest = verify_checkpoint(ann.path, ann.manifest_sha256)
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
        on_disk = model_fingerprint(ann.path)
    except FingerprintError as e:
        raise CheckpointError(f"checkpoint {ann.path}: {e}") from None
    if on_disk != base_fingerprint:
        raise CheckpointError(
            f"checkpoint {ann.path}: files' model fingerprint {on_disk} != base model's {base_fingerprint}"
        )
    return VerifiedCheckpoint(ann.version, str(Path(ann.path)), ann)


class CheckpointFollower:
    """Polls ``keys.latest`` (one cheap GET) and returns newer checkpoints once they verify."""

    def __init__(self, streams: StreamClient, keys: RunKeys, base_fingerprint: str):
        self.streams, self.keys, self.base_fingerprint = streams, keys, base_fingerprint
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
            return await asyncio.to_thread(verify_announcement, ann, self.base_fingerprint)
        except CheckpointError as e:
            self.refused[key] = str(e)
            log.error(
                "REFUSED checkpoint version %d (keeping current weights, version %d): %s",
                ann.version,
                version,
                e,
            )
            return None
