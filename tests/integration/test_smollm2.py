"""SmolLM2-135M-Instruct converted offline from its GGUF (modeling/smollm2.py): it loads with transformers and
generates, it is a Llama whose pad is its eos ``<|im_end|>``, its chat template renders through
``render_prompt`` exactly as ``apply_chat_template`` does, and the learner's chunked log-prob recompute agrees
with the one-chunk computation and with the in-process engine on its 49k vocabulary."""

from __future__ import annotations

import time

import pytest
import torch

from modeling import convert_smollm2, load_model, load_tokenizer, render_prompt
from modeling.smollm2 import is_converted
from tests.support.smollm2 import smollm2_dir  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(smollm2_dir):  # noqa: F811
    return load_model(smollm2_dir)


@pytest.fixture(scope="module")
def tok(smollm2_dir):  # noqa: F811
    return load_tokenizer(smollm2_dir)


def test_converted_dir_is_a_llama_with_pad_eq_eos_and_a_chat_template(smollm2_dir, model, tok):  # noqa: F811
    from transformers import AutoConfig, GenerationConfig

    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert not hasattr(cfg, "quantization_config")
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id == cfg.eos_token_id == cfg.pad_token_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    gen = GenerationConfig.from_pretrained(smollm2_dir)
    assert gen.eos_token_id == gen.pad_token_id == 2
    assert (smollm2_dir / "model.safetensors").stat().st_size > 500e6  # fp32, de-quantised


def test_conversion_is_cached_and_never_overwrites(smollm2_dir, tmp_path):  # noqa: F811
    t0 = time.monotonic()
    assert convert_smollm2(smollm2_dir) == smollm2_dir
    assert time.monotonic() - t0 < 1.0
    assert is_converted(smollm2_dir) and not is_converted(tmp_path)
    (tmp_path / "other.txt").write_text("keep me")
    with pytest.raises(Exception, match="not a complete SmolLM2 conversion"):
        convert_smollm2(tmp_path)
    assert (tmp_path / "other.txt").read_text() == "keep me"


def test_loads_with_transformers_and_generates(smollm2_dir, tok):  # noqa: F811
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([render_prompt(tok, QUESTION)])
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_render_prompt_equals_apply_chat_template(tok):
    def template(msgs):
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)

    got = render_prompt(tok, QUESTION)
    assert got == template(QUESTION)
    text = tok.decode(got)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>assistant\n"
    )  # default system
    sys_msgs = [{"role": "system", "content": "Answer with one word."}, *QUESTION]
    assert render_prompt(tok, QUESTION, system_prompt="Answer with one word.") == template(sys_msgs)
    assert "helpful AI assistant" not in tok.decode(render_prompt(tok, sys_msgs))
    assert render_prompt(tok, "What is 2+3?") == tok("What is 2+3?").input_ids  # plain text: no BOS added


def test_chunked_recompute_matches_one_chunk_and_the_engine(smollm2_dir, model, tok):  # noqa: F811
    from learner.logprobs import packed_logprobs
    from producer.engines.base import SamplingParams
    from producer.engines.hf import HFEngine

    engine = HFEngine(smollm2_dir, seed=0)
    prompt = render_prompt(tok, QUESTION)
    comps = engine.generate_sync(
        [prompt], 2, SamplingParams(temperature=0.8, max_new_tokens=12, stop_token_ids=(2,))
    )[0]
    seqs = [(prompt, [int(t) for t in c.token_ids]) for c in comps]
    model.zero_grad(set_to_none=True)
    one = packed_logprobs(model, seqs, 0.8, with_grad=True)
    sum(x.sum() for x in one.logprobs).backward()
    g_one = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    chunked = packed_logprobs(model, seqs, 0.8, with_grad=True, chunk_tokens=5)
    sum(x.sum() for x in chunked.logprobs).backward()
    g_chunked = model.lm_head.weight.grad
    model.zero_grad(set_to_none=True)
    for a, b, c in zip(chunked.logprobs, one.logprobs, comps, strict=True):
        # fp32 rounding of a 30-layer model's log-probs (|log p| up to ~10): measured up to 1.01e-5
        assert (a - b).abs().max().item() <= 3e-5
        assert (a.detach() - torch.from_numpy(c.logprobs)).abs().max().item() <= 1e-4  # engine vs learner
    assert chunked.entropy_sum == pytest.approx(one.entropy_sum, rel=1e-5)
    # the tied embedding's gradient also flows back through 30 layers from the (chunked) head's input gradient,
    # so float32 rounding differences grow: ~6e-6 of the largest entry here (1e-6 holds for the 1-layer models
    # of tests/unit/test_logprobs_chunked.py)
    assert (g_chunked - g_one).abs().max().item() <= 3e-5 * max(1.0, g_one.abs().max().item())
