"""Assembling a producer: its base model, engine and tokenizer, checkpoint follower and admission control,
checked against the pipeline shape the learner has published (if it has)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import zlib
from typing import TYPE_CHECKING

from common.admission import Admitter
from common.config import Settings
from common.fingerprint import model_fingerprint
from common.keys import RunKeys
from common.streams import StreamClient
from producer.engines.base import Engine
from producer.weights import CheckpointFollower, cache_dir_for, local_checkpoint

if TYPE_CHECKING:
    from producer.service import Producer

log = logging.getLogger(__name__)


class ProducerError(RuntimeError):
    """A producer set-up problem (no model, bad engine choice), in one line."""


def default_producer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def resolve_base_model(settings: Settings, streams: StreamClient, keys: RunKeys) -> str:
    """settings.producer.model, else settings.learner.model, else the announced checkpoint (its own base)."""
    model_dir = settings.producer.model or settings.learner.model
    if model_dir:  # a directory, or a hub id from the local cache
        from common.hub import resolve_model_dir

        return str(resolve_model_dir(model_dir))
    ann = await CheckpointFollower(streams, keys, "").announced()
    if ann is None:
        raise ProducerError(
            "no model: pass --model (or set learner.model), or start the learner so it publishes one"
        )
    log.warning("no base model configured: using the announced checkpoint %s as the base", ann.path)
    # an announced URL is downloaded into the cache first
    local, _ = await asyncio.to_thread(local_checkpoint, ann, cache_dir_for(settings))
    return str(local)


async def build_engine(
    settings: Settings, model_dir: str, producer_id: str, follower: CheckpointFollower
) -> tuple[Engine, object]:
    """The engine and the tokenizer used to tokenise prompts and detokenise completions for rewards."""
    from modeling import load_tokenizer

    p = settings.producer
    if p.engine == "transformers":
        from producer.engines.hf import HFEngine

        seed = (p.seed * 1_000_003 + zlib.crc32(producer_id.encode())) % 2**31
        engine = HFEngine(
            model_dir,
            device=p.device,
            dtype=p.dtype,
            seed=seed,
            threads=p.threads,
            attn_implementation=p.attn_implementation,
        )
        return engine, engine.tokenizer
    from producer.engines.sglang import SGLangEngine

    engine = SGLangEngine(
        p.sglang_url,
        fingerprint=follower.base_fingerprint,
        timeout_s=p.sglang_timeout_s,
        reload_mode=p.reload_mode,
        router_url=p.router_url,
    )
    await engine.start()
    return engine, load_tokenizer(model_dir)


def build_admitter(settings: Settings, streams: StreamClient, keys: RunKeys) -> Admitter:
    p = settings.pipeline
    return Admitter(
        streams.redis,
        keys,
        max_staleness=p.max_staleness,  # until the learner publishes its K and B (the prefill)
        batch_groups=p.batch_groups,
        prefill_min_groups=p.prefill_min_groups,
        group_size=p.group_size,  # must equal the learner's
    )


async def build_producer(
    settings: Settings, streams: StreamClient, stop: asyncio.Event | None = None
) -> Producer:
    """Engine, tokenizer and checkpoint follower wired into a :class:`Producer`, on the newest verified weights.
    Raises :class:`~common.admission.GroupSizeMismatch` if the learner has published another G."""
    from producer.service import Producer  # service.py imports this module (serve)

    producer_id = settings.producer.producer_id or default_producer_id()
    keys = RunKeys(settings.run)
    model_dir = await resolve_base_model(settings, streams, keys)
    follower = CheckpointFollower(streams, keys, model_fingerprint(model_dir), cache_dir_for(settings))
    engine, tokenizer = await build_engine(settings, model_dir, producer_id, follower)
    try:
        admitter = build_admitter(settings, streams, keys)
        await streams.call(admitter.check_learner, "HMGET learner state")
        producer = Producer(settings, engine, tokenizer, streams, producer_id, follower, admitter, stop)
        await producer.weights.sync()  # start from the newest verified checkpoint, if any
    except BaseException:
        await engine.close()
        raise
    log.info(
        "producer %s: engine %s, model %s, weight version %d",
        producer_id,
        engine.name,
        model_dir,
        engine.version,
    )
    return producer
