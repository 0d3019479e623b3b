"""Fuzzing the decoder: whatever the bytes, decode returns a valid message or raises a WireError."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wire import (
    MESSAGE_TYPES,
    CheckpointAnnouncement,
    DeadLetter,
    Limits,
    ProducerHeartbeat,
    PromptTask,
    RolloutGroup,
    Sample,
    WireError,
    decode,
    encode,
)

FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = Limits(max_message_bytes=1 << 16, max_tokens=64, max_samples=8, max_str_bytes=256, max_meta_items=8)

finite32 = st.floats(min_value=-30.0, max_value=0.0, width=32, allow_nan=False)
finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=12)
ids = st.lists(st.integers(-(2**31), 2**31 - 1), max_size=10)


@st.composite
def samples(draw) -> Sample:
    n = draw(st.integers(0, 10))
    v0 = draw(st.integers(0, 1000))
    return Sample(
        completion_ids=np.array(
            draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)), dtype=np.int32
        ),
        logprobs=np.array(draw(st.lists(finite32, min_size=n, max_size=n)), dtype=np.float32),
        reward=draw(finite),
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
        version_start=v0,
        version_end=v0 + draw(st.integers(0, 3)),
        version_spans=tuple(
            draw(st.lists(st.tuples(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)), max_size=3))
        ),
    )


@st.composite
def groups(draw) -> RolloutGroup:
    return RolloutGroup(
        group_id=draw(st.text(min_size=1, max_size=12)),
        prompt_id=draw(text),
        prompt_ids=np.array(draw(ids), dtype=np.int32),
        task=draw(text),
        producer_id=draw(text),
        model_fingerprint=draw(text),
        samples=tuple(draw(st.lists(samples(), min_size=1, max_size=4))),
        temperature=draw(st.floats(min_value=1e-3, max_value=10)),
        top_p=draw(st.floats(0.0, 1.0)),
        top_k=draw(st.integers(-1, 1000)),
        created_at=draw(finite),
        gen_time_s=draw(st.floats(0, 1e6)),
    )


meta_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    finite,
    text,
    st.lists(st.one_of(st.none(), st.integers(-5, 5), text), max_size=3),
)

any_message = st.one_of(
    groups(),
    st.builds(
        PromptTask,
        task_id=st.text(min_size=1, max_size=8),
        prompt=text,
        task=text,
        meta=st.dictionaries(text, meta_values, max_size=4),
        prompt_ids=ids.map(np.array),
        created_at=finite,
    ),
    st.builds(
        CheckpointAnnouncement,
        step=st.integers(0, 10**6),
        version=st.integers(0, 10**6),
        path=text,
        manifest_sha256=text,
        model_fingerprint=text,
        created_at=finite,
    ),
    st.builds(
        ProducerHeartbeat,
        producer_id=text,
        host=text,
        engine=text,
        version=st.integers(0, 99),
        groups_done=st.integers(0, 99),
        tokens_per_s=finite,
        groups_per_s=finite,
        inflight=st.integers(0, 9),
        state=text,
        started_at=finite,
        updated_at=finite,
    ),
    st.builds(
        DeadLetter,
        source_stream=text,
        entry_id=text,
        reason=text,
        detail=text,
        payload=st.binary(max_size=32),
        consumer=text,
        at=finite,
    ),
)


def decode_or_wire_error(raw: bytes) -> None:
    """The property: a message of a known type, or a WireError; any other exception fails the test."""
    try:
        msg = decode(raw, limits=SMALL)
    except WireError:
        return
    assert type(msg) in MESSAGE_TYPES.values()


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_wire_error(raw):
    decode_or_wire_error(raw)


@st.composite
def mutated(draw) -> bytes:
    raw = bytearray(encode(draw(any_message)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "splice", "byte"]))
        if not raw:
            break
        i = draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            raw[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[i:]
        else:
            other = encode(draw(any_message))
            j = draw(st.integers(0, len(other)))
            raw[i:] = other[j:]
    return bytes(raw)


@FUZZ
@given(mutated())
def test_mutated_messages_decode_or_raise_wire_error(raw):
    decode_or_wire_error(raw)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups())
def test_rollout_groups_round_trip(g):
    back = decode(encode(g))
    assert back == g
    assert all(s.logprobs.dtype == np.float32 and s.completion_ids.dtype == np.int32 for s in back.samples)


@settings(max_examples=200, deadline=None, database=None)
@given(any_message)
def test_every_message_type_round_trips(m):
    assert decode(encode(m), expect=type(m)) == m
