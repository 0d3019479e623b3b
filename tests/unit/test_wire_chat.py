"""The optional wire fields of chat prompts and several rewards: round trips, old messages still decode, and a
typed error for each malformed shape."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common.config import TaskSettings
from common.feeder import task_for
from common.tasks import PromptRow, TaskError
from common.wire import (
    InvalidValue,
    PromptTask,
    RolloutGroup,
    Sample,
    WireError,
    WrongType,
    decode,
    encode,
)

CHAT = (
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "2+2?"}], "name": "u1"},
)


def test_a_chat_task_round_trips_with_its_options_and_rewards():
    task = PromptTask(
        task_id="t-1",
        prompt="",
        task="math_exact",
        meta={"answer": "4"},
        messages=CHAT,
        chat_template_kwargs={"enable_thinking": False},
        rewards=(("correct", "math_verify", 1.0), ("short", "pkg.mod:short", -0.25)),
    )
    back = decode(encode(task), PromptTask)
    assert back == task
    assert back.messages[1]["content"] == [{"type": "text", "text": "2+2?"}]
    assert back.add_special_tokens is None


def test_a_text_task_keeps_add_special_tokens():
    task = PromptTask(task_id="t", prompt="1+1=", task="addition", add_special_tokens=False)
    back = decode(encode(task), PromptTask)
    assert back.add_special_tokens is False and back.messages == () and back.rewards == ()


def test_messages_of_an_older_feeder_decode_with_the_defaults():
    old = {
        "t": "prompt",
        "v": 1,
        "task_id": "t-0",
        "prompt": "12+34=",
        "task": "addition",
        "meta": {"answer": "46"},
        "prompt_ids": b"",
        "created_at": 1.0,
    }
    task = decode(msgpack.packb(old, use_bin_type=True), PromptTask)
    assert (task.prompt, task.messages, task.chat_template_kwargs, task.add_special_tokens, task.rewards) == (
        "12+34=",
        (),
        {},
        None,
        (),
    )
    assert "messages" not in msgpack.unpackb(encode(task))  # and a text task encodes as before


def _raw(**fields) -> bytes:
    body = encode(PromptTask(task_id="t", prompt="", task="addition"))
    d = msgpack.unpackb(body)
    d.update(fields)
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"messages": {"role": "user"}}, WrongType),
        ({"messages": [["user", "hi"]]}, WrongType),
        ({"messages": [{"content": "hi"}]}, WireError),  # no role
        ({"messages": [{"role": "", "content": "hi"}]}, InvalidValue),
        ({"messages": [{"role": "user", "content": 3}]}, WrongType),
        ({"messages": [{"role": "user", "content": [{"text": {"nested": 1}}]}]}, WrongType),
        ({"chat_template_kwargs": ["enable_thinking"]}, WrongType),
        ({"add_special_tokens": 1}, WrongType),
        ({"rewards": [["a", "math_exact"]]}, WrongType),
        ({"rewards": [["a", "math_exact", float("nan")]]}, WireError),
        ({"rewards": [["a", "math_exact", 1.0], ["a", "exact_match", 1.0]]}, InvalidValue),
        ({"rewards": [["", "math_exact", 1.0]]}, InvalidValue),
    ],
)
def test_malformed_optional_fields_are_typed_wire_errors(fields, error):
    with pytest.raises(error):
        decode(_raw(**fields), PromptTask)


def _group(parts: dict | None) -> RolloutGroup:
    s = Sample(np.arange(3), np.full(3, -0.5, np.float32), 1.5, "stop", 0, 0, rewards=parts or {})
    return RolloutGroup("g", "p", np.arange(4), "addition", "prod", "fp", (s, s))


def test_each_rewards_own_score_travels_in_the_sample_and_none_stays_none():
    g = _group({"correct": 1.0, "format": None})
    back = decode(encode(g), RolloutGroup)
    assert back.samples[0].rewards == {"correct": 1.0, "format": None}
    assert back == g


def test_a_sample_without_scores_encodes_and_decodes_as_before():
    g = _group(None)
    raw = encode(g)
    assert "rewards" not in msgpack.unpackb(raw)["samples"][0]
    assert decode(raw, RolloutGroup).samples[0].rewards == {}
    d = msgpack.unpackb(raw)
    d["samples"][0]["rewards"] = {"a": "high"}
    with pytest.raises(WrongType):
        decode(msgpack.packb(d, use_bin_type=True), RolloutGroup)


def row(prompt) -> PromptRow:
    return PromptRow("r-1", prompt, "math_exact", {"answer": "4"})


def test_task_for_puts_chat_messages_the_system_prompt_and_the_rewards_on_the_task():
    settings = TaskSettings(
        system_prompt="Think, then answer.",
        chat_template_kwargs={"enable_thinking": False},
        rewards=[{"function": "math_verify", "weight": 2.0}, {"function": "exact_match", "name": "exact"}],
    )
    task = task_for(row([{"role": "user", "content": "2+2?"}]), "id-1", settings)
    assert task.prompt == ""
    assert task.messages == (
        {"role": "system", "content": "Think, then answer."},
        {"role": "user", "content": "2+2?"},
    )
    assert task.chat_template_kwargs == {"enable_thinking": False}
    assert task.rewards == (("math_verify", "math_verify", 2.0), ("exact", "exact_match", 1.0))
    assert task.meta == {"answer": "4", "prompt_id": "r-1"}
    own = task_for(
        row([{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]), "i", settings
    )
    assert [m["content"] for m in own.messages] == ["mine", "q"]  # a row's own system message is kept
    assert decode(encode(task), PromptTask) == task


def test_task_for_a_string_prompt():
    task = task_for(row("2+2="), "id-2", TaskSettings(add_special_tokens=False))
    assert (task.prompt, task.messages, task.add_special_tokens, task.rewards) == ("2+2=", (), False, ())
    with pytest.raises(TaskError, match="system_prompt applies to chat prompts"):
        task_for(row("2+2="), "id-3", TaskSettings(system_prompt="be brief"))
