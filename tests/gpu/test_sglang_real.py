"""The SGLang engine against a real SGLang server on the tiny model (GPU hosts with the ``sglang`` extra)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.fingerprint import model_fingerprint
from common.redis_conn import free_port
from producer.engines.base import SamplingParams
from producer.engines.sglang import SGLangEngine
from tests.support import write_step_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None, reason="the sglang package is not installed"
    ),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def sglang_server(tiny_model_dir: Path, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("sglang") / "server.log").open("wb")
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        "float32",
        "--mem-fraction-static",
        "0.2",
        "--disable-cuda-graph",
        "--weight-version",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(60)


@pytest.fixture
async def engine(sglang_server, tiny_model_dir):
    eng = SGLangEngine(
        sglang_server, fingerprint=model_fingerprint(tiny_model_dir), timeout_s=120, startup_timeout_s=600
    )
    await eng.start()
    yield eng
    await eng.close()


def recompute(model, prompt, completion, temperature):
    seq = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(seq).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, -1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).numpy()


async def test_real_server_logprobs_match_a_transformers_recompute(engine, tiny_model_dir):
    from modeling import load_model

    prompts = [[5, 6, 14, 7, 8, 15], [5, 14, 6, 15]]
    out = await engine.generate(prompts, 4, SamplingParams(temperature=0.7, max_new_tokens=12))
    model = load_model(tiny_model_dir)
    assert [len(g) for g in out] == [4, 4]
    for p, group in zip(prompts, out, strict=True):
        for c in group:
            assert c.finish_reason in ("stop", "length") and c.version_start == 0
            want = recompute(model, p, [int(x) for x in c.token_ids], 0.7)
            np.testing.assert_allclose(c.logprobs, want, atol=2e-3, rtol=0)  # GPU kernels vs CPU fp32


async def test_real_server_reloads_weights_and_reports_the_version(engine, tiny_model_dir, tmp_path):
    step = write_step_dir(tmp_path, 3, tiny_model_dir, perturb=0.05)
    await engine.load_weights(str(step), 3)
    out = await engine.generate([[5, 6, 14, 7, 8, 15]], 2, SamplingParams(max_new_tokens=8))
    assert {(c.version_start, c.version_end) for c in out[0]} == {(3, 3)}
