"""A test HTTP server that speaks SGLang's JSON (sglang 0.5.x shapes), backed by the transformers engine.

Routes: ``POST /generate``, ``POST /update_weights_from_disk``, ``GET /health``, ``GET /model_info``,
``POST /flush_cache``. :class:`Faults` injects the failures the client must survive or report:
HTTP 500, non-JSON bodies, mismatched log-prob lengths or ids, NaN log-probs, slow answers, 503 from
/health while "starting", aborted samples, ``weight_versions`` spans. ``restart()`` stops and starts the
server on the same port. Requests are validated like SGLang would (400 on a bad body) and logged.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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
    delay_s: float = 0.0
    health_503: int = 0  # the first N /health calls answer 503 (server "starting")
    abort: int = 0  # the next N samples come back with finish_reason abort (truncated)
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
    weight_version: str = "default"  # SGLang's default until an update names one
    requests: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = HFEngine(self.model_dir, seed=1234)
        self.served_path = str(self.model_dir)
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
        """Stop, stay down ``down_s`` (in a background thread if > 0), start again on the same port."""
        self.stop()
        if down_s <= 0:
            self.start()
            return
        threading.Thread(target=lambda: (time.sleep(down_s), self.start()), daemon=True).start()

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    # ------------------------------------------------------------------ route bodies
    def generate(self, body: dict) -> tuple[int, Any]:
        problem = _check_generate(body)
        if problem:
            return 400, {"error": problem}
        sp = body["sampling_params"]
        sampling = SamplingParams(temperature=sp.get("temperature", 1.0), top_p=sp.get("top_p", 1.0),
                                  top_k=sp.get("top_k", -1), max_new_tokens=sp.get("max_new_tokens", 128),
                                  stop_token_ids=tuple(sp.get("stop_token_ids") or ()))  # fmt: skip
        groups = self.engine.generate_sync(body["input_ids"], sp.get("n", 1), sampling)
        items = [self._item(c, len(p)) for p, g in zip(body["input_ids"], groups, strict=True) for c in g]
        return 200, items

    def _item(self, c, prompt_len: int) -> dict:
        ids, lps = [int(x) for x in c.token_ids], [float(x) for x in c.logprobs]
        reason = self.faults.finish_type or c.finish_reason
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

    def model_info(self) -> dict:
        return {"model_path": self.faults.model_path or self.served_path, "tokenizer_path": self.served_path,
                "is_generation": True, "weight_version": self.weight_version}  # fmt: skip


def _check_generate(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "body must be an object"
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in ids):
        return "input_ids must be a non-empty batch of token id lists"
    if body.get("return_logprob") is not True or body.get("logprob_start_len") != -1:
        return "return_logprob must be true and logprob_start_len -1"
    sp = body.get("sampling_params")
    allowed = {"n", "temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids"}
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
        if self.path == "/health":
            self._send(503, {"status": "starting"}) if fake.faults.take("health_503") else self._send(200, {})
        elif self.path == "/model_info":
            self._send(200, fake.model_info())
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
        if faults.take("slow"):
            time.sleep(faults.delay_s)
        if faults.take("http_500"):
            return self._send(500, {"error": "internal server error"})
        if faults.take("garbage"):
            return self._send(200, None, raw=b"<html>proxy error</html>")
        with self.fake._lock:
            self._send(*self.fake.generate(body))
