"""Shared fixtures: a private redis-server per test session, unique run ids, a tiny model.

Nothing here touches a Redis server the tests did not start.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from common.redis_conn import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server (AOF on, so restart tests keep data) on a free port."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def run_id() -> str:
    """A fresh run id per test: keys never collide, so nothing needs flushing."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference task's tiny Qwen3 (random init), saved once per session."""
    from modeling import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(autouse=True)
def _quiet_threads() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "2")


# A chat template in the tiny model's vocabulary (digits, + =, space, a-z, and the <s> </s> specials)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant {% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}nothink {% endif %}"
)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a chat template on its tokenizer (saved with it), as an instruct model has."""
    from modeling import build_tiny_model, load_tokenizer

    out = build_tiny_model(tmp_path_factory.mktemp("chat-model"), seed=0)
    tok = load_tokenizer(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out
