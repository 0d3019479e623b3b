"""msgpack wire format: every message the services exchange (docs/architecture.md, "Wire format").

Encoding is a msgpack map ``{"t": <type tag>, "v": WIRE_VERSION, ...fields}``. Token ids travel as
little-endian int32 bytes and log-probs as little-endian float32 bytes (numpy ``tobytes`` /
``frombuffer`` with an explicit dtype), never as lists of Python numbers.

Decoding is strict and bounded: the msgpack unpacker gets hard size limits before it allocates
anything; then every field is checked for presence, type, finiteness and length. Any violation
raises a subclass of :class:`WireError`, which the services turn into a dead letter. No pickle,
no msgpack ext types.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import numpy as np

WIRE_VERSION = 1
_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")
FINISH_REASONS = ("stop", "length", "abort")


# --------------------------------------------------------------------------- errors
class WireError(ValueError):
    """Base of every decode error; ``reason`` is a short machine-readable class name."""

    reason = "wire_error"


class MalformedMessage(WireError):
    reason = "malformed"


class UnsupportedVersion(WireError):
    reason = "unsupported_version"


class WrongMessageType(WireError):
    reason = "wrong_message_type"


class MissingField(WireError):
    reason = "missing_field"


class WrongType(WireError):
    reason = "wrong_type"


class NonFiniteValue(WireError):
    reason = "non_finite"


class LengthMismatch(WireError):
    reason = "length_mismatch"


class TooLarge(WireError):
    reason = "too_large"


class InvalidValue(WireError):
    reason = "invalid_value"


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced while decoding (allocation never exceeds these)."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_tokens: int = 131_072  # per prompt or completion
    max_samples: int = 1024  # per group
    max_str_bytes: int = 1024 * 1024
    max_meta_items: int = 256


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------- arrays
def pack_i32(values: Any) -> bytes:
    if isinstance(values, np.ndarray) and values.dtype == _I32 and values.ndim == 1:
        return values.tobytes()  # already the wire dtype: one copy, no range check needed
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("token ids must be one-dimensional")
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise ValueError("token id out of int32 range")
    return arr.astype(_I32).tobytes()


def pack_f32(values: Any) -> bytes:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError("log-probs must be one-dimensional")
    return arr.astype(_F32, copy=False).tobytes()


def _unpack_array(name: str, raw: Any, dtype: np.dtype, limits: Limits) -> np.ndarray:
    if not isinstance(raw, (bytes, bytearray)):
        raise WrongType(f"field {name!r}: expected bytes, got {type(raw).__name__}")
    if len(raw) % dtype.itemsize:
        raise MalformedMessage(f"field {name!r}: {len(raw)} bytes is not a multiple of {dtype.itemsize}")
    n = len(raw) // dtype.itemsize
    if n > limits.max_tokens:
        raise TooLarge(f"field {name!r}: {n} elements exceeds max_tokens={limits.max_tokens}")
    arr = np.frombuffer(raw, dtype=dtype)  # read-only view, no copy
    if dtype.kind == "f" and not np.isfinite(arr.sum(dtype=np.float64)) and not np.isfinite(arr).all():
        # one cheap reduction first: a finite sum of float32 values in float64 proves all are finite
        raise NonFiniteValue(f"field {name!r}: contains NaN or inf")
    return arr


# --------------------------------------------------------------------------- field checks
def _check_str(name: str, v: Any, limits: Limits) -> str:
    if not isinstance(v, str):
        raise WrongType(f"field {name!r}: expected str, got {type(v).__name__}")
    if len(v) > limits.max_str_bytes:
        raise TooLarge(f"field {name!r}: string of {len(v)} characters")
    return v


def _check_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise WrongType(f"field {name!r}: expected int, got {type(v).__name__}")
    return v


def _check_float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WrongType(f"field {name!r}: expected float, got {type(v).__name__}")
    if not math.isfinite(v):
        raise NonFiniteValue(f"field {name!r}: {v} is not finite")
    return float(v)


def _check_scalar(name: str, v: Any, limits: Limits) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return _check_str(name, v, limits) if isinstance(v, str) else v
    if isinstance(v, float):
        return _check_float(name, v)
    if isinstance(v, list):
        if len(v) > limits.max_meta_items:
            raise TooLarge(f"field {name!r}: list of {len(v)} items")
        return [_check_scalar(f"{name}[]", x, limits) for x in v]
    raise WrongType(f"field {name!r}: unsupported value type {type(v).__name__}")


def _check_meta(name: str, v: Any, limits: Limits) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise WrongType(f"field {name!r}: expected map, got {type(v).__name__}")
    if len(v) > limits.max_meta_items:
        raise TooLarge(f"field {name!r}: {len(v)} items exceeds {limits.max_meta_items}")
    return {
        _check_str(f"{name} key", k, limits): _check_scalar(f"{name}.{k}", x, limits) for k, x in v.items()
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def _value_eq(self: Any, other: Any) -> bool:
    """Field-wise equality that compares numpy arrays by value (the generated ``__eq__`` raises on them)."""
    if other.__class__ is not self.__class__:
        return NotImplemented
    return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


def _require(d: dict, name: str) -> Any:
    if name not in d:
        raise MissingField(f"missing field {name!r}")
    return d[name]


# --------------------------------------------------------------------------- messages
def _check_messages(name: str, v: Any, limits: Limits) -> tuple[dict[str, Any], ...]:
    """Chat messages: a list of maps with a non-empty string ``role`` and a ``content`` that is a string or a
    list of parts (maps of scalars, e.g. ``{"type": "text", "text": ...}``); other keys hold scalars."""
    if not isinstance(v, list):
        raise WrongType(f"field {name!r}: expected a list of messages, got {type(v).__name__}")
    if len(v) > limits.max_meta_items:
        raise TooLarge(f"field {name!r}: {len(v)} messages exceeds {limits.max_meta_items}")
    out = []
    for k, m in enumerate(v):
        where = f"{name}[{k}]"
        if not isinstance(m, dict):
            raise WrongType(f"field {where!r}: expected a map, got {type(m).__name__}")
        role = _check_str(f"{where}.role", _require(m, "role"), limits)
        if not role:
            raise InvalidValue(f"field {where!r}: empty role")
        content = _require(m, "content")
        if isinstance(content, list):
            if len(content) > limits.max_meta_items:
                raise TooLarge(f"field {where}.content: {len(content)} parts")
            content = [_check_meta(f"{where}.content[]", part, limits) for part in content]
        else:
            content = _check_str(f"{where}.content", content, limits)
        rest = {key: x for key, x in m.items() if key not in ("role", "content")}
        out.append({**_check_meta(where, rest, limits), "role": role, "content": content})
    return tuple(out)


def _check_rewards(name: str, v: Any, limits: Limits) -> tuple[tuple[str, str, float], ...]:
    """``[[name, function, weight], ...]``: names unique and non-empty, weights finite."""
    if not isinstance(v, list):
        raise WrongType(f"field {name!r}: expected a list of [name, function, weight]")
    if len(v) > limits.max_meta_items:
        raise TooLarge(f"field {name!r}: {len(v)} rewards")
    out = []
    for r in v:
        if not isinstance(r, list) or len(r) != 3:
            raise WrongType(f"field {name!r}: each reward is [name, function, weight]")
        label = _check_str(f"{name}[].name", r[0], limits)
        fn = _check_str(f"{name}[].function", r[1], limits)
        if not label or not fn:
            raise InvalidValue(f"field {name!r}: empty reward name or function")
        out.append((label, fn, _check_float(f"{name}[].weight", r[2])))
    if len({r[0] for r in out}) != len(out):
        raise InvalidValue(f"field {name!r}: reward names repeat")
    return tuple(out)


@dataclass(frozen=True)
class PromptTask:
    """One prompt to be sampled ``group_size`` times. ``task_id`` becomes the group id (idempotency key).

    The prompt is either ``prompt`` (text, tokenised as is; ``add_special_tokens``: None = the tokenizer's
    default) or, when ``messages`` is not empty, chat messages that the producer renders with its tokenizer's
    chat template (``add_generation_prompt=True`` and ``chat_template_kwargs``); ``prompt`` is then "".
    ``rewards`` (``(name, function, weight)``) replaces the single reward ``task`` when not empty. Every field
    after ``created_at`` is optional on the wire (messages from older feeders decode with the defaults)."""

    TAG: ClassVar[str] = "prompt"
    task_id: str
    prompt: str
    task: str  # reward function name or "module:function"
    meta: dict[str, Any] = field(default_factory=dict)  # fields the reward needs, e.g. {"answer": "42"}
    prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=_I32))  # optional pre-tokenized
    created_at: float = field(default_factory=time.time)
    messages: tuple[dict[str, Any], ...] = ()  # chat prompt (TRL's conversational format)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_special_tokens: bool | None = None  # text prompts only
    rewards: tuple[tuple[str, str, float], ...] = ()  # (name, function, weight); () = the reward ``task``
    __eq__ = _value_eq

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "task_id": self.task_id,
            "prompt": self.prompt,
            "task": self.task,
            "meta": self.meta,
            "prompt_ids": pack_i32(self.prompt_ids),
            "created_at": float(self.created_at),
        }
        if self.messages:
            d["messages"] = [dict(m) for m in self.messages]
        if self.chat_template_kwargs:
            d["chat_template_kwargs"] = dict(self.chat_template_kwargs)
        if self.add_special_tokens is not None:
            d["add_special_tokens"] = bool(self.add_special_tokens)
        if self.rewards:
            d["rewards"] = [[n, f, float(w)] for n, f, w in self.rewards]
        return d

    @classmethod
    def from_dict(cls, d: dict, limits: Limits) -> PromptTask:
        task_id = _check_str("task_id", _require(d, "task_id"), limits)
        if not task_id:
            raise InvalidValue("field 'task_id' is empty")
        special = d.get("add_special_tokens")
        if special is not None and not isinstance(special, bool):
            raise WrongType(f"field 'add_special_tokens': expected bool, got {type(special).__name__}")
        return cls(
            task_id=task_id,
            prompt=_check_str("prompt", _require(d, "prompt"), limits),
            task=_check_str("task", _require(d, "task"), limits),
            meta=_check_meta("meta", _require(d, "meta"), limits),
            prompt_ids=_unpack_array("prompt_ids", _require(d, "prompt_ids"), _I32, limits),
            created_at=_check_float("created_at", _require(d, "created_at")),
            messages=_check_messages("messages", d.get("messages", []), limits),
            chat_template_kwargs=_check_meta(
                "chat_template_kwargs", d.get("chat_template_kwargs", {}), limits
            ),
            add_special_tokens=special,
            rewards=_check_rewards("rewards", d.get("rewards", []), limits),
        )


@dataclass(frozen=True)
class Sample:
    """One completion of a group, with the behaviour policy's per-token log-probs."""

    completion_ids: np.ndarray  # (L,) int32
    logprobs: np.ndarray  # (L,) float32, log-prob of each sampled token under the sampled-from distribution
    reward: float
    finish_reason: str  # "stop" | "length" | "abort"
    version_start: int  # weight version that produced the first token
    version_end: int  # weight version that produced the last token
    version_spans: tuple[
        tuple[int, int, int], ...
    ] = ()  # (version, start, end) token spans when weights changed
    # each reward's own score (before its weight; None: it does not apply to this sample) when the task has
    # several; ``reward`` is their weighted sum. Optional on the wire.
    rewards: dict[str, float | None] = field(default_factory=dict)
    __eq__ = _value_eq

    def to_dict(self) -> dict[str, Any]:
        d = {
            "completion_ids": pack_i32(self.completion_ids),
            "logprobs": pack_f32(self.logprobs),
            "reward": float(self.reward),
            "finish_reason": self.finish_reason,
            "version_start": int(self.version_start),
            "version_end": int(self.version_end),
            "version_spans": [list(s) for s in self.version_spans],
        }
        if self.rewards:
            d["rewards"] = {k: (None if v is None else float(v)) for k, v in self.rewards.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, limits: Limits) -> Sample:
        if not isinstance(d, dict):
            raise WrongType(f"sample: expected map, got {type(d).__name__}")
        ids = _unpack_array("completion_ids", _require(d, "completion_ids"), _I32, limits)
        lps = _unpack_array("logprobs", _require(d, "logprobs"), _F32, limits)
        if ids.shape != lps.shape:
            raise LengthMismatch(f"sample has {ids.size} completion tokens but {lps.size} log-probs")
        if lps.size and lps.max() > 1e-3:
            raise InvalidValue(f"sample log-prob {float(lps.max()):.4g} > 0")
        reason = _check_str("finish_reason", _require(d, "finish_reason"), limits)
        if reason not in FINISH_REASONS:
            raise InvalidValue(f"finish_reason {reason!r} not in {FINISH_REASONS}")
        v0 = _check_int("version_start", _require(d, "version_start"))
        v1 = _check_int("version_end", _require(d, "version_end"))
        if v0 < 0 or v1 < v0:
            raise InvalidValue(f"version_start={v0}, version_end={v1}: need 0 <= start <= end")
        spans_raw = _require(d, "version_spans")
        if not isinstance(spans_raw, list) or len(spans_raw) > limits.max_tokens:
            raise WrongType("field 'version_spans': expected a list of [version, start, end]")
        spans = []
        for s in spans_raw:
            if not isinstance(s, list) or len(s) != 3:
                raise WrongType("field 'version_spans': each span is [version, start, end]")
            spans.append(tuple(_check_int("version_spans[]", x) for x in s))
        parts_raw = d.get("rewards", {})
        if not isinstance(parts_raw, dict) or len(parts_raw) > limits.max_meta_items:
            raise WrongType("field 'rewards': expected a map of reward name -> score or nil")
        parts = {
            _check_str("rewards key", k, limits): (None if x is None else _check_float(f"rewards.{k}", x))
            for k, x in parts_raw.items()
        }
        reward = _check_float("reward", _require(d, "reward"))
        return cls(ids, lps, reward, reason, v0, v1, tuple(spans), parts)


@dataclass(frozen=True)
class RolloutGroup:
    """G completions of one prompt, as appended to the rollouts stream by a producer."""

    TAG: ClassVar[str] = "rollout"
    group_id: str  # idempotency key (= PromptTask.task_id): a re-generated prompt keeps it
    prompt_id: str
    prompt_ids: np.ndarray  # (P,) int32
    task: str
    producer_id: str
    model_fingerprint: str
    samples: tuple[Sample, ...]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    created_at: float = field(default_factory=time.time)
    gen_time_s: float = 0.0
    # how the engine computed ``Sample.logprobs`` (modeling.hf.numerics_id; "" = not declared). Optional on the
    # wire. When it equals the learner's own, the learner may take those log-probs as the anchor of a sample
    # generated by one weight version instead of recomputing them (loss.reuse_engine_logprobs).
    logprob_numerics: str = ""
    __eq__ = _value_eq

    @property
    def version_min(self) -> int:
        return min(s.version_start for s in self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "prompt_id": self.prompt_id,
            "prompt_ids": pack_i32(self.prompt_ids),
            "task": self.task,
            "producer_id": self.producer_id,
            "model_fingerprint": self.model_fingerprint,
            "samples": [s.to_dict() for s in self.samples],
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "created_at": float(self.created_at),
            "gen_time_s": float(self.gen_time_s),
            **({"logprob_numerics": self.logprob_numerics} if self.logprob_numerics else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, limits: Limits) -> RolloutGroup:
        samples_raw = _require(d, "samples")
        if not isinstance(samples_raw, list):
            raise WrongType(f"field 'samples': expected list, got {type(samples_raw).__name__}")
        if not samples_raw:
            raise InvalidValue("group has no samples")
        if len(samples_raw) > limits.max_samples:
            raise TooLarge(f"group has {len(samples_raw)} samples, max_samples={limits.max_samples}")
        temperature = _check_float("temperature", _require(d, "temperature"))
        if temperature <= 0:
            raise InvalidValue(f"temperature {temperature} must be > 0")
        group_id = _check_str("group_id", _require(d, "group_id"), limits)
        if not group_id:
            raise InvalidValue("field 'group_id' is empty")
        return cls(
            group_id=group_id,
            prompt_id=_check_str("prompt_id", _require(d, "prompt_id"), limits),
            prompt_ids=_unpack_array("prompt_ids", _require(d, "prompt_ids"), _I32, limits),
            task=_check_str("task", _require(d, "task"), limits),
            producer_id=_check_str("producer_id", _require(d, "producer_id"), limits),
            model_fingerprint=_check_str("model_fingerprint", _require(d, "model_fingerprint"), limits),
            samples=tuple(Sample.from_dict(s, limits) for s in samples_raw),
            temperature=temperature,
            top_p=_check_float("top_p", _require(d, "top_p")),
            top_k=_check_int("top_k", _require(d, "top_k")),
            created_at=_check_float("created_at", _require(d, "created_at")),
            gen_time_s=_check_float("gen_time_s", _require(d, "gen_time_s")),
            logprob_numerics=_check_str("logprob_numerics", d.get("logprob_numerics", ""), limits),
        )


@dataclass(frozen=True)
class CheckpointAnnouncement:
    """A published, verified (STABLE) checkpoint that producers may load."""

    TAG: ClassVar[str] = "ckpt"
    step: int
    version: int
    path: str
    manifest_sha256: str
    model_fingerprint: str
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, limits: Limits) -> CheckpointAnnouncement:
        return cls(
            step=_check_int("step", _require(d, "step")),
            version=_check_int("version", _require(d, "version")),
            path=_check_str("path", _require(d, "path"), limits),
            manifest_sha256=_check_str("manifest_sha256", _require(d, "manifest_sha256"), limits),
            model_fingerprint=_check_str("model_fingerprint", _require(d, "model_fingerprint"), limits),
            created_at=_check_float("created_at", _require(d, "created_at")),
        )


@dataclass(frozen=True)
class ProducerHeartbeat:
    """Liveness and progress of one producer; stored with a TTL under ``RunKeys.producer(id)``."""

    TAG: ClassVar[str] = "heartbeat"
    producer_id: str
    host: str
    engine: str
    version: int
    groups_done: int
    tokens_per_s: float
    groups_per_s: float
    inflight: int
    state: str  # "generating" | "paced" | "idle" | "draining"
    started_at: float
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, limits: Limits) -> ProducerHeartbeat:
        return cls(
            producer_id=_check_str("producer_id", _require(d, "producer_id"), limits),
            host=_check_str("host", _require(d, "host"), limits),
            engine=_check_str("engine", _require(d, "engine"), limits),
            version=_check_int("version", _require(d, "version")),
            groups_done=_check_int("groups_done", _require(d, "groups_done")),
            tokens_per_s=_check_float("tokens_per_s", _require(d, "tokens_per_s")),
            groups_per_s=_check_float("groups_per_s", _require(d, "groups_per_s")),
            inflight=_check_int("inflight", _require(d, "inflight")),
            state=_check_str("state", _require(d, "state"), limits),
            started_at=_check_float("started_at", _require(d, "started_at")),
            updated_at=_check_float("updated_at", _require(d, "updated_at")),
        )


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be processed: the original bytes, where it came from, and why."""

    TAG: ClassVar[str] = "dead"
    source_stream: str
    entry_id: str
    reason: str  # WireError.reason or another short class name
    detail: str  # one line naming what is wrong
    payload: bytes
    consumer: str
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, limits: Limits) -> DeadLetter:
        payload = _require(d, "payload")
        if not isinstance(payload, (bytes, bytearray)):
            raise WrongType("field 'payload': expected bytes")
        return cls(
            source_stream=_check_str("source_stream", _require(d, "source_stream"), limits),
            entry_id=_check_str("entry_id", _require(d, "entry_id"), limits),
            reason=_check_str("reason", _require(d, "reason"), limits),
            detail=_check_str("detail", _require(d, "detail"), limits),
            payload=bytes(payload),
            consumer=_check_str("consumer", _require(d, "consumer"), limits),
            at=_check_float("at", _require(d, "at")),
        )


MESSAGE_TYPES: dict[str, type] = {
    m.TAG: m for m in (PromptTask, RolloutGroup, CheckpointAnnouncement, ProducerHeartbeat, DeadLetter)
}
Message = PromptTask | RolloutGroup | CheckpointAnnouncement | ProducerHeartbeat | DeadLetter


# --------------------------------------------------------------------------- codec
def encode(msg: Message) -> bytes:
    body = msg.to_dict()
    body["t"] = msg.TAG
    body["v"] = WIRE_VERSION
    return msgpack.packb(body, use_bin_type=True)


def _no_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack ext type {code} is not allowed")


def _unpack(raw: bytes, limits: Limits) -> dict:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise WrongType(f"message must be bytes, got {type(raw).__name__}")
    if len(raw) > limits.max_message_bytes:
        raise TooLarge(f"message of {len(raw)} bytes exceeds max_message_bytes={limits.max_message_bytes}")
    cap = max(len(raw), 1)
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
            max_bin_len=cap,
            max_str_len=cap,
            max_array_len=cap,
            max_map_len=cap,
            max_ext_len=0,
        )
    except WireError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise MalformedMessage(f"not a valid msgpack message: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"message must be a msgpack map, got {type(obj).__name__}")
    return obj


def decode(raw: bytes, expect: type | None = None, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode and validate one message; raises a :class:`WireError` subclass on any defect."""
    d = _unpack(raw, limits)
    version = d.get("v")
    if version != WIRE_VERSION:
        raise UnsupportedVersion(
            f"wire_version {version!r} is not supported (this build speaks {WIRE_VERSION})"
        )
    tag = d.get("t")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise WrongMessageType(f"unknown message type {tag!r}")
    if expect is not None and cls is not expect:
        raise WrongMessageType(f"expected a {expect.TAG!r} message, got {tag!r}")
    return cls.from_dict(d, limits)
