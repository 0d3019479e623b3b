"""Checkpoints in an object store or any fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///shared/...``).

The learner writes each step locally as usual (temp dir, fsync, rename, STABLE), then uploads it to
``<url_root>/step_XXXXXXXX/``: every file first, the ``STABLE`` marker last, so a reader that sees STABLE
sees a complete directory. Producers download a step into a local cache (``.tmp-step_...``, verified against
the announced manifest sha256, then renamed), and load from that verified local copy.

Torch-free; ``fsspec`` is imported lazily (``s3fs``/``gcsfs`` bring the s3:// and gs:// protocols).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from common.manifest import STABLE, STEP_PREFIX, CheckpointError, stable_steps, verify_checkpoint

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"
CACHE_KEEP = 2  # the step being loaded and the one before it (an engine may still be reading it)


class CheckpointUploadError(OSError):
    """An upload to the checkpoint store failed (the learner handles it like a failed checkpoint write)."""


def is_url(path: str) -> bool:
    return "://" in path


def _fs(url: str):
    import fsspec  # optional at import time: only multi-host runs without a shared filesystem need it

    return fsspec.core.url_to_fs(url)


def upload_step(local_step_dir: str | Path, url_root: str) -> str:
    """Upload a STABLE step dir to ``<url_root>/<step name>/`` (STABLE last); return that URL."""
    local = Path(local_step_dir)
    url = f"{url_root.rstrip('/')}/{local.name}"
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != STABLE)
    fs, root = _fs(url)
    try:
        if fs.exists(f"{root}/{STABLE}"):  # a re-upload (e.g. after a resume): unmark before overwriting
            fs.rm(f"{root}/{STABLE}")
        for rel in sorted({p.parent.relative_to(local).as_posix() for p in files}):
            fs.makedirs(root if rel == "." else f"{root}/{rel}", exist_ok=True)  # object stores: a no-op
        fs.put([str(p) for p in files], [f"{root}/{p.relative_to(local).as_posix()}" for p in files])
        fs.put_file(str(local / STABLE), f"{root}/{STABLE}")
    except OSError as e:
        raise CheckpointUploadError(f"upload of {local} to {url} failed ({type(e).__name__}: {e})") from e
    return url


def prune_remote(url_root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step dirs under ``url_root`` (the newest one is always kept)."""
    fs, root = _fs(url_root)
    if not fs.exists(root):
        return []
    names = sorted(
        n
        for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        if n.startswith(STEP_PREFIX)
    )
    doomed = [f"{root.rstrip('/')}/{n}" for n in names[: max(0, len(names) - max(1, keep))]]
    for d in doomed:
        fs.rm(d, recursive=True)
    return doomed


def download_step(remote_step_url: str, cache_dir: str | Path, expected_manifest_sha256: str) -> Path:
    """A verified local copy of a remote step in ``cache_dir`` (reused if already there and valid).

    Raises :class:`CheckpointError` if the download does not verify (nothing is left in the cache) and
    OSError if the store cannot be read."""
    cache = Path(cache_dir)
    name = remote_step_url.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith(STEP_PREFIX):
        raise CheckpointError(f"checkpoint URL {remote_step_url} does not end in a {STEP_PREFIX}XXXXXXXX dir")
    final = cache / name
    if _cached_ok(final, expected_manifest_sha256):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    try:
        _fetch(remote_step_url, tmp)
        verify_checkpoint(tmp, expected_manifest_sha256)
        _install(tmp, final, expected_manifest_sha256)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    prune_cache(cache, CACHE_KEEP)
    return final


def _cached_ok(final: Path, expected_manifest_sha256: str) -> bool:
    if not final.exists():
        return False
    try:
        verify_checkpoint(final, expected_manifest_sha256)
        return True
    except CheckpointError as e:  # a different run's step of the same name, or a damaged copy: fetch again
        log.warning("cached %s is not the announced checkpoint (%s): downloading it again", final, e)
        shutil.rmtree(final)
        return False


def _fetch(url: str, dest: Path) -> None:
    fs, root = _fs(url)
    root = root.rstrip("/")
    remote = [p for p in fs.find(root) if p != root]
    if not remote:
        raise CheckpointError(f"checkpoint {url} does not exist or is empty")
    local = [dest / p[len(root) + 1 :] for p in remote]
    for parent in {p.parent for p in local}:
        parent.mkdir(parents=True, exist_ok=True)
    fs.get(remote, [str(p) for p in local])


def _install(tmp: Path, final: Path, expected_manifest_sha256: str) -> None:
    """Rename the verified temp dir into place; another producer sharing the cache may have won the race."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not _cached_ok(final, expected_manifest_sha256):
            raise


def prune_cache(cache_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` STABLE step dirs of the cache."""
    steps = stable_steps(cache_dir)
    doomed = steps[: max(0, len(steps) - max(1, keep))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)  # another producer sharing the cache may be pruning it too
    return doomed
