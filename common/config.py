"""Typed configuration: defaults < TOML file (``--config``) < environment (``GSPO_...``) < CLI flags.

Every field is documented and bounded; unknown keys are refused (``extra="forbid"``). A bad key or
value becomes one :class:`ConfigError` line that names the field, the value and where it came from.

Environment variables: ``GSPO_<SECTION>__<FIELD>`` (e.g. ``GSPO_LEARNER__LR=1e-4``) or, for brevity,
``GSPO_<SECTION>_<FIELD>`` when unambiguous (``GSPO_REDIS_URL``); root fields are ``GSPO_RUN``,
``GSPO_RUN_DIR``. Values that are JSON lists, maps or null are parsed; other values are strings coerced
by the field's type (``GSPO_LEARNER__LR=1e-4`` -> 0.0001).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.keys import validate_run_name


class ConfigError(ValueError):
    """A configuration problem, stated in one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RedisSettings(_Section):
    url: str = Field(
        "",
        description="redis:// or rediss:// URL (user:password@ allowed); empty = embedded server in the run dir",
    )
    ca_file: str | None = Field(None, description="CA bundle for rediss:// (TLS)")
    cert_file: str | None = Field(None, description="client certificate for mutual TLS")
    key_file: str | None = Field(None, description="client key for mutual TLS")
    retry_for_s: float = Field(
        120.0, ge=0, le=86_400, description="keep retrying a lost connection this long before failing"
    )
    socket_timeout_s: float = Field(
        30.0, gt=1, le=600, description="socket timeout; blocking reads use less than this"
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class SamplingSettings(_Section):
    temperature: float = Field(
        1.0, gt=0, le=10, description="sampling temperature (behaviour log-probs include it)"
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="nucleus sampling; 1 = off (recommended for RL: log-probs stay exact)"
    )
    top_k: int = Field(-1, ge=-1, description="top-k sampling; -1 = off")
    max_new_tokens: int = Field(16, ge=1, le=131_072, description="completion length cap")
    stop: list[str] = Field(
        default_factory=list,
        description="stop strings: a completion ends with the token that completes one (finish_reason 'stop'); the reward sees the text before it",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list,
        description="extra token ids that end a completion (kept, like EOS), besides the model's EOS",
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("token ids must be >= 0")
        return v


class PipelineSettings(_Section):
    group_size: int = Field(8, ge=2, le=1024, description="G: completions per prompt")
    batch_groups: int = Field(32, ge=1, le=100_000, description="B: groups per learner step")
    max_staleness: int = Field(
        1,
        ge=0,
        le=1000,
        description="K: max policy versions between generation and training (0 = synchronous)",
    )
    prefill_min_groups: int = Field(
        8, ge=1, description="groups producers may make before any learner version exists"
    )
    rollouts_maxlen: int = Field(
        200_000,
        ge=1000,
        description="approximate cap of the rollouts stream (safety net; admission control bounds it first)",
    )
    prompts_maxlen: int = Field(200_000, ge=1000, description="approximate cap of the prompts stream")
    dead_maxlen: int = Field(10_000, ge=100, description="approximate cap of the dead-letter stream")

    @model_validator(mode="after")
    def _maxlen_covers_backlog(self) -> PipelineSettings:
        need = (self.max_staleness + 2) * self.batch_groups
        if self.rollouts_maxlen < 4 * need:
            raise ValueError(
                f"pipeline.rollouts_maxlen={self.rollouts_maxlen} must be >= 4*(max_staleness+2)*batch_groups={4 * need}"
            )
        return self


class ProducerSettings(_Section):
    engine: Literal["transformers", "sglang"] = Field("transformers", description="inference engine")
    model: str = Field(
        "",
        description="HF model directory or hub id (local cache only) the engine starts from (default: the run's base model)",
    )
    sglang_url: str = Field("http://127.0.0.1:30000", description="SGLang server base URL (engine=sglang)")
    sglang_timeout_s: float = Field(600.0, gt=0, description="HTTP timeout of one /generate call")
    router_url: str | None = Field(None, description="sglang-router URL to register the SGLang server with")
    reload_mode: Literal["finish", "abort"] = Field(
        "finish",
        description="on new weights: let in-flight requests finish on old weights (versions recorded) or abort and resubmit",
    )
    producer_id: str = Field("", description="unique id; empty = hostname-pid")
    prompts_per_call: int = Field(8, ge=1, le=4096, description="prompts batched into one engine call")
    max_prompt_tokens: int = Field(
        0,
        ge=0,
        description="longest prompt in tokens; longer ones are dead-lettered as prompt_too_long (0 = only the context length, prompt + max_new_tokens, limits)",
    )
    device: str = Field("cpu", description="torch device of the transformers engine")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="transformers engine dtype"
    )
    attn_implementation: str = Field(
        "sdpa",
        pattern=r"^[A-Za-z0-9_./:-]+$",
        description="transformers engine attention (sdpa, eager, flash_attention_2, ...); the decode loop needs sdpa or eager",
    )
    seed: int = Field(0, ge=0, description="sampling seed (mixed with producer id)")
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads (0 = torch default)")
    heartbeat_ttl_s: float = Field(15.0, gt=1, le=3600, description="heartbeat key TTL")
    claim_idle_ms: int = Field(
        60_000, ge=100, description="reclaim prompts pending longer than this from dead producers"
    )
    max_groups: int = Field(0, ge=0, description="stop after this many groups (0 = run until stopped)")
    cache_dir: str = Field(
        "", description="local cache of downloaded checkpoints; default RUN_DIR/checkpoint-cache"
    )
    reward_timeout_s: float = Field(
        300.0,
        gt=0,
        description="one reward call (one prompt's G completions) longer than this dead-letters the prompt as reward_error",
    )
    reward_threads: int = Field(
        8, ge=1, le=1024, description="threads that run reward functions (off the producer's event loop)"
    )
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)


_REWARD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
RESERVED_REWARD_NAMES = ("mean", "std")  # reward/mean and reward/std are the weighted total's metrics


class RewardSettings(_Section):
    function: str = Field(
        ..., description="a registered reward name (math_verify, ...) or 'package.module:function'"
    )
    name: str = Field("", description="metric name (reward/<name>); default: the function's name")
    weight: float = Field(1.0, description="weight in the total reward (sum of weight x score)")

    @field_validator("function")
    @classmethod
    def _function(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a reward function")
        return v.strip()

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @model_validator(mode="after")
    def _default_name(self) -> RewardSettings:
        if not self.name:
            self.name = self.function.rpartition(":")[2].rpartition(".")[2] or self.function
        if not _REWARD_NAME.match(self.name) or self.name in RESERVED_REWARD_NAMES:
            raise ValueError(
                f"reward name {self.name!r}: use letters, digits, '_', '.', '-' (not {' or '.join(RESERVED_REWARD_NAMES)})"
            )
        return self


class TaskSettings(_Section):
    system_prompt: str = Field(
        "", description="system message put before chat prompts that have none ('' = none)"
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra arguments of the chat template, e.g. {enable_thinking = false} for Qwen3",
    )
    add_special_tokens: bool | None = Field(
        None,
        description="string prompts: add the tokenizer's special tokens (BOS ...); None = as the tokenizer does by default",
    )
    rewards: list[RewardSettings] = Field(
        default_factory=list,
        description="rewards of every prompt, [{function, name, weight}, ...], summed with their weights; [] = each row's own task (reward) alone",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> TaskSettings:
        names = [r.name for r in self.rewards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task.rewards: reward names must be unique, {dup} repeated (set name=)")
        return self


class LossSettings(_Section):
    variant: Literal["gspo", "gspo_token", "grpo"] = Field(
        "gspo", description="objective (docs/objective.md)"
    )
    clip_low: float = Field(
        3e-4, gt=0, lt=1, description="ε_low of the sequence-ratio band (GSPO paper: 3e-4; GRPO: 0.2)"
    )
    clip_high: float = Field(4e-4, gt=0, le=10, description="ε_high (GSPO paper: 4e-4; GRPO: 0.27)")
    clip_stale_scale: float = Field(
        100.0,
        ge=0,
        le=1000,
        description="band widens by (1 + scale·k) for staleness k (100: ε(1) ≈ 0.03, one update's drift; README, Staleness)",
    )
    is_mode: Literal["truncate", "mask", "none"] = Field(
        "truncate", description="behaviour correction of stale data"
    )
    is_level: Literal["geometric", "sequence", "token"] = Field(
        "geometric",
        description="behaviour weight of the GSPO variants: length-normalised sequence ratio, full sequence likelihood ratio, or per token (TIS)",
    )
    is_cap: float = Field(2.0, ge=1, description="C(0): cap of the behaviour importance weight")
    is_cap_decay: float = Field(1.0, gt=0, le=1, description="C(k) = is_cap · is_cap_decay^k")
    proximal: Literal["recompute", "version", "behaviour"] = Field(
        "version",
        description="anchor of the ratio: the learner's weights before this update (recompute), the learner's own copy of the weights that generated each sample (version), or the engine's log-probs (behaviour)",
    )


class LoraSettings(_Section):
    r: int = Field(
        0, ge=0, le=4096, description="LoRA rank; 0 = full fine-tuning (LoRA needs the 'lora' extra: peft)"
    )
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="LoRA dropout (training forward only; the proximal pass then covers every mini-batch)",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="module names (or suffixes) that get adapters; ['all-linear'] = every linear layer but the LM head",
    )


class LearnerSettings(_Section):
    model: str = Field(
        "",
        description="HF model directory or hub id (local cache only) to start from (a LoRA run's base, also on resume)",
    )
    attn_implementation: str = Field(
        "sdpa", pattern=r"^[A-Za-z0-9_./:-]+$", description="attention (sdpa, eager, flash_attention_2, ...)"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="compute precision: bf16 = autocast to bfloat16 (and bf16 parameter gathers of a sharded model), with fp32 master weights, gradient reduction and AdamW state",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward instead of keeping them",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    cpu_offload: bool = Field(
        False,
        description="keep each rank's shard of the parameters, gradients and AdamW state in CPU memory (FSDP2 CPUOffloadPolicy); the optimizer step runs on the CPU",
    )
    shard: Literal["auto", "always"] = Field(
        "auto",
        description="FSDP2 sharding of the full weights: auto = only with more than one rank or cpu_offload (one rank trains the plain module), always = also one rank, over a process group of one; a LoRA model is never sharded",
    )
    lr: float = Field(1.5e-4, gt=0, le=1, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up steps")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="LR schedule after warm-up"
    )
    grad_clip: float = Field(1.0, gt=0, description="max global grad norm")
    n_minibatches: int = Field(
        2,
        ge=1,
        le=64,
        description="optimizer steps per batch (the paper uses 4); >= 2 gives the clip band something to act on (README: staleness ablation)",
    )
    micro_batch_tokens: int = Field(4096, ge=64, description="packed tokens per forward/backward chunk")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty to the initial model (0 = off)")
    truncated: Literal["score", "zero", "mask"] = Field(
        "score",
        description="completions cut at max_new_tokens (finish_reason 'length'): score as the reward says, reward 0, or mask from the loss (DAPO / TRL mask_truncated_completions)",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="skip the forward/backward of sequences whose advantage is exactly 0 (kept in the loss denominator: same gradients; only with kl_coef = 0)",
    )
    reuse_engine_logprobs: bool = Field(
        True,
        description="loss.proximal = version: a sample generated by one weight version whose engine computed its log-probs the way the learner does (same transformers numerics: fp32, no LoRA, one rank) takes them as its anchor instead of a no-grad pass (equal to float rounding)",
    )
    max_steps: int = Field(0, ge=0, description="stop after this many steps (0 = run until stopped)")
    publish_every: int = Field(1, ge=1, description="publish a checkpoint every N steps")
    keep_checkpoints: int = Field(3, ge=1, description="published checkpoints kept on disk")
    checkpoint_dir: str = Field(
        "", description="root of the published checkpoints producers load (default: RUN_DIR/checkpoints)"
    )
    state_dir: str = Field(
        "",
        description="learner-private root of the optimizer, scheduler, RNG, counters and LoRA adapters of each step (default: RUN_DIR/learner-state)",
    )
    checkpoint_url: str = Field(
        "",
        description="fsspec URL (s3://bucket/prefix, gs://..., file:///shared/...) to upload published checkpoints to; producers download from it; '' = announce the local path",
    )
    wait_log_s: float = Field(
        30.0, gt=0, description="say that the learner is waiting for rollouts every N seconds"
    )
    seed: int = Field(0, ge=0, description="torch seed")
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads (0 = torch default)")
    dataset: str = Field(
        "addition",
        description="prompt source the learner keeps queued: 'addition', a JSONL or Parquet path, or hf:NAME_OR_DIR, with ?split=&columns=&task=&shuffle= options (README: bring your own model and task); '' = none",
    )
    prompts_ahead: int = Field(4, ge=1, description="keep this many batches' worth of prompts queued")
    tensorboard: bool = Field(False, description="also write TensorBoard events (when installed)")
    report_to: list[Literal["wandb", "mlflow", "trackio", "tensorboard"]] = Field(
        default_factory=list,
        description="experiment trackers that get every step's metrics and the sample completions (extras: pip install 'gspo-pipeline[wandb]' ...)",
    )
    report_project: str = Field(
        "gspo",
        description="tracker project (W&B, trackio) or experiment (MLflow); the run is named after `run`",
    )
    samples_every: int = Field(
        10,
        ge=0,
        description="write sample completions to RUN_DIR/samples.jsonl (and the trackers) every N steps (0 = off)",
    )
    samples_groups: int = Field(2, ge=1, description="groups (all their completions) in each sample")
    eval_dataset: str = Field(
        "",
        description="evaluation prompts (a dataset spec like learner.dataset; hf: sources read split 'test' unless ?split=); '' = no eval",
    )
    eval_every: int = Field(0, ge=0, description="enqueue the eval prompts every N steps (0 = never)")
    eval_prompts: int = Field(0, ge=0, description="first N eval prompts only (0 = all)")

    @model_validator(mode="after")
    def _eval_pair(self) -> LearnerSettings:
        if bool(self.eval_dataset) != bool(self.eval_every):
            raise ValueError(
                "learner.eval_dataset and learner.eval_every go together: set both (a dataset and every N "
                "steps) or neither"
            )
        return self


class Settings(_Section):
    run: str = Field("default", description="run id: namespaces every Redis key (gspo:{run}:...)")
    run_dir: str = Field(
        "runs/default", description="directory for metrics, checkpoints, logs, embedded Redis"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port (0 = off)")
    redis: RedisSettings = Field(default_factory=RedisSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    loss: LossSettings = Field(default_factory=LossSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)

    @field_validator("run")
    @classmethod
    def _run(cls, v: str) -> str:
        return validate_run_name(v)

    @model_validator(mode="after")
    def _publish_within_staleness(self) -> Settings:
        # producers generate with the last published weights; a group the learner needs for the step before the
        # next publish is (publish_every - 1) versions behind, so admission control would refuse it forever
        k, every = self.pipeline.max_staleness, self.learner.publish_every
        if every > k + 1:
            raise ValueError(
                f"learner.publish_every={every} must be <= pipeline.max_staleness + 1 = {k + 1}: producers would "
                f"hold weights too stale to generate anything admissible and the run would stall"
            )
        return self

    @model_validator(mode="after")
    def _state_apart_from_checkpoints(self) -> Settings:
        # both hold step_XXXXXXXX/ dirs: in one directory the published and the private halves would collide
        run_dir = Path(self.run_dir)
        published = Path(self.learner.checkpoint_dir or run_dir / "checkpoints").resolve()
        private = Path(self.learner.state_dir or run_dir / "learner-state").resolve()
        if published == private:
            raise ValueError(
                f"learner.state_dir and learner.checkpoint_dir are the same directory ({published}): the learner's "
                f"private state must be kept apart from the checkpoints producers load"
            )
        return self

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able data with credentials removed (safe to log and save)."""
        from common.redis_conn import redact_url

        d = self.model_dump(mode="json")
        d["redis"]["url"] = redact_url(d["redis"]["url"])
        return d


SECTIONS = ("redis", "pipeline", "producer", "learner", "loss", "task")


# --------------------------------------------------------------------------- loading
def _set_path(tree: dict, path: tuple[str, ...], value: Any, origin: str, origins: dict) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {'.'.join(path)} ({origin}): {part} is not a section")
    node[path[-1]] = value
    origins[path] = origin


def _flatten(d: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, prefix + (k,))
        else:
            out.append((prefix + (k,), v))
    return out


def _env_path(name: str) -> tuple[str, ...]:
    rest = name[len("GSPO_") :].lower()
    if "__" in rest:
        return tuple(rest.split("__"))
    if rest in Settings.model_fields:
        return (rest,)
    for section in SECTIONS:
        if rest.startswith(section + "_"):
            return (section, rest[len(section) + 1 :])
    return (rest,)


def _env_value(raw: str) -> Any:
    """JSON lists/maps/null are parsed (``[0.9, 0.99]``); scalars stay strings for pydantic to coerce,
    so ``GSPO_RUN=123`` is the run "123", not an int rejected by a str field."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw
    return parsed if parsed is None or isinstance(parsed, (list, dict)) else raw


def _origin_of(loc: tuple[str, ...], origins: dict) -> str:
    """Where the value at ``loc`` came from; for a section-level (cross-field) error, every source under it."""
    for i in range(len(loc), 0, -1):
        if loc[:i] in origins:
            return origins[loc[:i]]
    below = sorted({o for p, o in origins.items() if p[: len(loc)] == loc and len(p) > len(loc)})
    return ", ".join(below) if below else "default"


def _format_error(err: ValidationError, origins: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        where = _origin_of(loc, origins)
        name = ".".join(loc) or "config"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        if e["type"] == "value_error" and not loc:  # a cross-section rule: its message names the fields
            lines.append(f"{msg.removeprefix('Value error, ')} [from {where}]")
            continue
        lines.append(f"{name}: {msg}{got} [from {where}]")
    return "invalid config: " + "; ".join(lines)


def load_settings(
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Resolve the configuration; ``overrides`` maps dotted names (``"learner.lr"``) to flag values."""
    tree: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for p, v in _flatten(data):
            _set_path(tree, p, v, f"{path}", origins)
    environ = os.environ if env is None else env
    for name in sorted(environ):
        if name.startswith("GSPO_") and name not in _ENV_IGNORED:
            _set_path(tree, _env_path(name), _env_value(environ[name]), f"env {name}", origins)
    for dotted, v in (overrides or {}).items():
        if v is not None:
            _set_path(
                tree,
                tuple(dotted.split(".")),
                v,
                f"flag --{dotted.split('.')[-1].replace('_', '-')}",
                origins,
            )
    try:
        return Settings.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origins)) from None


# variables read by the CLI itself, not config fields
_ENV_IGNORED = {
    "GSPO_CONFIG",
    "GSPO_REDIS_SERVER",
    "GSPO_SOAK_S",
}  # REDIS_SERVER: find_redis_server; SOAK_S: tests/chaos


def save_settings(settings: Settings, path: Path) -> None:
    """Write the resolved config (credentials redacted) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings.redacted(), indent=2, sort_keys=True) + "\n")


def describe_fields(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) of every field, for ``gspo config show --doc`` and the README."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, f"{prefix}{name}.")
        else:
            default = f.default if f.default_factory is None else f.default_factory()
            rows.append((f"{prefix}{name}", repr(default), f.description or ""))
    return rows
