"""In-process transformers engine: batched sampling with exact behaviour log-probs (CPU or GPU).

Log-probs come from the *raw* logits (``output_logits=True``), divided by the temperature and
log-softmaxed, at the sampled token. The processed ``scores`` are not used: logits processors
(EOS masking, top-k/top-p) shift them by up to nats (measured: up to 2.3 nats with min_new_tokens' EOS masking). top-k/top-p only restrict sampling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from common.fingerprint import model_fingerprint
from modeling import load_model, load_tokenizer
from producer.engines.base import Completion, Engine, EngineError, SamplingParams

log = logging.getLogger(__name__)


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


class HFEngine(Engine):
    name = "transformers"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                 threads: int = 0, version: int = 0):  # fmt: skip
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.device = device
        self.model = load_model(model_dir, device, dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.fingerprint = model_fingerprint(model_dir)
        self.version = version
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()  # generate and reload never overlap: versions cannot change mid-call

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return tuple(int(i) for i in ids if i is not None)

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
        with self._lock:
            version = self.version
            new_ids, logprobs = self._sample(rows, sampling, stop_ids)
        flat = [self._completion(new_ids[i], logprobs[i], stop_ids, version) for i in range(len(rows))]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generation_config(self, s: SamplingParams, stop_ids: tuple[int, ...]) -> GenerationConfig:
        return GenerationConfig(
            do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0 if s.top_k < 0 else s.top_k,
            max_new_tokens=s.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=list(stop_ids),
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip

    @torch.inference_mode()
    def _sample(
        self, rows: list[list[int]], s: SamplingParams, stop_ids: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = left_pad(rows, self.pad_id)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=self._generation_config(s, stop_ids))  # fmt: skip
        new = out.sequences[:, ids.shape[1] :]  # (R, T)
        # one step at a time: a (R, T, V) float tensor would be large for real vocabularies
        steps = [
            torch.log_softmax(logits.float() / s.temperature, dim=-1)
            .gather(-1, new[:, t : t + 1])
            .squeeze(-1)
            for t, logits in enumerate(out.logits)
        ]  # T x (R,)
        lps = torch.stack(steps, dim=1)  # (R, T)
        return new.cpu().numpy(), lps.cpu().numpy().astype(np.float32)

    @staticmethod
    def _completion(ids: np.ndarray, lps: np.ndarray, stop_ids: tuple[int, ...], version: int) -> Completion:
        hits = np.flatnonzero(np.isin(ids, stop_ids))
        # keep the stop token itself (with its log-prob): the learner trains on it; drop the padding after it
        end, reason = (int(hits[0]) + 1, "stop") if hits.size else (ids.size, "length")
        return Completion(ids[:end].astype(np.int32), lps[:end].astype(np.float32), reason, version, version)

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
