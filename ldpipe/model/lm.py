"""Tokenizer and tiny-model factory, pretraining, checkpoints and loading.

The default experiment trains its own byte-level BPE and a small GPT-NeoX (the
Pythia architecture) from scratch, so nothing is downloaded; real models
(Pythia, Qwen) load through the same `load_model_and_tokenizer` when the caller
opts in to the hub.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ldpipe.errors import LdpipeError

EOS_TOKEN = "<|endoftext|>"
METADATA_FILE = "ldpipe.json"


# --------------------------------------------------------------------------- runtime

def resolve_device(pref: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; also "cpu", "cuda", "cuda:N"."""
    if isinstance(pref, torch.device):
        pref = str(pref)
    p = str(pref).strip().lower()
    if p == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if p == "cpu":
        return torch.device("cpu")
    if p == "cuda" or p.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LdpipeError(f"device {pref!r} requested but CUDA is not available on this machine")
        if p.startswith("cuda:"):
            idx = p.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise LdpipeError(f"device {pref!r}: no such CUDA device (have {torch.cuda.device_count()})")
        return torch.device(p)
    raise LdpipeError(f"unknown device {pref!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: `n`, else the LDPIPE_THREADS environment variable (e.g. 1 on a machine shared
    with other jobs), else min(2, cores) (the measured sweet spot on small CPUs)."""
    env = os.environ.get("LDPIPE_THREADS")
    if n is None and env:
        try:
            n = int(env)
        except ValueError:
            raise LdpipeError(f"LDPIPE_THREADS must be a whole number of threads, got {env!r}") from None
    if n is not None and n < 1:
        raise LdpipeError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n or min(2, os.cpu_count() or 1))
    return torch.get_num_threads()


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE; "<|endoftext|>" is id 0 and serves as eos, pad and bos.

    The full 256-byte alphabet is seeded so any unicode text encodes without an
    unknown token, and no prefix space is added, so decode(encode(s)) == s.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],  # first special -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # otherwise decode rewrites " ." to "." and breaks the round trip
    )


# --------------------------------------------------------------------------- model

@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    rotary_pct: float = 0.25
    seed: int = 0


def build_model(cfg: TinyModelConfig, vocab_size: int) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX; the same cfg (incl. seed) gives the same weights."""
    if cfg.hidden_size % cfg.num_heads:
        raise LdpipeError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    hf_cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        # transformers 5 keeps rotary settings in rope_parameters (rotary_pct is a legacy alias)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": cfg.rotary_pct},
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    hf_cfg._attn_implementation = "sdpa"
    # Fork the RNG so that seeding here does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPTNeoXForCausalLM(hf_cfg)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- pretraining

@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 50
    autocast: str = "auto"  # "auto" | "bf16" | "fp32": bf16 autocast of the training matmuls


def attention_without_cudnn(dev: torch.device | str):
    """On CUDA, scaled-dot-product attention without its cuDNN backend (elsewhere: nothing changes).

    Left-padded batches have query rows that may attend to nothing. The efficient and math kernels
    give such rows 0; cuDNN's has been reported to give NaN in bf16, and a NaN value vector then
    spreads to every real token through the (masked, weight 0) keys/values of later layers."""
    if torch.device(dev).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _native_bf16(dev: torch.device) -> bool:
    """Whether the hardware runs bf16 matmuls natively (else autocast emulates them and is slower)."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def use_bf16(mode: str, dev: torch.device) -> bool:
    if mode not in ("auto", "bf16", "fp32"):
        raise LdpipeError(f"autocast must be 'auto', 'bf16' or 'fp32', got {mode!r}")
    return mode == "bf16" or (mode == "auto" and _native_bf16(dev))


def _pack(docs: Sequence[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate docs with EOS after each and cut into [n, seq_len] rows (a short stream gives one short row)."""
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        stream.append(eos_id)
    if len(stream) < 2:
        return torch.empty(0, 0, dtype=torch.long)
    n = len(stream) // seq_len
    if n == 0:
        return torch.tensor([stream], dtype=torch.long)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over all positions of packed rows, in fp32."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode for the duration (no dropout), the caller's train/eval mode restored afterwards, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def _eval_loss(model: torch.nn.Module, rows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    if rows.numel() == 0:
        return float("nan")
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, rows.size(0), batch_size):
            b = rows[i:i + batch_size].to(device)
            n = b.size(0) * (b.size(1) - 1)
            total += lm_loss(model, b).item() * n
            count += n
    return total / count


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine from 1 down to 0.1."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Sequence[str],
    cfg: PretrainConfig,
    *,
    device: str | torch.device | None = None,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Causal-LM pretraining on packed documents; returns final metrics.

    Documents (not tokens) are split into train/validation so no document is in both.
    Weights, optimizer state and the loss stay fp32; with autocast "auto" only the
    matmuls run in bf16, and only where the hardware does bf16 natively. Measured
    on the 2-core AVX512-BF16/AMX CPU (d=128 and d=256 models): 1.3-1.8x faster per
    step after the first (kernel warm-up) steps, and a 30-step loss curve equal to
    fp32 to 1e-4 nats. Validation loss is always computed in fp32.
    `val_loss`/`val_ppl` are NaN when there is no validation document.
    """
    if not corpus:
        raise LdpipeError("pretrain: the corpus is empty")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.seq_len < 2:
        raise LdpipeError(f"pretrain: need steps>=1, batch_size>=1, seq_len>=2; got {cfg}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise LdpipeError("pretrain: the tokenizer has no eos token")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    bf16 = use_bf16(cfg.autocast, dev)

    rng = random.Random(cfg.seed)
    order = list(range(len(corpus)))
    rng.shuffle(order)
    n_val = int(round(len(corpus) * cfg.val_fraction))
    if cfg.val_fraction > 0 and len(corpus) >= 2:
        n_val = min(max(n_val, 1), len(corpus) - 1)
    else:
        n_val = 0
    ids = tokenizer([corpus[i] for i in order], add_special_tokens=False)["input_ids"]
    val_rows = _pack(ids[:n_val], eos_id, cfg.seq_len)
    train_rows = _pack(ids[n_val:], eos_id, cfg.seq_len)
    if train_rows.numel() == 0:
        raise LdpipeError("pretrain: the training documents hold fewer than 2 tokens")

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases, LayerNorm
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))

    gen = torch.Generator().manual_seed(cfg.seed)
    perm, cursor = torch.randperm(train_rows.size(0), generator=gen), 0
    model.train()
    t0 = time.perf_counter()
    tokens_seen = 0
    window: list[float] = []
    val_loss = float("nan")
    for step in range(cfg.steps):
        # Epoch-wise reshuffle so every packed row is seen once per pass.
        idx = []
        while len(idx) < cfg.batch_size:
            if cursor >= perm.numel():
                perm, cursor = torch.randperm(train_rows.size(0), generator=gen), 0
            take = min(cfg.batch_size - len(idx), perm.numel() - cursor)
            idx.extend(perm[cursor:cursor + take].tolist())
            cursor += take
        batch = train_rows[idx].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        tokens_seen += batch.numel()
        window.append(loss.item())
        window = window[-cfg.eval_every:] if cfg.eval_every > 0 else window[-50:]
        done = step + 1
        if (cfg.eval_every > 0 and done % cfg.eval_every == 0) or done == cfg.steps:
            val_loss = _eval_loss(model, val_rows, cfg.batch_size, dev)
            if progress is not None:
                progress({
                    "step": done,
                    "train_loss": sum(window) / len(window),
                    "val_loss": val_loss,
                    "val_ppl": math.exp(val_loss) if val_loss == val_loss else float("nan"),
                    "lr": opt.param_groups[0]["lr"],
                    "tokens_seen": tokens_seen,
                    "seconds": time.perf_counter() - t0,
                })
    model.eval()
    return {
        "train_loss": sum(window) / len(window),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss == val_loss else float("nan"),
        "tokens_seen": tokens_seen,
        "steps": cfg.steps,
        "seconds": time.perf_counter() - t0,
        "precision": "bf16-autocast" if bf16 else "fp32",
    }
