"""The learner's publisher on a real Redis: trimming when the last pending entry is acked under it, and a failed
publish retried on its timer while no rollout (hence no training step) arrives."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import stable_steps
from common.streams import StreamClient
from common.wire import CheckpointAnnouncement, decode, encode
from learner.publisher import Publisher
from tests.integration.test_learner_service import learner_settings, make_groups, read_metrics

pytestmark = pytest.mark.redis


async def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_oldest_pending_is_none_when_nothing_is_pending(aredis, run_id) -> None:
    streams, stream = StreamClient(aredis), f"t:{run_id}"
    assert await streams.oldest_pending(stream, "g") is None  # no such group
    await streams.ensure_group(stream, "g")
    ids = [await streams.append(stream, b"x", None) for _ in range(3)]
    assert await streams.oldest_pending(stream, "g") is None
    await streams.read(stream, "g", "c", 10, None)
    assert await streams.oldest_pending(stream, "g") == ids[0]
    await streams.ack(stream, "g", ids)
    assert await streams.oldest_pending(stream, "g") is None


class StaleInfo(StreamClient):
    """XINFO GROUPS as read just before the last pending entry got acked: pending still 1."""

    async def group_info(self, stream: str) -> list[dict]:
        return [dict(g, pending=max(1, int(g.get("pending", 0)))) for g in await super().group_info(stream)]


async def test_trim_when_the_last_pending_entry_is_acked_between_xinfo_and_xpending(
    aredis, redis_url, run_id, tmp_path
) -> None:
    keys = RunKeys(run_id)
    streams = StaleInfo(aredis)
    await streams.ensure_group(keys.rollouts, LEARNER_GROUP)
    ids = [await streams.append(keys.rollouts, b"x", None) for _ in range(4)]
    await streams.read(keys.rollouts, LEARNER_GROUP, "learner-0", 10, None)
    await streams.ack(keys.rollouts, LEARNER_GROUP, ids)  # XPENDING: no min id; XINFO (stale): 1 pending
    s = learner_settings(run_id, redis_url, tmp_path / "run", tmp_path)
    publisher = Publisher(s, streams, keys, tmp_path / "ckpt", None, None, "fp", last_published=None)

    await publisher.trim()  # was: XTRIM MINID "None" -> ResponseError, the learner crashed

    # nothing pending: trimmed below the last delivered entry, as with an up-to-date pending count
    assert [i.decode() for i, _ in await aredis.xrange(keys.rollouts)] == ids[-1:]


async def test_a_failed_publish_is_retried_on_its_timer_without_a_new_step(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
) -> None:
    from learner.distributed import World
    from learner.service import Learner, build_trainer

    keys, run_dir = RunKeys(run_id), tmp_path / "run"
    for g in make_groups(tiny_model_dir, 4):
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the checkpoint dir's parent should be: every checkpoint write fails")
    s = learner_settings(
        run_id,
        redis_url,
        run_dir,
        tiny_model_dir,
        max_steps=3,
        publish_every=2,
        checkpoint_dir=str(blocker / "checkpoints"),
    )
    torch.set_num_threads(1)
    learner = Learner(s, build_trainer(s, tiny_model_dir, World()), tiny_model_dir, None)
    learner._install_signals = lambda: None  # the test's event loop keeps its own handlers
    learner.publisher.retry_every_s = 0.5
    run = asyncio.create_task(learner.run())
    try:

        async def failed_once() -> bool:
            assert not run.done(), run.result()
            return learner.publisher.failures_total >= 1

        await wait_for(failed_once, 60, "the publish of step 2 to fail")
        assert learner.state.step == 2
        assert (await aredis.xpending(keys.rollouts, LEARNER_GROUP))["pending"] == 4  # nothing acked
        await asyncio.sleep(1.5)  # retries on the timer fail too while the disk is "full"
        assert learner.publisher.failures_total >= 2 and await aredis.get(keys.latest) is None

        blocker.unlink()  # the disk has room again; no rollout arrives, so no step 3 is ever trained

        async def published() -> bool:
            assert not run.done(), run.result()
            return (await aredis.xpending(keys.rollouts, LEARNER_GROUP))["pending"] == 0

        await wait_for(published, 30, "the retried publish of step 2 to ack its entries")
    finally:
        learner.stop.set()
        assert await asyncio.wait_for(run, 30) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert [p.name for p in stable_steps(blocker / "checkpoints")] == ["step_00000002"]
    assert decode(await aredis.get(keys.latest), expect=CheckpointAnnouncement).step == 2
    # the learner states the pipeline shape with its state (admission control and producers read it)
    state = await aredis.hgetall(keys.learner_state)
    assert {k: int(state[k.encode()]) for k in ("step", "max_staleness", "batch_groups", "group_size")} == {
        "step": 2,
        "max_staleness": s.pipeline.max_staleness,
        "batch_groups": 2,
        "group_size": 4,
    }
