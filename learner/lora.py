"""LoRA through ``peft`` (the optional ``lora`` extra, imported only when ``learner.lora.r > 0``).

The learner trains the adapters only (the base weights are frozen); AdamW holds their state alone. Producers
never see an adapter: every published checkpoint holds the **merged** full weights ``W + (alpha / r) · B A`` of
each adapted layer, under the base model's own parameter names, so the transformers engine and SGLang load it
like any other checkpoint (docs/architecture.md, "Checkpoints"). The adapters themselves go to the learner's
private state (``adapter.safetensors`` + ``adapter.json``), with which a resume rebuilds exactly the same model
from the base (``learner.model``), whose weight files must hash as they did when the run started.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from common.config import LoraSettings
from common.hub import ModelLoadError, resolve_model_dir

log = logging.getLogger(__name__)
Tensor = torch.Tensor
ADAPTER = "default"


class LoraError(RuntimeError):
    """A LoRA set-up or resume problem (peft missing, adapters that do not match), stated in one line."""


def _peft():
    try:
        import peft
    except ImportError:
        raise LoraError(
            "learner.lora.r > 0 needs peft: pip install 'gspo-pipeline[lora]' (or pip install peft)"
        ) from None
    return peft


def spec(lora: LoraSettings) -> dict:
    """The adapter configuration as stored with the trainer state (a resume must use the same)."""
    return {
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
    }


def apply_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """Inject adapters into ``model`` in place; returns the same transformers model (base frozen, adapters
    trainable). The learner keeps calling the transformers model: its adapted layers run base + adapter."""
    peft = _peft()
    targets = lora.target_modules
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        bias="none",
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. no module matches target_modules
        raise LoraError(f"learner.lora: {str(e).splitlines()[0]}") from None
    inner = wrapped.get_base_model()
    trainable = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    total = sum(p.numel() for p in inner.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %s: %d trainable parameters of %d",
        lora.r,
        lora.alpha,
        targets,
        trainable,
        total,
    )
    return inner


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")
    }


def is_lora(model: torch.nn.Module) -> bool:
    return bool(_lora_layers(model))


def _is_adapter_key(key: str) -> bool:
    return any(part.startswith("lora_") for part in key.split("."))


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """CPU copies of the full weights producers load: each adapted layer's weight is base + its delta
    (``get_delta_weight``: ``(alpha / r) · B @ A``, transposed where the layer is), under the base model's names.
    The live model is not modified (no merge/unmerge round trip, so training goes on from exact weights)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not _is_adapter_key(key):
            out[key.replace(".base_layer.", ".")] = value.detach().to("cpu", copy=True)
    for name, layer in _lora_layers(model).items():
        key = f"{name}.weight"
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = layer.get_delta_weight(adapter).detach().to("cpu", torch.float32)
                out[key] = (out[key].to(torch.float32) + delta).to(out[key].dtype)
    return out


def adapter_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """CPU copies of the trainable adapter tensors, by their names in the adapted model."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_adapter_state(model: torch.nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Copy saved adapter tensors into the adapted model; every trainable tensor must be there, with its shape."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise LoraError(
            f"{where}: the saved adapters do not match the model's (missing {missing[:3]}, extra {extra[:3]})"
        )
    for n, p in params.items():
        if p.shape != tensors[n].shape:
            raise LoraError(
                f"{where}: adapter {n} has shape {tuple(tensors[n].shape)}, the model's is {tuple(p.shape)}"
            )
        p.copy_(tensors[n].to(p.device, p.dtype))


def base_weights_digest(model: str | Path) -> str:
    """sha256 over the base model's ``*.safetensors`` files (names and bytes): a LoRA run resumes only on the
    base it was trained from, since its published weights cannot be split back into base and adapters."""
    try:
        d = resolve_model_dir(model)
    except ModelLoadError as e:
        raise LoraError(str(e)) from None
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise LoraError(f"base model {d} has no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def check_resume(saved: dict, current: dict, where: str) -> None:
    """Refuse in one line to resume adapters with another configuration or on another base model; ``saved`` and
    ``current`` are ``{"spec", "base_model", "base_sha256"}`` (``Trainer.lora_meta``)."""
    if saved.get("spec") != current["spec"]:
        raise LoraError(
            f"{where}: adapters were trained with learner.lora = {saved.get('spec')}, the config says {current['spec']}"
        )
    if saved.get("base_sha256") != current["base_sha256"]:
        raise LoraError(
            f"{where}: the base model {current['base_model']} is not the one these adapters were trained on (its "
            f"weight files hash differently); point learner.model at the run's base ({saved.get('base_model')})"
        )
