"""Light commands that talk to Redis only: ``gspo status`` and ``gspo prompts load``."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from common.config import Settings
from common.feeder import enqueue
from common.keys import LEARNER_GROUP, PRODUCERS_GROUP, RunKeys
from common.redis_conn import connect_async
from common.streams import StreamClient
from common.tasks import jsonl_rows
from common.wire import CheckpointAnnouncement, ProducerHeartbeat, WireError, decode


async def load_prompts(settings: Settings, path: Path, repeat: int = 1) -> int:
    """Enqueue every row of a JSONL file ``repeat`` times; ids derive from the file content (idempotent)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    rows = list(jsonl_rows(path))
    keys = RunKeys(settings.run)
    client = connect_async(settings.redis)
    try:
        streams = StreamClient(client, settings.redis.retry_for_s)
        pairs = ((f"{digest}-e{e}-{i}", r) for e in range(repeat) for i, r in enumerate(rows))
        return await enqueue(streams, keys, pairs, settings.pipeline.prompts_maxlen)
    finally:
        await client.aclose()


async def collect_status(settings: Settings) -> dict[str, Any]:
    keys = RunKeys(settings.run)
    client = connect_async(settings.redis)
    try:
        streams = StreamClient(client, settings.redis.retry_for_s)
        producers = []
        async for key in client.scan_iter(match=f"{keys.producers}:*", count=500):
            raw = await client.get(key)
            if raw is None:
                continue
            try:
                hb = decode(raw, ProducerHeartbeat)
            except WireError:
                continue
            producers.append({**hb.to_dict(), "age_s": round(time.time() - hb.updated_at, 1)})
        learner = {k.decode(): v.decode() for k, v in (await client.hgetall(keys.learner_state)).items()}
        latest_raw = await client.get(keys.latest)
        latest = decode(latest_raw, CheckpointAnnouncement).to_dict() if latest_raw else None
        return {
            "run": settings.run,
            "producers": sorted(producers, key=lambda p: p["producer_id"]),
            "learner": learner,
            "latest_checkpoint": latest,
            "admitted_groups": int(await client.get(keys.admitted_count) or 0),
            "streams": {
                "prompts": {
                    "length": await streams.length(keys.prompts),
                    "backlog": await streams.backlog(keys.prompts, PRODUCERS_GROUP),
                    "pending": await streams.pending_count(keys.prompts, PRODUCERS_GROUP),
                },
                "rollouts": {
                    "length": await streams.length(keys.rollouts),
                    "backlog": await streams.backlog(keys.rollouts, LEARNER_GROUP),
                    "pending": await streams.pending_count(keys.rollouts, LEARNER_GROUP),
                },
                "dead": {"length": await streams.length(keys.dead)},
            },
        }
    finally:
        await client.aclose()
