"""Bad input: garbage on the streams of running services, a producer on another tokenizer, broken configs,
missing models and unverifiable checkpoints. Each ends as a typed dead letter or one error line, never a crash
or a traceback, and leaves no partial state.

Elsewhere: the decoder itself is fuzzed in tests/unit/test_fuzz_wire.py; an SGLang server answering errors or
garbage is tests/integration/test_sglang_client.py (one-line SGLangError, retries); a producer refusing a
corrupt or foreign checkpoint is tests/integration/test_producer.py.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest

from common.feeder import task_for
from common.fingerprint import model_fingerprint
from common.keys import RunKeys
from common.tasks import addition_prompt
from common.wire import (
    WIRE_VERSION,
    InvalidValue,
    LengthMismatch,
    MalformedMessage,
    MissingField,
    NonFiniteValue,
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
from tests.chaos.conftest import (
    REPO,
    account_for_every_prompt,
    dead_letters,
    last_step,
    learner_args,
    producer_args,
    report,
    sync_client,
    wait_until,
)

N_GARBAGE = 300  # per stream
WIRE_REASONS = {c.reason for c in (MalformedMessage, UnsupportedVersion, WrongMessageType, MissingField, WrongType,
                                   NonFiniteValue, LengthMismatch, TooLarge, InvalidValue)}  # fmt: skip
PROMPT_REASONS = WIRE_REASONS | {"unknown_reward", "empty_prompt"}


# --------------------------------------------------------------------------- garbage
def _random_bytes(rng: random.Random, _: bytes) -> bytes:
    return rng.randbytes(rng.randint(0, 200))


def _truncated(rng: random.Random, raw: bytes) -> bytes:
    return raw[: rng.randint(1, len(raw) - 1)]


def _trailing(rng: random.Random, raw: bytes) -> bytes:
    return raw + rng.randbytes(rng.randint(1, 8))


def _flipped(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def _odd_msgpack(rng: random.Random, _: bytes) -> bytes:
    return rng.choice([
        msgpack.packb([1, 2, rng.random()]), msgpack.packb(rng.randint(-(2**40), 2**40)), msgpack.packb("m" * rng.randint(0, 9)),
        b"\x91" * rng.randint(600, 3000) + b"\xc0",  # nested deeper than the unpacker allows
        msgpack.packb(msgpack.ExtType(rng.randint(1, 100), b"x")),  # ext types are refused
        b"\xdb\xff\xff\xff\xff" + rng.randbytes(8),  # a str claiming 4 GiB
        msgpack.packb({1: 2, "v": WIRE_VERSION}, strict_types=False),  # non-str map key
    ])  # fmt: skip


def _dict_mutation(rng: random.Random, raw: bytes, wrong: dict) -> bytes:
    d = msgpack.unpackb(raw, raw=False)
    kind = rng.choice(["drop", "wrong_type", "version", "tag"])
    if kind == "drop":
        del d[rng.choice(sorted(d))]
    elif kind == "wrong_type":
        key = rng.choice(sorted(wrong))
        d[key] = rng.choice(wrong[key])
    elif kind == "version":
        d["v"] = rng.choice([0, WIRE_VERSION + 1, 99, -1, str(WIRE_VERSION), None])
    else:
        d["t"] = rng.choice(["heartbeat", "nope", 7, None, "checkpoint"])
    return msgpack.packb(d, use_bin_type=True)


def _sample_mutation(rng: random.Random, raw: bytes) -> bytes:
    d = msgpack.unpackb(raw, raw=False)
    s = d["samples"][rng.randrange(len(d["samples"]))]
    lp = np.frombuffer(s["logprobs"], dtype="<f4").copy()
    kind = rng.choice(
        ["nan", "inf_reward", "short", "positive", "finish", "version", "no_samples", "temperature"]
    )
    if kind == "nan":
        lp[rng.randrange(lp.size)] = np.nan
        s["logprobs"] = lp.tobytes()
    elif kind == "inf_reward":
        s["reward"] = rng.choice([float("inf"), float("-inf"), float("nan")])
    elif kind == "short":
        s["logprobs"] = lp[:-1].tobytes()
    elif kind == "positive":
        lp[0] = 0.5
        s["logprobs"] = lp.tobytes()
    elif kind == "finish":
        s["finish_reason"] = "banana"
    elif kind == "version":
        s["version_start"] = -rng.randint(1, 5)
    elif kind == "no_samples":
        d["samples"] = []
    else:
        d["temperature"] = rng.choice([0.0, -1.0])
    return msgpack.packb(d, use_bin_type=True)


def garbage(
    valid: bytes, expect: type, n: int, seed: int, extra=(), exclude: frozenset = frozenset()
) -> list[bytes]:
    """``n`` distinct byte strings, each of which ``decode(_, expect)`` refuses (or, for ``extra`` families,
    that the service must refuse past decoding): random bytes, truncations, trailing bytes, flipped bytes, odd
    msgpack, dropped fields, wrong types, versions and tags, and the ``extra`` families; none in ``exclude``
    (dead letters are matched to what was injected by their bytes)."""
    rng = random.Random(seed)
    wrong = {
        k: ["text", 12345, None, [1], {"a": 1}]
        for k in msgpack.unpackb(valid, raw=False)
        if k not in ("t", "v")
    }
    families = [_random_bytes, _truncated, _trailing, _flipped, _odd_msgpack,
                lambda r, raw: _dict_mutation(r, raw, wrong), *extra]  # fmt: skip
    out: dict[bytes, None] = {}
    while len(out) < n:
        fam = families[len(out) % len(families)]
        raw = fam(rng, valid)
        if raw in exclude:
            continue
        if fam in extra:
            out.setdefault(raw)
            continue
        try:
            decode(raw, expect)
        except WireError:
            out.setdefault(raw)
        # a mutation that still decodes to a valid message (a flipped digit in a prompt) is not garbage
    return list(out)


def valid_rollout(model_dir: Path) -> bytes:
    rng = np.random.default_rng(0)
    samples = tuple(Sample(rng.integers(4, 16, 5).astype(np.int32), -rng.random(5).astype(np.float32), 1.0, "stop", 0, 0)
                    for _ in range(4))  # fmt: skip
    return encode(RolloutGroup("garbage-base", "p", np.array([5, 6, 7], np.int32), "addition", "fuzz",
                               model_fingerprint(model_dir), samples))  # fmt: skip


def _unknown_reward(rng: random.Random, raw: bytes) -> bytes:
    d = msgpack.unpackb(raw, raw=False)
    d["task"], d["task_id"] = f"no_such_reward_{rng.randrange(10**9)}", f"bad-{rng.randrange(10**9)}"
    return msgpack.packb(d, use_bin_type=True)


def _empty_prompt(rng: random.Random, raw: bytes) -> bytes:
    d = msgpack.unpackb(raw, raw=False)
    d["prompt"], d["prompt_ids"], d["task_id"] = "", b"", f"empty-{rng.randrange(10**9)}"
    return msgpack.packb(d, use_bin_type=True)


def other_tokenizer_model(tiny_model_dir: Path, dest: Path) -> Path:
    """The same weights and config with a tokenizer that maps characters to other ids: another fingerprint."""
    from modeling import build_char_tokenizer

    shutil.copytree(tiny_model_dir, dest)
    for f in dest.glob("*token*"):
        f.unlink()
    from common.tasks import ADDITION_CHARS

    build_char_tokenizer((ADDITION_CHARS + " abcdefghijklmnopqrstuvwxyz")[::-1]).save_pretrained(dest)
    assert model_fingerprint(dest) != model_fingerprint(tiny_model_dir)
    return dest


# --------------------------------------------------------------------------- services under bad input
@pytest.mark.redis
@pytest.mark.slow
def test_stream_garbage_and_a_foreign_model_producer_are_dead_lettered_while_training_goes_on(
    redis_url, services, run_id, tiny_model_dir, tmp_path
):
    keys, run_dir = RunKeys(run_id), tmp_path / "run"
    r = sync_client(redis_url)
    foreign = other_tokenizer_model(tiny_model_dir, tmp_path / "foreign-model")
    learner = services.start("learner", learner_args(redis_url, run_id, tiny_model_dir, run_dir, max_steps=0),
                             "learner")  # fmt: skip
    bad = services.start("producer", producer_args(redis_url, run_id, foreign, run_dir, "pX"), "pX")
    # the foreign producer first, until its refused groups exceed the admission bound (K + 1) * B = 12: were
    # they not released as consumed, the good producer below would be paced forever and nothing trained
    wait_until(
        lambda: len(dead_letters(r, keys)) > 12, 90, "the foreign groups to fill the bound", (learner, bad)
    )
    good = services.start("producer", producer_args(redis_url, run_id, tiny_model_dir, run_dir, "p1"), "p1")
    rollout_junk = garbage(
        valid_rollout(tiny_model_dir), RolloutGroup, N_GARBAGE, seed=1, extra=(_sample_mutation,)
    )
    prompt_junk = garbage(encode(task_for(addition_prompt(1, 2), "junk-base")), PromptTask, N_GARBAGE, seed=2,
                          extra=(_unknown_reward, _empty_prompt), exclude=frozenset(rollout_junk))  # fmt: skip
    wait_until(lambda: last_step(run_dir) >= 1, 90, "a first learner step", (learner, good, bad))
    for i in range(0, N_GARBAGE, 50):  # in bursts, between real traffic
        for raw in rollout_junk[i : i + 50]:
            r.xadd(keys.rollouts, {b"m": raw})
        for raw in prompt_junk[i : i + 50]:
            r.xadd(keys.prompts, {b"m": raw})
        time.sleep(0.2)
    at_injection = last_step(run_dir)

    def all_junk_dead() -> bool:
        payloads = Counter(d.payload for d in dead_letters(r, keys))
        return (
            sum(payloads[p] for p in rollout_junk) == N_GARBAGE
            and sum(payloads[p] for p in prompt_junk) == N_GARBAGE
        )

    wait_until(all_junk_dead, 90, "every injected message to be dead-lettered", (learner, good, bad))
    wait_until(lambda: last_step(run_dir) >= at_injection + 4, 90, "4 more steps", (learner, good, bad))
    wait_until(
        lambda: "REFUSED checkpoint" in bad.text(), 30, "the foreign producer to refuse a checkpoint", (bad,)
    )
    for svc in (learner, good, bad):
        assert svc.terminate() == 0, svc.tail()
    letters = dead_letters(r, keys)
    by_payload = {d.payload: d for d in letters}
    assert Counter(by_payload[p].source_stream for p in rollout_junk) == {keys.rollouts: N_GARBAGE}
    assert Counter(by_payload[p].source_stream for p in prompt_junk) == {keys.prompts: N_GARBAGE}
    junk_reasons = Counter(by_payload[p].reason for p in rollout_junk)
    prompt_reasons = Counter(by_payload[p].reason for p in prompt_junk)
    assert set(junk_reasons) <= WIRE_REASONS and set(prompt_reasons) <= PROMPT_REASONS
    assert len(junk_reasons) >= 6 and len(prompt_reasons) >= 6  # the families reach many decoder checks
    foreign_letters = [d for d in letters if d.payload not in set(rollout_junk) | set(prompt_junk)]
    assert foreign_letters and {d.reason for d in foreign_letters} == {"wrong_fingerprint"}
    assert {decode(d.payload, RolloutGroup).producer_id for d in foreign_letters} == {"pX"}
    assert model_fingerprint(foreign) in foreign_letters[0].detail
    assert len(letters) == 2 * N_GARBAGE + len(foreign_letters)  # nothing else was refused
    for svc in (learner, good, bad):
        assert "Traceback" not in svc.text()
    counts = account_for_every_prompt(r, run_id, run_dir)
    report("stream_garbage", {"injected_rollouts": N_GARBAGE, "injected_prompts": N_GARBAGE,
                              "rollout_reasons": dict(junk_reasons), "prompt_reasons": dict(prompt_reasons),
                              "foreign_groups_dead": len(foreign_letters), "steps_after_injection":
                              last_step(run_dir) - at_injection, **counts})  # fmt: skip


# --------------------------------------------------------------------------- the command line
def gspo(*args: str, cwd: Path, timeout_s: float = 90) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "gspo", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s)  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or " ERROR " in ln]


def assert_one_line_failure(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("service", "toml", "needles"),
    [
        ("learner", "[learner\nlr = 1e-4\n", ("is not valid TOML",)),
        ("learner", "[pipeline]\ngroup_sise = 8\n", ("pipeline.group_sise: unknown key", "bad.toml")),
        ("learner", "[learner]\nlr = -1.0\n", ("learner.lr", "-1.0", "bad.toml")),
        (
            "producer",
            "[producer.sampling]\ntemperature = 'hot'\n",
            ("producer.sampling.temperature", "'hot'"),
        ),
        (
            "producer",
            "[pipeline]\nbatch_groups = 100\nrollouts_maxlen = 1000\n",
            ("rollouts_maxlen", "batch_groups"),
        ),
    ],
    ids=["toml-syntax", "unknown-key", "bad-value", "bad-type", "cross-field"],
)
def test_malformed_config_is_one_error_line_and_creates_nothing(service, toml, needles, tmp_path):
    (tmp_path / "bad.toml").write_text(toml)
    run_dir = tmp_path / "run"
    done = gspo(service, "--config", str(tmp_path / "bad.toml"), "--run-dir", str(run_dir), "--model", "/nope",
                cwd=tmp_path, timeout_s=30)  # fmt: skip
    line = assert_one_line_failure(
        done, "error: invalid config" if "TOML" not in needles[0] else "error:", *needles
    )
    assert len(line) < 600
    assert not run_dir.exists()  # the config is refused before anything is created


@pytest.mark.redis
def test_missing_model_is_one_error_line_for_learner_and_producer(redis_url, run_id, tmp_path):
    runs = {s: tmp_path / s for s in ("learner", "producer")}
    procs = {s: subprocess.Popen([sys.executable, "-m", "gspo", s, "--redis-url", redis_url, "--run", run_id,
                                  "--model", "/nope/model", "--run-dir", str(d)], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for s, d in runs.items()}  # fmt: skip
    for s, p in procs.items():
        out, err = p.communicate(timeout=90)
        line = assert_one_line_failure(
            subprocess.CompletedProcess(p.args, p.returncode, out, err), "/nope/model"
        )
        assert f"{s} failed:" in line
        assert sorted(x.name for x in runs[s].iterdir()) == ["logs"]  # no checkpoints, metrics or .tmp dirs


@pytest.mark.slow
@pytest.mark.redis
def test_unverifiable_checkpoints_are_skipped_and_resume_fails_with_one_line(
    redis_url, run_id, tiny_model_dir, tmp_path
):
    from tests.support import write_step_dir

    root = tmp_path / "run" / "checkpoints"
    hashed = write_step_dir(root, 1, tiny_model_dir)
    with (hashed / "model.safetensors").open("r+b") as f:  # bit rot after STABLE
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    (write_step_dir(root, 2, tiny_model_dir) / "tokenizer.json").unlink()  # a file lost in a copy
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    done = gspo("learner", "--redis-url", redis_url, "--run", run_id, "--run-dir", str(tmp_path / "run"), "--resume",
                "--model", str(tiny_model_dir), cwd=tmp_path)  # fmt: skip
    assert_one_line_failure(done, "learner failed: --resume: no verified STABLE checkpoint under", str(root))
    warnings = [ln for ln in done.stderr.splitlines() if "skipping checkpoint" in ln]
    assert len(warnings) == 2
    assert "step_00000002: file tokenizer.json listed in the manifest is missing" in warnings[0]
    assert "step_00000001: model.safetensors has sha256" in warnings[1]
    assert (
        sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before
    )  # nothing added or removed
