"""ops/sglang_host.sh launches SGLang with an explicit weight version (the base model's, 0): every answer
then names the weights it came from, and a restarted server is told apart from one serving a checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess

from tests.unit.test_ops_recipes import OPS, _events, _host_env, _wait_for


def test_sglang_is_launched_with_weight_version_0_and_extra_args_after_it(tmp_path):
    env = _host_env(tmp_path, SGLANG_EXTRA_ARGS="--tp-size 2")
    proc = subprocess.Popen(
        ["bash", str(OPS / "sglang_host.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(tmp_path, "producer-started")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    args = json.loads(next(e for e in _events(tmp_path) if e.startswith("sglang-started")).split(" ", 1)[1])
    assert args[args.index("--weight-version") + 1] == "0"
    # extra flags come last, so an operator's own --weight-version wins (argparse keeps the last one)
    assert args.index("--tp-size") > args.index("--weight-version")
