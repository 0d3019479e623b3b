"""The SGLang client against a server that speaks SGLang's JSON (tests/support/fake_sglang.py)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from common.fingerprint import model_fingerprint
from modeling import build_tiny_model
from producer.engines.base import PromptFailure, SamplingParams
from producer.engines.sglang import (
    SGLangEngine,
    SGLangError,
    SGLangRefused,
    SGLangTimeout,
    parse_generate,
    parse_item,
)
from tests.support import write_step_dir
from tests.support.fake_sglang import FakeSGLang

PROMPTS = [[5, 6, 14, 7, 8, 15], [5, 14, 6, 15]]
SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=8)


@pytest.fixture
def fake(tiny_model_dir):
    server = FakeSGLang(tiny_model_dir).start()
    yield server
    server.stop()


@pytest.fixture
async def engine(fake, tiny_model_dir):
    eng = SGLangEngine(
        fake.url,
        fingerprint=model_fingerprint(tiny_model_dir),
        timeout_s=5.0,
        retries=3,
        backoff_s=0.05,
        startup_timeout_s=5.0,
    )
    yield eng
    await eng.close()


async def test_generate_parses_n_samples_per_prompt_in_order(engine, fake):
    await engine.start()
    out = await engine.generate(PROMPTS, 3, SAMPLING)
    assert [len(g) for g in out] == [3, 3]
    path, body = fake.requests[-1]
    assert path == "/generate" and body["input_ids"] == PROMPTS and body["return_logprob"] is True
    assert body["sampling_params"] == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 8,
    }
    eos = fake.engine.eos_ids[0]
    for c in (c for g in out for c in g):
        assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
        assert c.token_ids.size == c.logprobs.size and (c.logprobs < 0).all()
        assert c.finish_reason == ("stop" if int(c.token_ids[-1]) == eos else "length")
        # weight_version "default" (SGLang's until an update names one) -> the engine's own version
        assert (c.version_start, c.version_end, c.version_spans) == (0, 0, ())


async def test_weight_versions_spans_give_start_and_end_versions(engine, fake):
    fake.faults.spans = [{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 2, "end": 8}]
    out = await engine.generate(PROMPTS[:1], 2, SAMPLING)
    assert {(c.version_start, c.version_end, c.version_spans) for c in out[0]} == {
        (3, 4, ((3, 0, 2), (4, 2, 8)))
    }


@pytest.mark.parametrize("finish", ["stop", "length"])
async def test_finish_reason_types_pass_through(engine, fake, finish):
    fake.faults.finish_type = finish
    out = await engine.generate(PROMPTS, 2, SAMPLING)
    assert {c.finish_reason for g in out for c in g} == {finish}


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("garbage", "answer is not JSON"),
        ("short_logprobs", "output_ids but"),
        ("wrong_token", "is for token"),
        ("nan_logprob", "is not a finite log-prob"),
    ],
)
async def test_malformed_answers_raise_a_one_line_sglang_error(engine, fake, fault, message):
    setattr(fake.faults, fault, 1)
    with pytest.raises(SGLangError, match=message) as info:
        await engine.generate(PROMPTS, 2, SAMPLING)
    assert "\n" not in str(info.value)
    assert fake.paths().count("/generate") == 1  # a protocol error is not retried


async def test_http_500_is_retried_then_succeeds(engine, fake):
    fake.faults.http_500 = 2
    out = await engine.generate(PROMPTS, 2, SAMPLING)
    assert [len(g) for g in out] == [2, 2] and fake.paths().count("/generate") == 3


async def test_persistent_http_500_becomes_an_error_after_the_retries(engine, fake):
    fake.faults.http_500 = 10
    with pytest.raises(SGLangError, match=r"POST .*/generate failed after 3 attempts: HTTP 500"):
        await engine.generate(PROMPTS, 2, SAMPLING)


async def test_timeout_is_retried_then_reported(fake, tiny_model_dir):
    eng = SGLangEngine(
        fake.url, fingerprint=model_fingerprint(tiny_model_dir), timeout_s=0.3, retries=2, backoff_s=0.01
    )
    fake.faults.slow, fake.faults.delay_s = 1, 1.0
    try:
        out = await eng.generate(PROMPTS[:1], 1, SAMPLING)  # one slow answer: retried
        assert [len(g) for g in out] == [1]
        fake.faults.slow = 5
        with pytest.raises(SGLangTimeout, match="failed after 2 attempts: ReadTimeout"):
            await eng.generate(PROMPTS[:1], 1, SAMPLING)
        # a batch is not retried whole: the engine stage splits it (tests/integration/test_engine_stage.py)
        fake.faults.slow = 1
        with pytest.raises(SGLangTimeout, match="no answer within 0.3s"):
            await eng.generate(PROMPTS, 1, SAMPLING)
    finally:
        await eng.close()


async def test_server_restart_is_survived_by_retrying(engine, fake):
    await engine.generate(PROMPTS, 1, SAMPLING)
    fake.restart(down_s=0.1)  # connection refused for a moment; backoff 0.05 + 0.1 + 0.2 covers it
    out = await engine.generate(PROMPTS, 2, SAMPLING)
    assert [len(g) for g in out] == [2, 2]


async def test_health_503_while_starting_is_waited_out(engine, fake):
    fake.faults.health_503 = 3
    t0 = time.monotonic()
    await engine.start()
    assert fake.paths()[:5] == ["/health"] * 4 + ["/model_info"]
    assert time.monotonic() - t0 < 5


async def test_never_healthy_server_is_a_clear_error(fake, tiny_model_dir):
    fake.faults.health_503 = 1000
    eng = SGLangEngine(fake.url, fingerprint=model_fingerprint(tiny_model_dir), startup_timeout_s=0.5)
    with pytest.raises(SGLangError, match=r"not healthy after 0.5s \(last: HTTP 503\)"):
        await eng.start()
    await eng.close()


async def test_a_server_with_another_model_is_refused(fake, tmp_path):
    other = build_tiny_model(tmp_path / "other", hidden=64, layers=1)
    eng = SGLangEngine(fake.url, fingerprint=model_fingerprint(other), startup_timeout_s=5)
    with pytest.raises(SGLangError, match="but the producer's model has"):
        await eng.start()
    await eng.close()


async def test_a_remote_model_path_only_warns(engine, fake, caplog):
    fake.faults.model_path = "Qwen/Qwen3-0.6B"
    await engine.start()
    assert any("cannot compare its fingerprint" in r.getMessage() for r in caplog.records)


async def test_update_weights_sends_sglang_fields_and_versions_follow(engine, fake, tiny_model_dir, tmp_path):
    step = write_step_dir(tmp_path, 5, tiny_model_dir, perturb=0.05)
    engine.reload_mode = "abort"
    await engine.load_weights(str(step), 5)
    path, body = fake.requests[-1]
    assert path == "/update_weights_from_disk"
    assert body == {
        "model_path": str(step),
        "weight_version": "5",
        "flush_cache": True,
        "abort_all_requests": True,
    }
    out = await engine.generate(PROMPTS, 1, SAMPLING)
    assert {(c.version_start, c.version_end) for g in out for c in g} == {(5, 5)}


async def test_update_weights_refused_by_the_server_is_an_error(engine, tmp_path):
    with pytest.raises(SGLangError, match="HTTP 400.*not a model directory"):
        await engine.load_weights(str(tmp_path / "missing"), 7)
    assert engine.version == 0


async def test_aborted_samples_are_resubmitted(engine, fake):
    fake.faults.abort = 3  # the first 3 samples of the batch come back aborted (weights reloaded with abort)
    out = await engine.generate(PROMPTS, 2, SAMPLING)
    assert [len(g) for g in out] == [2, 2] and all(c.finish_reason != "abort" for g in out for c in g)
    gens = [body for path, body in fake.requests if path == "/generate"]
    # the batch is [p0 s0, p0 s1, p1 s0, p1 s1]: p0 lost 2, p1 lost 1 -> one call per missing count
    assert sorted((b["input_ids"], b["sampling_params"]["n"]) for b in gens[1:]) == [
        ([PROMPTS[0]], 2),
        ([PROMPTS[1]], 1),
    ]
    assert engine.resubmitted == 3


def test_wrong_item_count_is_an_error():
    with pytest.raises(SGLangError, match="answered 2 items for 1 prompts x n=3"):
        parse_generate([{}, {}], 1, 3, 0)


def test_parse_item_accepts_sglang_shape_and_rejects_bad_finish_reason():
    item = {
        "output_ids": [7, 2],
        "meta_info": {
            "output_token_logprobs": [[-0.5, 7, None], [-1.25, 2, None]],
            "finish_reason": {"type": "stop", "matched": 2},
            "weight_version": "9",
        },
    }
    c = parse_item(item, "item 0", 0)
    assert c.token_ids.tolist() == [7, 2] and c.logprobs.tolist() == [-0.5, -1.25] and c.version_start == 9
    item["meta_info"]["finish_reason"] = None
    with pytest.raises(SGLangError, match="finish_reason None is not one of"):
        parse_item(item, "item 0", 0)


def test_weight_version_strings_map_to_versions():
    meta = {"output_token_logprobs": [[-0.5, 7, None]], "finish_reason": {"type": "length"}}
    item = {"output_ids": [7], "meta_info": meta}
    # "default" (no --weight-version) and any other non-integer launch value: the launch weights, version 0
    for raw, want in (("default", 0), ("base", 0), ("0", 0), ("12", 12), (None, 4)):
        meta["weight_version"] = raw
        assert parse_item(item, "item 0", 4).version_start == want, raw


# --------------------------------------------------------------------------- versions and server settings
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


def engine_for(server: FakeSGLang, model_dir, **kw) -> SGLangEngine:
    kw = {"timeout_s": 5.0, "retries": 3, "backoff_s": 0.05, "startup_timeout_s": 5.0, **kw}
    return SGLangEngine(server.url, fingerprint=model_fingerprint(model_dir), **kw)


@pytest.mark.parametrize("old_api", [False, True], ids=["0.5.23", "0.5.2"])
async def test_start_reads_the_context_limit_from_new_and_old_apis(make_fake, tiny_model_dir, old_api):
    server = make_fake(context_len=64, old_api=old_api)
    eng = engine_for(server, tiny_model_dir)
    try:
        await eng.start()
        # max_req_input_len = min(64 - 1, pool - 1) - 5 = 58; prompt + max_new_tokens <= 58 + 4 = 62
        assert eng.context_limit == 62
        infos = [p for p in server.paths() if "info" in p]
        assert infos == (
            ["/model_info", "/server_info"]
            if not old_api
            else ["/model_info", "/get_model_info", "/server_info", "/get_server_info"]
        )
        # at the limit: neither refused nor clipped (SGLang clips max_new_tokens to max_req_len - prompt - 1)
        out = await eng.generate([[5] * 54], 2, SamplingParams(max_new_tokens=8, stop_token_ids=()))
        assert len(out[0]) == 2
        with pytest.raises(SGLangRefused, match="HTTP 400: Requested token count exceeds"):
            await eng.generate([[5] * 56, PROMPTS[0]], 2, SamplingParams(max_new_tokens=8))
    finally:
        await eng.close()


async def test_a_smaller_kv_pool_lowers_the_context_limit(make_fake, tiny_model_dir):
    server = make_fake(context_len=200, max_total_num_tokens=40)
    eng = engine_for(server, tiny_model_dir)
    try:
        await eng.start()
        assert eng.context_limit == 38  # min(199, 39) - 5 + 4
    finally:
        await eng.close()


@pytest.mark.parametrize("old_api", [False, True], ids=["0.5.23", "0.5.2"])
@pytest.mark.parametrize(
    ("preferred", "setting"),
    [
        ({"repetition_penalty": 1.1}, "repetition_penalty=1.1"),
        ({"frequency_penalty": 0.5, "temperature": 0.6}, "frequency_penalty=0.5"),
        ({"presence_penalty": -0.2}, "presence_penalty=-0.2"),
        ({"min_new_tokens": 4}, "min_new_tokens=4"),
        ({"min_p": 0.05}, "min_p=0.05"),
        ({"logit_bias": {"5": -100}}, "logit_bias"),
    ],
)
async def test_penalised_preferred_sampling_params_are_refused_at_start(
    make_fake, tiny_model_dir, old_api, preferred, setting
):
    server = make_fake(preferred_sampling_params=preferred, old_api=old_api)
    eng = engine_for(server, tiny_model_dir)
    try:
        with pytest.raises(SGLangError, match=f"--preferred-sampling-params sets {setting}") as info:
            await eng.start()
        assert "\n" not in str(info.value)
    finally:
        await eng.close()


async def test_neutral_preferred_sampling_params_are_accepted(make_fake, tiny_model_dir):
    # temperature/top_p/top_k are sent with every request; neutral penalties change nothing
    preferred = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.0, "stop": ["\n\n"]}
    server = make_fake(preferred_sampling_params=preferred, old_api=True)
    eng = engine_for(server, tiny_model_dir)
    try:
        await eng.start()
    finally:
        await eng.close()


async def test_raw_logprobs_are_refused_at_start_and_ours_pass(make_fake, tiny_model_dir, caplog):
    good = engine_for(make_fake(), tiny_model_dir)
    raw_server = make_fake()
    raw_server.faults.original_logprob = True
    raw = engine_for(raw_server, tiny_model_dir)
    try:
        await good.start()
        assert not [r for r in caplog.records if "probe" in r.getMessage()]  # conclusive, and as expected
        with pytest.raises(SGLangError, match="RETURN_ORIGINAL_LOGPROB"):
            await raw.start()
    finally:
        await good.close()
        await raw.close()


async def test_aborts_without_output_ids_are_resubmitted(engine, fake):
    fake.faults.abort_bare = 3  # older servers: aborted samples carry neither output_ids nor log-probs
    out = await engine.generate(PROMPTS, 2, SAMPLING)
    assert [len(g) for g in out] == [2, 2] and all(c.finish_reason != "abort" for g in out for c in g)
    assert engine.resubmitted == 3


async def test_samples_aborted_at_every_resubmission_fail_their_prompt_only(engine, fake):
    fake.faults.abort_prompt = PROMPTS[0]  # aborted in the first call and in each of the 3 resubmissions
    out = await engine.generate(PROMPTS, 2, SAMPLING)
    assert out[0] == PromptFailure(
        "engine_aborted",
        "2 of 2 samples still aborted after 3 resubmissions (last abort: Abort before prefill)",
    )
    assert len(out[1]) == 2 and fake.paths().count("/generate") == 4


@pytest.mark.parametrize("launch", ["default", "0"])
async def test_a_restarted_server_gets_the_loaded_checkpoint_back(
    make_fake, tiny_model_dir, tmp_path, launch
):
    server = make_fake(launch_weight_version=launch)
    eng = engine_for(server, tiny_model_dir)
    step = write_step_dir(tmp_path, 5, tiny_model_dir, perturb=0.05)
    try:
        await eng.load_weights(str(step), 5)
        server.restart()  # serves the base weights again, weight_version back to the launch value
        assert server.weight_version == launch
        out = await eng.generate(PROMPTS, 2, SAMPLING)
        assert {(c.version_start, c.version_end) for g in out for c in g} == {(5, 5)}
        assert server.paths().count("/update_weights_from_disk") == 2 and server.served_path == str(step)
        assert (eng.restarts, eng.version) == (1, 5)
    finally:
        await eng.close()


async def test_a_restarted_server_whose_checkpoint_is_gone_labels_its_launch_weights(
    make_fake, tiny_model_dir, tmp_path
):
    server = make_fake(launch_weight_version="0")
    eng = engine_for(server, tiny_model_dir)
    step = write_step_dir(tmp_path, 5, tiny_model_dir, perturb=0.05)
    try:
        await eng.load_weights(str(step), 5)
        shutil.rmtree(step)  # pruned by the learner meanwhile
        server.restart()
        out = await eng.generate(PROMPTS, 2, SAMPLING)
        # the server serves its launch (base) weights: the samples say so, and the engine's version too, so
        # the weight follower loads the newest checkpoint at its next poll
        assert {(c.version_start, c.version_end) for g in out for c in g} == {(0, 0)}
        assert (eng.restarts, eng.version) == (1, 0)
    finally:
        await eng.close()


async def test_http_400_is_a_refusal_not_retried(engine, fake):
    fake.faults.http_400 = 1
    with pytest.raises(SGLangRefused, match="HTTP 400: sampling_params: unsupported field"):
        await engine.generate(PROMPTS, 2, SAMPLING)
    assert fake.paths().count("/generate") == 1
