"""A test HTTP server that speaks SGLang's JSON (sglang 0.5.x shapes), backed by the transformers engine.

Routes: ``POST /generate``, ``POST /update_weights_from_disk``, ``GET /health``, ``GET /model_info`` and
``GET /server_info`` (0.5.23+), ``GET /get_model_info`` and ``GET /get_server_info`` (all 0.5.x),
``POST /flush_cache``. :class:`Faults` injects the failures the client must survive or report:
HTTP 500, non-JSON bodies, mismatched log-prob lengths or ids, NaN log-probs, slow answers, 503 from
/health while "starting", aborted samples (with or without output_ids and log-probs), ``weight_versions``
spans, raw log-probs (``RETURN_ORIGINAL_LOGPROB``). Server settings emulated:

- ``context_len`` / ``max_total_num_tokens``: SGLang's length checks, which answer 400 for the *whole*
  batch when one prompt fails them (tokenizer manager: ``prompt >= context_len`` or
  ``prompt + max_new_tokens >= context_len``; scheduler: ``prompt >= max_req_input_len``), and its silent
  clip of ``max_new_tokens`` to ``max_req_len - prompt - 1``; ``/server_info`` reports
  ``max_req_input_len`` and ``max_total_num_tokens`` unless ``report_limits`` is off (then 404);
- ``old_api``: only the 0.5.2 names ``/get_model_info`` and ``/get_server_info`` (the new ones 404), and
  ``preferred_sampling_params`` reported as the launch argument's JSON string;
- ``preferred_sampling_params``: reported only (the fake does not apply them);
- ``launch_weight_version``: ``--weight-version`` ("default" when not given); ``restart()`` stops and starts
  the server on the same port and, like a real restart, serves the launch weights and version again.

Requests are validated like SGLang would (400 ``{"error": {"message": ...}}`` on a bad body) and logged.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from producer.engines.base import SamplingParams
from producer.engines.hf import HFEngine


@dataclass
class Faults:
    http_500: int = 0  # the next N /generate calls answer 500
    garbage: int = 0  # the next N /generate calls answer a non-JSON body
    short_logprobs: int = 0  # the next N answers drop the last output_token_logprobs entry
    wrong_token: int = 0  # the next N answers report a log-prob for another token id
    nan_logprob: int = 0  # the next N answers carry a NaN log-prob
    slow: int = 0  # the next N /generate calls sleep delay_s before answering
    slow_prompt: list[int] | None = None  # every /generate call holding this prompt sleeps delay_s
    http_400: int = 0  # the next N /generate calls answer 400 with one message (whatever they hold)
    delay_s: float = 0.0
    health_503: int = 0  # the first N /health calls answer 503 (server "starting")
    abort: int = 0  # the next N samples come back with finish_reason abort (truncated)
    abort_bare: int = 0  # the next N samples come back aborted, no output_ids nor log-probs (older servers)
    abort_prompt: list[int] | None = None  # every sample of this prompt comes back aborted like abort_bare
    original_logprob: bool = False  # raw-logit log-probs whatever the temperature (RETURN_ORIGINAL_LOGPROB)
    finish_type: str | None = None  # force this finish_reason type on every sample
    spans: list[dict] | None = None  # weight_versions attached to every sample
    model_path: str | None = None  # what /model_info reports (default: the served dir)

    def take(self, name: str) -> bool:
        n = getattr(self, name)
        if n > 0:
            setattr(self, name, n - 1)
            return True
        return False


@dataclass
class FakeSGLang:
    model_dir: Path
    port: int = 0
    faults: Faults = field(default_factory=Faults)
    launch_weight_version: str = "default"  # --weight-version (SGLang's default: "default")
    context_len: int = 0  # the model's context length (0: the fake does not check lengths)
    max_total_num_tokens: int = 0  # KV cache pool size in tokens (0: same as context_len)
    report_limits: bool = True  # /server_info reports max_req_input_len (else it answers 404)
    old_api: bool = False  # 0.5.2: /get_model_info and /get_server_info only
    preferred_sampling_params: dict | None = None  # --preferred-sampling-params (reported, not applied)
    requests: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = HFEngine(self.model_dir, seed=1234)
        self.weight_version = self.launch_weight_version  # what /generate answers report
        self.served_path = str(self.model_dir)
        self.restarts = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeSGLang:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-sglang").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` (in a background thread if > 0), start again on the same port, serving
        the launch weights and weight version (what a loaded checkpoint was is forgotten)."""
        self.stop()
        with self._lock:
            if self.served_path != str(self.model_dir):
                self.engine.load_weights_sync(self.model_dir, 0)
            self.served_path, self.weight_version = str(self.model_dir), self.launch_weight_version
            self.restarts += 1
        if down_s <= 0:
            self.start()
            return
        threading.Thread(target=lambda: (time.sleep(down_s), self.start()), daemon=True).start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    # ------------------------------------------------------------------ limits
    @property
    def max_req_len(self) -> int:
        """The scheduler's ``min(context_len - 1, max_total_num_tokens - 1)``."""
        return min(self.context_len, self.max_total_num_tokens or self.context_len) - 1

    @property
    def max_req_input_len(self) -> int:
        return self.max_req_len - 5

    def _length_error(self, prompts: list[list[int]], max_new: int) -> str | None:
        """SGLang's messages; the first failing prompt fails the whole batch."""
        if not self.context_len:
            return None
        for p in prompts:
            if len(p) >= self.context_len:
                return (f"The input ({len(p)} tokens) is longer than the model's context length "
                        f"({self.context_len} tokens).")  # fmt: skip
            if len(p) + max_new >= self.context_len:
                return (f"Requested token count exceeds the model's maximum context length of {self.context_len} "
                        f"tokens. You requested a total of {len(p) + max_new} tokens: {len(p)} tokens from the "
                        f"input messages and {max_new} tokens for the completion. Please reduce the number of "
                        "tokens in the input messages or the completion to fit within the limit.")  # fmt: skip
            if len(p) >= self.max_req_input_len:
                return (f"Input length ({len(p)} tokens) exceeds the maximum allowed length "
                        f"({self.max_req_input_len} tokens). Use a shorter input or enable --allow-auto-truncate.")  # fmt: skip
        return None

    # ------------------------------------------------------------------ route bodies
    def generate(self, body: dict) -> tuple[int, Any]:
        problem = _check_generate(body)
        if problem:
            return 400, {"error": {"message": problem}}
        sp = body["sampling_params"]
        max_new = sp.get("max_new_tokens", 128)
        problem = self._length_error(body["input_ids"], max_new)
        if problem:
            return 400, {"error": {"message": problem}}
        if self.context_len:  # the scheduler clips max_new_tokens silently
            max_new = min([max_new] + [self.max_req_len - len(p) - 1 for p in body["input_ids"]])
        sampling = SamplingParams(temperature=sp.get("temperature", 1.0), top_p=sp.get("top_p", 1.0),
                                  top_k=sp.get("top_k", -1), max_new_tokens=max_new,
                                  stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
                                  stop=tuple(sp.get("stop") or ()))  # fmt: skip
        groups = self.engine.generate_sync(body["input_ids"], sp.get("n", 1), sampling)
        top_n = int(body.get("top_logprobs_num") or 0)
        items = [self._item(c, p, sampling.temperature, top_n)
                 for p, g in zip(body["input_ids"], groups, strict=True) for c in g]  # fmt: skip
        return 200, items

    @torch.inference_mode()
    def _logprobs(self, prompt: list[int], ids: list[int], temperature: float, top_n: int):
        """Recomputed log-probs of ``ids`` after ``prompt`` (raw with the original_logprob fault), and the
        top ``top_n`` [logprob, id, None] at every position."""
        seq = torch.tensor([prompt + ids])
        logits = self.engine.model(seq).logits[0, len(prompt) - 1 : -1].float()
        if not self.faults.original_logprob:
            logits = logits / temperature
        logp = torch.log_softmax(logits, -1)
        lps = logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()
        top = torch.topk(logp, top_n, -1) if top_n else None
        tops = ([[[float(v), int(i), None] for v, i in zip(vals, idx, strict=True)]
                 for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
                if top is not None else None)  # fmt: skip
        return lps, tops

    def _item(self, c, prompt: list[int], temperature: float, top_n: int) -> dict:
        ids, lps = [int(x) for x in c.token_ids], [float(x) for x in c.logprobs]
        tops = None
        if self.faults.original_logprob or top_n:
            lps, tops = self._logprobs(prompt, ids, temperature, top_n)
        reason = self.faults.finish_type or c.finish_reason
        prompt_len = len(prompt)
        if self.faults.take("abort_bare") or prompt == self.faults.abort_prompt:  # aborted before prefill
            meta = {"id": f"req-{len(self.requests)}", "prompt_tokens": prompt_len, "completion_tokens": 0,
                    "cached_tokens": 0, "weight_version": self.weight_version,
                    "finish_reason": {"type": "abort", "message": "Abort before prefill", "status_code": 200}}  # fmt: skip
            return {"text": "", "meta_info": meta}
        if self.faults.take("abort"):
            ids, lps, reason = ids[:1], lps[:1], "abort"
        triples = [[lp, t, None] for lp, t in zip(lps, ids, strict=True)]
        if self.faults.take("short_logprobs"):
            triples = triples[:-1]
        if self.faults.take("wrong_token"):
            triples[0][1] = ids[0] + 1
        if self.faults.take("nan_logprob"):
            triples[0][0] = float("nan")
        finish = (
            {"type": reason, "matched": ids[-1]} if reason == "stop" else {"type": reason, "length": len(ids)}
        )
        meta = {"id": f"req-{len(self.requests)}", "finish_reason": finish, "prompt_tokens": prompt_len,
                "completion_tokens": len(ids), "cached_tokens": 0, "output_token_logprobs": triples,
                "weight_version": self.weight_version}  # fmt: skip
        if tops is not None:
            meta["output_top_logprobs"] = tops[: len(ids)]
        if self.faults.spans is not None:
            meta["weight_versions"] = self.faults.spans
        return {"text": "", "output_ids": ids, "meta_info": meta}

    def update_weights(self, body: dict) -> tuple[int, Any]:
        path = body.get("model_path")
        if not path or not (Path(path) / "config.json").exists():
            return 400, {
                "success": False,
                "message": f"model_path {path!r} is not a model directory",
                "num_paused_requests": 0,
            }
        version = body.get("weight_version")
        self.engine.load_weights_sync(path, int(version) if str(version).isdigit() else 0)
        if version is not None:
            self.weight_version = str(version)
        self.served_path = path
        return 200, {
            "success": True,
            "message": "Succeeded to update model weights.",
            "num_paused_requests": 0,
        }

    def _preferred(self) -> Any:
        p = self.preferred_sampling_params
        return json.dumps(p) if (p is not None and self.old_api) else p  # 0.5.2: the launch argument

    def model_info(self) -> dict:
        return {"model_path": self.faults.model_path or self.served_path, "tokenizer_path": self.served_path,
                "is_generation": True, "weight_version": self.weight_version,
                "preferred_sampling_params": self._preferred()}  # fmt: skip

    def server_info(self) -> dict | None:
        """A few of the server args and the scheduler info SGLang reports (None: 404)."""
        if not self.report_limits:
            return None
        info = {"model_path": str(self.model_dir), "context_length": None, "weight_version": self.launch_weight_version,
                "preferred_sampling_params": self._preferred(), "version": "0.5.2" if self.old_api else "0.5.23",
                "max_total_num_tokens": self.max_total_num_tokens or self.context_len or 1 << 20,
                "max_req_input_len": self.max_req_input_len if self.context_len else (1 << 20) - 6}  # fmt: skip
        return info


def _check_generate(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be an object"
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in ids):
        return "input_ids must be a non-empty batch of token id lists"
    if body.get("return_logprob") is not True or body.get("logprob_start_len") != -1:
        return "return_logprob must be true and logprob_start_len -1"
    sp = body.get("sampling_params")
    allowed = {"n", "temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "stop"}
    if not isinstance(sp, dict) or set(sp) - allowed:
        return f"sampling_params must be an object with keys from {sorted(allowed)}"
    return None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeSGLang
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, status: int, payload: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client timed out and hung up (the slow-answer fault): nothing to answer

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else None

    def do_GET(self) -> None:
        fake = self.fake
        fake.requests.append((self.path, None))
        new, old = ("/model_info", "/server_info"), ("/get_model_info", "/get_server_info")
        if self.path == "/health":
            self._send(503, {"status": "starting"}) if fake.faults.take("health_503") else self._send(200, {})
        elif self.path in old or (self.path in new and not fake.old_api):
            info = fake.model_info() if "model" in self.path else fake.server_info()
            self._send(200, info) if info is not None else self._send(404, {"detail": "Not Found"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        fake, body = self.fake, self._body()
        fake.requests.append((self.path, body))
        if self.path == "/generate":
            self._generate(body)
        elif self.path == "/update_weights_from_disk":
            self._send(*fake.update_weights(body or {}))
        elif self.path == "/flush_cache":
            self._send(200, None, raw=b"Cache flushed.")
        else:
            self._send(404, {"error": "not found"})

    def _generate(self, body: Any) -> None:
        faults = self.fake.faults
        if faults.take("slow") or (
            faults.slow_prompt and isinstance(body, dict) and faults.slow_prompt in body.get("input_ids", [])
        ):
            time.sleep(faults.delay_s)
        if faults.take("http_400"):
            return self._send(400, {"error": {"message": "sampling_params: unsupported field"}})
        if faults.take("http_500"):
            return self._send(500, {"error": "internal server error"})
        if faults.take("garbage"):
            return self._send(200, None, raw=b"<html>proxy error</html>")
        with self.fake._lock:
            self._send(*self.fake.generate(body))
