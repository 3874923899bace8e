"""SFT with probe tracking: every `eval_every` optimizer steps (and at step 0 and the last
step) the whole probe set is scored and written to the store as one shard.

Shards are named by step, so a rerun rewrites the same files: each
(run, step, example, response_type) row exists exactly once.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl
import torch

from ldpipe.models import load_model_and_tokenizer, resolve_device, save_checkpoint
from ldpipe.schema import TRAIN_METRICS_SCHEMA, TRAJECTORY_SCHEMA
from ldpipe.scoring import EncodedProbe, batch_logps, encode_pair, score_probes
from ldpipe.spec import RunSpec
from ldpipe.store import Store

Log = Callable[[str], None]


@dataclass
class TrainResult:
    run_id: str
    checkpoint: Path
    steps: int
    evals: int
    wall_s: float
    device: str
    final_loss: float
    first_eval: pl.DataFrame
    last_eval: pl.DataFrame


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(run: RunSpec, params) -> torch.optim.Optimizer:
    if run.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.RMSprop(params, lr=run.lr)


def sft_loss(model, batch: Sequence[tuple[list[int], list[int]]], device) -> torch.Tensor:
    """Per-sequence summed NLL averaged over the batch, as in the paper's code (not length-normalised)."""
    logp, _ = batch_logps(model, batch, device=device)
    return -logp.mean()


def _eval_frame(scores: pl.DataFrame, *, run_id: str, config_hash: str, phase: str, step: int,
                epoch: float) -> pl.DataFrame:
    return scores.with_columns(
        pl.lit(run_id).alias("run_id"),
        pl.lit(config_hash).alias("config_hash"),
        pl.lit(phase).alias("phase"),
        pl.lit(step, dtype=pl.Int64).alias("step"),
        pl.lit(epoch, dtype=pl.Float64).alias("epoch"),
    ).select(list(TRAJECTORY_SCHEMA))


def run_sft(
    run: RunSpec,
    *,
    run_id: str,
    config_hash: str,
    model_path: Path,
    train_pairs: Sequence[tuple[str, str]],
    probes: Sequence[EncodedProbe],
    store: Store,
    out_dir: Path,
    max_prompt_tokens: int,
    max_response_tokens: int,
    device: str = "auto",
    log: Log = print,
) -> TrainResult:
    """Train `model_path` on (prompt, response) pairs with SFT, tracking `probes` in `store`."""
    if not train_pairs:
        raise ValueError(f"run {run_id}: no training pairs")
    t0 = time.perf_counter()
    seed_everything(run.seed)
    dev = resolve_device(device)
    model, tokenizer = load_model_and_tokenizer(model_path, device=dev)
    encoded = [encode_pair(tokenizer, p, r, max_prompt_tokens=max_prompt_tokens,
                           max_response_tokens=max_response_tokens) for p, r in train_pairs]
    steps_per_epoch = math.ceil(len(encoded) / run.batch_size)
    total_steps = max(1, round(run.epochs * steps_per_epoch))
    opt = make_optimizer(run, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (run.warmup_steps + 1)))
    # A fresh run starts clean: stale shards of an earlier, longer run must not mix in.
    for table in ("trajectories", "train_metrics"):
        store.delete_partition(table, {"run_id": run_id})

    def evaluate(step: int) -> pl.DataFrame:
        te = time.perf_counter()
        scores = score_probes(model, probes, device=dev)
        frame = _eval_frame(scores, run_id=run_id, config_hash=config_hash, phase=run.algo, step=step,
                            epoch=step / steps_per_epoch)
        store.write_shard("trajectories", frame, partition={"run_id": run_id}, name=f"step-{step:07d}",
                          schema=TRAJECTORY_SCHEMA)
        means = frame.group_by("response_type").agg(pl.col("logp_sum").mean()).sort("response_type")
        brief = ", ".join(f"{t}={v:.1f}" for t, v in means.iter_rows())
        log(f"[{run_id}] eval step {step}/{total_steps} ({time.perf_counter() - te:.1f}s): {brief}")
        model.train()
        return frame

    rng = random.Random(run.seed)
    order: list[int] = []
    metrics: list[dict] = []
    flushed_to = 0
    evals = 0
    first = evaluate(0)
    evals += 1
    last = first
    model.train()
    loss_val = float("nan")
    for step in range(1, total_steps + 1):
        if not order:  # a fresh seeded permutation each epoch
            order = list(range(len(encoded)))
            rng.shuffle(order)
        idx, order = order[: run.batch_size], order[run.batch_size:]
        loss = sft_loss(model, [encoded[i] for i in idx], dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = run.max_grad_norm if run.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        clip = min(1.0, max_norm / grad_norm) if grad_norm > 0 else 1.0
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"run {run_id}: loss became {loss_val} at step {step}; lower lr ({run.lr})")
        metrics.append({"run_id": run_id, "config_hash": config_hash, "phase": run.algo, "step": step,
                        "epoch": step / steps_per_epoch, "loss": loss_val, "grad_norm": grad_norm,
                        "clip_factor": clip, "lr": lr})
        if step % run.eval_every == 0 or step == total_steps:
            store.write_shard("train_metrics", pl.DataFrame(metrics[flushed_to:], schema=TRAIN_METRICS_SCHEMA),
                              partition={"run_id": run_id}, name=f"steps-{flushed_to + 1:07d}-{step:07d}",
                              schema=TRAIN_METRICS_SCHEMA)
            flushed_to = len(metrics)
            log(f"[{run_id}] step {step}/{total_steps} loss {loss_val:.3f} grad_norm {grad_norm:.1f} lr {lr:.2e}")
            last = evaluate(step)
            evals += 1
    ckpt = save_checkpoint(model, tokenizer, out_dir / "final",
                           metadata={"run_id": run_id, "config_hash": config_hash, "steps": total_steps})
    return TrainResult(run_id=run_id, checkpoint=ckpt, steps=total_steps, evals=evals,
                       wall_s=time.perf_counter() - t0, device=str(dev), final_loss=loss_val,
                       first_eval=first, last_eval=last)
