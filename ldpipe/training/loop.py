"""Training with probe tracking: SFT (also on y+ and y-, "extend") and off-policy DPO/IPO.

Every `eval_every` optimizer steps (and at step 0 and the last step) the whole
probe set is scored and written to the store as one shard; every optimizer step
adds one train_metrics row. Shards are named by step, so a rerun rewrites the
same files: each (run, step, example, response_type) row exists exactly once.

DPO/IPO follow the paper's code (docs/glossary.md): the reference is the
starting model, chosen and rejected run in one forward (2B sequences), and the
reference log-probs are computed once before training, in the very batches of the
first epoch, so the step-1 rewards (taken before the first update) are exactly 0.

Resumable (ldpipe.training.resume): every `checkpoint_every` steps the model, optimizer, LR scheduler, RNG
states, step and objective state (DPO's reference log-probs) are saved under `<out_dir>/resume/`,
after that step's train_metrics are flushed. A rerun with the same config hash continues from the
newest checkpoint: trajectory and train_metrics shards after its step are removed first and the
batches are re-derived from the step, so the result equals an uninterrupted run's. A finished run
deletes its resume state, so rerunning it trains from scratch.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch

from ldpipe.layout import FINAL_DIR, snapshot_path, step_name
from ldpipe.model.checkpoints import load_model_and_tokenizer, save_checkpoint
from ldpipe.model.lm import resolve_device, use_bf16
from ldpipe.model.scoring import EncodedProbe
from ldpipe.spec import RunSpec
from ldpipe.store.shards import Store
from ldpipe.training import distributed, resume
from ldpipe.training.objectives import Objective, _LogpsModule, make_objective
from ldpipe.training.optim_state import save_optimizer_state
from ldpipe.training.record import RUN_TABLES, _Recorder, keep_other_config

Log = Callable[[str], None]

@dataclass
class TrainResult:
    run_id: str
    checkpoint: Path
    steps: int
    step_offset: int       # optimizer steps of the runs this one is chained after
    evals: int
    wall_s: float
    device: str
    final_loss: float
    first_eval: pl.DataFrame
    last_eval: pl.DataFrame
    final_metrics: dict = field(default_factory=dict)  # the last train_metrics row
    resumed_from: int | None = None   # step of the resume checkpoint this call continued from (None: fresh)
    precision: str = "fp32"            # "fp32" | "bf16-autocast" (forwards; log-softmax and optimizer stay fp32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def begin_run(run: RunSpec, run_id: str, examples: Sequence, out_dir: Path | str,
              device: str) -> tuple[float, Path, torch.device]:
    """What every trainer does first (ldpipe's loop, TRL runs): refuse an empty run, seed, pick the device."""
    if not examples:
        raise ValueError(f"run {run_id}: no training examples")
    t0 = time.perf_counter()
    seed_everything(run.seed)
    return t0, Path(out_dir), resolve_device(device)


def make_optimizer(run: RunSpec, params) -> torch.optim.Optimizer:
    if run.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.RMSprop(params, lr=run.lr)


def batch_schedule(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of example indices: a fresh seeded permutation per epoch; an epoch's last batch
    may be short (batches never straddle epochs)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            yield order[i:i + batch_size]


# ------------------------------------------------------------------ the loop

def _train_step(model, opt, sched, objective: Objective, idx: list[int], max_grad_norm: float | None,
                dev: torch.device, amp: Callable = contextlib.nullcontext) -> dict[str, float]:
    with amp():   # bf16 autocast of the forward on CUDA (batch_logps keeps the log-softmax in fp32)
        loss, stats = objective.loss(model, idx, dev)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))  # pre-clip norm
    clip = min(1.0, max_norm / grad_norm) if grad_norm > 0 else 1.0
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    return {"loss": float(loss.detach()), "grad_norm": grad_norm, "clip_factor": clip, "lr": lr, **stats}


def _train_step_ddp(ddp, opt, sched, objective: Objective, idx: list[int], max_grad_norm: float | None,
                    dev: torch.device, amp: Callable = contextlib.nullcontext) -> dict[str, float]:
    """One data-parallel step over the global batch `idx`: this rank's slice, weighted so that DDP's average
    over ranks equals the single-process mean over the whole batch (slices may be uneven or empty)."""
    part = distributed.my_slice(idx)
    # A rank without examples still runs a forward and backward (weight 0): DDP's all-reduce needs every rank.
    with amp():
        loss, stats = objective.loss(ddp, part or idx[:1], dev)
    weight = len(part) / len(idx) * distributed.world_size()
    opt.zero_grad(set_to_none=True)
    (loss * weight).backward()   # DDP all-reduces (averages) the gradients here
    max_norm = max_grad_norm if max_grad_norm is not None else float("inf")
    # on the all-reduced gradients, identical on every rank: the same norm and clip as one process
    grad_norm = float(torch.nn.utils.clip_grad_norm_(ddp.parameters(), max_norm))
    clip = min(1.0, max_norm / grad_norm) if grad_norm > 0 else 1.0
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    # batch means over the global batch: every logged value is a per-example mean of its slice
    keys = sorted(stats)
    n = len(part)
    sums = distributed.sum_across([float(loss.detach()) * n, *(stats[k] * n for k in keys)], dev)
    means = [v / len(idx) for v in sums]
    return {"loss": means[0], "grad_norm": grad_norm, "clip_factor": clip, "lr": lr, **dict(zip(keys, means[1:]))}


def _every(n: int | None, step: int) -> bool:
    return bool(n) and step % n == 0


def run_training(
    run: RunSpec,
    *,
    run_id: str,
    config_hash: str,
    model_path: Path | str,
    examples: Sequence[tuple[str, ...]],
    probes: Sequence[EncodedProbe],
    store: Store,
    out_dir: Path,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: str = "auto",
    device: str = "auto",
    step_offset: int = 0,
    checkpoint_metadata: dict | None = None,
    llm_cache: Path | None = None,
    log: Log = print,
) -> TrainResult:
    """Train the checkpoint at `model_path` with `run.algo`, tracking `probes` in `store`.

    `examples`: (prompt, response) for SFT, (prompt, chosen, rejected) for DPO/IPO. The final
    checkpoint goes to `out_dir/final` with metadata {run_id, config_hash, algo, steps, step_offset, ...};
    resume checkpoints to `out_dir/resume/`, model snapshots (`run.snapshot_every`) to
    `out_dir/checkpoints/step-NNNNNNN`. A resume checkpoint with the same `config_hash` is continued.
    """
    t0, out_dir, dev = begin_run(run, run_id, examples, out_dir, device)
    # Data-parallel under torchrun (WORLD_SIZE > 1): same global batches, each rank trains on its slice;
    # rank 0 alone scores probes and writes shards and checkpoints.
    dp, main = distributed.enabled(), distributed.is_main()
    if dp:
        if run.pairs == "on_policy":
            raise ValueError(f"run {run_id}: pairs 'on_policy' trains in one process only; launch it without "
                             f"torchrun (WORLD_SIZE is {distributed.world_size()})")
        dev = distributed.rank_device(dev)
        distributed.init(dev)
    model, tokenizer = load_model_and_tokenizer(model_path, device=dev)
    if run.lora is not None:   # an adapter on top of the start checkpoint; only its parameters train
        from ldpipe.model.lora import apply_lora

        model = apply_lora(model, run.lora, model_path, seed=run.seed).to(dev)
    # Dropout off, as in the reference implementation: eval mode disables every dropout path of HF models and
    # leaves gradients intact; it also keeps the policy's forward identical to the reference's.
    model.eval()
    objective = make_objective(run, tokenizer, examples, max_prompt_tokens=max_prompt_tokens,
                               max_response_tokens=max_response_tokens, chat_template=chat_template,
                               llm_cache=llm_cache)
    steps_per_epoch, total_steps = run.steps_per_epoch(objective.n), run.total_steps(objective.n)
    checkpoint_every = run.eval_every if run.checkpoint_every is None else run.checkpoint_every
    opt = make_optimizer(run, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (run.warmup_steps + 1)))
    # bf16 autocast (run.autocast "auto": on CUDA with native bf16) of the training and scoring forwards;
    # weights, optimizer state, log-softmax and sums stay fp32
    # (on a CPU, "auto" stays fp32 even where bf16 is native: tracked log-probs keep full precision there)
    bf16 = use_bf16(run.autocast, dev) if (run.autocast != "auto" or dev.type == "cuda") else False
    amp = functools.partial(torch.autocast, dev.type, dtype=torch.bfloat16, enabled=bf16)
    precision = "bf16-autocast" if bf16 else "fp32"
    rec = _Recorder(store, run_id, config_hash, run.algo, steps_per_epoch, total_steps, log,
                    pairs=getattr(objective, "pairs_frame", None), amp=amp)
    identity = {"run_id": run_id, "config_hash": config_hash, "total_steps": total_steps, "n_examples": objective.n}

    def first_epoch() -> list[list[int]]:
        return list(itertools.islice(batch_schedule(objective.n, run.batch_size, run.seed), steps_per_epoch))

    def snapshot(step: int) -> None:
        # with the optimizer state inside (the influence analyses' preconditioner, optim_state.py), published
        # together: a crash never leaves a snapshot without it
        save_checkpoint(model, tokenizer, snapshot_path(out_dir, step),
                        metadata={"step": step, "run_id": run_id, "config_hash": config_hash,
                                  "algo": run.algo, "step_offset": step_offset},
                        extra=lambda d: save_optimizer_state(model, opt, d))

    ckpt, removed = _resumable(out_dir, store, identity, log) if main else (None, {})
    if dp:   # rank 0 decided (and rolled the store back); every rank continues from the same point
        ckpt = distributed.broadcast(ckpt)
    if ckpt is None:
        # A fresh run starts clean: stale shards and snapshots of an earlier, longer run must not mix in.
        if main:
            keep_other_config(store, out_dir, run_id, config_hash, log)
            store.manifest_path("run_id", run_id).unlink(missing_ok=True)
            for table in RUN_TABLES:
                store.delete_partition(table, {"run_id": run_id})
            resume.clear(out_dir, snapshots=True)
        objective.prepare(model, first_epoch(), dev)   # every rank: the full reference (DPO/IPO)
        first = last = rec.evaluate(model, probes, 0, dev) if main else None
        if run.snapshot_every and main:
            snapshot(0)
        start, evals = 0, 1
    else:
        start, state = ckpt.step, ckpt.load()
        log(f"resuming {run_id} from step {start}/{total_steps} (checkpoint {ckpt.path}); "
            f"shards written after step {start} removed: {removed}")
        resume.drop_snapshots_after(out_dir, start)
        if state["objective"] is not None and hasattr(objective, "load_state_dict"):
            objective.load_state_dict({k: v.to(dev) if isinstance(v, torch.Tensor) else v
                                       for k, v in state["objective"].items()})
        else:   # the objective's prepared state comes from the starting model, still loaded here
            objective.prepare(model, first_epoch(), dev)
        model.load_state_dict(state["model"])     # copies into the parameters, on `dev`
        opt.load_state_dict(state["optimizer"])   # moves its state to the parameters' device
        sched.load_state_dict(state["scheduler"])
        resume.set_rng_state(state["rng"])
        rec.flushed_step = start
        first = last = pl.read_parquet(store.shard_path("trajectories", {"run_id": run_id}, step_name(0)))
        evals = int(ckpt.meta["evals"])
    if dp:
        distributed.barrier()   # every rank has read the resume checkpoint before rank 0 may replace it
        train_model = torch.nn.parallel.DistributedDataParallel(
            _LogpsModule(model, dev), device_ids=[dev.index] if dev.type == "cuda" else None,
            broadcast_buffers=False)   # no batch-norm style buffers to keep in sync
        step_fn = _train_step_ddp
    else:
        train_model, step_fn = model, _train_step
    # The data position is the step: the schedule is re-derived from the seed and fast-forwarded.
    schedule = itertools.islice(batch_schedule(objective.n, run.batch_size, run.seed), start, total_steps)
    for step, idx in enumerate(schedule, start=start + 1):
        values = step_fn(train_model, opt, sched, objective, idx, run.max_grad_norm, dev, amp)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"run {run_id}: loss became {values['loss']} at step {step}; "
                                     f"lower lr ({run.lr})")
        rec.add(step, values)
        do_eval = _every(run.eval_every, step) or step == total_steps
        do_checkpoint = _every(checkpoint_every, step) and step < total_steps
        if (do_eval or do_checkpoint) and main:
            rec.flush(step)
        if do_eval:
            last = rec.evaluate(model, probes, step, dev) if main else last
            evals += 1
        if run.snapshot_every and (_every(run.snapshot_every, step) or step == total_steps) and main:
            snapshot(step)
        if do_checkpoint and main:   # last: everything up to `step` is in the store before the checkpoint says so
            state_fn = getattr(objective, "state_dict", None)
            path = resume.save(out_dir, step, meta={**identity, "evals": evals}, model=model, optimizer=opt,
                               scheduler=sched, objective_state=state_fn() if state_fn else None)
            log(f"[{run_id}] resume checkpoint at step {step}: {path}")
    meta = {**(checkpoint_metadata or {}), "run_id": run_id, "config_hash": config_hash, "algo": run.algo,
            "steps": total_steps, "step_offset": step_offset, "precision": precision}
    if main:
        final = save_checkpoint(model, tokenizer, out_dir / FINAL_DIR, metadata=meta,
                                extra=lambda d: save_optimizer_state(model, opt, d))
        store.write_manifest("run_id", run_id, RUN_TABLES)   # lets `ldpipe check --store` spot lost shards
        resume.clear(out_dir)   # finished: a rerun trains from scratch (and rewrites every shard)
    if dp:   # the other ranks return what rank 0 wrote
        distributed.barrier()
        final = out_dir / FINAL_DIR
        if not main:
            traj = lambda s: pl.read_parquet(store.shard_path("trajectories", {"run_id": run_id},  # noqa: E731
                                                              step_name(s)))
            first, last = traj(0), traj(total_steps)
    return TrainResult(run_id=run_id, checkpoint=final, steps=total_steps, step_offset=step_offset, evals=evals,
                       wall_s=time.perf_counter() - t0, device=str(dev), final_loss=rec.last_row["loss"],
                       first_eval=first, last_eval=last, final_metrics=dict(rec.last_row),
                       resumed_from=None if ckpt is None else start, precision=precision)


def _resumable(out_dir: Path, store: Store, identity: dict,
               log: Log) -> tuple[resume.Checkpoint | None, dict[str, int]]:
    """The newest resume checkpoint this call may continue, or None (with the reason logged), and the
    number of shards removed per table because they were written after it."""
    ckpt = resume.latest(out_dir)
    if ckpt is None:
        return None, {}
    run_id = identity["run_id"]
    differs = {k: (ckpt.meta.get(k), v) for k, v in identity.items() if ckpt.meta.get(k) != v}
    if differs:
        why = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differs.items())
        log(f"[{run_id}] not resuming from {ckpt.path} ({why}): starting fresh")
        return None, {}
    # Rows after the checkpoint are redone; a fresh start would delete them anyway, so drop them first.
    removed = resume.truncate_store(store, run_id, ckpt.step)
    # The store may have been wiped or moved since: continuing would leave steps without rows.
    problem = resume.store_problem(store, run_id, ckpt.step)
    if problem:
        log(f"[{run_id}] not resuming from {ckpt.path}: {problem}; starting fresh")
        return None, removed
    return ckpt, removed
