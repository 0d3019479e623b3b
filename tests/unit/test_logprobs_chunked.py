"""learner/logprobs.py computes the LM head and the log-softmax in chunks of completion positions: the values,
the entropy and the gradients equal the one-chunk computation in fp32 (to 1e-6, relative to the largest entry
of each tensor where that exceeds 1: a weight gradient summed per chunk differs from one matmul by float32
rounding only, ~2e-6 on entries of size 3), and under grad no tensor of (all positions × vocab) is ever saved
for backward."""

from __future__ import annotations

import random

import pytest
import torch

import learner.logprobs as lp_mod
from learner.logprobs import chunk_size, chunked_logprobs, packed_logprobs, token_logprobs


def small_qwen(vocab: int, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).float().eval()


def sequences(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(vocab) for _ in range(rng.randint(1, 6))],
            [rng.randrange(vocab) for _ in range(rng.randint(0, 9))],
        )
        for _ in range(n)
    ]


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Equal to 1e-6, measured relative to the tensor's largest entry when that is above 1."""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= 1e-6 * scale, (what, err, scale)


def grads_of(model, seqs, temps, chunk_tokens):
    model.zero_grad(set_to_none=True)
    res = packed_logprobs(model, seqs, temps, max_row_tokens=64, with_grad=True, chunk_tokens=chunk_tokens)
    g = torch.Generator().manual_seed(3)
    weights = [
        torch.randn(x.shape, generator=g) for x in res.logprobs
    ]  # a loss that weighs every token differently
    loss = sum((w * x).sum() for w, x in zip(weights, res.logprobs, strict=True))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return res, grads


@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 50])
def test_chunked_values_entropy_and_gradients_equal_one_chunk(chunk_tokens):
    model = small_qwen(vocab=97)
    seqs = sequences(9, 97, seed=chunk_tokens)
    temps = [0.6 + 0.1 * (i % 4) for i in range(len(seqs))]
    n = sum(len(c) for _, c in seqs)
    assert n > chunk_tokens or chunk_tokens == 50
    ref, ref_grads = grads_of(model, seqs, temps, chunk_tokens=10**9)
    got, got_grads = grads_of(model, seqs, temps, chunk_tokens=chunk_tokens)
    assert [x.shape for x in got.logprobs] == [x.shape for x in ref.logprobs]
    assert (
        max((a - b).abs().max().item() for a, b in zip(got.logprobs, ref.logprobs, strict=True) if a.numel())
        <= 1e-6
    )
    assert got.entropy_sum == pytest.approx(ref.entropy_sum, rel=1e-6, abs=1e-6)
    assert ref_grads.keys() == got_grads.keys() and "lm_head.weight" in got_grads
    for name, g in ref_grads.items():
        assert_close(got_grads[name], g, name)


def test_no_grad_path_and_token_logprobs_agree_across_chunk_sizes():
    model = small_qwen(vocab=61)
    seqs = sequences(6, 61, seed=5)
    a = token_logprobs(model, seqs, 1.0, chunk_tokens=2)
    b = token_logprobs(model, seqs, 1.0)
    assert all(not x.requires_grad for x in a)
    assert max((x - y).abs().max().item() for x, y in zip(a, b, strict=True) if x.numel()) <= 1e-6


def test_the_default_chunk_follows_the_byte_budget(monkeypatch):
    assert chunk_size(151_936) == lp_mod.LOGIT_CHUNK_BYTES // (4 * 151_936)
    assert chunk_size(10, 5) == 5 and chunk_size(10**12) == 1
    with pytest.raises(ValueError):
        chunk_size(10, 0)
    model = small_qwen(vocab=97)
    seqs = sequences(6, 97, seed=2)
    seen = []
    real = lp_mod.chunked_logprobs
    monkeypatch.setattr(
        lp_mod, "chunked_logprobs", lambda *a, **k: seen.append(k["chunk_tokens"]) or real(*a, **k)
    )
    monkeypatch.setattr(lp_mod, "LOGIT_CHUNK_BYTES", 4 * 97 * 4)  # four positions of fp32 logits
    packed_logprobs(model, seqs, 1.0)
    assert seen == [4]


def max_saved_numel(fn) -> int:
    """Largest tensor autograd saves for backward while ``fn`` runs (outside checkpointed regions)."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_under_grad_no_all_positions_by_vocab_tensor_is_saved():
    vocab, n, hidden, chunk = 5000, 64, 32, 8
    head = torch.nn.Linear(hidden, vocab, bias=False)
    x = torch.randn(n, hidden)
    targets = torch.randint(0, vocab, (n,))
    temps = torch.full((n,), 0.8)
    run = lambda c: chunked_logprobs(head, x, targets, temps, chunk_tokens=c)  # noqa: E731
    assert max_saved_numel(lambda: run(n)) >= n * vocab  # one chunk: the full logits are kept for backward
    assert max_saved_numel(lambda: run(chunk)) < chunk * vocab  # chunked: only the inputs of each chunk
    logp, _ = run(chunk)
    logp.sum().backward()  # backward recomputes each chunk
    g_chunked = head.weight.grad.clone()
    head.weight.grad = None
    run(n)[0].sum().backward()
    assert_close(g_chunked, head.weight.grad)


class _NoHead(torch.nn.Module):
    """A causal LM seen through a wrapper without get_output_embeddings: the full-forward fallback."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        return self.inner(**kw)


def test_full_forward_fallback_is_chunked_too():
    inner = small_qwen(vocab=53)
    seqs = sequences(5, 53, seed=9)
    wrapped = _NoHead(inner)
    ref, ref_grads = grads_of(inner, seqs, 0.9, chunk_tokens=10**9)
    got, got_grads = grads_of(wrapped, seqs, 0.9, chunk_tokens=2)
    assert (
        max((a - b).abs().max().item() for a, b in zip(got.logprobs, ref.logprobs, strict=True) if a.numel())
        <= 1e-6
    )
    assert got.entropy_sum == pytest.approx(ref.entropy_sum, rel=1e-6)
    for name, g in ref_grads.items():
        assert_close(got_grads[f"inner.{name}"], g, name)


def test_no_completion_tokens():
    model = small_qwen(vocab=31)
    res = packed_logprobs(model, [([1, 2], []), ([3], [])], 1.0, with_grad=True, chunk_tokens=1)
    assert [x.numel() for x in res.logprobs] == [0, 0] and res.entropy_sum == 0.0
