"""Test helpers shared by integration tests: publishing checkpoints like the learner does."""

from __future__ import annotations

import os
import time
from pathlib import Path

from common.fingerprint import model_fingerprint
from common.keys import RunKeys
from common.manifest import MANIFEST, STABLE, Manifest, hash_tree, read_manifest, step_dir_name
from common.streams import StreamClient
from common.wire import CheckpointAnnouncement, encode


def write_step_dir(root: Path, step: int, model_dir: Path, *, perturb: float = 0.0, seed: int = 0) -> Path:
    """A published step dir (HF files + manifest + STABLE) holding ``model_dir``'s weights, optionally
    perturbed by ``perturb * N(0, 1)`` so that a reload is observable."""
    import torch

    from modeling import load_model, load_tokenizer

    model = load_model(model_dir)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    out = root / step_dir_name(step)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    (out / "trainer_state").mkdir()
    (out / "trainer_state" / "state.json").write_text(f'{{"step": {step}}}')
    manifest = Manifest(
        step=step,
        version=step,
        parent=step - 1 if step else None,
        model_fingerprint=model_fingerprint(model_dir),
        files=hash_tree(out),
        created_at=time.time(),
    )
    (out / MANIFEST).write_bytes(manifest.to_json())
    (out / STABLE).touch()
    os.sync()
    return out


async def announce(streams: StreamClient, keys: RunKeys, step_dir: Path) -> CheckpointAnnouncement:
    """SET keys.latest and XADD the announcement to keys.checkpoints, as the learner does (in that order)."""
    manifest, digest = read_manifest(step_dir)
    ann = CheckpointAnnouncement(
        step=manifest.step,
        version=manifest.version,
        path=str(step_dir.resolve()),
        manifest_sha256=digest,
        model_fingerprint=manifest.model_fingerprint,
    )
    await streams.redis.set(keys.latest, encode(ann))
    await streams.append(keys.checkpoints, encode(ann), maxlen=1000)
    return ann
