"""Learner-side flow control on a real Redis: the oldest groups first (and a bounded wait for groups that
turn stale after this step), dead letters that survive a crash in the accounting, and a bounded window of
trained group ids that still drops duplicates inside it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import stable_steps
from common.wire import RolloutGroup, encode
from tests.integration.test_learner_service import learner_settings, make_groups, read_metrics

pytestmark = pytest.mark.redis
REPO = Path(__file__).resolve().parents[2]


async def run_learner(main, s, timeout_s: float) -> int:
    """``main(s)`` in a daemon thread (its own event loop), bounded: a learner that hangs fails the test and
    cannot keep the test process from exiting."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(main(s)), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        assert time.monotonic() < deadline, f"the learner is still running after {timeout_s}s"
        await asyncio.sleep(0.05)
    assert result, "the learner raised (see the log)"
    return result[0]


def versioned(groups: list[RolloutGroup], version: int, gen_time_s: float = 0.0) -> list[RolloutGroup]:
    """The groups as if generated with weights of ``version`` (every sample), by a call of ``gen_time_s``."""
    return [
        replace(g, samples=tuple(replace(s, version_start=version, version_end=version) for s in g.samples),
                gen_time_s=gen_time_s)
        for g in groups
    ]  # fmt: skip


async def xadd(aredis, keys: RunKeys, groups: list[RolloutGroup]) -> None:
    for g in groups:
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})


async def open_admissions(aredis, keys: RunKeys, group_ids: list[str], version: int) -> None:
    """As a producer's admission does (common/admission.py): these groups are being generated at ``version``."""
    for gid in group_ids:
        await aredis.zadd(keys.admissions_open, {gid: time.time()})
        await aredis.zadd(keys.admissions_version, {gid: version})
    await aredis.incrby(keys.admitted_count, len(group_ids))


async def close_admissions(aredis, keys: RunKeys, group_ids: list[str]) -> None:
    """As a producer's append does: the groups are in the rollouts stream now."""
    await aredis.zrem(keys.admissions_open, *group_ids)
    await aredis.zrem(keys.admissions_version, *group_ids)


async def wait_step(run_dir: Path, step: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout_s}s")


async def test_a_late_group_that_would_turn_stale_is_waited_for_and_trained_first(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
):
    """K=1, B=2. At step 2 the learner holds two version-1 groups while a producer is still generating two
    version-0 ones (open admissions): trained after step 2 those would be 2 versions stale. It waits for
    them, trains them first, and the version-1 groups at step 3: nothing dropped. Before the fix it trained
    the version-1 groups at once and dropped the late ones as stale at step 3 (then waited for ever)."""
    from learner.service import main

    keys, run_dir = RunKeys(run_id), tmp_path / "run"
    first = versioned(make_groups(tiny_model_dir, 2, prefix="a"), 0)
    newer = versioned(make_groups(tiny_model_dir, 2, prefix="n", seed=1), 1, gen_time_s=4.0)
    late = versioned(make_groups(tiny_model_dir, 2, prefix="o", seed=2), 0)
    await open_admissions(aredis, keys, [g.group_id for g in late], version=0)
    await xadd(aredis, keys, first + newer)
    s = learner_settings(
        run_id, redis_url, run_dir, tiny_model_dir, max_staleness=1, max_steps=3, publish_every=1
    )
    learner = asyncio.create_task(run_learner(main, s, timeout_s=90))
    await wait_step(run_dir, 1)
    await asyncio.sleep(1.0)  # the learner now waits (up to 2 x the newer groups' 4 s engine call)
    await xadd(aredis, keys, late)
    await close_admissions(aredis, keys, [g.group_id for g in late])
    assert await learner == 0

    rows = read_metrics(run_dir)
    assert [r["groups/ids"] for r in rows] == [["a0000", "a0001"], ["o0000", "o0001"], ["n0000", "n0001"]]
    assert [r["staleness/hist"] for r in rows] == [{"0": 2}, {"1": 2}, {"1": 2}]
    assert sum(r["staleness/dropped"] for r in rows) == 0


async def test_the_wait_for_late_groups_is_bounded(tiny_model_dir, redis_url, run_id, aredis, tmp_path):
    """The same, but the late groups never come (their producer died): after the bound (1 s here: the
    groups' engine calls took 0 s) the learner trains what it has."""
    from learner.service import main

    keys, run_dir = RunKeys(run_id), tmp_path / "run"
    await open_admissions(aredis, keys, ["o0000", "o0001"], version=0)
    await xadd(aredis, keys, versioned(make_groups(tiny_model_dir, 2, prefix="a"), 0))
    await xadd(aredis, keys, versioned(make_groups(tiny_model_dir, 2, prefix="n", seed=1), 1))
    s = learner_settings(
        run_id, redis_url, run_dir, tiny_model_dir, max_staleness=1, max_steps=2, publish_every=1
    )
    assert await run_learner(main, s, timeout_s=60) == 0
    rows = read_metrics(run_dir)
    assert [r["groups/ids"] for r in rows] == [["a0000", "a0001"], ["n0000", "n0001"]]
    assert rows[1]["time/wait_s"] >= 1.0


def learner_cmd(redis_url: str, run_id: str, model: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "gspo", "learner", "--redis-url", redis_url, "--run", run_id, "--model", str(model),
            "--run-dir", str(run_dir), "--max-steps", "4", "--publish-every", "2", "-B", "2", "-K", "100",
            "--dataset", "", "--threads", "1", "--log-level", "INFO"]  # fmt: skip


def learner_env(crash_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
    env["OMP_NUM_THREADS"] = "1"
    if crash_at:
        env["LEARNER_TEST_CRASH_AT"] = crash_at
    return env


@pytest.mark.slow
async def test_a_dead_letter_between_a_checkpoint_and_a_crash_is_counted_again(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
):
    """Nine groups from producers (nine admissions), one of them made by another model, which arrives after the
    step-2 checkpoint: the learner dead-letters it, trains step 3 and is killed. Resumed from step 2, it must
    still count it as consumed, or admission control would hold its slot for ever (consumed rolls back to the
    checkpoint, and before the fix the dead-lettered entry had been acked at once and was gone)."""
    keys, run_dir = RunKeys(run_id), tmp_path / "run"
    groups = make_groups(tiny_model_dir, 8)
    foreign = replace(groups[5], group_id="foreign", model_fingerprint="0123456789abcdef")
    await aredis.set(keys.admitted_count, 9)  # what the producers admitted
    await xadd(aredis, keys, groups[:5])
    cmd = learner_cmd(redis_url, run_id, tiny_model_dir, run_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, env=learner_env("after_step:3"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not [p.name for p in stable_steps(run_dir / "checkpoints")] and proc.poll() is None:
            assert time.monotonic() < deadline, "no step-2 checkpoint"
            await asyncio.sleep(0.05)
        await xadd(aredis, keys, [foreign, *groups[5:]])  # step 3 needs g0005, behind the foreign group
        out = (await asyncio.to_thread(proc.communicate, timeout=120))[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 137, out[-3000:]
    assert [p.name for p in stable_steps(run_dir / "checkpoints")] == ["step_00000002"]
    resumed = subprocess.run(cmd, cwd=REPO, env=learner_env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    last = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(g for r in last.values() for g in r["groups/ids"]) == sorted(g.group_id for g in groups)
    state = await aredis.hgetall(keys.learner_state)
    assert int(state[b"consumed"]) == 9  # every admitted group accounted for: 8 trained + 1 dead-lettered
    assert int(await aredis.get(keys.released_count) or 0) == 0
    assert (await aredis.xpending(keys.rollouts, LEARNER_GROUP))["pending"] == 0
    dead = [f for _, f in await aredis.xrange(keys.dead)]
    assert 1 <= len(dead) <= 2  # copied again when the crash came before the checkpoint that acks it


async def test_trained_ids_are_kept_for_a_window_of_steps_and_dedup_inside_it(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path, monkeypatch
):
    """A window of 4 steps (DEDUP_GROUPS=2 with B=2; K=1, publish_every=1): after 10 steps, a copy of a group
    trained at step 9 is dropped as a duplicate, a copy of one trained at step 1 is trained again (forgotten),
    and every checkpoint holds at most 4 steps' worth of ids (8), not every id ever trained."""
    import learner.intake as intake
    from learner.service import main

    monkeypatch.setattr(intake, "DEDUP_GROUPS", 2)
    assert intake.dedup_window_steps(2, 1, 1) == 4
    keys, run_dir = RunKeys(run_id), tmp_path / "run"
    base = make_groups(tiny_model_dir, 22)
    groups = [versioned([g], i // 2)[0] for i, g in enumerate(base[:20])]  # steps 1..10 on versions 0..9
    near, far = versioned([groups[16], groups[0]], 9)  # copies of groups trained at steps 9 and 1
    fresh = versioned(base[20:], 9)
    await xadd(aredis, keys, groups)
    s = learner_settings(
        run_id, redis_url, run_dir, tiny_model_dir, max_staleness=1, max_steps=11, publish_every=1
    )
    learner = asyncio.create_task(run_learner(main, s, timeout_s=120))
    await wait_step(run_dir, 10, timeout_s=100)  # the originals are trained: the copies come later
    await xadd(aredis, keys, [near, far] + fresh)
    assert await learner == 0

    rows = read_metrics(run_dir)
    trained = [g for r in rows for g in r["groups/ids"]]
    assert trained.count(groups[16].group_id) == 1 and trained.count(groups[0].group_id) == 2
    assert rows[-1]["groups/ids"] == [groups[0].group_id, fresh[0].group_id]
    assert sum(r["duplicates/dropped"] for r in rows) == 1
    assert sum(r["staleness/dropped"] for r in rows) == 0
    states = run_dir / "learner-state"  # the learner-private half of each step
    for step_dir in stable_steps(run_dir / "checkpoints"):
        ids = json.loads((states / step_dir.name / "trained_ids.json").read_text())
        assert ids["format"] == 2 and len(ids["ids"]) <= 8, (step_dir.name, ids)
    newest = json.loads(
        (states / stable_steps(run_dir / "checkpoints")[-1].name / "trained_ids.json").read_text()
    )
    assert set(newest["ids"]) == {g for r in rows[-4:] for g in r["groups/ids"]}  # steps 8..11
    # each id keeps the step it was trained at (a resume forgets them on time, not all at once)
    assert newest["ids"] == {g: r["step"] for r in rows[-4:] for g in r["groups/ids"]}


def test_trained_ids_window_unit():
    from learner.intake import TrainedIds

    t = TrainedIds(3)
    for step in range(1, 7):
        t.add([f"g{step}a", f"g{step}b"], step)
    assert sorted(t) == ["g4a", "g4b", "g5a", "g5b", "g6a", "g6b"] and len(t) == 6
    assert "g4a" in t and "g3a" not in t
    assert t.steps()["g6b"] == 6
    restored = TrainedIds(3, t.steps())  # from a checkpoint with steps
    assert restored.steps() == t.steps()
    legacy = TrainedIds(3, ["x", "y"], step=6)  # from a checkpoint of plain ids: trained at its step
    legacy.add(["z"], 8)
    assert sorted(legacy) == ["x", "y", "z"]
    legacy.add(["w"], 9)
    assert sorted(legacy) == ["w", "z"]
