"""Import rules: the producer and the learner never import each other, `common` imports neither (nor torch),
`modeling` (shared torch-side loading) imports neither service, and `gspo --help` imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "sglang")

COMMON_LIGHT = """
import common.wire, common.streams, common.config, common.keys, common.tasks, common.feeder, common.manifest, common.store
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


# ---------------------------------------------------------------- side boundaries (static: lazy imports too)
# who may not import whom: the two services meet only through Redis and published checkpoints
FORBIDDEN = {
    "producer": {"learner"},
    "learner": {"producer"},
    "common": {"producer", "learner", "modeling", "torch", "transformers", "sglang"},
    "modeling": {"producer", "learner"},
}


def _imported_roots(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``path``, function-level and conditional ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


@pytest.mark.parametrize("side", sorted(FORBIDDEN))
def test_side_boundaries_hold_for_every_import(side):
    files = sorted((REPO / side).rglob("*.py"))
    assert files, f"no python files under {side}/"
    crossings = [
        f"{f.relative_to(REPO)}:{line} imports {root}"
        for f in files
        for line, root in _imported_roots(f)
        if root in FORBIDDEN[side]
    ]
    assert not crossings, "\n".join(crossings)


def test_boundary_scan_sees_lazy_imports(tmp_path):
    """The scan is not vacuous: a function-level import and an importlib call are both found."""
    f = tmp_path / "m.py"
    f.write_text(
        "def f():\n    from learner import trainer\n    import importlib\n"
        "    importlib.import_module('producer.service')\n"
    )
    roots = {r for _, r in _imported_roots(f)}
    assert {"learner", "producer"} <= roots
