"""SGLang server client (the production engine), over HTTP with httpx; a timeout on every call.

Request/response shapes follow sglang 0.5.x (``io_struct.GenerateReqInput``, ``tokenizer_manager``):
``POST /generate`` with a batch of ``input_ids`` and ``sampling_params.n`` answers a list of
``len(input_ids) * n`` items, for each prompt its n samples in a row, each with ``output_ids`` and
``meta_info`` (``output_token_logprobs`` ``[logprob, token_id, text|null]``, ``finish_reason``
``{"type": ...}``, ``weight_version`` and, when weights changed mid-request, ``weight_versions`` spans).
SGLang reports ``log(softmax(logits / T))`` of the sampled token (before top-p/top-k renormalisation),
the same convention as the transformers engine.

Transport errors, timeouts and 5xx answers are retried with backoff a few times; a malformed answer is
an :class:`SGLangError` at once (a protocol mismatch does not heal by retrying).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from common.fingerprint import FingerprintError, model_fingerprint
from producer.engines.base import FINISH_REASONS, Completion, Engine, EngineError, SamplingParams

log = logging.getLogger(__name__)


class SGLangError(EngineError):
    """The SGLang server failed or answered something this client cannot use (one line: what and where)."""


# --------------------------------------------------------------------------- response parsing
def _version(raw: Any, fallback: int) -> int:
    """SGLang's weight_version is a string ("default" unless set by an update); ours are ints."""
    try:
        return int(raw)
    except (TypeError, ValueError):
        return fallback


def _spans(raw: Any, where: str, fallback: int) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(raw, list) or not raw:
        raise SGLangError(f"{where}: weight_versions must be a non-empty list of spans, got {raw!r:.80}")
    out = []
    for s in raw:
        if not isinstance(s, dict) or not {"version", "start", "end"} <= s.keys():
            raise SGLangError(f"{where}: weight_versions span {s!r:.80} lacks version/start/end")
        out.append((_version(s["version"], fallback), int(s["start"]), int(s["end"])))
    return tuple(out)


def _token_logprobs(meta: dict, output_ids: list, where: str) -> np.ndarray:
    triples = meta.get("output_token_logprobs")
    if not isinstance(triples, list):
        raise SGLangError(f"{where}: meta_info.output_token_logprobs missing (was return_logprob honoured?)")
    if len(triples) != len(output_ids):
        raise SGLangError(f"{where}: {len(output_ids)} output_ids but {len(triples)} output_token_logprobs")
    lps = np.empty(len(triples), dtype=np.float32)
    for j, t in enumerate(triples):
        if not isinstance(t, (list, tuple)) or len(t) < 2 or not isinstance(t[0], (int, float)):
            raise SGLangError(
                f"{where}: output_token_logprobs[{j}] = {t!r:.60} is not [logprob, token_id, text]"
            )
        if t[1] != output_ids[j]:
            raise SGLangError(
                f"{where}: output_token_logprobs[{j}] is for token {t[1]} but output_ids[{j}] = {output_ids[j]}"
            )
        if not math.isfinite(t[0]) or t[0] > 1e-3:
            raise SGLangError(f"{where}: output_token_logprobs[{j}] = {t[0]} is not a finite log-prob")
        lps[j] = t[0]
    return lps


def parse_item(item: Any, where: str, fallback_version: int) -> Completion:
    """One element of a /generate answer -> a validated :class:`Completion`."""
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise SGLangError(f"{where}: expected an object with meta_info, got {str(item)[:80]!r}")
    ids = item.get("output_ids")
    if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        raise SGLangError(f"{where}: output_ids must be a list of ints")
    meta = item["meta_info"]
    lps = _token_logprobs(meta, ids, where)
    finish = meta.get("finish_reason")
    reason = finish.get("type") if isinstance(finish, dict) else None
    if reason not in FINISH_REASONS:
        raise SGLangError(f"{where}: finish_reason {finish!r:.80} is not one of {FINISH_REASONS}")
    version = _version(meta.get("weight_version"), fallback_version)
    spans = _spans(meta["weight_versions"], where, version) if meta.get("weight_versions") else ()
    v0, v1 = (spans[0][0], spans[-1][0]) if spans else (version, version)
    return Completion(np.asarray(ids, dtype=np.int32), lps, reason, v0, v1, spans if len(spans) > 1 else ())


def parse_generate(body: Any, n_prompts: int, n: int, fallback_version: int) -> list[list[Completion]]:
    """A whole /generate answer -> ``n_prompts`` lists of ``n`` completions."""
    if isinstance(body, dict) and n_prompts * n == 1:
        body = [body]
    if not isinstance(body, list):
        raise SGLangError(
            f"/generate answered a {type(body).__name__}, expected a list of {n_prompts * n} items"
        )
    if len(body) != n_prompts * n:
        raise SGLangError(f"/generate answered {len(body)} items for {n_prompts} prompts x n={n}")
    flat = [parse_item(x, f"/generate item {i}", fallback_version) for i, x in enumerate(body)]
    return [flat[i * n : (i + 1) * n] for i in range(n_prompts)]


# --------------------------------------------------------------------------- the engine
class SGLangEngine(Engine):
    name = "sglang"

    def __init__(
        self,
        base_url: str,
        *,
        fingerprint: str,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        reload_mode: str = "finish",
        router_url: str | None = None,
        startup_timeout_s: float = 600.0,
        max_resubmits: int = 3,
        version: int = 0,
    ):
        self.base_url = base_url.rstrip("/")
        self.fingerprint = fingerprint
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.backoff_s = max(1, retries), backoff_s
        self.reload_mode, self.router_url = reload_mode, router_url
        self.startup_timeout_s, self.max_resubmits = startup_timeout_s, max_resubmits
        self.version = version
        self.resubmitted = 0  # samples resubmitted after an abort (a metric)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))

    # ------------------------------------------------------------------ HTTP with retries
    async def _request(
        self, method: str, url: str, *, json: Any = None, timeout_s: float | None = None
    ) -> Any:
        """JSON body of a 2xx answer; retries transport errors and 5xx, then raises SGLangError."""
        timeout = httpx.Timeout(timeout_s or self.timeout_s, connect=self.connect_timeout_s)
        what = f"{method} {url}"
        last = ""
        for attempt in range(1, self.retries + 1):
            try:
                resp = await self.client.request(method, url, json=json, timeout=timeout)
            except httpx.TransportError as e:  # connect errors, timeouts, dropped connections
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if resp.status_code < 500:
                    return self._json(resp, what)
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if attempt < self.retries:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "%s failed (%s); retry %d/%d in %.2fs", what, last, attempt, self.retries - 1, delay
                )
                await asyncio.sleep(delay)
        raise SGLangError(f"{what} failed after {self.retries} attempts: {last}")

    @staticmethod
    def _json(resp: httpx.Response, what: str) -> Any:
        if resp.status_code >= 400:
            raise SGLangError(f"{what}: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError:
            raise SGLangError(f"{what}: answer is not JSON: {resp.text[:120]!r}") from None

    # ------------------------------------------------------------------ start-up
    async def start(self) -> None:
        await self.wait_healthy()
        await self.check_model()
        if self.router_url:
            url = f"{self.router_url.rstrip('/')}/add_worker"
            resp = await self.client.post(url, params={"url": self.base_url}, timeout=self.connect_timeout_s)
            self._json(resp, f"POST {url}")
            log.info("registered %s with the router %s", self.base_url, self.router_url)

    async def wait_healthy(self) -> None:
        """GET /health until 200 (SGLang answers 503 while loading), up to ``startup_timeout_s``."""
        deadline = time.monotonic() + self.startup_timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                resp = await self.client.get(f"{self.base_url}/health", timeout=min(10.0, self.timeout_s))
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}"
            except httpx.TransportError as e:
                last = type(e).__name__
            await asyncio.sleep(min(0.25, max(0.01, deadline - time.monotonic())))
        raise SGLangError(
            f"SGLang at {self.base_url} not healthy after {self.startup_timeout_s:g}s (last: {last})"
        )

    async def check_model(self) -> None:
        info = await self._request("GET", f"{self.base_url}/model_info", timeout_s=min(30.0, self.timeout_s))
        path = info.get("model_path") if isinstance(info, dict) else None
        if not path:
            raise SGLangError(f"GET {self.base_url}/model_info names no model_path: {str(info)[:120]}")
        if not (Path(path) / "config.json").exists():
            log.warning("SGLang serves %s, not a local directory: cannot compare its fingerprint", path)
            return
        try:
            served = model_fingerprint(path)
        except FingerprintError as e:
            log.warning("cannot fingerprint the served model %s: %s", path, e)
            return
        if served != self.fingerprint:
            raise SGLangError(
                f"SGLang serves {path} (fingerprint {served}) but the producer's model has {self.fingerprint}"
            )

    # ------------------------------------------------------------------ generation
    def _payload(self, prompts: list[list[int]], n: int, s: SamplingParams) -> dict:
        params: dict[str, Any] = {
            "n": n,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "max_new_tokens": s.max_new_tokens,
        }
        if s.stop_token_ids:
            params["stop_token_ids"] = list(s.stop_token_ids)
        return {
            "input_ids": prompts,
            "sampling_params": params,
            "return_logprob": True,
            "logprob_start_len": -1,
        }

    async def _generate_once(
        self, prompts: list[list[int]], n: int, s: SamplingParams
    ) -> list[list[Completion]]:
        body = await self._request("POST", f"{self.base_url}/generate", json=self._payload(prompts, n, s))
        return parse_generate(body, len(prompts), n, self.version)

    async def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        """Aborted samples (weights reloaded with ``abort_all_requests``) are resubmitted, up to ``max_resubmits``."""
        if not prompts:
            return []
        done: list[list[Completion]] = [[] for _ in prompts]
        missing = dict.fromkeys(range(len(prompts)), n)
        for attempt in range(self.max_resubmits + 1):
            by_count: dict[int, list[int]] = defaultdict(list)
            for i, k in missing.items():
                by_count[k].append(i)
            calls = [
                self._generate_once([prompts[i] for i in idx], k, sampling) for k, idx in by_count.items()
            ]
            for idx, result in zip(by_count.values(), await asyncio.gather(*calls), strict=True):
                for i, comps in zip(idx, result, strict=True):
                    done[i] += [c for c in comps if c.finish_reason != "abort"]
            missing = {i: n - len(done[i]) for i in range(len(prompts)) if len(done[i]) < n}
            if not missing:
                return done
            self.resubmitted += sum(missing.values())
            log.info("resubmitting %d aborted samples (attempt %d)", sum(missing.values()), attempt + 1)
        raise SGLangError(
            f"{sum(missing.values())} samples still aborted after {self.max_resubmits} resubmissions"
        )

    # ------------------------------------------------------------------ weights
    async def load_weights(self, path: str, version: int) -> None:
        """``/update_weights_from_disk``; with reload_mode "finish" SGLang lets running requests finish first."""
        t0 = time.monotonic()
        body = {
            "model_path": str(path),
            "weight_version": str(version),
            "flush_cache": True,
            "abort_all_requests": self.reload_mode == "abort",
        }
        answer = await self._request("POST", f"{self.base_url}/update_weights_from_disk", json=body)
        if not isinstance(answer, dict) or not answer.get("success"):
            raise SGLangError(f"SGLang refused to load {path}: {str(answer)[:200]}")
        self.version = version
        log.info("SGLang loaded weights version %d from %s in %.2fs", version, path, time.monotonic() - t0)

    async def close(self) -> None:
        await self.client.aclose()
