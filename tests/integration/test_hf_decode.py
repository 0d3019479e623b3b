"""The in-process engine's decode loop and its model.generate fallback (producer/engines/hf.py).

Exact behaviour log-probs with left padding and rows leaving the batch, the sampled distribution
(temperature, top-k, top-p) against transformers' own warpers and against counts, stop handling, the
fallback rule, and a generation_config.json whose defaults must not act.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import producer.engines.hf as hf
from modeling import build_char_tokenizer, load_model, load_tokenizer
from producer.engines.base import SamplingParams
from producer.engines.hf import HFEngine, UnsupportedModel, sampling_distribution

# unequal lengths: the batch is left-padded
PROMPTS = [[5, 6, 14, 7, 8, 15, 9, 9, 9], [5, 14, 6, 15], [13, 13, 14, 13, 13, 15], [7]]
PREFIX = [5, 6, 14, 7, 15]


def recompute(model, prompt_ids, completion_ids, temperature: float) -> np.ndarray:
    """Independent reference: one unpadded forward of prompt+completion, log_softmax(logits / T) at each token."""
    seq = torch.tensor([list(prompt_ids) + [int(x) for x in completion_ids]])
    with torch.no_grad():
        logits = model(seq).logits[0].float()
    p = len(prompt_ids)
    lp = torch.log_softmax(logits[p - 1 : -1] / temperature, dim=-1)
    return lp.gather(-1, torch.as_tensor(completion_ids).long()[:, None]).squeeze(-1).numpy()


def raw_last_logits(model, prompt_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0, -1].float()


def chi2_bound(df: int, z: float = 6.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at a normal z of 6 (p ~ 1e-9): a correct sampler
    essentially never exceeds it, so the check cannot flake."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: Counter, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson statistic of observed first tokens against ``probs``; bins expecting < 5 are pooled."""
    expected = (probs.double() * n).tolist()
    big = [t for t, e in enumerate(expected) if e >= 5]
    small = [t for t, e in enumerate(expected) if e < 5]
    stat = sum((counts.get(t, 0) - expected[t]) ** 2 / expected[t] for t in big)
    pooled_e, pooled_o = sum(expected[t] for t in small), sum(counts.get(t, 0) for t in small)
    bins = len(big)
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        bins += 1
    elif pooled_o > 0:  # a token the distribution gives probability 0 was drawn
        return math.inf, bins
    return stat, bins - 1


def save_model(model, out: Path, tokenizer_dir: Path | None = None) -> Path:
    model.save_pretrained(out)
    if tokenizer_dir is None:
        build_char_tokenizer().save_pretrained(out)
    else:
        load_tokenizer(tokenizer_dir).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its final norm scaled x2.5: a logit spread of about 4.4 nats instead of 1.5 (after
    PREFIX at T=0.7: top token 0.55, then a long tail), so temperature and truncation visibly change what is
    sampled."""
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.5)
    return save_model(model, tmp_path_factory.mktemp("sharp"), tiny_model_dir)


@pytest.fixture(scope="module")
def loop_engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir, seed=3, decode="loop")


class CountingCache(hf.DynamicCache):
    """A DynamicCache that counts how often the loop drops stopped rows."""

    compactions = 0

    def batch_select_indices(self, indices):
        CountingCache.compactions += 1
        return super().batch_select_indices(indices)


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("decode", ["loop", "generate"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_recompute_with_left_padding_and_rows_leaving_the_batch(
    tiny_model_dir, decode, temperature, monkeypatch
):
    engine = HFEngine(tiny_model_dir, seed=3, decode=decode)
    assert engine.decode == decode
    monkeypatch.setattr(hf, "DynamicCache", CountingCache)
    CountingCache.compactions = 0
    torch.manual_seed(11)
    # three extra stop ids: rows stop at many different steps, so the loop drops rows from its batch
    sampling = SamplingParams(temperature=temperature, max_new_tokens=20, stop_token_ids=(5, 6, 7))
    out = engine.generate_sync(PROMPTS, 8, sampling)
    assert [len(g) for g in out] == [8] * len(PROMPTS)
    lengths = set()
    for prompt, group in zip(PROMPTS, out, strict=True):
        for c in group:
            lengths.add(c.token_ids.size)
            want = recompute(engine.model, prompt, c.token_ids, temperature)
            np.testing.assert_allclose(c.logprobs, want, atol=1e-5, rtol=0)
    assert len(lengths) > 3
    if decode == "loop":
        assert CountingCache.compactions >= 1


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_other_allowed_architectures_pass_the_probe_and_are_exact(model_type, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = build_char_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(LlamaConfig(**common))
        if model_type == "llama"
        else Qwen2ForCausalLM(Qwen2Config(**common))
    )
    engine = HFEngine(save_model(model, tmp_path / model_type), seed=5, decode="auto")
    assert engine.model.config.model_type == model_type and engine.decode == "loop"
    torch.manual_seed(5)
    out = engine.generate_sync(
        PROMPTS, 4, SamplingParams(temperature=0.7, max_new_tokens=12, stop_token_ids=(5,))
    )
    for prompt, group in zip(PROMPTS, out, strict=True):
        for c in group:
            np.testing.assert_allclose(
                c.logprobs, recompute(engine.model, prompt, c.token_ids, 0.7), atol=1e-5, rtol=0
            )


# --------------------------------------------------------------------------- distribution
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, -1, 1.0),
        (0.7, -1, 1.0),
        (0.7, 5, 1.0),
        (1.0, -1, 0.8),
        (0.7, 10, 0.9),
        (1.3, 1, 1.0),
        (0.5, 3, 0.3),
    ],
)
def test_sampled_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    """What the loop samples from is what model.generate samples from: temperature, top-k, top-p, softmax."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 50, generator=g) * 3
    logits[:4, :6] = 2.5  # ties at the top-k boundary are kept by both
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    want = torch.softmax(warpers(None, logits.clone()), dim=-1)
    probs, logp = sampling_distribution(
        logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    )
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=0)
    assert torch.equal(probs > 0, want > 0)
    torch.testing.assert_close(logp, torch.log_softmax(logits / temperature, dim=-1))  # never truncated


@pytest.mark.parametrize("decode", ["loop", "generate"])
def test_first_token_counts_match_softmax_of_raw_logits_over_t(sharp_model_dir, decode):
    engine = HFEngine(sharp_model_dir, seed=0, decode=decode)
    raw = raw_last_logits(engine.model, PREFIX)
    n, t = 6000, 0.7
    torch.manual_seed(1)
    out = engine.generate_sync([PREFIX], n, SamplingParams(temperature=t, max_new_tokens=1))[0]
    counts = Counter(int(c.token_ids[0]) for c in out)
    stat, df = chi2(counts, torch.softmax(raw / t, -1), n)
    assert stat < chi2_bound(df), (stat, df)
    # the check has power: the same counts are far from the T=1 distribution
    stat_t1, df_t1 = chi2(counts, torch.softmax(raw, -1), n)
    assert stat_t1 > 3 * chi2_bound(df_t1), (stat_t1, df_t1)
    lp = torch.log_softmax(raw / t, -1)
    for c in out[:200]:
        assert c.logprobs[0] == pytest.approx(float(lp[int(c.token_ids[0])]), abs=1e-5)


@pytest.mark.parametrize("decode", ["loop", "generate"])
@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (-1, 0.6)])
def test_truncation_restricts_what_is_sampled_but_not_the_reported_logprob(
    sharp_model_dir, decode, top_k, top_p
):
    engine = HFEngine(sharp_model_dir, seed=0, decode=decode)
    raw = raw_last_logits(engine.model, PREFIX)
    n, t = 3000, 0.7
    s = SamplingParams(temperature=t, top_k=top_k, top_p=top_p, max_new_tokens=1)
    probs, logp = sampling_distribution(raw[None], s)
    allowed = set(torch.nonzero(probs[0] > 0).flatten().tolist())
    assert 1 < len(allowed) < 10
    if top_k > 0:
        assert allowed == set(torch.topk(raw, top_k).indices.tolist())
    torch.manual_seed(2)
    out = engine.generate_sync([PREFIX], n, s)[0]
    counts = Counter(int(c.token_ids[0]) for c in out)
    assert set(counts) <= allowed
    stat, df = chi2(counts, probs[0], n)
    assert stat < chi2_bound(df), (stat, df)
    for c in out[:200]:
        tok = int(c.token_ids[0])
        assert c.logprobs[0] == pytest.approx(float(logp[0, tok]), abs=1e-5)  # un-truncated
        assert c.logprobs[0] < math.log(float(probs[0, tok])) - 1e-3  # strictly below the truncated one


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=0.7, max_new_tokens=20),
     SamplingParams(top_k=5, top_p=0.9, max_new_tokens=20, stop_token_ids=(5, 6))],
)  # fmt: skip
def test_without_row_dropping_the_loop_reproduces_generates_draws_from_the_same_seed(
    tiny_model_dir, sampling, monkeypatch
):
    """Same softmax-then-multinomial on the same (R, V) shapes: with rows never leaving the batch, the loop
    reproduces model.generate's draws token for token (float rounding could flip a rare draw: 90% rows)."""
    monkeypatch.setattr(hf, "COMPACT_AT", 0.0)
    engine = HFEngine(tiny_model_dir, seed=0, decode="loop")
    drawn = {}
    for path in ("loop", "generate"):
        engine.decode = path
        torch.manual_seed(123)
        drawn[path] = [c.token_ids.tolist() for g in engine.generate_sync(PROMPTS, 16, sampling) for c in g]
    same = sum(a == b for a, b in zip(drawn["loop"], drawn["generate"], strict=True))
    assert same >= 0.9 * len(drawn["loop"]), same


# --------------------------------------------------------------------------- stops
@pytest.mark.parametrize("decode", ["loop", "generate"])
def test_rows_stop_at_their_first_stop_id_which_is_kept(tiny_model_dir, decode):
    engine = HFEngine(tiny_model_dir, seed=4, decode=decode)
    stop_ids = {engine.tokenizer.eos_token_id, 9, 12}
    torch.manual_seed(4)
    out = engine.generate_sync(PROMPTS, 8, SamplingParams(max_new_tokens=16, stop_token_ids=(9, 12)))
    reasons = Counter()
    for prompt, group in zip(PROMPTS, out, strict=True):
        for c in group:
            ids = [int(x) for x in c.token_ids]
            reasons[c.finish_reason] += 1
            assert not stop_ids & set(ids[:-1])  # nothing after the first stop id, no padding
            if c.finish_reason == "stop":
                assert ids[-1] in stop_ids and 1 <= len(ids) <= 16
            else:
                assert c.finish_reason == "length" and len(ids) == 16 and ids[-1] not in stop_ids
            np.testing.assert_allclose(
                c.logprobs, recompute(engine.model, prompt, ids, 1.0), atol=1e-5, rtol=0
            )
    assert reasons["stop"] > 0 and reasons["length"] > 0


def test_loop_ends_when_every_row_has_stopped(loop_engine):
    calls = []
    handle = loop_engine.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        every_id = tuple(range(loop_engine.model.config.vocab_size))
        torch.manual_seed(0)
        out = loop_engine.generate_sync(
            PROMPTS, 3, SamplingParams(max_new_tokens=16, stop_token_ids=every_id)
        )
        assert all(c.token_ids.size == 1 and c.finish_reason == "stop" for g in out for c in g)
        assert len(calls) == 1  # the prefill only
        calls.clear()
        torch.manual_seed(0)
        out = loop_engine.generate_sync(
            PROMPTS, 3, SamplingParams(max_new_tokens=16, stop_token_ids=(5, 6, 7, 8))
        )
        # the prefill gives each row's first token, every later token one forward: no step after the last stop
        assert len(calls) == max(c.token_ids.size for g in out for c in g)
    finally:
        handle.remove()


# --------------------------------------------------------------------------- fallback
def test_auto_falls_back_to_generate_for_an_untested_model_type(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(hf, "LOOP_MODEL_TYPES", frozenset({"llama"}))
    assert HFEngine(tiny_model_dir, decode="auto").decode == "generate"
    with pytest.raises(UnsupportedModel, match="model type 'qwen3' is not one the decode loop was tested on"):
        HFEngine(tiny_model_dir, decode="loop")
    with pytest.raises(ValueError, match="decode must be one of"):
        HFEngine(tiny_model_dir, decode="fast")


def test_the_probe_refuses_a_cached_path_that_gets_positions_wrong(tiny_model_dir, monkeypatch):
    forward = HFEngine._forward

    def no_positions(self, ids, mask, pos, cache, past):  # as if the model ignored position_ids
        return forward(self, ids, mask, torch.zeros_like(pos), cache, past)

    monkeypatch.setattr(HFEngine, "_forward", no_positions)
    assert HFEngine(tiny_model_dir, decode="auto").decode == "generate"
    with pytest.raises(UnsupportedModel, match="differ from a full forward"):
        HFEngine(tiny_model_dir, decode="loop")


def repeats_a_bigram(ids: list[int]) -> bool:
    pairs = list(zip(ids, ids[1:], strict=False))
    return len(set(pairs)) < len(pairs)


def test_generate_fallback_ignores_the_models_generation_config_json(sharp_model_dir, tmp_path):
    model_dir = tmp_path / "with-defaults"
    shutil.copytree(sharp_model_dir, model_dir)
    cfg = json.loads((model_dir / "generation_config.json").read_text())
    cfg.update(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3, top_k=4, temperature=0.3)
    (model_dir / "generation_config.json").write_text(json.dumps(cfg))
    prompts = [PREFIX, [13, 14, 15]]
    s = SamplingParams(temperature=0.7, max_new_tokens=24)

    # control: a plain model.generate over this directory does apply the file (no bigram ever repeats)
    plain = load_model(model_dir)
    assert plain.generation_config.no_repeat_ngram_size == 2
    torch.manual_seed(0)
    with torch.no_grad():
        seqs = plain.generate(torch.tensor([PREFIX] * 16), do_sample=True, max_new_tokens=24, pad_token_id=0)
    rows = [row[len(PREFIX) :].tolist() for row in seqs]
    eos = load_tokenizer(model_dir).eos_token_id
    rows = [r[: r.index(eos) + 1] if eos in r else r for r in rows]  # up to EOS (padding after it repeats)
    assert not any(repeats_a_bigram(r) for r in rows) and max(map(len, rows)) > 10

    engine = HFEngine(model_dir, seed=0, decode="generate")
    assert engine.model.generation_config.no_repeat_ngram_size in (None, 0)
    effective, _ = engine.model._prepare_generation_config(engine._generation_config(s, engine.eos_ids))
    assert (effective.repetition_penalty, effective.no_repeat_ngram_size) == (1.0, 0)
    assert (effective.temperature, effective.top_k, effective.top_p) == (0.7, 0, 1.0)
    assert effective.min_new_tokens in (None, 0) and effective.min_length == 0
    torch.manual_seed(0)
    out = engine.generate_sync(prompts, 16, s)
    completions = [
        (p, [int(x) for x in c.token_ids], c.logprobs) for p, g in zip(prompts, out, strict=True) for c in g
    ]
    assert any(repeats_a_bigram(ids) for _, ids, _ in completions)  # no_repeat_ngram_size did not act
    for prompt, ids, lps in completions:
        np.testing.assert_allclose(lps, recompute(engine.model, prompt, ids, 0.7), atol=1e-5, rtol=0)
