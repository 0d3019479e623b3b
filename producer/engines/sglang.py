"""SGLang server client (the production engine), over HTTP with httpx; a timeout on every call.

Request/response shapes follow sglang 0.5.x (``io_struct.GenerateReqInput``, ``tokenizer_manager``):
``POST /generate`` with a batch of ``input_ids`` and ``sampling_params.n`` answers a list of
``len(input_ids) * n`` items, for each prompt its n samples in a row, each with ``output_ids`` and
``meta_info`` (``output_token_logprobs`` ``[logprob, token_id, text|null]``, ``finish_reason``
``{"type": ...}``, ``weight_version`` and, when weights changed mid-request, ``weight_versions`` spans).
SGLang reports ``log(softmax(logits / T))`` of the sampled token (before top-p/top-k renormalisation),
the same convention as the transformers engine.

Transport errors, timeouts and 5xx answers are retried with backoff a few times; a malformed answer is
an :class:`SGLangError` at once (a protocol mismatch does not heal by retrying). Two failures may be one
prompt's fault and are raised as such, for the engine stage (producer/generate.py) to narrow down:

- HTTP 400 (:class:`SGLangRefused`): SGLang validates every prompt of a batch before it starts and refuses
  the *whole* batch when one is invalid (``prompt + max_new_tokens >= context_len`` in the tokenizer
  manager, ``prompt >= max_req_input_len`` in the scheduler, token ids outside the vocabulary);
- a read timeout (:class:`SGLangTimeout`): for one prompt after the retries, for a batch at once (the
  engine stage retries it in halves).

Across SGLang versions and server settings (sources read: sglang 0.5.2 and 0.5.23,
``entrypoints/http_server.py``, ``managers/tokenizer_manager.py``, ``managers/scheduler.py``,
``layers/sampler.py``):

- ``GET /model_info`` exists from 0.5.23 on; 0.5.2 has only ``/get_model_info`` (same fields): a 404
  falls back. Likewise ``/server_info`` -> ``/get_server_info``, which report the scheduler's
  ``max_req_input_len`` (= min(context_len - 1, max_total_num_tokens - 1) - 5) and ``max_total_num_tokens``,
  and the ``context_length`` override. From them :attr:`SGLangEngine.context_limit` is the most
  ``prompt + max_new_tokens`` the server takes without refusing the batch or silently clipping
  ``max_new_tokens`` (``max_req_input_len + 4``). ``/model_info`` itself carries no context length.
- Aborted samples (``finish_reason.type == "abort"``; weights reloaded with ``abort_all_requests``) may come
  back without ``output_ids`` or log-probs in older servers: accepted, resubmitted up to ``max_resubmits``
  times, then a :class:`PromptFailure` ``engine_aborted`` for the prompts still short of samples.
- ``weight_version`` is the string ``"default"`` unless the server was launched with ``--weight-version``
  (ops/sglang_host.sh launches it with ``0``, the base model's version here). A non-integer version means
  the weights the server was launched with: version 0. An answer whose version is older than the one the
  engine loaded means the server restarted and lost the loaded checkpoint: the engine reloads that
  checkpoint and resubmits the call (if the reload fails, it serves and labels the launch weights, and
  the producer's weight follower loads the newest checkpoint at its next poll). Groups are never labelled
  with weights the server no longer serves.
- Log-probs must be those of the distribution sampled from (``log_softmax(logits / T)``). Refused at
  start, with one line naming the setting: ``--preferred-sampling-params`` with penalties, ``min_p``,
  ``min_new_tokens``, a logit bias, a grammar or a watermark (they fill in every field a request leaves
  out); a default watermark (``--watermark-config``); and the raw-log-prob mode of the
  ``RETURN_ORIGINAL_LOGPROB`` (0.5.2) / ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (0.5.23) environment variable,
  which no endpoint reports: a probe samples one token at two temperatures and compares the top-2
  log-prob gaps (they scale with 1/T unless the log-probs ignore the temperature).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from common.fingerprint import FingerprintError, model_fingerprint
from producer.engines.base import (
    FINISH_REASONS,
    Completion,
    Engine,
    EngineError,
    EngineRefused,
    EngineTimeout,
    GroupResult,
    PromptFailure,
    SamplingParams,
)

log = logging.getLogger(__name__)

LAUNCH_VERSION = 0  # what a non-integer weight_version ("default": launched without --weight-version) means
PROBE_PROMPT = [1, 2, 3]  # a trivial prompt for the start-up and liveness probes (ids every vocabulary has)
PROBE_TEMPERATURES = (1.0, 0.25)
MAX_RECOVERIES = 2  # server restarts survived within one generate call
# --preferred-sampling-params fields that change what is sampled but not the reported log-probs: their
# neutral values (temperature/top_p/top_k/max_new_tokens/n/stop_token_ids are sent with every request)
NEUTRAL_SAMPLING = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "min_p": 0.0,
}
EMPTY_SAMPLING = (
    "logit_bias",
    "json_schema",
    "regex",
    "ebnf",
    "structural_tag",
    "custom_params",
    "watermark",
)


class SGLangError(EngineError):
    """The SGLang server failed or answered something this client cannot use (one line: what and where)."""


class SGLangRefused(SGLangError, EngineRefused):
    """HTTP 400: SGLang refused the request (for /generate: the whole batch, for one prompt's sake)."""


class SGLangTimeout(SGLangError, EngineTimeout):
    """/generate timed out (a batch: at the first timeout; one prompt: at every attempt)."""


class _Restarted(Exception):
    """An answer labelled with older weights than the engine loaded: the server restarted."""

    def __init__(self, reported: int, believed: int):
        super().__init__(f"server reports weight version {reported}, the engine loaded {believed}")
        self.reported, self.believed = reported, believed


# --------------------------------------------------------------------------- response parsing
def _version(raw: Any, fallback: int) -> int:
    """SGLang's weight_version is a string: ours as a decimal after an update, else the launch value
    ("default" without ``--weight-version``), which means the launch weights. Missing: ``fallback``."""
    if raw is None:
        return fallback
    try:
        return int(raw)
    except (TypeError, ValueError):
        return LAUNCH_VERSION


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


def _finish_type(meta: dict) -> Any:
    finish = meta.get("finish_reason")
    return finish.get("type") if isinstance(finish, dict) else None


def abort_message(item: Any) -> str:
    """The message of an aborted sample ("" if none)."""
    meta = item.get("meta_info") if isinstance(item, dict) else None
    finish = meta.get("finish_reason") if isinstance(meta, dict) else None
    return str(finish.get("message") or "") if isinstance(finish, dict) else ""


def parse_item(item: Any, where: str, fallback_version: int) -> Completion:
    """One element of a /generate answer -> a validated :class:`Completion`. An aborted sample becomes an
    empty "abort" completion whatever it holds (older servers send no output_ids or log-probs)."""
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise SGLangError(f"{where}: expected an object with meta_info, got {str(item)[:80]!r}")
    if _finish_type(item["meta_info"]) == "abort":
        version = _version(item["meta_info"].get("weight_version"), fallback_version)
        empty = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        return Completion(*empty, "abort", version, version)
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


# --------------------------------------------------------------------------- server settings
def _error_message(resp: httpx.Response) -> str:
    """SGLang's ``{"error": {"message": ...}}`` (or FastAPI's ``{"detail": ...}``), else the body's start."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        for v in (err, body.get("detail"), body.get("message")):
            if isinstance(v, str) and v:
                return v[:300]
    return str(body)[:300]


def sampling_defaults_problem(preferred: Any) -> str | None:
    """What in ``--preferred-sampling-params`` makes the log-probs not those sampled from (None: nothing)."""
    if isinstance(preferred, str) and preferred.strip():
        try:
            preferred = json.loads(preferred)  # 0.5.2 reports the launch argument, a JSON string
        except ValueError:
            return f"--preferred-sampling-params {preferred[:80]!r} is not JSON"
    if not preferred:
        return None
    if not isinstance(preferred, dict):
        return f"--preferred-sampling-params {str(preferred)[:80]!r} is not an object"
    for key, neutral in NEUTRAL_SAMPLING.items():
        value = preferred.get(key)
        if value is not None and value != neutral:
            return f"--preferred-sampling-params sets {key}={value} (must be {neutral} or unset)"
    for key in EMPTY_SAMPLING:
        if preferred.get(key):
            return f"--preferred-sampling-params sets {key} (must be unset)"
    return None


def server_info_problem(info: dict) -> str | None:
    """Server-wide settings (``/server_info``) under which samples are not drawn as the log-probs say."""
    for key in ("watermark_default_enabled", "watermark_enforce_all"):
        if info.get(key):
            return f"--watermark-config turns on {key}: samples are drawn from watermarked logits"
    return sampling_defaults_problem(info.get("preferred_sampling_params"))


def context_limit_from(info: dict) -> int | None:
    """The most ``prompt + max_new_tokens`` the server takes without refusing the batch (tokenizer manager:
    ``>= context_len``; scheduler: ``prompt >= max_req_input_len``) or clipping ``max_new_tokens``
    (to ``max_req_len - prompt - 1``, where ``max_req_len = max_req_input_len + 5``)."""
    mril = info.get("max_req_input_len")
    if isinstance(mril, int) and not isinstance(mril, bool) and mril > 0:
        return mril + 4
    known = [
        x
        for x in (info.get("context_length"), info.get("max_total_num_tokens"))
        if isinstance(x, int) and not isinstance(x, bool) and x > 2
    ]
    return min(known) - 2 if known else None


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
        check_logprobs: bool = True,
    ):
        self.base_url = base_url.rstrip("/")
        self.fingerprint = fingerprint
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.backoff_s = max(1, retries), backoff_s
        self.reload_mode, self.router_url = reload_mode, router_url
        self.startup_timeout_s, self.max_resubmits = startup_timeout_s, max_resubmits
        self.check_logprobs = check_logprobs
        self.version = version
        self.context_limit: int | None = None  # from the server's info at start()
        self.resubmitted = 0  # samples resubmitted after an abort (a metric)
        self.restarts = 0  # server restarts detected (weights lost)
        self.last_abort = ""  # message of the last aborted sample
        self._loaded: tuple[str, int] | None = None  # the checkpoint this engine loaded last (path, version)
        self._load_lock = asyncio.Lock()  # one weight update at a time (follower or restart recovery)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))

    # ------------------------------------------------------------------ HTTP with retries
    async def _request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        timeout_s: float | None = None,
        split_on_timeout: bool = False,
        missing_ok: bool = False,
    ) -> Any:
        """JSON body of a 2xx answer; retries transport errors and 5xx, then raises SGLangError.
        HTTP 400 is :class:`SGLangRefused` at once; read timeouts at every attempt are :class:`SGLangTimeout`
        (with ``split_on_timeout`` at the first one); a 404 with ``missing_ok`` is None."""
        seconds = timeout_s or self.timeout_s
        timeout = httpx.Timeout(seconds, connect=self.connect_timeout_s)
        what = f"{method} {url}"
        last, read_timeouts = "", 0
        for attempt in range(1, self.retries + 1):
            try:
                resp = await self.client.request(method, url, json=json, timeout=timeout)
            except httpx.ReadTimeout:
                read_timeouts += 1
                last = "ReadTimeout"
                if split_on_timeout:
                    raise SGLangTimeout(f"{what}: no answer within {seconds:g}s") from None
            except httpx.TransportError as e:  # connect errors and timeouts, dropped connections
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if resp.status_code == 404 and missing_ok:
                    return None
                if resp.status_code < 500:
                    return self._json(resp, what)
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if attempt < self.retries:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "%s failed (%s); retry %d/%d in %.2fs", what, last, attempt, self.retries - 1, delay
                )
                await asyncio.sleep(delay)
        error = SGLangTimeout if read_timeouts == self.retries else SGLangError
        raise error(f"{what} failed after {self.retries} attempts: {last}")

    @staticmethod
    def _json(resp: httpx.Response, what: str) -> Any:
        if resp.status_code == 400:
            raise SGLangRefused(f"{what}: HTTP 400: {_error_message(resp)}")
        if resp.status_code >= 400:
            raise SGLangError(f"{what}: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError:
            raise SGLangError(f"{what}: answer is not JSON: {resp.text[:120]!r}") from None

    async def _get_info(self, *paths: str) -> tuple[str, Any]:
        """The first of ``paths`` the server knows (newer names first; older servers answer 404)."""
        for path in paths:
            url = f"{self.base_url}{path}"
            body = await self._request("GET", url, timeout_s=min(30.0, self.timeout_s), missing_ok=True)
            if body is not None:
                return path, body
        return paths[-1], None

    # ------------------------------------------------------------------ start-up
    async def start(self) -> None:
        await self.wait_healthy()
        await self.check_model()
        await self.read_server_info()
        if self.check_logprobs:
            await self.check_logprob_convention()
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
        """The served model (``/model_info``, or ``/get_model_info`` before 0.5.23) is the producer's, and its
        ``--preferred-sampling-params`` leave the sampled distribution alone."""
        where, info = await self._get_info("/model_info", "/get_model_info")
        path = info.get("model_path") if isinstance(info, dict) else None
        if not path:
            raise SGLangError(f"GET {self.base_url}{where} names no model_path: {str(info)[:120]}")
        problem = sampling_defaults_problem(info.get("preferred_sampling_params"))
        if problem:
            raise SGLangError(
                f"SGLang at {self.base_url}: {problem}: its log-probs are not those of the "
                "distribution it samples from; relaunch it without that setting"
            )
        if _version(info.get("weight_version"), LAUNCH_VERSION) != LAUNCH_VERSION:
            log.warning(
                "SGLang at %s already serves weight version %s (loaded before this producer started)",
                self.base_url,
                info.get("weight_version"),
            )
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

    async def read_server_info(self) -> None:
        """``/server_info`` (``/get_server_info`` before 0.5.23): refuse settings that break the log-probs,
        and take the context limit."""
        try:
            where, info = await self._get_info("/server_info", "/get_server_info")
        except SGLangError as e:
            info, where = None, str(e)
        if not isinstance(info, dict):
            log.warning(
                "SGLang at %s reports no server info (%s): no context limit is known, so a batch "
                "it refuses is split to find the prompt at fault",
                self.base_url,
                where,
            )
            return
        problem = server_info_problem(info)
        if problem:
            raise SGLangError(
                f"SGLang at {self.base_url}: {problem}: its log-probs are not those of the "
                "distribution it samples from; relaunch it without that setting"
            )
        self.context_limit = context_limit_from(info)
        log.info(
            "SGLang at %s: version %s, prompt + max_new_tokens <= %s tokens",
            self.base_url,
            info.get("version", "?"),
            self.context_limit,
        )

    async def check_logprob_convention(self) -> None:
        """Refuse a server that reports raw log-probs (``RETURN_ORIGINAL_LOGPROB``), which no endpoint shows:
        sample one token of :data:`PROBE_PROMPT` at two temperatures with the top-2 log-probs. Ours scale the
        gap between the two by 1/T; raw ones do not change."""
        gaps = []
        for t in PROBE_TEMPERATURES:
            body = self._payload([PROBE_PROMPT], 1, SamplingParams(temperature=t, max_new_tokens=1))
            answer = await self._request(
                "POST",
                f"{self.base_url}/generate",
                json={**body, "top_logprobs_num": 2},
                timeout_s=min(60.0, self.timeout_s),
            )
            item = answer[0] if isinstance(answer, list) and answer else answer
            try:
                top = item["meta_info"]["output_top_logprobs"][0]
                gaps.append(float(top[0][0]) - float(top[1][0]))
            except (KeyError, IndexError, TypeError, ValueError):
                log.warning(
                    "SGLang at %s returned no top log-probs: cannot check its log-prob convention",
                    self.base_url,
                )
                return
        want = PROBE_TEMPERATURES[0] / PROBE_TEMPERATURES[1]
        if not (math.isfinite(gaps[0]) and math.isfinite(gaps[1])) or gaps[0] < 1e-3:
            log.warning("SGLang log-prob probe inconclusive (top-2 gaps %s)", gaps)
            return
        ratio = gaps[1] / gaps[0]
        if abs(ratio - 1) < 0.25 * (want - 1):
            raise SGLangError(
                f"SGLang at {self.base_url} reports log-probs that ignore the temperature (top-2 gap "
                f"{gaps[0]:.4g} at T={PROBE_TEMPERATURES[0]:g} and {gaps[1]:.4g} at T={PROBE_TEMPERATURES[1]:g}): "
                "it runs with RETURN_ORIGINAL_LOGPROB / SGLANG_RETURN_ORIGINAL_LOGPROB set; relaunch it without"
            )
        if abs(ratio - want) > 0.25 * want:
            log.warning("SGLang log-prob probe: top-2 gap ratio %.3g, expected %.3g", ratio, want)

    async def check_alive(self) -> None:
        """A one-token request of :data:`PROBE_PROMPT` must succeed (else the server, not a prompt, is at fault)."""
        body = self._payload([PROBE_PROMPT], 1, SamplingParams(max_new_tokens=1))
        try:
            answer = await self._request("POST", f"{self.base_url}/generate", json=body)
            (probe,) = parse_generate(answer, 1, 1, self.version)[0]
        except EngineRefused as e:
            raise SGLangError(
                f"SGLang refuses even a one-token probe request, so not one prompt is at fault: {e}"
            ) from None
        except EngineTimeout as e:
            raise SGLangError(f"SGLang does not even answer a one-token probe request: {e}") from None
        if probe.finish_reason == "abort":
            raise SGLangError(
                f"SGLang aborts even a one-token probe request ({abort_message(answer[0] if isinstance(answer, list) else answer) or 'no message'})"
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
        if s.stop:  # the server ends a sample at a stop string (the reward text is cut before it on append)
            params["stop"] = list(s.stop)
        return {
            "input_ids": prompts,
            "sampling_params": params,
            "return_logprob": True,
            "logprob_start_len": -1,
        }

    async def _generate_once(
        self, prompts: list[list[int]], n: int, s: SamplingParams
    ) -> list[list[Completion]]:
        believed = self.version
        body = await self._request(
            "POST",
            f"{self.base_url}/generate",
            json=self._payload(prompts, n, s),
            split_on_timeout=len(prompts) > 1,
        )
        groups = parse_generate(body, len(prompts), n, believed)
        oldest = min(c.version_start for g in groups for c in g)
        if oldest < believed:
            raise _Restarted(oldest, believed)
        for item in body if isinstance(body, list) else [body]:
            self.last_abort = abort_message(item) or self.last_abort
        return groups

    async def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[GroupResult]:
        """Aborted samples are resubmitted (up to ``max_resubmits``); answers from a server that lost the loaded
        weights (restarted) make the engine reload them and submit the call again."""
        if not prompts:
            return []
        for _ in range(MAX_RECOVERIES + 1):
            try:
                return await self._generate_resubmitting(prompts, n, sampling)
            except _Restarted as e:
                await self._recover(e)
        raise SGLangError(
            f"SGLang at {self.base_url} lost its weights {MAX_RECOVERIES + 1} times in one call"
        )

    async def _generate_resubmitting(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[GroupResult]:
        done: list[list[Completion]] = [[] for _ in prompts]
        missing = dict.fromkeys(range(len(prompts)), n)
        for attempt in range(self.max_resubmits + 1):
            by_count: dict[int, list[int]] = defaultdict(list)
            for i, k in missing.items():
                by_count[k].append(i)
            calls = [
                self._generate_once([prompts[i] for i in idx], k, sampling) for k, idx in by_count.items()
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)  # none left running on an error
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            for idx, result in zip(by_count.values(), results, strict=True):
                for i, comps in zip(idx, result, strict=True):
                    done[i] += [c for c in comps if c.finish_reason != "abort"]
            missing = {i: n - len(done[i]) for i in range(len(prompts)) if len(done[i]) < n}
            if not missing:
                return done  # type: ignore[return-value]
            if attempt < self.max_resubmits:
                self.resubmitted += sum(missing.values())
                log.info("resubmitting %d aborted samples (attempt %d)", sum(missing.values()), attempt + 1)
        log.warning(
            "%d prompts still have aborted samples after %d resubmissions (last abort: %s)",
            len(missing),
            self.max_resubmits,
            self.last_abort or "no message",
        )
        out: list[GroupResult] = list(done)
        for i, k in missing.items():
            out[i] = PromptFailure(
                "engine_aborted",
                f"{k} of {n} samples still aborted after {self.max_resubmits} "
                f"resubmissions (last abort: {self.last_abort or 'no message'})"[:300],
            )
        return out

    async def _recover(self, e: _Restarted) -> None:
        """The server answered with older weights than this engine loaded (it restarted): load them again,
        or, if that fails, serve and label the server's launch weights (the follower reloads the newest)."""
        async with self._load_lock:
            if self.version != e.believed:
                return  # newer weights were loaded meanwhile: just submit again
            self.restarts += 1
            if self._loaded is not None and self._loaded[1] == e.believed:
                path = self._loaded[0]
                try:
                    await self._update_weights(path, e.believed)
                except SGLangError as err:
                    log.error(
                        "SGLang at %s lost weight version %d (restarted?) and cannot reload %s: %s; "
                        "labelling samples with its weights, version %d",
                        self.base_url,
                        e.believed,
                        path,
                        err,
                        e.reported,
                    )
                else:
                    log.warning(
                        "SGLang at %s reported weight version %d while serving %d (restarted?): reloaded %s",
                        self.base_url,
                        e.reported,
                        e.believed,
                        path,
                    )
                    return
            self.version = e.reported
            self._loaded = None

    # ------------------------------------------------------------------ weights
    async def load_weights(self, path: str, version: int) -> None:
        """``/update_weights_from_disk``; with reload_mode "finish" SGLang lets running requests finish first."""
        async with self._load_lock:
            await self._update_weights(path, version)

    async def _update_weights(self, path: str, version: int) -> None:
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
        self._loaded = (str(path), version)
        log.info("SGLang loaded weights version %d from %s in %.2fs", version, path, time.monotonic() - t0)

    async def close(self) -> None:
        await self.client.aclose()
