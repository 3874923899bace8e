"""FLOP accounting for the benchmarks: the work a method must do, and the machine's measured matmul peak.

Work is counted as model FLOPs without padding (the MFU convention): 2 FLOPs per weight of every
linear layer of the transformer body per token, 2 * hidden * vocab per position where logits are
formed, and 4 * hidden per (query, key) pair per layer for attention. The peak is not a datasheet
number: it is a large square GEMM timed in the same process, on the same device, dtype and thread
count, so `work / peak` is the least time any implementation of that work can take here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ldpipe.bench.common import timed


@dataclass(frozen=True)
class Shape:
    body_weights: int   # weights of the body's linear layers (per-token multiply-adds)
    head_weights: int   # hidden * vocab
    attn_width: int     # hidden size * layers: multiply-adds per (query, key) pair, QK and AV each


def model_shape(model) -> Shape:
    body = sum(m.weight.numel() for m in model.base_model.modules() if isinstance(m, nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return Shape(body, head, int(cfg.hidden_size) * int(cfg.num_hidden_layers))


def forward_flops(shape: Shape, *, tokens: int, logit_positions: int, attn_pairs: int) -> float:
    return 2.0 * shape.body_weights * tokens + 2.0 * shape.head_weights * logit_positions \
        + 4.0 * shape.attn_width * attn_pairs


def _causal_pairs(n: int, past: int = 0) -> int:
    """(query, key) pairs of n causal queries that follow `past` cached positions."""
    return n * past + n * (n + 1) // 2


def full_sequence_flops(shape: Shape, encoded: Sequence) -> float:
    """The reference method's work: every prompt+response in full, logits at every position."""
    total = 0.0
    for ep in encoded:
        for r in ep.response_ids:
            n = len(ep.prompt_ids) + len(r)
            total += forward_flops(shape, tokens=n, logit_positions=n, attn_pairs=_causal_pairs(n))
    return total


def shared_prefix_flops(shape: Shape, encoded: Sequence) -> float:
    """The least work for exact scores: each prompt once, each response once (attending to its prompt),
    logits only where a response token is predicted."""
    total = 0.0
    for ep in encoded:
        p = len(ep.prompt_ids)
        total += forward_flops(shape, tokens=p, logit_positions=0, attn_pairs=_causal_pairs(p))
        for r in ep.response_ids:
            # the prompt's last state predicts the first response token; the last response token feeds nothing
            total += forward_flops(shape, tokens=len(r) - 1, logit_positions=len(r),
                                   attn_pairs=_causal_pairs(len(r) - 1, past=p))
    return total


def training_flops(shape: Shape, pairs: Sequence[tuple[int, int]]) -> float:
    """One SFT step's work over (prompt tokens, response tokens) pairs: forward + backward = 3 forwards,
    logits at response positions only (as batch_logps forms them)."""
    return 3.0 * sum(forward_flops(shape, tokens=p + r, logit_positions=r, attn_pairs=_causal_pairs(p + r))
                     for p, r in pairs)


def measured_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  repeats: int = 5) -> float:
    """FLOP/s of a large square matmul here (best of `repeats`), at the current thread count."""
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 2048
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best, _ = timed(lambda: a @ b, dev, repeats + 1)  # one more: the first call warms up
    return 2.0 * n ** 3 / best
