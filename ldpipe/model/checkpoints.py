"""Checkpoints: save (atomic, with ldpipe.json metadata; a LoRA model saves its adapter and names its base) and
load (a local folder or, opt-in, a hub id; a LoRA folder as base + adapter)."""

from __future__ import annotations

import json
import os
import re
import shutil
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ldpipe.atomic import free_space, is_disk_full, remove_dead_owners
from ldpipe.errors import LdpipeError
from ldpipe.model.lm import METADATA_FILE, resolve_device

# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
                    *, metadata: dict | None = None, extra: Callable[[Path], Any] | None = None) -> Path:
    """Write model + tokenizer (+ ldpipe.json) into `path` atomically.

    Everything goes into a sibling temp dir that is renamed into place, so a
    crash never leaves a half-written checkpoint under `path`. An existing
    checkpoint at `path` is replaced. `extra(tmp_dir)` writes further files (e.g.
    optimizer state) into the checkpoint before it is published.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_siblings(path)
    # with_name, not with_suffix: a name like "sft-v1.2" must not lose its ".2".
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    from ldpipe.model import lora

    if lora.is_peft(model):   # the adapter alone is saved; ldpipe.json says where its base weights are
        metadata = {**(metadata or {}), **lora.checkpoint_metadata(model, path)}
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True, default=str))
        if extra is not None:
            extra(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)    # never leave a half-written checkpoint behind
        if is_disk_full(e):
            raise LdpipeError(f"no space left on {path.parent} while writing the checkpoint {path.name} "
                              f"({free_space(path.parent)} free); free some space and rerun (nothing was replaced)"
                              ) from None
        raise
    old = None
    if path.exists():
        # os.replace cannot overwrite a non-empty directory: move the old one aside first.
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _sweep_dead_siblings(path: Path) -> None:
    """Remove `<name>.tmp-<pid>` / `<name>.old-<pid>` folders of processes that are gone (a crash or a full disk
    left them; a live writer's folder is never touched)."""
    def owner(d: Path) -> int | None:
        m = re.fullmatch(re.escape(path.name) + r"\.(?:tmp|old)-(\d+)", d.name)
        return int(m.group(1)) if m else None

    remove_dead_owners(path.parent.glob(f"{glob_escape(path.name)}.*-*"), owner)


def is_checkpoint(path: Path) -> bool:
    """A complete model folder: full weights (config.json) or a LoRA adapter (ldpipe.model.lora)."""
    path = Path(path)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def read_metadata(path: Path) -> dict:
    """The metadata dict written by save_checkpoint ({} if none)."""
    f = Path(path) / METADATA_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with separators is meant as a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _model_source(name_or_path: str | Path) -> str:
    """A local model directory (checked) or a hub id."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir() and (p / "adapter_config.json").is_file():   # a LoRA checkpoint (ldpipe.model.lora)
            return str(p)
        if not p.is_dir() or not (p / "config.json").is_file():
            raise LdpipeError(f"model path {str(p)!r} holds no model (no config.json)")
        return str(p)
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise LdpipeError(f"model path {str(p)!r} does not exist")
    return name


def _load(name: str, local_files_only: bool, loader: Callable[[], Any]) -> Any:
    try:
        return loader()
    except OSError as e:
        if local_files_only:
            raise LdpipeError(f"model {name!r} is neither a local directory (cwd {os.getcwd()}) nor in the local "
                              "Hugging Face cache; pass local_files_only=False to download it") from e
        raise LdpipeError(f"cannot load model {name!r}: {e}") from e
    except ValueError as e:  # e.g. an architecture this transformers version does not know
        raise LdpipeError(f"cannot load model {name!r}: {e}") from e


# Any of these in a model folder is a tokenizer transformers can load (fast, sentencepiece, GPT-2 BPE, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def load_tokenizer(name_or_path: str | Path, *, local_files_only: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model dir or (opt-in) a hub id, with pad = eos when it has no pad token."""
    source = _model_source(name_or_path)
    local = Path(source)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        # transformers would say "install sentencepiece or tiktoken", which is not the problem
        raise LdpipeError(f"no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])}) in {local}; save the tokenizer "
                          "beside the model (tokenizer.save_pretrained(folder))")
    tokenizer = _load(str(name_or_path), local_files_only,
                      lambda: AutoTokenizer.from_pretrained(source, local_files_only=local_files_only))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local dir or (opt-in) a hub id; model in eval mode.

    With local_files_only=True (the default) a hub id resolves only from the
    local HF cache, so nothing is downloaded unless the caller asks for it.
    """
    source = _model_source(name_or_path)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(name_or_path, local_files_only=local_files_only)
    from ldpipe.model import lora

    if lora.is_adapter_dir(source):   # base + adapter, the adapter trainable (influence over it alone)
        base, _ = load_model_and_tokenizer(lora.base_of(Path(source), read_metadata(Path(source))), device=dev,
                                           dtype=dtype)
        model = lora.load_adapter(base, Path(source))
        model.to(dev)
        model.eval()
        return model, tokenizer
    model = _load(str(name_or_path), local_files_only,
                  lambda: AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only))
    model.to(dev)
    model.eval()
    return model, tokenizer
