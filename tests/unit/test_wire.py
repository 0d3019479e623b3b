"""The msgpack wire format: exact round trips and one typed error per class of malformed input."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from common.wire import (
    WIRE_VERSION,
    CheckpointAnnouncement,
    DeadLetter,
    InvalidValue,
    LengthMismatch,
    Limits,
    MalformedMessage,
    MissingField,
    NonFiniteValue,
    ProducerHeartbeat,
    PromptTask,
    RolloutGroup,
    Sample,
    TooLarge,
    UnsupportedVersion,
    WireError,
    WrongMessageType,
    WrongType,
    decode,
    encode,
)


def make_group(n_samples: int = 3) -> RolloutGroup:
    samples = tuple(
        Sample(
            completion_ids=np.arange(10 + i, 14 + 2 * i, dtype=np.int64),
            logprobs=-np.linspace(0.125, 2.5, 4 + i, dtype=np.float64).astype(np.float32),
            reward=float(i % 2),
            finish_reason=("stop", "length", "abort")[i % 3],
            version_start=5 + i,
            version_end=6 + i,
            version_spans=((5 + i, 0, 2), (6 + i, 2, 4 + i)),
        )
        for i in range(n_samples)
    )
    return RolloutGroup(
        group_id="abc-e0-7",
        prompt_id="add-12-34",
        prompt_ids=np.array([1, 2, 12, 40, 2**31 - 1]),
        task="addition",
        producer_id="host-1",
        model_fingerprint="fp0123",
        samples=samples,
        temperature=0.7,
        top_p=0.95,
        top_k=20,
        created_at=1_700_000_000.25,
        gen_time_s=1.5,
    )


def raw_map(msg) -> dict:
    return msgpack.unpackb(encode(msg), raw=False)


def repack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


# --------------------------------------------------------------------------- round trips
def test_rollout_group_round_trips_field_by_field_with_int32_float32_arrays():
    g = make_group()
    back = decode(encode(g))
    assert isinstance(back, RolloutGroup)
    for name in (
        "group_id",
        "prompt_id",
        "task",
        "producer_id",
        "model_fingerprint",
        "temperature",
        "top_p",
        "top_k",
        "created_at",
        "gen_time_s",
    ):
        assert getattr(back, name) == getattr(g, name), name
    assert back.prompt_ids.dtype == np.dtype("<i4")
    assert back.prompt_ids.tolist() == [1, 2, 12, 40, 2**31 - 1]
    assert len(back.samples) == 3
    for s0, s1 in zip(g.samples, back.samples, strict=True):
        assert s1.completion_ids.dtype == np.dtype("<i4") and s1.logprobs.dtype == np.dtype("<f4")
        assert s1.completion_ids.tolist() == s0.completion_ids.tolist()
        np.testing.assert_array_equal(s1.logprobs, s0.logprobs.astype(np.float32))
        assert (s1.reward, s1.finish_reason, s1.version_start, s1.version_end) == (
            s0.reward,
            s0.finish_reason,
            s0.version_start,
            s0.version_end,
        )
        assert s1.version_spans == s0.version_spans
    assert back.samples[2].version_spans == ((7, 0, 2), (8, 2, 6))
    assert back.version_min == 5
    assert back == decode(encode(back))


def test_messages_with_arrays_compare_by_value():
    g = make_group()
    assert decode(encode(g)) == g
    other = make_group()
    changed = RolloutGroup(**{**other.__dict__, "prompt_ids": np.array([1, 2, 12, 40, 7])})
    assert changed != g


@pytest.mark.parametrize(
    "msg",
    [
        PromptTask(
            task_id="f00-e0-3",
            prompt="12+34=",
            task="addition",
            meta={"answer": "46", "n": 3, "x": 0.5, "tags": ["a", 1, None, True]},
            prompt_ids=np.array([5, 6, 7]),
            created_at=12.5,
        ),
        CheckpointAnnouncement(
            step=42,
            version=42,
            path="/ckpt/step_00000042",
            manifest_sha256="ab" * 32,
            model_fingerprint="fp",
            created_at=3.0,
        ),
        ProducerHeartbeat(
            producer_id="p1",
            host="h",
            engine="sglang",
            version=3,
            groups_done=17,
            tokens_per_s=812.5,
            groups_per_s=1.25,
            inflight=4,
            state="generating",
            started_at=1.0,
            updated_at=2.0,
        ),
        DeadLetter(
            source_stream="gspo:r:rollouts",
            entry_id="1-0",
            reason="non_finite",
            detail="field 'reward'",
            payload=b"\x00\xffraw",
            consumer="learner-0",
            at=9.0,
        ),
    ],
    ids=lambda m: type(m).__name__,
)
def test_other_messages_round_trip_exactly(msg):
    back = decode(encode(msg), expect=type(msg))
    assert type(back) is type(msg)
    assert back == msg
    if isinstance(msg, PromptTask):
        assert back.prompt_ids.dtype == np.dtype("<i4") and back.prompt_ids.tolist() == [5, 6, 7]
        assert back.meta == {"answer": "46", "n": 3, "x": 0.5, "tags": ["a", 1, None, True]}


def test_logprobs_and_tokens_travel_as_little_endian_bytes_not_number_lists():
    g = make_group(1)
    d = raw_map(g)
    assert d["t"] == "rollout" and d["v"] == WIRE_VERSION
    s = d["samples"][0]
    assert isinstance(s["logprobs"], bytes) and isinstance(s["completion_ids"], bytes)
    assert s["logprobs"] == np.asarray(g.samples[0].logprobs, dtype="<f4").tobytes()
    assert len(s["logprobs"]) == 4 * 4 and len(s["completion_ids"]) == 4 * 4
    assert s["completion_ids"] == np.array([10, 11, 12, 13], dtype="<i4").tobytes()
    assert isinstance(d["prompt_ids"], bytes) and len(d["prompt_ids"]) == 5 * 4


def test_expect_rejects_another_message_type():
    with pytest.raises(WrongMessageType, match="expected a 'rollout' message, got 'prompt'"):
        decode(encode(PromptTask("a", "b", "addition")), expect=RolloutGroup)


# --------------------------------------------------------------------------- malformed input
def _sample_dict(**over) -> dict:
    d = raw_map(make_group(1))
    d["samples"][0].update(over)
    return d


def test_truncated_bytes_are_malformed():
    raw = encode(make_group())
    for cut in (1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(MalformedMessage):
            decode(raw[:cut])
    with pytest.raises(MalformedMessage):
        decode(b"")


def test_trailing_garbage_is_malformed():
    with pytest.raises(MalformedMessage, match="ExtraData"):
        decode(encode(make_group()) + b"\x00")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_wire_version(version):
    d = raw_map(make_group())
    d["v"] = version
    with pytest.raises(UnsupportedVersion, match="wire_version"):
        decode(repack(d))


def test_missing_wire_version():
    d = raw_map(make_group())
    del d["v"]
    with pytest.raises(UnsupportedVersion):
        decode(repack(d))


@pytest.mark.parametrize("tag", ["nope", 3, None])
def test_unknown_type_tag(tag):
    d = raw_map(make_group())
    d["t"] = tag
    with pytest.raises(WrongMessageType, match="unknown message type"):
        decode(repack(d))


@pytest.mark.parametrize("name", ["group_id", "samples", "temperature", "model_fingerprint", "gen_time_s"])
def test_missing_group_field(name):
    d = raw_map(make_group())
    del d[name]
    with pytest.raises(MissingField, match=repr(name)):
        decode(repack(d))


@pytest.mark.parametrize(
    "name", ["completion_ids", "logprobs", "reward", "finish_reason", "version_start", "version_spans"]
)
def test_missing_sample_field(name):
    d = raw_map(make_group(1))
    del d["samples"][0][name]
    with pytest.raises(MissingField, match=repr(name)):
        decode(repack(d))


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", "20"),
        ("top_k", 1.5),
        ("top_k", True),
        ("group_id", 7),
        ("temperature", "hot"),
        ("prompt_ids", [1, 2, 3]),
        ("samples", {"a": 1}),
        ("samples", [5]),
    ],
)
def test_wrong_types_in_group(field, value):
    d = raw_map(make_group(1))
    d[field] = value
    with pytest.raises(WrongType):
        decode(repack(d))


def test_logprobs_as_float_list_is_wrong_type():
    with pytest.raises(WrongType, match="'logprobs': expected bytes, got list"):
        decode(repack(_sample_dict(logprobs=[-0.1, -0.2, -0.3, -0.4])))


def test_version_start_as_str_is_wrong_type():
    with pytest.raises(WrongType, match="'version_start': expected int, got str"):
        decode(repack(_sample_dict(version_start="5")))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logprob_bytes(bad):
    lps = np.array([-0.5, bad, -0.25, -1.0], dtype="<f4").tobytes()
    with pytest.raises(NonFiniteValue, match="'logprobs'"):
        decode(repack(_sample_dict(logprobs=lps)))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_reward(bad):
    with pytest.raises(NonFiniteValue, match="'reward'"):
        decode(repack(_sample_dict(reward=bad)))


def test_non_finite_heartbeat_float():
    d = raw_map(ProducerHeartbeat("p", "h", "transformers", 0, 0, 1.0, 1.0, 0, "idle", 0.0, 0.0))
    d["tokens_per_s"] = math.nan
    with pytest.raises(NonFiniteValue, match="tokens_per_s"):
        decode(repack(d))


def test_tokens_logprobs_length_mismatch():
    lps = np.array([-0.5, -0.25, -1.0], dtype="<f4").tobytes()  # 3 log-probs for 4 tokens
    with pytest.raises(LengthMismatch, match="4 completion tokens but 3 log-probs"):
        decode(repack(_sample_dict(logprobs=lps)))


def test_array_bytes_not_a_multiple_of_itemsize_is_malformed():
    with pytest.raises(MalformedMessage, match="not a multiple of 4"):
        decode(repack(_sample_dict(completion_ids=b"\x01\x00\x00\x00\x02")))


@pytest.mark.parametrize(
    "over,exc",
    [
        ({"finish_reason": "eos"}, InvalidValue),
        ({"version_start": -1}, InvalidValue),
        ({"version_start": 7, "version_end": 6}, InvalidValue),
        ({"logprobs": np.array([-0.5, 0.5, -0.25, -1.0], dtype="<f4").tobytes()}, InvalidValue),
        ({"version_spans": [[1, 2]]}, WrongType),
    ],
)
def test_invalid_sample_values(over, exc):
    with pytest.raises(exc):
        decode(repack(_sample_dict(**over)))


def test_empty_group_and_zero_temperature_are_invalid():
    d = raw_map(make_group(1))
    d["samples"] = []
    with pytest.raises(InvalidValue, match="no samples"):
        decode(repack(d))
    d = raw_map(make_group(1))
    d["temperature"] = 0.0
    with pytest.raises(InvalidValue, match="temperature"):
        decode(repack(d))


def test_too_large_message_bytes():
    raw = encode(make_group())
    with pytest.raises(TooLarge, match=f"{len(raw)} bytes exceeds max_message_bytes=100"):
        decode(raw, limits=Limits(max_message_bytes=100))
    assert decode(raw, limits=Limits(max_message_bytes=len(raw))) == make_group()


def test_too_many_tokens():
    g = make_group(3)  # completions of 4, 5, 6 tokens; prompt of 5
    assert decode(encode(g), limits=Limits(max_tokens=6)) == g
    with pytest.raises(TooLarge, match="6 elements exceeds max_tokens=5"):
        decode(encode(g), limits=Limits(max_tokens=5))


def test_too_many_samples():
    g = make_group(3)
    assert len(decode(encode(g), limits=Limits(max_samples=3)).samples) == 3
    with pytest.raises(TooLarge, match="3 samples, max_samples=2"):
        decode(encode(g), limits=Limits(max_samples=2))


def test_too_many_meta_items():
    t = PromptTask("a", "b", "addition", meta={f"k{i}": i for i in range(5)})
    with pytest.raises(TooLarge, match="5 items exceeds 4"):
        decode(encode(t), limits=Limits(max_meta_items=4))


@pytest.mark.parametrize(
    "ext", [msgpack.ExtType(5, b"abcd"), msgpack.Timestamp(1, 0)], ids=["ext5", "timestamp"]
)
def test_msgpack_ext_types_are_refused(ext):
    d = raw_map(make_group(1))
    d["extra"] = ext
    with pytest.raises(MalformedMessage):
        decode(repack(d))


@pytest.mark.parametrize("top", [[1, 2, 3], "rollout", 42, None, b"bytes"])
def test_non_map_top_level_is_malformed(top):
    with pytest.raises(MalformedMessage, match="must be a msgpack map"):
        decode(msgpack.packb(top, use_bin_type=True))


def test_non_string_map_keys_are_malformed():
    with pytest.raises(MalformedMessage):
        decode(msgpack.packb({1: "x", "t": "rollout", "v": 1}, use_bin_type=True))


def test_dict_in_meta_is_wrong_type():
    d = raw_map(PromptTask("a", "b", "addition"))
    d["meta"] = {"nested": {"x": 1}}
    with pytest.raises(WrongType, match="meta.nested"):
        decode(repack(d))


def test_non_bytes_input_is_wrong_type():
    with pytest.raises(WrongType):
        decode("not bytes")  # type: ignore[arg-type]


def test_every_error_is_a_wire_error_and_value_error_with_a_reason():
    for exc in (
        MalformedMessage,
        UnsupportedVersion,
        WrongMessageType,
        MissingField,
        WrongType,
        NonFiniteValue,
        LengthMismatch,
        TooLarge,
        InvalidValue,
    ):
        assert issubclass(exc, WireError) and issubclass(exc, ValueError)
        assert exc.reason != WireError.reason
    assert (
        len(
            {
                e.reason
                for e in (
                    MalformedMessage,
                    UnsupportedVersion,
                    WrongMessageType,
                    MissingField,
                    WrongType,
                    NonFiniteValue,
                    LengthMismatch,
                    TooLarge,
                    InvalidValue,
                )
            }
        )
        == 9
    )
