"""Text generation from a causal LM: greedy or sampled continuations of prompts, batched and seeded.

Used by the model-made probe types (y_init, y_selfr) and by the generation-based analyses
(squeezing's repeater rate, hallucination borrowing, win rate). Prompts are tokenized the way
the scorer does (ldpipe.model.encoding: the tokenizer's BOS, its chat template under `chat_template: auto`; the
prompt keeps its last `max_prompt_tokens` tokens) and left-padded so a batch of prompts decodes together. Decoding
stops at EOS, at the model's own EOS ids, and with a chat template at its end-of-turn token (encoding.stop_ids).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ldpipe.model.encoding import encode_prompt, stop_ids, uses_chat_template
from ldpipe.model.lm import attention_without_cudnn, eval_mode


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False      # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    max_prompt_tokens: int = 96
    chat_template: str = "auto"   # as ldpipe.model.encoding: "auto" renders with the tokenizer's template, if any

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_prompt_tokens < 1:
            raise ValueError(f"max_new_tokens, batch_size and max_prompt_tokens must be >= 1: {self}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1: {self}")


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], config: GenerationConfig = GenerationConfig(),
             device: torch.device | str | None = None) -> list[str]:
    """One continuation per prompt (text after the prompt, EOS and padding removed), in input order.

    Deterministic for a given seed: each batch reseeds a local generator from (seed, batch index),
    so results do not depend on what ran before.
    """
    if not prompts:
        return []
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; generation needs one to stop and to pad")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chat = uses_chat_template(tokenizer, config.chat_template)
    stops = stop_ids(tokenizer, model, chat=chat)   # a template's end of turn, EOS, the model's own EOS ids
    out: list[str] = []
    with eval_mode(model):
        for b, start in enumerate(range(0, len(prompts), config.batch_size)):
            chunk = list(prompts[start:start + config.batch_size])
            ids = [encode_prompt(tokenizer, p, chat=chat, max_prompt_tokens=config.max_prompt_tokens) for p in chunk]
            empty = [i for i, x in enumerate(ids) if not x]
            if empty:
                raise ValueError(f"prompt {start + empty[0]} is empty after tokenization")
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=dev)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=dev)
            kwargs = {"max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
                      "pad_token_id": pad, "eos_token_id": stops[0] if len(stops) == 1 else stops}
            if config.do_sample:
                torch.manual_seed(config.seed * 1_000_003 + b)
                kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
            with attention_without_cudnn(dev):   # left padding: rows that attend to nothing
                seqs = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            for row in seqs[:, width:].tolist():
                row = row[:next((i for i, t in enumerate(row) if t in stops), len(row))]
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out
