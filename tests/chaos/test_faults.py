"""Faults on real processes and a real Redis: a Redis restart and connection drops under load, a full disk
during a checkpoint write, and each side running without the other.

kill -9 of a producer mid-group and of the learner mid-step / mid-checkpoint-write are covered by
tests/integration/test_producer_kill.py and tests/integration/test_learner_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from common.feeder import task_for
from common.keys import LEARNER_GROUP, RunKeys
from common.manifest import stable_steps, verify_checkpoint
from common.tasks import addition_prompt
from common.wire import CheckpointAnnouncement, ProducerHeartbeat, decode, encode
from tests.chaos.conftest import (
    account_for_every_prompt,
    last_step,
    learner_args,
    lineage,
    metric_rows,
    producer_args,
    report,
    restart,
    sync_client,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def retries_logged(text: str) -> int:
    return text.count("retrying in")


def test_redis_restart_under_load_loses_nothing_and_trains_nothing_twice(
    own_redis, services, run_id, tiny_model_dir, tmp_path
):
    url, run_dir = own_redis.url, tmp_path / "run"
    learner = services.start(
        "learner", learner_args(url, run_id, tiny_model_dir, run_dir, max_steps=8), "learner"
    )
    producer = services.start("producer", producer_args(url, run_id, tiny_model_dir, run_dir, "p1"), "p1")
    wait_until(lambda: last_step(run_dir) >= 2, 90, "two learner steps", (learner, producer))
    restart(own_redis, down_s=2.0)  # same port, same AOF
    at_restart = last_step(run_dir)
    assert learner.wait(90) == 0, learner.tail()
    assert producer.terminate() == 0, producer.tail()
    assert at_restart < 8  # the restart hit a running pipeline, not a finished one
    assert retries_logged(learner.text()) >= 1 and retries_logged(producer.text()) >= 1  # both felt it
    r = sync_client(url)
    counts = account_for_every_prompt(r, run_id, run_dir)
    assert sorted(lineage(run_dir)) == list(range(1, 9)) and counts["trained"] == 8 * 4
    assert r.xlen(RunKeys(run_id).dead) == 0
    latest = decode(r.get(RunKeys(run_id).latest), CheckpointAnnouncement)
    assert latest.step == 8
    verify_checkpoint(latest.path, latest.manifest_sha256)
    report("redis_restart", {**counts, "restart_at_step": at_restart, "learner_retries": retries_logged(learner.text()),
                             "producer_retries": retries_logged(producer.text())})  # fmt: skip


# long enough that a quiet machine is still training when the 3 s of kills are over
STEPS_UNDER_FAULTS = 100


def test_killed_connections_and_a_paused_server_are_survived(
    own_redis, services, run_id, tiny_model_dir, tmp_path
):
    url, run_dir = own_redis.url, tmp_path / "run"
    learner = services.start(
        "learner", learner_args(url, run_id, tiny_model_dir, run_dir, max_steps=STEPS_UNDER_FAULTS), "learner"
    )
    producer = services.start("producer", producer_args(url, run_id, tiny_model_dir, run_dir, "p1"), "p1")
    wait_until(lambda: last_step(run_dir) >= 1, 90, "a learner step", (learner, producer))
    at_start = last_step(run_dir)
    admin = sync_client(url)
    killed, until_s = 0, time.monotonic() + 3.0
    while time.monotonic() < until_s:  # every client connection dropped, ten times a second, for 3 s
        killed += admin.client_kill_filter(_type="normal", skipme=True)
        time.sleep(0.1)
    os.kill(own_redis.pid(), signal.SIGSTOP)  # then the server hangs for 3 s
    at_pause = last_step(run_dir)
    time.sleep(3.0)
    os.kill(own_redis.pid(), signal.SIGCONT)
    assert learner.wait(90) == 0, learner.tail()
    assert producer.terminate() == 0, producer.tail()
    assert killed >= 3 and at_pause < STEPS_UNDER_FAULTS  # the faults hit a running pipeline
    assert retries_logged(learner.text()) >= 1 and retries_logged(producer.text()) >= 1
    counts = account_for_every_prompt(admin, run_id, run_dir)
    assert counts["trained"] == STEPS_UNDER_FAULTS * 4
    report("connection_drops", {**counts, "connections_killed": killed, "paused_s": 3.0, "steps_during_kills":
                                at_pause - at_start, "learner_retries": retries_logged(learner.text()),
                                "producer_retries": retries_logged(producer.text())})  # fmt: skip


def _entry_ids(step_dir: Path) -> list[str]:
    """The rollout entries a step's checkpoint covers, from its learner-private state (RUN_DIR/learner-state)."""
    private = step_dir.parent.parent / "learner-state" / step_dir.name
    return json.loads((private / "state.json").read_text())["entry_ids"]


def test_full_disk_during_publish_keeps_training_and_acks_nothing_unpublished(
    redis_url, services, run_id, tiny_model_dir, tmp_path
):
    from tests.integration.test_learner_service import make_groups

    keys, run_dir = RunKeys(run_id), tmp_path / "run"
    r = sync_client(redis_url)
    groups = make_groups(tiny_model_dir, 14)
    for g in groups[:10]:
        r.xadd(keys.rollouts, {b"m": encode(g)})
    args = learner_args(redis_url, run_id, tiny_model_dir, run_dir, max_steps=5, batch_groups=2, max_staleness=100,
                        publish_every=1, dataset="")  # fmt: skip
    learner = services.start(
        "learner", args, "learner-1", env={"LEARNER_TEST_FAULT": "enospc_at_publish:2,3"}
    )
    assert learner.wait(90) == 0, learner.tail()
    out = learner.text()
    for step in (2, 3):
        assert (
            f"could not publish the checkpoint of step {step} (OSError: [Errno 28] No space left on device"
            in out
        )
    assert "Traceback" not in out
    root = run_dir / "checkpoints"
    assert not list(root.glob(".tmp-*")) and [p.name for p in stable_steps(root)] == [
        "step_00000001", "step_00000004", "step_00000005"]  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in stable_steps(root)]  # no partial dir
    states = run_dir / "learner-state"  # nor a private state without its published step
    assert sorted(p.name for p in states.iterdir()) == [p.name for p in stable_steps(root)]
    for p in stable_steps(root):
        verify_checkpoint(p)
        verify_checkpoint(states / p.name)
    # the entries of the unpublished steps 2 and 3 were not acked then: the step-4 checkpoint carries them
    assert [len(_entry_ids(root / n)) for n in ("step_00000001", "step_00000004", "step_00000005")] == [
        2,
        6,
        2,
    ]
    assert metric_rows(run_dir)[2]["stream/pending"] >= 4  # after step 3: steps 2-3 still pending
    announced = [decode(f[b"m"], CheckpointAnnouncement).step for _, f in r.xrange(keys.checkpoints)]
    assert announced == [1, 4, 5] and r.xpending(keys.rollouts, LEARNER_GROUP)["pending"] == 0
    assert metric_rows(run_dir)[-1]["weights/publish_failures"] == 2

    # the disk fills at the final publish: exit 2 with one error line, the last step stays unacked ...
    for g in groups[10:]:
        r.xadd(keys.rollouts, {b"m": encode(g)})
    args7 = [*args[: args.index("--max-steps")], "--max-steps", "7", *args[args.index("--max-steps") + 2 :]]
    learner = services.start("learner", args7, "learner-2", env={"LEARNER_TEST_FAULT": "enospc_at_publish:7"})
    assert learner.wait(90) == 2
    errors = [ln for ln in learner.text().splitlines() if " ERROR " in ln]
    assert "Traceback" not in learner.text() and len(errors) >= 2, (
        errors
    )  # the failed write(s), then the reason
    assert "learner failed: the final checkpoint (step 7) could not be written" in errors[-1]
    assert r.xpending(keys.rollouts, LEARNER_GROUP)["pending"] == 2
    # ... and a clean resume retrains it: every group exactly once over the lineage
    learner = services.start("learner", args7, "learner-3")
    assert learner.wait(90) == 0, learner.tail()
    trained = [gid for row in lineage(run_dir).values() for gid in row["groups/ids"]]
    assert sorted(trained) == sorted(g.group_id for g in groups)
    assert not list(root.glob(".tmp-*")) and r.xpending(keys.rollouts, LEARNER_GROUP)["pending"] == 0
    for p in stable_steps(root):
        verify_checkpoint(p)
    report("enospc_at_publish", {"failed_publishes": 3, "steps": 7, "groups_trained_once": len(trained)})


def test_learner_without_producers_waits_and_exits_0_on_sigterm(
    redis_url, services, run_id, tiny_model_dir, tmp_path
):
    run_dir = tmp_path / "run"
    learner = services.start("learner", learner_args(redis_url, run_id, tiny_model_dir, run_dir, max_steps=3),
                             "learner", env={"GSPO_LEARNER__WAIT_LOG_S": "1"})  # fmt: skip
    log_file = run_dir / "logs" / "learner.log"
    wait_until(lambda: log_file.exists() and "waiting for producers: 0/4 groups" in log_file.read_text(), 90,
               "the learner to say it waits", (learner,))  # fmt: skip
    assert learner.terminate() == 0, learner.tail()
    assert metric_rows(run_dir) == [] and stable_steps(run_dir / "checkpoints") == []
    assert "0 producers alive" in log_file.read_text()


def test_producer_without_learner_paces_at_the_bound_and_exits_0_on_sigterm(
    redis_url, services, run_id, tiny_model_dir, tmp_path
):
    keys = RunKeys(run_id)
    r = sync_client(redis_url)
    for i in range(12):
        r.xadd(keys.prompts, {b"m": encode(task_for(addition_prompt(i, i), f"task-{i}"))})
    args = producer_args(redis_url, run_id, tiny_model_dir, tmp_path / "run", "p1")
    # no learner: the producer's own K and B bound the prefill
    env = {"GSPO_PIPELINE__PREFILL_MIN_GROUPS": "1", "GSPO_PIPELINE__BATCH_GROUPS": "2",
           "GSPO_PIPELINE__MAX_STALENESS": "1"}  # fmt: skip
    producer = services.start("producer", args, "p1", env=env)
    bound = (1 + 1) * 2  # (K + 1) * B with no learner version yet

    def paced() -> bool:
        raw = r.get(keys.producer("p1"))
        hb = decode(raw, ProducerHeartbeat) if raw else None
        return hb is not None and hb.state == "paced" and hb.groups_done == bound

    wait_until(paced, 90, "the producer to pace itself", (producer,))
    time.sleep(2.0)  # longer than claim_idle_ms: re-reading its own idle prompts admits nothing more
    assert paced() and int(r.get(keys.admitted_count)) == bound and r.xlen(keys.rollouts) == bound
    assert producer.terminate() == 0, producer.tail()
    assert r.exists(keys.producer("p1")) == 0
