"""`common` stays light (no torch, transformers, sglang, producer, learner) and `gspo --help` imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "sglang")

COMMON_LIGHT = """
import common.wire, common.streams, common.config, common.keys, common.tasks, common.feeder, common.manifest
import common.admission, common.fingerprint, common.redis_conn, common.logs
import sys
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sglang', 'producer', 'learner'))
assert not bad, bad
print('ok')
"""

CLI_HELP = f"""
import sys
HEAVY = {HEAVY!r}
from typer.testing import CliRunner
from gspo.cli import app
for args in (['--help'], ['learner', '--help'], ['producer', '--help'], ['prompts', 'load', '--help'],
             ['config', 'show', '--doc']):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (args, r.output)
    assert 'Usage' in r.output or 'learner.lr' in r.output, args
bad = sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)
assert not bad, bad
print('ok')
"""


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_common_imports_no_torch_producer_or_learner():
    r = run_py("-c", COMMON_LIGHT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_cli_help_of_every_command_imports_no_torch():
    r = run_py("-c", CLI_HELP)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_python_m_gspo_help_exits_0_without_importing_torch():
    r = run_py("-X", "importtime", "-m", "gspo", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Usage" in r.stdout and "learner" in r.stdout and "producer" in r.stdout
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in r.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "typer" in imported  # the importtime report is really there
    assert not imported & set(HEAVY), imported & set(HEAVY)
