"""In-process transformers engine: batched sampling with exact behaviour log-probs (CPU or GPU).

Log-probs come from the *raw* logits, divided by the temperature and log-softmaxed, at the sampled
token: ``log_softmax(raw_logits / T)[token]`` (producer/engines/base.py). Processed scores are never
used: logits processors (EOS masking, top-k/top-p) shift them by up to nats (measured: up to 2.3 nats
with min_new_tokens' EOS masking). top-k/top-p only restrict what is sampled.

Two decode paths draw from the same distribution (temperature, then top-k, then top-p, then a
multinomial draw, as transformers' sampling does):

* ``loop`` (the default where supported): prefill the left-padded batch once, then one forward per
  token with a DynamicCache, sampling from the raw logits and recording the sampled token's log-prob
  directly. Rows stop at their first stop id; once at most ``COMPACT_AT`` of the batch is still
  running, the stopped rows leave it (and the KV cache), so compute follows the running rows; the loop
  ends when every row has stopped or after ``max_new_tokens``. Measured on the tiny model on CPU
  (bench/engine_decode.py): about 1.05x generate's tokens/s at max_new_tokens=16 (generate's own
  per-step overhead is ~15% of a step there), 1.5-1.9x at 64, where rows stop at very different
  steps. A StaticCache measured slower on CPU and cannot drop rows.
* ``generate``: ``model.generate`` with ``output_logits=True``. The fallback for models the loop has
  not been tested on (``decode="auto"`` picks it when :func:`loop_support` or the construction-time
  cached-vs-full probe refuses the model; ``decode="loop"`` raises :class:`UnsupportedModel` instead).

Neither path lets a model's ``generation_config.json`` act: the engine replaces the loaded model's
generation config with one that holds only token ids, and ``generate`` gets a complete config, so
repetition_penalty, min_new_tokens, no_repeat_ngram_size, suppress_tokens, bad_words_ids, ... from
the file are ignored (logged once). Only temperature/top-p/top-k/stop ids/max_new_tokens act.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from common.fingerprint import model_fingerprint
from modeling import load_model, load_tokenizer, numerics_id
from producer.engines.base import Completion, Engine, EngineError, SamplingParams

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "loop", "generate")
# Decoder-only architectures whose cached forward the loop was checked against a full forward
# (tests/integration/test_hf_decode.py). Others use model.generate under decode="auto".
LOOP_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama"})
# the loop drops stopped rows from its batch (and KV cache) once the running ones are at most this share of it
COMPACT_AT = 0.75
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_BOOKKEEPING_FIELDS = (
    "transformers_version",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
)


def _global_generation_defaults() -> dict:
    """transformers' neutral generation defaults (5.x keeps them apart from GenerationConfig(), whose fields are None)."""
    get = getattr(GenerationConfig, "_get_default_generation_params", None)
    return dict(get()) if get is not None else {}


class StopStrings:
    """Finds stop strings (``SamplingParams.stop``) in the decoded text of a completion, one token at a time.

    ``hit(ids)`` is asked after each new token: does a stop string occur in the text of the last
    ``longest stop string + 1`` tokens? Every token decodes to at least one character, so a stop string that
    the newest token completes lies within that tail, and asked at every step the first hit is the token that
    completed it (the completion ends there, that token kept)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.window = max(len(s) for s in self.stops) + 1

    def hit(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids[-self.window :], skip_special_tokens=False)
        return any(s in text for s in self.stops)

    def first_end(self, ids: list[int]) -> int | None:
        """The length of ``ids`` up to and including the token that completes the first stop string, or None."""
        if not any(s in self.tokenizer.decode(ids, skip_special_tokens=False) for s in self.stops):
            return None
        for t in range(len(ids)):
            if self.hit(ids[: t + 1]):
                return t + 1
        return None


class _StopStringCriteria(StoppingCriteria):
    """``model.generate``'s stopping criterion for stop strings: records where each row first hit one."""

    def __init__(self, stopper: StopStrings, prompt_width: int, rows: int):
        self.stopper, self.width = stopper, prompt_width
        self.ends: list[int | None] = [None] * rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        gen = input_ids[:, self.width :].tolist()
        for i, row in enumerate(gen):
            if self.ends[i] is None and self.stopper.hit(row):
                self.ends[i] = len(row)
        return torch.tensor([e is not None for e in self.ends], dtype=torch.bool, device=input_ids.device)


class UnsupportedModel(EngineError):
    """The fast decode loop does not support this model (decode="auto" falls back to model.generate)."""


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, P) input ids and attention mask, padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def sampling_distribution(logits: torch.Tensor, s: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities sampled from, reported log-probs ``log_softmax(logits / T)``), both (R, V) float32.

    The sampled distribution follows transformers' sampling: divide by the temperature, keep the top-k
    (ties at the k-th value kept), keep the smallest top-p nucleus (at least one token), softmax. The
    reported log-probs are the un-truncated ones.
    """
    scaled = logits.float() / s.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    filtered = scaled
    if 0 < s.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, s.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(filtered, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
        drop_sorted[:, -1:] = False
        filtered = filtered.masked_fill(drop_sorted.scatter(1, sorted_idx, drop_sorted), float("-inf"))
    probs = logp.exp() if filtered is scaled else torch.softmax(filtered, dim=-1)
    return probs, logp


def sample_tokens(logits: torch.Tensor, s: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of ``logits`` (R, V), drawn from :func:`sampling_distribution`, and its reported
    log-prob ``log_softmax(logits / T)[token]``."""
    probs, logp = sampling_distribution(logits, s)
    tokens = torch.multinomial(probs, num_samples=1)  # (R, 1)
    return tokens.squeeze(1), logp.gather(-1, tokens).squeeze(1)


def loop_support(model: torch.nn.Module) -> dict[str, bool | str]:
    """How to call ``model`` in the decode loop, or :class:`UnsupportedModel` naming why it cannot be."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    if model_type not in LOOP_MODEL_TYPES:
        raise UnsupportedModel(
            f"model type {model_type!r} is not one the decode loop was tested on "
            f"({', '.join(sorted(LOOP_MODEL_TYPES))})"
        )
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{model_type} is configured as an encoder-decoder")
    attn = getattr(cfg, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        raise UnsupportedModel(f"attention implementation {attn!r} is not sdpa/eager")
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    if set(layer_types) != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        raise UnsupportedModel(
            f"{model_type} uses sliding-window or non-full attention layers ({sorted(set(layer_types))})"
        )
    params = inspect.signature(model.forward).parameters
    cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None)
    if cache_kw is None or "position_ids" not in params:
        raise UnsupportedModel(
            f"{type(model).__name__}.forward takes no cache/past_key_values or position_ids"
        )
    return {
        "cache_kw": cache_kw,
        "cache_position": "cache_position" in params,
        "logits_to_keep": "logits_to_keep" in params,
    }


class HFEngine(Engine):
    name = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
        threads: int = 0,
        version: int = 0,
        decode: str = "auto",
        attn_implementation: str = "sdpa",
    ):
        """``decode``: "loop" (fast loop; EngineError if the model is unsupported), "generate"
        (model.generate), or "auto" (the loop where :func:`loop_support` and a cached-vs-full probe
        accept the model, else generate)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, not {decode!r}")
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.device = device
        self.model = load_model(model_dir, device, dtype, attn_implementation=attn_implementation)
        self.numerics = numerics_id(dtype, attn_implementation, device)
        self.tokenizer = load_tokenizer(model_dir)
        self.fingerprint = model_fingerprint(model_dir)
        self.version = version
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = self._eos_ids()
        # prompt + max_new_tokens beyond the model's positions: the engine stage fails the prompt before the call
        self.context_limit = getattr(self.model.config, "max_position_embeddings", None)
        self._neutralise_generation_config()
        self._lock = threading.Lock()  # generate and reload never overlap: versions cannot change mid-call
        self._loop: dict[str, bool | str] = {}
        self.decode = self._choose_decode(decode)

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return tuple(int(i) for i in ids if i is not None)

    def _neutralise_generation_config(self) -> None:
        """Keep only the token ids of the model's generation config: nothing from generation_config.json
        (repetition_penalty, min_new_tokens, suppress_tokens, ...) can reach model.generate's defaults."""
        loaded = self.model.generation_config
        clean = GenerationConfig(**{k: getattr(loaded, k, None) for k in _TOKEN_ID_FIELDS})
        neutral = {**GenerationConfig().to_dict(), **_global_generation_defaults()}
        ignored = {
            k: v
            for k, v in loaded.to_dict().items()
            if k not in _TOKEN_ID_FIELDS
            and k not in _BOOKKEEPING_FIELDS
            and not k.startswith("_")
            and v is not None
            and v != neutral.get(k)
        }
        if ignored:
            log.info("ignoring the model's generation config (only the sampling params act): %s", ignored)
        self.model.generation_config = clean

    def _choose_decode(self, decode: str) -> str:
        if decode == "generate":
            return "generate"
        try:
            self._loop = loop_support(self.model)
            self._probe_loop()
        except UnsupportedModel as e:
            if decode == "loop":
                raise
            log.warning("decode loop unsupported (%s); sampling with model.generate", e)
            return "generate"
        log.info("sampling with the decode loop (%s)", self.model.config.model_type)
        return "loop"

    # ------------------------------------------------------------------ sampling
    async def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        return await asyncio.to_thread(self.generate_sync, prompts, n, sampling)

    def generate_sync(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        if any(not p for p in prompts):
            raise EngineError("cannot generate from an empty prompt")
        stop_ids = tuple(dict.fromkeys(self.eos_ids + tuple(sampling.stop_token_ids)))
        rows = [p for p in prompts for _ in range(n)]  # each prompt's n samples in a row
        sample = self._sample_loop if self.decode == "loop" else self._sample
        stopper = StopStrings(self.tokenizer, sampling.stop) if sampling.stop else None
        with self._lock:
            version = self.version
            new_ids, logprobs, str_ends = sample(rows, sampling, stop_ids, stopper)
        flat = self._completions(new_ids, logprobs, stop_ids, version, str_ends)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    # ---------------------------------------------------------- the decode loop
    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, past: int
    ) -> torch.Tensor:
        """Last-position logits (R, V) of ``ids`` (R, Q) at positions ``pos``, after ``past`` cached tokens."""
        kw = {self._loop["cache_kw"]: cache}
        if self._loop["cache_position"]:
            kw["cache_position"] = torch.arange(past, past + ids.shape[1], device=ids.device)
        if self._loop["logits_to_keep"]:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        return out.logits[:, -1]

    @torch.inference_mode()
    def _sample_loop(
        self,
        rows: list[list[int]],
        s: SamplingParams,
        stop_ids: tuple[int, ...],
        stopper: StopStrings | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
        """Prefill once, then one cached forward per token. Stopped rows leave the batch (their cache rows
        are dropped) once at most COMPACT_AT of it is still running, so compute follows the rows still running.
        With stop strings, each running row's text is checked after every token (``StopStrings``); the third
        result is, per row, the length at which a stop string ended it (None: it did not)."""
        dev = self.device
        ids, mask = left_pad(rows, self.pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        (n_rows, width), steps = ids.shape, s.max_new_tokens
        # the mask of every position the loop may reach: prompt padding 0, generated tokens 1
        att = torch.ones((n_rows, width + steps), dtype=torch.long, device=dev)
        att[:, :width] = mask
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: each row's first real token is at 0
        next_pos = pos[:, -1:] + 1
        stops = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        new = torch.full((n_rows, steps), self.pad_id, dtype=torch.long, device=dev)
        lps = torch.zeros((n_rows, steps), dtype=torch.float32, device=dev)
        slot_row = torch.arange(n_rows, device=dev)  # batch slot -> row of `new`
        done = torch.zeros(n_rows, dtype=torch.bool, device=dev)  # per slot
        str_ends: list[int | None] = [None] * n_rows
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache, 0)
        t = 0
        for t in range(steps):
            tok, lp = sample_tokens(logits, s)
            tok = tok.masked_fill(done, self.pad_id)  # a stopped row still in the batch gets padding
            new[slot_row, t] = tok
            lps[slot_row, t] = lp
            done |= torch.isin(tok, stops)
            if stopper is not None:
                lo = max(0, t + 1 - stopper.window)
                for slot in (~done).nonzero().squeeze(1).tolist():
                    row = int(slot_row[slot])
                    if stopper.hit(new[row, lo : t + 1].tolist()):
                        str_ends[row] = t + 1
                        done[slot] = True
            if t + 1 == steps:
                break
            running = int((~done).sum())
            if running == 0:
                break
            if running <= COMPACT_AT * done.numel():
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                att, next_pos, slot_row, tok, done = (x[keep] for x in (att, next_pos, slot_row, tok, done))
            logits = self._forward(tok[:, None], att[:, : width + t + 1], next_pos, cache, width + t)
            next_pos += 1
        return new[:, : t + 1].cpu().numpy(), lps[:, : t + 1].cpu().numpy(), str_ends

    @torch.inference_mode()
    def _probe_loop(self) -> None:
        """Teacher-force fixed tokens through the cached path and compare with one full forward of the same
        left-padded batch (no RNG used). Catches a model that ignores position ids or the padding mask."""
        vocab = int(self.model.config.vocab_size)
        prompts = [[(7 * i + 3) % vocab for i in range(6)], [(5 * i + 11) % vocab for i in range(2)]]
        forced = torch.tensor([[(3 * j + 4) % vocab for j in range(3)]] * 2, device=self.device)
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        width = ids.shape[1]
        full_ids = torch.cat([ids, forced], 1)
        full_mask = torch.cat([mask, torch.ones_like(forced)], 1)
        full_pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
        try:
            want = self.model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos).logits
            want = torch.log_softmax(want[:, width - 1 : -1].float(), -1)
            cache = DynamicCache()
            got = [self._forward(ids, mask, full_pos[:, :width], cache, 0)]
            for j in range(forced.shape[1] - 1):
                at = width + j
                got.append(
                    self._forward(
                        forced[:, j : j + 1], full_mask[:, : at + 1], full_pos[:, at : at + 1], cache, at
                    )
                )
            got = torch.log_softmax(torch.stack(got, 1).float(), -1)
        except Exception as e:  # noqa: BLE001 - any failure of the cached path means: not supported
            raise UnsupportedModel(f"the cached forward failed: {type(e).__name__}: {e}") from e
        err = float((got - want).abs().max())
        tol = 1e-3 if self.model.dtype == torch.float32 else 0.1
        if not err <= tol:
            raise UnsupportedModel(f"cached log-probs differ from a full forward by {err:.2g} (> {tol})")

    # ------------------------------------------------------ the generate fallback
    def _generation_config(self, s: SamplingParams, stop_ids: tuple[int, ...]) -> GenerationConfig:
        """Every field that could shape sampling set explicitly (neutral unless it is ours)."""
        neutral = _global_generation_defaults()
        neutral.update(
            min_length=0,
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            encoder_no_repeat_ngram_size=0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            length_penalty=1.0,
            num_beams=1,
            num_return_sequences=1,
            renormalize_logits=False,
            remove_invalid_values=False,
            output_scores=False,
            use_cache=True,
        )
        neutral.update(
            do_sample=True,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0 if s.top_k < 0 else s.top_k,
            max_new_tokens=s.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=list(stop_ids),
            bos_token_id=self.model.generation_config.bos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        neutral.pop("max_length", None)  # max_new_tokens decides
        return GenerationConfig(**neutral)

    @torch.inference_mode()
    def _sample(
        self,
        rows: list[list[int]],
        s: SamplingParams,
        stop_ids: tuple[int, ...],
        stopper: StopStrings | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
        ids, mask = left_pad(rows, self.pad_id)
        criteria = _StopStringCriteria(stopper, ids.shape[1], len(rows)) if stopper is not None else None
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=self._generation_config(s, stop_ids),
            stopping_criteria=StoppingCriteriaList([criteria]) if criteria is not None else None,
        )
        new = out.sequences[:, ids.shape[1] :]  # (R, T)
        # one step at a time: a (R, T, V) float tensor would be large for real vocabularies
        steps = [
            torch.log_softmax(logits.float() / s.temperature, dim=-1)
            .gather(-1, new[:, t : t + 1])
            .squeeze(-1)
            for t, logits in enumerate(out.logits)
        ]  # T x (R,)
        lps = torch.stack(steps, dim=1)  # (R, T)
        str_ends = criteria.ends if criteria is not None else [None] * len(rows)
        return new.cpu().numpy(), lps.cpu().numpy().astype(np.float32), str_ends

    @staticmethod
    def _completions(
        ids: np.ndarray,
        lps: np.ndarray,
        stop_ids: tuple[int, ...],
        version: int,
        str_ends: list[int | None] | None = None,
    ) -> list[Completion]:
        """One completion per row of ``ids`` (R, T): up to and including its first stop id (kept, with its
        log-prob: the learner trains on it) or the token that completed a stop string (``str_ends``), "stop";
        or all T tokens, "length". Padding after a stop is dropped."""
        ids, lps = ids.astype(np.int32, copy=False), lps.astype(np.float32, copy=False)
        hit = np.isin(ids, stop_ids)
        stopped = hit.any(axis=1)
        ends = np.where(stopped, hit.argmax(axis=1) + 1, ids.shape[1])
        for i, end in enumerate(str_ends or ()):
            if end is not None and (not stopped[i] or end < ends[i]):
                stopped[i], ends[i] = True, end
        return [
            Completion(
                ids[i, :end].copy(), lps[i, :end].copy(), "stop" if stop else "length", version, version
            )
            for i, (end, stop) in enumerate(zip(ends.tolist(), stopped.tolist(), strict=True))
        ]

    # ------------------------------------------------------------------ weights
    async def load_weights(self, path: str, version: int) -> None:
        await asyncio.to_thread(self.load_weights_sync, path, version)

    def load_weights_sync(self, path: str | Path, version: int) -> None:
        """Copy the safetensors weights of a (verified) checkpoint into the live model, in place."""
        t0 = time.monotonic()
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise EngineError(f"checkpoint {path} holds no *.safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f), device=str(self.device)))
        with self._lock:
            self._copy_state(state, path)
            self.version = version
        log.info("loaded weights version %d from %s in %.2fs", version, path, time.monotonic() - t0)

    def _copy_state(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise EngineError(f"checkpoint {path} has parameters the model lacks: {sorted(unexpected)[:5]}")
        params = dict(self.model.named_parameters(remove_duplicate=False))
        loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
        untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
        if untied:  # a tied weight (e.g. lm_head = embed_tokens) may be absent; anything else may not
            raise EngineError(f"checkpoint {path} lacks parameters: {sorted(untied)[:5]}")
