"""Light commands that talk to Redis only: ``gspo status`` and ``gspo prompts load``."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from common.config import Settings
from common.feeder import check_task_settings, enqueue
from common.keys import LEARNER_GROUP, PRODUCERS_GROUP, RunKeys
from common.redis_conn import connect_async
from common.streams import StreamClient
from common.tasks import TaskError, open_dataset, parse_dataset_spec
from common.wire import CheckpointAnnouncement, ProducerHeartbeat, WireError, decode


def _content_digest(rows: list) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt_id, r.prompt, r.task, r.meta], sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:10]


async def load_prompts(settings: Settings, spec: str | Path, repeat: int = 1) -> int:
    """Enqueue every row of a dataset ``repeat`` times: a JSONL or Parquet file, a directory of Parquet files
    or ``hf:NAME_OR_DIR`` (a dataset spec, ``?split=...&columns=...`` allowed: ``common/tasks.py``). Ids derive
    from the content (the file's bytes; for directories and hf: sources, the rows), so loading the same data
    twice gives the same ids and trains once. The config's ``task`` section (system prompt, chat template
    arguments, rewards) is applied as by the learner's feeder."""
    s = parse_dataset_spec(str(spec))
    if s.kind == "addition":
        raise TaskError("the addition task is endless: give a file or an hf: dataset to load")
    check_task_settings(settings.task)
    rows = list(open_dataset(s))
    path = Path(s.source)
    if s.kind != "hf" and path.is_file():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        query = str(spec).partition("?")[2]
        if query:  # the same bytes read with other options (columns, task) are other prompts
            digest = hashlib.sha256(f"{digest}?{query}".encode()).hexdigest()[:10]
    else:
        digest = _content_digest(rows)
    keys = RunKeys(settings.run)
    client = connect_async(settings.redis)
    try:
        streams = StreamClient(client, settings.redis.retry_for_s)
        pairs = ((f"{digest}-e{e}-{i}", r) for e in range(repeat) for i, r in enumerate(rows))
        return await enqueue(streams, keys, pairs, settings.pipeline.prompts_maxlen, task=settings.task)
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
