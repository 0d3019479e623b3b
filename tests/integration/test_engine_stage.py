"""The engine stage (producer/generate.py): a prompt the engine cannot take fails alone, as a PromptFailure,
and the rest of its batch is generated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.fingerprint import model_fingerprint
from producer.engines.base import PromptFailure, SamplingParams
from producer.engines.hf import HFEngine
from producer.engines.sglang import PROBE_PROMPT, SGLangEngine, SGLangError
from producer.generate import Generator
from producer.intake import Held
from producer.metrics import ProducerMetrics
from tests.support.fake_sglang import FakeSGLang

SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=8)
G = 2


def held(prompts: list[list[int]]) -> list[Held]:
    return [Held(None, SimpleNamespace(task_id=f"task-{i}"), p, None) for i, p in enumerate(prompts)]  # type: ignore[arg-type]


def batch_of(n: int, poison: dict[int, list[int]]) -> list[list[int]]:
    return [poison.get(i, [5, 6 + i % 4, 14, 7, 8, 15]) for i in range(n)]


@pytest.fixture
def make_fake(tiny_model_dir):
    started = []

    def make(**kw) -> FakeSGLang:
        server = FakeSGLang(tiny_model_dir, **kw).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
async def make_engine(tiny_model_dir):
    engines = []

    def make(server: FakeSGLang, **kw) -> SGLangEngine:
        kw = {"timeout_s": 5.0, "retries": 3, "backoff_s": 0.05, "startup_timeout_s": 5.0, **kw}
        eng = SGLangEngine(server.url, fingerprint=model_fingerprint(tiny_model_dir), **kw)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        await eng.close()


def generate_bodies(server: FakeSGLang, since: int = 0) -> list[dict]:
    return [b for p, b in server.requests[since:] if p == "/generate"]


async def test_a_batch_sglang_refuses_for_one_prompt_is_split_down_to_that_prompt(make_fake, make_engine):
    # the server does not report its limits (e.g. behind a router): the 400 for the whole batch is all there is
    server = make_fake(context_len=64, report_limits=False)
    engine = make_engine(server)
    await engine.start()
    assert engine.context_limit is None
    prompts = batch_of(8, {5: [5] * 60})  # 60 + 8 new tokens >= 64: SGLang refuses the whole batch
    gen = Generator(engine, G, SAMPLING, ProducerMetrics())
    since = len(server.requests)
    results, _ = await gen.generate(held(prompts))
    assert results[5].reason == "engine_refused"
    assert "Requested token count exceeds the model's maximum context length of 64" in results[5].detail
    assert all(len(r) == G for i, r in enumerate(results) if i != 5)
    # 8 -> 4 + 4 -> 2 + 2 -> 1 + 1: 7 calls, no probe (other prompts were generated)
    assert len(generate_bodies(server, since)) == gen.engine_calls == 7 and gen.failures == 1


@pytest.mark.parametrize("old_api", [False, True], ids=["0.5.23", "0.5.2"])
async def test_the_server_reported_limit_fails_a_long_prompt_before_any_call(make_fake, make_engine, old_api):
    server = make_fake(context_len=64, old_api=old_api)
    engine = make_engine(server)
    await engine.start()
    since = len(server.requests)
    gen = Generator(engine, G, SAMPLING, ProducerMetrics())
    prompts = batch_of(3, {1: [5] * 55})  # 55 + 8 = 63 > 62: SGLang would refuse it or clip max_new_tokens
    results, _ = await gen.generate(held(prompts))
    assert results[1] == PromptFailure(
        "prompt_too_long", "prompt of 55 tokens + max_new_tokens 8 = 63 > the engine's context limit 62"
    )
    assert [len(r) for i, r in enumerate(results) if i != 1] == [G, G]
    assert [b["input_ids"] for b in generate_bodies(server, since)] == [[prompts[0], prompts[2]]]


async def test_a_prompt_that_keeps_timing_out_is_isolated(make_fake, make_engine):
    server = make_fake()
    slow = [5, 14, 14, 15]
    server.faults.slow_prompt, server.faults.delay_s = slow, 0.6
    engine = make_engine(server, timeout_s=0.3, retries=2, backoff_s=0.01)
    gen = Generator(engine, G, SAMPLING, ProducerMetrics())
    results, _ = await gen.generate(held(batch_of(4, {2: slow})))
    assert (
        results[2].reason == "engine_timeout" and "failed after 2 attempts: ReadTimeout" in results[2].detail
    )
    assert all(len(r) == G for i, r in enumerate(results) if i != 2)


async def test_a_lone_refused_prompt_is_believed_once_a_probe_passes(make_fake, make_engine):
    server = make_fake(context_len=64, report_limits=False)
    engine = make_engine(server)
    results, _ = await Generator(engine, G, SAMPLING, ProducerMetrics()).generate(held([[5] * 70]))
    assert (
        results[0].reason == "engine_refused"
        and "longer than the model's context length" in results[0].detail
    )
    assert generate_bodies(server)[-1]["input_ids"] == [
        PROBE_PROMPT
    ]  # nothing succeeded: the server was asked


async def test_a_server_refusing_everything_stops_the_producer_instead_of_failing_every_prompt(
    make_fake, make_engine
):
    server = make_fake()
    server.faults.http_400 = 100  # e.g. a sampling field this server version does not know
    engine = make_engine(server)
    with pytest.raises(SGLangError, match="refuses even a one-token probe request.*unsupported field"):
        await Generator(engine, G, SAMPLING, ProducerMetrics()).generate(held(batch_of(4, {})))


async def test_a_server_aborting_everything_stops_the_producer_instead_of_failing_every_prompt(
    make_fake, make_engine
):
    server = make_fake()
    server.faults.abort_bare = 1000  # e.g. a server shutting down
    engine = make_engine(server)
    with pytest.raises(SGLangError, match="aborts even a one-token probe request .Abort before prefill."):
        await Generator(engine, G, SAMPLING, ProducerMetrics()).generate(held(batch_of(2, {})))


def test_transformers_engine_fails_prompts_beyond_the_model_positions_or_max_prompt_tokens(tiny_model_dir):
    import asyncio

    engine = HFEngine(tiny_model_dir, seed=0)
    assert engine.context_limit == 256  # the tiny model's max_position_embeddings
    sampling = SamplingParams(max_new_tokens=16)
    short, long = [5, 6, 14, 7, 8, 15], [5] * 241  # 241 + 16 = 257 > 256
    results, _ = asyncio.run(Generator(engine, G, sampling, ProducerMetrics()).generate(held([long, short])))
    assert results[0] == PromptFailure(
        "prompt_too_long", "prompt of 241 tokens + max_new_tokens 16 = 257 > the engine's context limit 256"
    )
    assert len(results[1]) == G
    capped = Generator(engine, G, sampling, ProducerMetrics(), max_prompt_tokens=5)
    results, _ = asyncio.run(capped.generate(held([short, short[:5]])))
    assert results[0] == PromptFailure("prompt_too_long", "prompt of 6 tokens > producer.max_prompt_tokens 5")
    assert len(results[1]) == G
