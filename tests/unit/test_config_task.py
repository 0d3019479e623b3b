"""The config keys of a user's task: the task section (TOML tables, environment JSON), rewards' names and weights,
stop strings, the eval pair and trackers; each bad value is one line naming the key."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_settings

TOML = """
[producer.sampling]
stop = ["</answer>", "\\n\\n"]
stop_token_ids = [7]

[learner]
eval_dataset = "data/eval.jsonl"
eval_every = 5
report_to = ["wandb", "tensorboard"]

[task]
system_prompt = "Think, then answer."
chat_template_kwargs = { enable_thinking = false }

[[task.rewards]]
function = "math_verify"
name = "correct"

[[task.rewards]]
function = "my_rewards:fmt"
weight = -0.5
"""


def test_the_task_section_from_toml(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(TOML)
    s = load_settings(cfg, env={})
    assert s.producer.sampling.stop == ["</answer>", "\n\n"] and s.producer.sampling.stop_token_ids == [7]
    assert (s.learner.eval_dataset, s.learner.eval_every, s.learner.report_to) == (
        "data/eval.jsonl",
        5,
        ["wandb", "tensorboard"],
    )
    assert s.task.system_prompt == "Think, then answer."
    assert s.task.chat_template_kwargs == {"enable_thinking": False}
    assert [(r.name, r.function, r.weight) for r in s.task.rewards] == [
        ("correct", "math_verify", 1.0),
        ("fmt", "my_rewards:fmt", -0.5),  # the name defaults to the function's
    ]


def test_the_task_section_from_the_environment():
    env = {
        "GSPO_TASK__REWARDS": '[{"function": "pkg.rewards:judge", "weight": 2}]',
        "GSPO_TASK__CHAT_TEMPLATE_KWARGS": '{"enable_thinking": true}',
        "GSPO_PRODUCER__SAMPLING__STOP": '["###"]',
        "GSPO_LEARNER__REPORT_TO": '["mlflow"]',
    }
    s = load_settings(env=env)
    assert [(r.name, r.weight) for r in s.task.rewards] == [("judge", 2.0)]
    assert s.task.chat_template_kwargs == {"enable_thinking": True}
    assert s.producer.sampling.stop == ["###"] and s.learner.report_to == ["mlflow"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"task.rewards": [{"function": "a:mean"}]}, "reward name 'mean'"),
        ({"task.rewards": [{"function": "x", "name": "bad name"}]}, "reward name 'bad name'"),
        ({"task.rewards": [{"function": "a:f"}, {"function": "b:f"}]}, "reward names must be unique, ['f']"),
        ({"task.rewards": [{"function": " "}]}, "must name a reward function"),
        ({"task.rewards": [{"function": "x", "weight": float("inf")}]}, "must be finite"),
        ({"task.rewards": [{"name": "x"}]}, "task.rewards.0.function: Field required"),
        ({"producer.sampling.stop": [""]}, "stop strings must not be empty"),
        ({"producer.sampling.stop_token_ids": [-1]}, "token ids must be >= 0"),
        ({"learner.eval_every": 5}, "learner.eval_dataset and learner.eval_every go together"),
        ({"learner.eval_dataset": "e.jsonl"}, "learner.eval_dataset and learner.eval_every go together"),
        ({"learner.report_to": ["neptune"]}, "learner.report_to.0"),
        ({"producer.reward_timeout_s": 0}, "producer.reward_timeout_s"),
    ],
)
def test_bad_task_values_are_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(overrides=overrides, env={})
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
