"""Stop strings (``producer.sampling.stop``) and extra stop token ids on every engine: the transformers engine's
decode loop, its model.generate fallback, and SGLang (the fake server runs the same model): a completion that
meets a stop string ends with the token that completes it (finish_reason "stop"), never later, and its
log-probs still equal a recompute."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from common.fingerprint import model_fingerprint
from producer.engines.base import SamplingParams
from producer.engines.hf import HFEngine, StopStrings
from tests.integration.test_hf_decode import PROMPTS, recompute

STOPS = ("e", "9=")


def check(tok, model, prompts, groups, stops=STOPS, stop_ids=()):
    by_string = by_id = 0
    for p, g in zip(prompts, groups, strict=True):
        for c in g:
            ids = [int(x) for x in c.token_ids]
            text = tok.decode(ids, skip_special_tokens=False)
            before = tok.decode(ids[:-1], skip_special_tokens=False)
            assert not any(s in before for s in stops), (text, "a stop string was passed over")
            if any(text.endswith(s) or s in text for s in stops):
                assert c.finish_reason == "stop"
                by_string += 1
            elif ids[-1] in stop_ids:
                assert c.finish_reason == "stop"
                by_id += 1
            if c.finish_reason == "length":
                assert len(ids) == 12
            np.testing.assert_allclose(c.logprobs, recompute(model, p, ids, 1.0), atol=1e-4)
    return by_string, by_id


@pytest.mark.parametrize("decode", ["loop", "generate"])
def test_the_transformers_engine_stops_at_the_token_completing_a_stop_string(tiny_model_dir, decode):
    engine = HFEngine(tiny_model_dir, decode=decode, seed=5)
    extra = engine.tokenizer.convert_tokens_to_ids("+")
    s = SamplingParams(max_new_tokens=12, stop=STOPS, stop_token_ids=(extra,))
    groups = engine.generate_sync(PROMPTS, 6, s)
    by_string, by_id = check(engine.tokenizer, engine.model, PROMPTS, groups, stop_ids=(extra,))
    assert by_string > 0 and by_id > 0


def test_the_sglang_engine_sends_the_stop_strings(tiny_model_dir):
    from producer.engines.sglang import SGLangEngine
    from tests.support.fake_sglang import FakeSGLang

    fake = FakeSGLang(tiny_model_dir).start()

    async def run():
        engine = SGLangEngine(fake.url, fingerprint=model_fingerprint(tiny_model_dir), startup_timeout_s=10.0)
        await engine.start()
        try:
            return await engine.generate(PROMPTS, 6, SamplingParams(max_new_tokens=12, stop=STOPS))
        finally:
            await engine.close()

    try:
        groups = asyncio.run(run())
    finally:
        fake.stop()
    bodies = [b for path, b in fake.requests if path == "/generate" and b and b["input_ids"] == PROMPTS]
    assert bodies and bodies[0]["sampling_params"]["stop"] == list(STOPS)
    engine = HFEngine(tiny_model_dir, decode="loop")
    by_string, _ = check(engine.tokenizer, engine.model, PROMPTS, groups)
    assert by_string > 0


def test_stop_strings_first_end(tiny_model_dir):
    from modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ids = tok("ab9=cd9=e").input_ids
    st = StopStrings(tok, STOPS)
    assert st.first_end(ids) == 4  # "ab9=": the "=" completes "9="
    assert st.first_end(tok("abcd").input_ids) is None
