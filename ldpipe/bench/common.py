"""Inputs shared by the benchmarks: the built-in world, a default-size model, its probe set."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch


def set_threads(threads: int | None) -> int:
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    return torch.get_num_threads()


@lru_cache(maxsize=1)
def world():
    from ldpipe.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(seed=0))


@lru_cache(maxsize=1)
def tokenizer(vocab_size: int = 2048):
    from ldpipe.models import train_tokenizer

    return train_tokenizer(world().corpus, vocab_size=vocab_size)


def default_model(seed: int = 0, **arch):
    """The default experiment's architecture with random weights: speed does not depend on the weights."""
    from ldpipe.models import TinyModelConfig, build_model

    return build_model(TinyModelConfig(seed=seed, **arch), vocab_size=len(tokenizer()))


def probe_frame(n_prompts: int):
    from ldpipe.probes import ProbeRecipe, build_probe_set
    from ldpipe.synthetic import human_sentence

    w = world()
    return build_probe_set(w.preferences, ProbeRecipe(n_examples=n_prompts, seed=0), rephrases=w.rephrases,
                           human_sentence=human_sentence).probes


def encoded_probes(n_prompts: int, max_prompt_tokens: int = 96, max_response_tokens: int = 64):
    from ldpipe.scoring import encode_probes

    return encode_probes(tokenizer(), probe_frame(n_prompts), max_prompt_tokens=max_prompt_tokens,
                         max_response_tokens=max_response_tokens)


def save_default_model(path: Path, seed: int = 0) -> Path:
    from ldpipe.models import save_checkpoint

    return save_checkpoint(default_model(seed), tokenizer(), path, metadata={"bench": True})


@dataclass
class Timer:
    seconds: float = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
