"""The learner service on a real Redis: metrics, checkpoints, announcements, acks, dead letters, feeder."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import msgpack
import numpy as np
import pytest

from common.config import Settings, load_settings
from common.fingerprint import model_fingerprint
from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import stable_steps, verify_checkpoint
from common.wire import CheckpointAnnouncement, DeadLetter, RolloutGroup, Sample, decode, encode
from learner.logprobs import token_logprobs
from modeling import load_model

pytestmark = pytest.mark.redis

REQUIRED = (
    "step",
    "reward/mean",
    "staleness/mean",
    "gspo/clip_frac",
    "throughput/tokens_per_s",
    "loss",
    "grad_norm",
    "lr",
    "entropy",
    "is/ess",
    "mismatch/prox_vs_behaviour_abs",
    "staleness/hist",
    "staleness/dropped",
    "stream/backlog",
    "stream/pending",
    "weights/publish_s",
    "padding/frac",
    "time/step_s",
    "time/wait_s",
    "groups/ids",
    "length/mean",
    "frac_zero_std",
)


def make_groups(
    model_dir: Path, n: int, *, group_size: int = 4, seed: int = 0, prefix: str = "g", version: int = 0
) -> list[RolloutGroup]:
    """Random completions with behaviour log-probs recomputed by the tiny model (T = 1)."""
    model = load_model(model_dir)
    fp = model_fingerprint(model_dir)
    rng = random.Random(seed)
    groups = []
    for g in range(n):
        prompt = [rng.randrange(4, 40) for _ in range(6)]
        comps = [[rng.randrange(4, 40) for _ in range(rng.randint(1, 5))] for _ in range(group_size)]
        lps = token_logprobs(model, [(prompt, c) for c in comps], 1.0)
        samples = tuple(
            Sample(np.array(c, np.int32), lp.numpy(), float(rng.random() < 0.5), "stop", version, version)
            for c, lp in zip(comps, lps, strict=True)
        )
        groups.append(
            RolloutGroup(
                f"{prefix}{g:04d}", f"p{g}", np.array(prompt, np.int32), "addition", "test", fp, samples
            )
        )
    return groups


def learner_settings(
    run_id: str, redis_url: str, run_dir: Path, model_dir: Path, max_staleness: int = 1, **learner
) -> Settings:
    return load_settings(
        overrides={
            "run": run_id,
            "run_dir": str(run_dir),
            "redis.url": redis_url,
            "learner.model": str(model_dir),
            "pipeline.batch_groups": 2,
            "pipeline.group_size": 4,
            "learner.publish_every": 2,
            "learner.max_steps": 4,
            "learner.dataset": "",
            "learner.threads": 1,
            "learner.wait_log_s": 1.0,
            "pipeline.max_staleness": max_staleness,
            **{f"learner.{k}": v for k, v in learner.items()},
        }
    )


async def run_learner(main, s: Settings, resume: bool | None = None, timeout_s: float = 50.0) -> int:
    """main() in a thread (it runs its own event loop), bounded so a hang fails the test."""
    return await asyncio.wait_for(asyncio.to_thread(main, s, resume), timeout_s)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def nan_payload(group: RolloutGroup) -> bytes:
    """A message with a NaN behaviour log-prob, built by hand (encode() would not be asked to check it)."""
    d = msgpack.unpackb(encode(group), raw=False)
    lp = np.frombuffer(d["samples"][0]["logprobs"], dtype="<f4").copy()
    lp[0] = np.nan
    d["samples"][0]["logprobs"] = lp.tobytes()
    return msgpack.packb(d, use_bin_type=True)


async def test_service_trains_publishes_acks_and_dead_letters(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
) -> None:
    from learner.service import main

    keys = RunKeys(run_id)
    groups = make_groups(tiny_model_dir, 9)
    wrong_fp = RolloutGroup(
        "bad-fp", "p", groups[0].prompt_ids, "addition", "test", "0123456789abcdef", groups[0].samples
    )
    payloads = [encode(g) for g in groups[:3]] + [
        b"\x93not msgpack",
        encode(wrong_fp),
        nan_payload(groups[3]),
    ]
    payloads += [encode(groups[1])]  # a duplicate group id (a regenerated prompt)
    payloads += [encode(g) for g in groups[3:]]
    for p in payloads:
        await aredis.xadd(keys.rollouts, {b"m": p})
    s = learner_settings(
        run_id,
        redis_url,
        tmp_path / "run",
        tiny_model_dir,
        max_staleness=5,
        dataset="addition",
        prompts_ahead=2,
    )

    assert await run_learner(main, s) == 0

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
        assert len(r["groups/ids"]) == 2
    trained = [g for r in rows for g in r["groups/ids"]]
    assert trained == [g.group_id for g in groups[:8]]  # in stream order, duplicate and poison skipped
    assert sum(r["duplicates/dropped"] for r in rows) == 1
    assert [r["staleness/hist"] for r in rows] == [
        {"0": 2},
        {"1": 2},
        {"2": 2},
        {"3": 2},
    ]  # all made by version 0
    assert rows[3]["staleness/mean"] == 3 and rows[3]["staleness/max"] == 3
    # checkpoints 2 and 4, verified, announced; latest = 4
    steps = stable_steps(tmp_path / "run" / "checkpoints")
    assert [p.name for p in steps] == ["step_00000002", "step_00000004"]
    latest = decode(await aredis.get(keys.latest), expect=CheckpointAnnouncement)
    assert (latest.step, latest.version, latest.path) == (4, 4, str(steps[-1].resolve()))
    assert verify_checkpoint(latest.path, latest.manifest_sha256).model_fingerprint == model_fingerprint(
        tiny_model_dir
    )
    announced = [
        decode(f[b"m"], expect=CheckpointAnnouncement).step for _, f in await aredis.xrange(keys.checkpoints)
    ]
    assert announced == [2, 4]
    # everything consumed is acked; the ninth group was read ahead and stays pending for the next run
    pending = await aredis.xpending(keys.rollouts, LEARNER_GROUP)
    assert pending["pending"] <= 1
    state = await aredis.hgetall(keys.learner_state)
    # consumed: 9 taken + the wrong-model group (a well-formed group held an admission slot: released)
    assert int(state[b"version"]) == 4 and int(state[b"step"]) == 4 and int(state[b"consumed"]) == 10
    assert await aredis.xlen(keys.rollouts) <= 2  # trimmed below the oldest pending entry
    # dead letters with reasons; training went on
    dead = [decode(f[b"m"], expect=DeadLetter) for _, f in await aredis.xrange(keys.dead)]
    assert sorted(d.reason for d in dead) == ["malformed", "non_finite", "wrong_fingerprint"]
    # prompt feeder: prompts_ahead × B = 4 prompts queued with run-scoped task ids, cursor saved
    prompts = await aredis.xrange(keys.prompts)
    assert [decode(f[b"m"]).task_id for _, f in prompts] == [f"{run_id}-{i:09d}" for i in range(4)]
    assert int((await aredis.hgetall(keys.prompt_cursor))[b"position"]) == 4


async def test_groups_staler_than_k_are_dropped_and_counted(
    tiny_model_dir, redis_url, run_id, aredis, tmp_path
) -> None:
    from learner.service import main

    keys = RunKeys(run_id)
    fresh = make_groups(tiny_model_dir, 4, prefix="f")
    for g in fresh[:2]:
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    s = learner_settings(run_id, redis_url, tmp_path / "run", tiny_model_dir, max_steps=1, publish_every=1)
    assert await run_learner(main, s) == 0
    # the learner is at version 1 now; K = 1; version-0 groups at step 3 would be k = 2
    s2 = learner_settings(run_id, redis_url, tmp_path / "run", tiny_model_dir, max_steps=3, publish_every=1)
    stale_at_3 = make_groups(tiny_model_dir, 2, prefix="old", seed=4)  # version 0: k = 2 at step 3
    newer = make_groups(tiny_model_dir, 2, prefix="new", seed=5, version=2)
    for g in fresh[2:4] + stale_at_3 + newer:
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    assert await run_learner(main, s2) == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["staleness/hist"] == {"1": 2}
    assert rows[2]["staleness/dropped"] == 2 and rows[2]["groups/ids"] == ["new0000", "new0001"]
    assert await aredis.xpending(keys.rollouts, LEARNER_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
