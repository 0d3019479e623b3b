"""What a run leaves behind, for a learner that starts over on it (torch-free: ``gspo up`` uses it too).

A run's state is its Redis keys (``gspo:{run}:*``, common/keys.py), its checkpoint directories (published and
learner-private) and its metrics files. Starting a new learner at step 0 on top of them mixes two runs: the old ``admitted`` count makes
admission refuse every producer (deadlock), the old ``latest`` announcement keeps producers on the old
weights (the new run's versions are lower, so they never load them), pruning keeps the old run's higher
step numbers and deletes the new run's, and the old feeder cursor and trained ids collide with the new ones.

- :func:`find_used` reports the state a previous *learner* left (checkpoints, the learner-state hash,
  ``latest``, the checkpoints stream, the prompt cursor); keys that producers or ``gspo prompts load`` create
  for a run that has not trained yet (prompts, admissions, rollouts, heartbeats) alone do not make a run used.
- :func:`wipe` deletes all of it: every ``gspo:{run}:*`` key, the step directories under the checkpoint root
  (and under ``learner.checkpoint_url``) and the learner's private state root, ``metrics.jsonl`` and the
  producers' ``metrics/*.jsonl``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from common.config import Settings
from common.keys import RunKeys
from common.manifest import STEP_PREFIX, stable_steps
from common.redis_conn import connect_sync

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"  # learner/checkpoint.py's temp dirs


def checkpoint_root(settings: Settings) -> Path:
    return Path(settings.learner.checkpoint_dir or Path(settings.run_dir) / "checkpoints")


def state_root(settings: Settings) -> Path:
    """The learner-private trainer state of each step (learner/checkpoint.py)."""
    return Path(settings.learner.state_dir or Path(settings.run_dir) / "learner-state")


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    names = (STEP_PREFIX, TMP_PREFIX + STEP_PREFIX)
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(names))


@dataclass
class RunState:
    """What a run dir and Redis hold for one run."""

    run: str
    root: Path
    state_root: Path | None = None
    checkpoints: list[str] = field(default_factory=list)  # STABLE step dir names, oldest first
    other_dirs: int = 0  # step dirs that never became STABLE, temp dirs
    state_dirs: int = 0  # learner-private trainer state dirs (learner.state_dir)
    keys: dict[str, str] = field(default_factory=dict)  # key -> short description, the named keys only
    key_count: int = 0  # every gspo:{run}:* key (admission markers and heartbeats included)
    learner_keys: list[str] = field(default_factory=list)  # the keys only a learner writes
    announced_step: int | None = None

    @property
    def used(self) -> bool:
        """A learner has run here: it left checkpoints or its own keys."""
        return bool(self.checkpoints or self.other_dirs or self.state_dirs or self.learner_keys)

    def describe(self) -> str:
        parts = []
        if self.checkpoints:
            parts.append(
                f"{len(self.checkpoints)} checkpoint(s) under {self.root} (newest {self.checkpoints[-1]})"
            )
        if self.other_dirs:
            parts.append(f"{self.other_dirs} unfinished checkpoint dir(s) under {self.root}")
        if self.state_dirs and not self.checkpoints:
            parts.append(f"{self.state_dirs} trainer state dir(s) under {self.state_root}")
        if self.key_count:
            named = ", ".join(f"{k} ({v})" if v else k for k, v in self.keys.items())
            others = self.key_count - len(self.keys)
            more = f" and {others} other key(s)" if others > 0 else ""
            parts.append(f"{self.key_count} Redis key(s) gspo:{self.run}:*: {named}{more}")
        return "; ".join(parts) or "nothing"


def _describe_key(client, keys: RunKeys, key: str) -> str:
    if key == keys.learner_state:
        step = client.hget(key, "step")
        return f"learner at step {int(step)}" if step is not None else ""
    if key == keys.latest:
        return "announces a checkpoint"
    if key == keys.admitted_count:
        return f"{int(client.get(key) or 0)} groups admitted"
    if key == keys.prompt_cursor:
        pos = client.hget(key, "position")
        return f"position {int(pos)}" if pos is not None else ""
    if key in (keys.prompts, keys.rollouts, keys.checkpoints, keys.dead):
        return f"{client.xlen(key)} entries"
    return ""


def find_used(settings: Settings) -> RunState:
    """The run's checkpoints and Redis keys (see the module docstring); reads only."""
    keys = RunKeys(settings.run)
    root = checkpoint_root(settings)
    state = RunState(settings.run, root, state_root(settings))
    state.checkpoints = [p.name for p in stable_steps(root)]
    state.other_dirs = len(_step_dirs(root)) - len(state.checkpoints)
    state.state_dirs = len(_step_dirs(state_root(settings)))
    named = [
        keys.learner_state,
        keys.latest,
        keys.checkpoints,
        keys.prompt_cursor,
        keys.admitted_count,
        keys.prompts,
        keys.rollouts,
        keys.dead,
    ]
    learner_written = {keys.learner_state, keys.latest, keys.checkpoints, keys.prompt_cursor}
    client = connect_sync(settings.redis)
    try:
        state.key_count = sum(1 for _ in client.scan_iter(match=f"{keys.prefix}:*", count=1000))
        for key in named:
            if client.exists(key):
                state.keys[key] = _describe_key(client, keys, key)
                if key in learner_written:
                    state.learner_keys.append(key)
        if keys.latest in state.keys:
            from common.wire import CheckpointAnnouncement, WireError, decode

            try:
                ann = decode(client.get(keys.latest), expect=CheckpointAnnouncement)
                state.announced_step = ann.step
                state.keys[keys.latest] = f"announces step {ann.step}"
            except WireError:
                pass
    finally:
        client.close()
    return state


def wipe(settings: Settings) -> str:
    """Delete the run's keys, checkpoints and metrics (the module docstring); returns what went, in words.

    Nothing of the run may be running meanwhile: a producer still up would go on with what it holds."""
    keys = RunKeys(settings.run)
    client = connect_sync(settings.redis)
    n_keys = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n_keys += client.unlink(*batch)
                batch = []
        if batch:
            n_keys += client.unlink(*batch)
    finally:
        client.close()
    root = checkpoint_root(settings)
    dirs = _step_dirs(root)
    for d in [*dirs, *_step_dirs(state_root(settings))]:
        shutil.rmtree(d)
    remote = _wipe_remote(settings.learner.checkpoint_url)
    run_dir = Path(settings.run_dir)
    files = [run_dir / "metrics.jsonl", *sorted((run_dir / "metrics").glob("*.jsonl"))]
    files = [f for f in files if f.exists()]
    for f in files:
        f.unlink()
    what = f"deleted {n_keys} Redis key(s) gspo:{settings.run}:*, {len(dirs)} checkpoint dir(s) under {root}"
    if settings.learner.checkpoint_url:
        what += f", {remote} under {settings.learner.checkpoint_url}"
    return what + f", {len(files)} metrics file(s)"


def _wipe_remote(url_root: str) -> int:
    if not url_root:
        return 0
    import fsspec

    fs, root = fsspec.core.url_to_fs(url_root)
    if not fs.exists(root):
        return 0
    doomed = [
        p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(STEP_PREFIX)
    ]
    for p in doomed:
        fs.rm(p, recursive=True)
    return len(doomed)
