"""LoRA adapters through peft: a run with `lora:` trains an adapter on top of its start checkpoint.

A LoRA checkpoint folder holds the adapter (adapter_config.json, adapter_model.safetensors), the tokenizer and
ldpipe.json, whose `lora_base` names the folder of the weights under the adapter (relative to the checkpoint, so a
moved ldpipe home still loads). `models.load_model_and_tokenizer` loads such a folder as base + adapter, with only
the adapter trainable: scoring and generation see the adapted model, and influence (which differentiates the
trainable parameters) is over the adapter alone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:   # peft absent: no model can be one
        return False
    return isinstance(model, PeftModel)


def unwrap(model: Any) -> Any:
    """The transformers model inside a PeftModel (its layers carry the adapter), else `model` itself."""
    return model.get_base_model() if is_peft(model) else model


def apply_lora(model: Any, spec: Any, base_path: str | Path, seed: int = 0) -> Any:
    """Wrap `model` (loaded from `base_path`) with a fresh trainable adapter as `spec` (spec.LoraSpec) declares;
    a model that already carries an adapter (a chained run's parent) keeps training that one. The adapter's
    random init depends on `seed` alone, so the influence analyses rebuild a run's exact starting adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    if is_peft(model):
        return model
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                     target_modules=list(spec.target_modules) if spec.target_modules else None,
                     task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, cfg)
    wrapped.ldpipe_lora_base = str(Path(base_path).resolve())
    return wrapped


def describe(model: Any) -> str:
    """Which parameters influence differentiates, in words (asset metadata)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if not is_peft(model):
        return f"all {total:,} parameters"
    cfg = model.peft_config["default"]
    return f"the LoRA adapter only (r={cfg.r}, {sorted(cfg.target_modules or [])}): {trainable:,} of {total:,} parameters"


def checkpoint_metadata(model: Any, ckpt: Path) -> dict:
    """What ldpipe.json records of an adapter checkpoint: where its base weights are, and the adapter's size."""
    base = Path(model.ldpipe_lora_base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    cfg = model.peft_config["default"]
    return {"lora_base": os.path.relpath(base, Path(ckpt).resolve()),
            "lora": {"r": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                     "target_modules": sorted(cfg.target_modules or [])},
            "trainable_parameters": trainable, "total_parameters": total}


def base_of(path: Path, meta: dict) -> Path:
    """The base weights' folder of adapter checkpoint `path`."""
    from ldpipe.errors import LdpipeError

    if "lora_base" not in meta:
        raise LdpipeError(f"{path} holds a LoRA adapter but its ldpipe.json names no base model (lora_base)")
    base = (Path(path).resolve() / meta["lora_base"]).resolve()
    if not base.is_dir():
        raise LdpipeError(f"{path}: the base model of this LoRA adapter, {base}, is missing")
    return base


def load_adapter(base_model: Any, path: Path) -> Any:
    """`base_model` with the adapter of `path`, the adapter trainable (what influence differentiates)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(path), is_trainable=True)
    model.ldpipe_lora_base = str(Path(base_model.name_or_path).resolve())
    return model
