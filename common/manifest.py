"""Checkpoint manifests (docs/architecture.md, "Checkpoints"): what a published step directory must contain, and its verification.

A step directory ``step_00000042/`` holds the HF files, ``trainer_state/``, ``manifest.json`` and,
last, an empty ``STABLE`` marker. The manifest lists the sha256 of every other file. Producers and a
resuming learner load a directory only if it is STABLE and every hash matches. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST = "manifest.json"
STABLE = "STABLE"
STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: not STABLE, missing file, wrong hash, bad manifest."""


@dataclass(frozen=True)
class Manifest:
    step: int
    version: int
    parent: int | None
    model_fingerprint: str
    files: dict[str, str]  # relative path -> sha256
    created_at: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` except the manifest and the STABLE marker."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST, STABLE):
            out[rel] = sha256_file(p)
    return out


def read_manifest(step_dir: Path) -> tuple[Manifest, str]:
    """The parsed manifest and the sha256 of its bytes."""
    path = step_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {step_dir} has no {MANIFEST}") from None
    try:
        d = json.loads(raw)
        m = Manifest(
            step=int(d["step"]),
            version=int(d["version"]),
            parent=None if d["parent"] is None else int(d["parent"]),
            model_fingerprint=str(d["model_fingerprint"]),
            files={str(k): str(v) for k, v in d["files"].items()},
            created_at=float(d["created_at"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {step_dir}: {MANIFEST} is malformed ({type(e).__name__}: {e})"
        ) from None
    return m, hashlib.sha256(raw).hexdigest()


def verify_checkpoint(step_dir: str | Path, expected_manifest_sha256: str | None = None) -> Manifest:
    """Raise :class:`CheckpointError` naming the first defect; return the manifest if all is well."""
    d = Path(step_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist")
    if not (d / STABLE).exists():
        raise CheckpointError(f"checkpoint {d} is not marked {STABLE} (incomplete write?)")
    manifest, digest = read_manifest(d)
    if expected_manifest_sha256 and digest != expected_manifest_sha256:
        raise CheckpointError(
            f"checkpoint {d}: manifest sha256 {digest[:12]} != announced {expected_manifest_sha256[:12]}"
        )
    if not manifest.files:
        raise CheckpointError(f"checkpoint {d}: manifest lists no files")
    for rel, want in manifest.files.items():
        p = d / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d}: file {rel} listed in the manifest is missing")
        got = sha256_file(p)
        if got != want:
            raise CheckpointError(f"checkpoint {d}: {rel} has sha256 {got[:12]}, manifest says {want[:12]}")
    return manifest


def stable_steps(root: str | Path) -> list[Path]:
    """STABLE step directories under ``root``, oldest first (unverified: call verify_checkpoint)."""
    r = Path(root)
    if not r.is_dir():
        return []
    dirs = [p for p in r.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / STABLE).exists()]
    return sorted(dirs, key=lambda p: p.name)
