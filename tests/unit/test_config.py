"""Typed configuration: defaults < TOML < env < flags, one-line errors naming field and source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, Settings, describe_fields, load_settings, save_settings


def write_toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gspo.toml"
    p.write_text(text)
    return p


def one_line_error(**kw) -> str:
    with pytest.raises(ConfigError) as ei:
        load_settings(**kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_valid_and_documented():
    s = load_settings(env={})
    assert s == Settings()
    assert (s.run, s.pipeline.group_size, s.pipeline.batch_groups, s.pipeline.max_staleness) == (
        "default",
        8,
        32,
        1,
    )
    assert (s.learner.lr, s.loss.clip_low, s.loss.clip_high, s.redis.url) == (1.5e-4, 3e-4, 4e-4, "")
    assert (s.loss.proximal, s.loss.clip_stale_scale) == ("version", 100.0)
    rows = describe_fields()
    assert ("learner.lr", "0.00015", "AdamW learning rate") in rows
    assert all(text for _, _, text in rows), [name for name, _, text in rows if not text]


def test_precedence_defaults_toml_env_flags(tmp_path):
    cfg = write_toml(
        tmp_path,
        "[learner]\nlr = 1e-3\nmax_steps = 7\n[pipeline]\nbatch_groups = 16\n"
        '[redis]\nurl = "redis://file:1/0"\n',
    )
    only_file = load_settings(cfg, env={})
    assert (only_file.learner.lr, only_file.learner.max_steps, only_file.pipeline.batch_groups) == (
        1e-3,
        7,
        16,
    )
    assert only_file.redis.url == "redis://file:1/0"
    env = {
        "GSPO_LEARNER__LR": "1e-4",
        "GSPO_REDIS_URL": "redis://env:2/0",
        "GSPO_PIPELINE_BATCH_GROUPS": "12",
        "GSPO_RUN": "123",
        "HOME": "/ignored",
        "GSPO_CONFIG": "/also/ignored",
    }
    with_env = load_settings(cfg, env=env)
    assert (with_env.learner.lr, with_env.learner.max_steps, with_env.pipeline.batch_groups) == (1e-4, 7, 12)
    assert (with_env.redis.url, with_env.run) == ("redis://env:2/0", "123")
    flags = load_settings(
        cfg, {"learner.lr": 5e-5, "redis.url": "redis://flag:3/0", "learner.max_steps": None}, env
    )
    assert (flags.learner.lr, flags.learner.max_steps, flags.redis.url) == (5e-5, 7, "redis://flag:3/0")


def test_env_parses_json_lists_and_coerces_scalars():
    s = load_settings(
        env={
            "GSPO_LEARNER__BETAS": "[0.8, 0.95]",
            "GSPO_LEARNER__TENSORBOARD": "true",
            "GSPO_PRODUCER__SAMPLING__TOP_K": "20",
            "GSPO_PRODUCER__PRODUCER_ID": "7",
            "GSPO_REDIS__CA_FILE": "null",
        }
    )
    assert (s.learner.betas, s.learner.tensorboard, s.producer.sampling.top_k) == ((0.8, 0.95), True, 20)
    assert (s.producer.producer_id, s.redis.ca_file) == ("7", None)


def test_gspo_redis_server_env_is_not_a_config_key():
    s = load_settings(env={"GSPO_REDIS_SERVER": "/usr/bin/redis-server"})
    assert s.redis.url == ""


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    cfg = write_toml(tmp_path, "[learner]\nlrr = 1\n")
    msg = one_line_error(config_file=cfg, env={})
    assert "learner.lrr: unknown key" in msg and f"[from {cfg}]" in msg


def test_unknown_key_in_env_names_variable():
    msg = one_line_error(env={"GSPO_LEARNER__WARMUP": "3"})
    assert "learner.warmup: unknown key" in msg and "[from env GSPO_LEARNER__WARMUP]" in msg


def test_unknown_key_in_flags_names_flag():
    msg = one_line_error(overrides={"loss.clip": 0.2}, env={})
    assert "loss.clip: unknown key" in msg and "[from flag --clip]" in msg


def test_unknown_section_in_file(tmp_path):
    msg = one_line_error(config_file=write_toml(tmp_path, "[trainer]\nlr = 1\n"), env={})
    assert "trainer: unknown key" in msg


@pytest.mark.parametrize(
    "overrides,field,text",
    [
        ({"learner.lr": -1.0}, "learner.lr", "greater than 0"),
        ({"pipeline.batch_groups": 0}, "pipeline.batch_groups", "greater than or equal to 1"),
        ({"redis.url": "http://localhost:6379"}, "redis.url", "must start with redis://"),
        ({"run": "a b"}, "run", "is invalid"),
        ({"loss.variant": "ppo"}, "loss.variant", "'gspo', 'gspo_token' or 'grpo'"),
        ({"producer.sampling.top_p": 1.5}, "producer.sampling.top_p", "less than or equal to 1"),
    ],
)
def test_bad_value_names_field_value_and_flag(overrides, field, text):
    msg = one_line_error(overrides=overrides, env={})
    assert msg.startswith(f"invalid config: {field}: ")
    assert text in msg
    assert f"(got {next(iter(overrides.values()))!r})" in msg
    assert f"[from flag --{field.split('.')[-1].replace('_', '-')}]" in msg


def test_bad_value_from_file_names_the_file(tmp_path):
    cfg = write_toml(tmp_path, "[pipeline]\nbatch_groups = 0\n")
    msg = one_line_error(config_file=cfg, env={})
    assert msg.startswith("invalid config: pipeline.batch_groups:") and f"[from {cfg}]" in msg


def test_cross_field_validator_names_both_fields_and_their_sources(tmp_path):
    cfg = write_toml(tmp_path, "[pipeline]\nrollouts_maxlen = 1000\n")
    msg = one_line_error(config_file=cfg, env={"GSPO_PIPELINE__BATCH_GROUPS": "100"})
    # (K + 2) * B * 4 = 3 * 100 * 4
    assert "pipeline.rollouts_maxlen=1000 must be >= 4*(max_staleness+2)*batch_groups=1200" in msg
    assert "env GSPO_PIPELINE__BATCH_GROUPS" in msg and str(cfg) in msg


def test_missing_or_broken_toml_file(tmp_path):
    assert "does not exist" in one_line_error(config_file=tmp_path / "nope.toml", env={})
    assert "is not valid TOML" in one_line_error(config_file=write_toml(tmp_path, "[learner\n"), env={})


def test_redacted_hides_redis_password():
    s = load_settings(overrides={"redis.url": "redis://user:secret@redis.example:6380/2"}, env={})
    assert s.redis.url == "redis://user:secret@redis.example:6380/2"
    red = s.redacted()
    assert red["redis"]["url"] == "redis://user:***@redis.example:6380/2"
    assert "secret" not in json.dumps(red)
    only_pw = load_settings(overrides={"redis.url": "rediss://:hunter2@h:1/0"}, env={}).redacted()
    assert only_pw["redis"]["url"] == "rediss://:***@h:1/0"


def test_save_settings_writes_no_secret_and_reloads(tmp_path):
    s = load_settings(overrides={"redis.url": "redis://user:secret@h:6379/0", "learner.lr": 1e-4}, env={})
    path = tmp_path / "run" / "config.json"
    save_settings(s, path)
    text = path.read_text()
    assert "secret" not in text
    saved = json.loads(text)
    assert saved["redis"]["url"] == "redis://user:***@h:6379/0"
    assert saved["learner"]["lr"] == 1e-4 and saved["learner"]["betas"] == [0.9, 0.999]


def test_the_readme_real_model_example_loads_and_lora_settings_are_checked(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### The learner on a real model", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    s = load_settings(write_toml(tmp_path, block), env={})
    ls = s.learner
    assert (ls.model, ls.precision, ls.gradient_checkpointing, ls.attn_implementation) == (
        "Qwen/Qwen3-0.6B",
        "bf16",
        True,
        "sdpa",
    )
    assert (ls.lora.r, ls.lora.alpha, ls.lora.dropout, ls.lora.target_modules) == (
        16,
        32.0,
        0.0,
        ["all-linear"],
    )
    assert s.producer.attn_implementation == "sdpa"
    assert load_settings(env={"GSPO_LEARNER__LORA__R": "8"}).learner.lora.r == 8
    assert "learner.lora.r" in one_line_error(env={"GSPO_LEARNER__LORA__R": "-1"})
    assert "learner.lora.dropout" in one_line_error(env={"GSPO_LEARNER__LORA__DROPOUT": "1.5"})
    assert "learner.precision" in one_line_error(env={"GSPO_LEARNER__PRECISION": "fp8"})
    assert "learner.lora.rank: unknown key" in one_line_error(env={"GSPO_LEARNER__LORA__RANK": "8"})
    msg = one_line_error(
        env={"GSPO_LEARNER__STATE_DIR": "/x/ckpt", "GSPO_LEARNER__CHECKPOINT_DIR": "/x/ckpt/"}
    )
    assert "learner.state_dir and learner.checkpoint_dir are the same directory" in msg
