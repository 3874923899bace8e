"""Inputs shared by the benchmarks: the built-in world, a default-size model, its probe set."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def set_threads(threads: int | None) -> int:
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    return torch.get_num_threads()


@lru_cache(maxsize=1)
def world():
    from ldpipe.data.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(seed=0))


@lru_cache(maxsize=1)
def tokenizer(vocab_size: int = 2048):
    from ldpipe.model.lm import train_tokenizer

    return train_tokenizer(world().corpus, vocab_size=vocab_size)


# Architectures the benchmarks can run at, random weights (speed and memory do not depend on the weights).
# "160m" / "410m" have the Pythia GPT-NeoX shapes and vocabulary; the built-in tokenizer's ids are a subset.
ARCHS: dict[str, tuple[dict, int | None]] = {
    "default": ({}, None),
    "160m": ({"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
              "max_position_embeddings": 2048}, 50304),
    "410m": ({"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096,
              "max_position_embeddings": 2048}, 50304),
}


def bench_model(arch: str = "default", seed: int = 0):
    """A model of one of ARCHS, random weights."""
    from ldpipe.errors import LdpipeError
    from ldpipe.model.lm import TinyModelConfig, build_model

    if arch not in ARCHS:
        raise LdpipeError(f"unknown --arch {arch!r}; choose one of {list(ARCHS)}")
    kw, vocab = ARCHS[arch]
    return build_model(TinyModelConfig(seed=seed, **kw), vocab_size=vocab or len(tokenizer()))


def bench_device(device: str | None):
    """--device: auto (CUDA when present) | cpu | cuda | cuda:N, resolved as training resolves it."""
    from ldpipe.model.lm import resolve_device

    return resolve_device(device or "auto")


def probe_frame(n_prompts: int):
    from ldpipe.data.synthetic import human_sentence
    from ldpipe.probes.build import ProbeRecipe, build_probe_set

    w = world()
    return build_probe_set(w.preferences, ProbeRecipe(n_examples=n_prompts, seed=0), rephrases=w.rephrases,
                           human_sentence=human_sentence).probes


def encoded_probes(n_prompts: int, max_prompt_tokens: int = 96, max_response_tokens: int = 64):
    from ldpipe.model.scoring import encode_probes

    return encode_probes(tokenizer(), probe_frame(n_prompts), max_prompt_tokens=max_prompt_tokens,
                         max_response_tokens=max_response_tokens)


def save_bench_model(model, path: Path, arch: str) -> Path:
    from ldpipe.model.checkpoints import save_checkpoint

    return save_checkpoint(model, tokenizer(), path, metadata={"bench": True, "arch": arch})


def timed(fn: Callable[[], T], dev: torch.device, repeats: int = 1) -> tuple[float, T]:
    """(best wall seconds of `repeats` calls, the last result), with the device's queued work finished
    before and after each call (CUDA runs asynchronously; elsewhere nothing to wait for)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return best, out


@dataclass
class Timer:
    seconds: float = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
