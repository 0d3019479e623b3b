"""Checkpoints through an fsspec store (learner.checkpoint_url), here a ``file://`` root: upload order,
verified download into the producer's cache, cache reuse and pruning, and a learner + producer run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import STABLE, CheckpointError, hash_tree, read_manifest, verify_checkpoint
from common.store import download_step, upload_step
from common.wire import CheckpointAnnouncement, decode, encode
from modeling import load_model
from tests.integration.test_learner_service import learner_settings, make_groups, run_learner
from tests.integration.test_producer import (
    heartbeat,
    make_settings,
    put_prompts,
    recompute,
    rollouts,
    wait_for,
)
from tests.support import write_step_dir


@pytest.fixture
def store(tmp_path) -> str:
    return f"file://{tmp_path / 'store'}"


@pytest.fixture
def step_dir(tmp_path, tiny_model_dir) -> Path:
    return write_step_dir(tmp_path / "local", 3, tiny_model_dir, perturb=0.01)


def remote_dir(store: str, name: str) -> Path:
    return Path(store.removeprefix("file://")) / name


def test_upload_then_download_gives_the_same_verified_files(step_dir, store, tmp_path):
    url = upload_step(step_dir, store)
    assert url == f"{store}/step_00000003"
    local = download_step(url, tmp_path / "cache", read_manifest(step_dir)[1])
    assert local == tmp_path / "cache" / "step_00000003"
    assert hash_tree(local) == hash_tree(step_dir) and len(hash_tree(local)) >= 5  # subdirectories included
    assert (local / STABLE).exists() and verify_checkpoint(local).step == 3
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["step_00000003"]  # no temp dir left


def test_stable_is_uploaded_after_every_other_file(step_dir, store, monkeypatch):
    order: list[str] = []
    put_file = LocalFileSystem.put_file

    def recording(self, lpath, rpath, *args, **kwargs):
        order.append(Path(rpath).relative_to(remote_dir(store, step_dir.name)).as_posix())
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "put_file", recording)
    upload_step(step_dir, store)
    files = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    assert order[-1] == STABLE and sorted(order) == files and len(order) == len(set(order))


def test_tampered_remote_file_is_refused_and_nothing_is_cached(step_dir, store, tmp_path):
    url = upload_step(step_dir, store)
    with (remote_dir(store, step_dir.name) / "model.safetensors").open("r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x00" * 16)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="model.safetensors has sha256"):
        download_step(url, cache, read_manifest(step_dir)[1])
    assert list(cache.iterdir()) == []
    with pytest.raises(CheckpointError, match="manifest sha256 .* != announced"):
        download_step(url, cache, "0" * 64)  # another checkpoint than the announced one
    assert list(cache.iterdir()) == []


def test_cached_step_is_reused_without_fetching_again(step_dir, store, tmp_path, monkeypatch):
    fetched: list[str] = []
    get_file = LocalFileSystem.get_file

    def counting(self, rpath, lpath, *args, **kwargs):
        fetched.append(rpath)
        return get_file(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "get_file", counting)
    url, sha = upload_step(step_dir, store), read_manifest(step_dir)[1]
    first = download_step(url, tmp_path / "cache", sha)
    n_files = len([p for p in step_dir.rglob("*") if p.is_file()])
    assert len(fetched) == n_files
    mtime_ns = (first / "model.safetensors").stat().st_mtime_ns
    assert download_step(url, tmp_path / "cache", sha) == first
    assert len(fetched) == n_files and (first / "model.safetensors").stat().st_mtime_ns == mtime_ns


def test_cache_keeps_the_newest_two_steps(tiny_model_dir, store, tmp_path):
    for step in (1, 2, 3):
        d = write_step_dir(tmp_path / "local", step, tiny_model_dir)
        download_step(upload_step(d, store), tmp_path / "cache", read_manifest(d)[1])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["step_00000002", "step_00000003"]


@pytest.mark.redis
async def test_failed_upload_is_not_announced_nor_acked(tiny_model_dir, redis_url, run_id, aredis, tmp_path):
    from learner.service import main

    keys = RunKeys(run_id)
    for g in make_groups(tiny_model_dir, 2):
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    (tmp_path / "not-a-dir").write_text("a file where the store's directory should be")
    s = learner_settings(
        run_id,
        redis_url,
        tmp_path / "run",
        tiny_model_dir,
        max_steps=1,
        publish_every=1,
        checkpoint_url=f"file://{tmp_path / 'not-a-dir'}",
    )
    assert await run_learner(main, s) == 2  # the final checkpoint is not durable: stated failure
    assert await aredis.get(keys.latest) is None and await aredis.xlen(keys.checkpoints) == 0
    assert (await aredis.xpending(keys.rollouts, LEARNER_GROUP))["pending"] == 2


@pytest.mark.redis
async def test_learner_announces_urls_and_producer_loads_from_its_cache(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path, store
):
    """B=2, K=1: the learner trains 2 steps on the producer's groups and uploads each checkpoint; the
    producer follows the URLs, loads version 2 from its verified cache and generates with it."""
    from learner.service import main
    from producer.service import serve

    keys = RunKeys(run_id)
    cache = tmp_path / "cache"
    await put_prompts(aredis, run_id, [(i, 3) for i in range(6)])
    psettings = make_settings(
        redis_url,
        run_id,
        tmp_path / "prun",
        tiny_model_dir,
        **{"pipeline.batch_groups": 2, "pipeline.max_staleness": 1, "producer.cache_dir": str(cache)},
    )
    lsettings = learner_settings(
        run_id,
        redis_url,
        tmp_path / "lrun",
        tiny_model_dir,
        max_steps=2,
        publish_every=1,
        checkpoint_url=store,
    )
    stop = asyncio.Event()
    producer = asyncio.create_task(serve(psettings, stop))
    try:
        assert await run_learner(main, lsettings, timeout_s=40) == 0
        await wait_for(lambda: _version_is(aredis, run_id, 2))
        await put_late_prompts(aredis, run_id, [(40, 2), (7, 7)])
        await wait_for(lambda: _late_groups(aredis, run_id, 2))
    finally:
        stop.set()
        metrics = await asyncio.wait_for(producer, 30)
    anns = [decode(f[b"m"], CheckpointAnnouncement) for _, f in await aredis.xrange(keys.checkpoints)]
    assert [a.path for a in anns] == [f"{store}/step_00000001", f"{store}/step_00000002"]
    for a in anns:
        assert (remote_dir(store, Path(a.path).name) / STABLE).exists()
    local = cache / "step_00000002"
    assert verify_checkpoint(local, anns[-1].manifest_sha256).version == 2
    # the producer downloaded the weights, config and tokenizer, not the learner's optimizer and trainer state
    fetched = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert [f for f in fetched if f.startswith("model") and f.endswith(".safetensors")] and not [
        f
        for f in fetched
        if f.startswith(("trainer_state", "tensors", "state", "optimizer", "weight_shards"))
    ]
    assert not list(remote_dir(store, "step_00000002").glob("trainer_state"))
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert metrics.weight_version == 2 and metrics.weight_syncs >= 1
    late = await _late_groups(aredis, run_id, 2)
    assert {s.version_start for g in late for s in g.samples} == {2}
    model = load_model(local)
    for g in late:
        for s in g.samples:
            want = recompute(model, g.prompt_ids, s.completion_ids, 1.0)
            np.testing.assert_allclose(s.logprobs, want, atol=1e-4, rtol=0)


async def put_late_prompts(aredis, run_id: str, pairs: list[tuple[int, int]]) -> None:
    from common.feeder import enqueue
    from common.streams import StreamClient
    from common.tasks import addition_prompt

    rows = [(f"late-{i}", addition_prompt(a, b)) for i, (a, b) in enumerate(pairs)]
    await enqueue(StreamClient(aredis), RunKeys(run_id), rows, maxlen=10_000)


async def _version_is(aredis, run_id: str, version: int) -> bool:
    hb = await heartbeat(aredis, run_id)
    return hb is not None and hb.version == version


async def _late_groups(aredis, run_id: str, n: int) -> list:
    """The groups of the late prompts once there are n of them (the learner trims what it trained on)."""
    late = [g for g in await rollouts(aredis, run_id) if g.group_id.startswith("late-")]
    return late if len(late) == n else []
