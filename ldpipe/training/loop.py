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
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import polars as pl
import torch

from ldpipe.training import distributed

from ldpipe.training import resume
from ldpipe.training.losses import REWARD_COLUMNS, STAT_COLUMNS as _STAT_COLUMNS, dpo_loss, ipo_loss, sft_loss
from ldpipe.model.lm import resolve_device, use_bf16
from ldpipe.model.checkpoints import load_model_and_tokenizer, read_metadata, save_checkpoint
from ldpipe.schema import ONPOLICY_PAIRS_TABLE_SCHEMA, TRAIN_METRICS_SCHEMA, TRAJECTORY_SCHEMA
from ldpipe.training.optim_state import save_optimizer_state
from ldpipe.model.scoring import EncodedProbe, batch_logps, encode_pair, score_probes
from ldpipe.spec import RunSpec
from ldpipe.store.shards import Store

Log = Callable[[str], None]
Ids = list[int]


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


# ------------------------------------------------------------------ objectives

class _LogpsModule(torch.nn.Module):
    """batch_logps as a module's forward, so DistributedDataParallel can wrap it: DDP only syncs the
    gradients of a backward whose forward went through the wrapper."""

    def __init__(self, model, dev: torch.device):
        super().__init__()
        self.lm, self.dev = model, dev

    def forward(self, pairs: list[tuple[Ids, Ids]]) -> torch.Tensor:
        return batch_logps(self.lm, pairs, device=self.dev)[0]


def _logps(model, pairs: list[tuple[Ids, Ids]], dev: torch.device) -> torch.Tensor:
    """Summed response log-probs; `model` is the causal LM, or (data-parallel training) its DDP wrapper."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model(pairs)
    return batch_logps(model, pairs, device=dev)[0]


class Objective(Protocol):
    n: int

    def prepare(self, model, first_epoch: list[list[int]], dev: torch.device) -> None: ...

    def loss(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class SftObjective:
    """Summed NLL of (prompt, response) pairs."""
    pairs: list[tuple[Ids, Ids]]

    @property
    def n(self) -> int:
        return len(self.pairs)

    def prepare(self, model, first_epoch: list[list[int]], dev: torch.device) -> None:
        pass

    def loss(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        logp = _logps(model, [self.pairs[i] for i in idx], dev)
        return sft_loss(logp), {}


@dataclass
class PreferenceObjective:
    """Off-policy DPO/IPO on (prompt, chosen, rejected); the reference is the model at `prepare` time."""
    triples: list[tuple[Ids, Ids, Ids]]
    algo: str
    beta: float
    label_smoothing: float = 0.0
    ref: torch.Tensor | None = None   # [n, 2]: reference log pi of chosen, rejected

    @property
    def n(self) -> int:
        return len(self.triples)

    def _logps(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [(self.triples[i][0], self.triples[i][1]) for i in idx]
        rejected = [(self.triples[i][0], self.triples[i][2]) for i in idx]
        logp = _logps(model, chosen + rejected, dev)
        return logp[: len(idx)], logp[len(idx):]

    @torch.no_grad()
    def prepare(self, model, first_epoch: list[list[int]], dev: torch.device) -> None:
        # Same batches, same forward as step 1 of training: identical numbers, so rewards start at exactly 0.
        ref = torch.full((self.n, 2), float("nan"), device=dev)
        for idx in first_epoch:
            c, r = self._logps(model, idx, dev)
            ref[idx, 0], ref[idx, 1] = c, r
        if torch.isnan(ref).any():
            raise RuntimeError("reference log-probs missing for some pairs: first_epoch must cover every pair")
        self.ref = ref

    # Optional Objective methods: state a resume checkpoint keeps (an objective without them is `prepare`d
    # again on the starting model when a run resumes).
    def state_dict(self) -> dict:
        return {"ref": self.ref}

    def load_state_dict(self, state: dict) -> None:
        self.ref = state["ref"]

    def loss(self, model, idx: list[int], dev: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ref is None:
            raise RuntimeError("PreferenceObjective.prepare must run before training")
        c, r = self._logps(model, idx, dev)
        rc, rr = self.ref[idx, 0], self.ref[idx, 1]
        if self.algo == "ipo":
            loss, stats = ipo_loss(c, r, rc, rr, self.beta)
        else:
            loss, stats = dpo_loss(c, r, rc, rr, self.beta, self.label_smoothing)
        return loss, {_STAT_COLUMNS[k]: float(v) for k, v in stats.items()}


def make_objective(run: RunSpec, tokenizer, examples: Sequence[tuple[str, ...]], *, max_prompt_tokens: int,
                   max_response_tokens: int, llm_cache: Path | None = None) -> SftObjective | PreferenceObjective:
    """SFT takes (prompt, response) examples, DPO/IPO (prompt, chosen, rejected). `llm_cache`: where an on-policy
    judge caches its verdicts (the run's ldpipe home)."""
    if run.pairs == "on_policy":   # only the prompts are used: pairs are sampled from the policy every step
        from ldpipe.training.onpolicy import make_onpolicy_objective

        return make_onpolicy_objective(run, tokenizer, examples, max_prompt_tokens=max_prompt_tokens,
                                       max_response_tokens=max_response_tokens, cache_path=llm_cache)
    width = 2 if run.algo == "sft" else 3
    bad = next((i for i, e in enumerate(examples) if len(e) != width), None)
    if bad is not None:
        raise ValueError(f"{run.algo} needs {width}-tuples of text; example {bad} has {len(examples[bad])}")

    def enc(prompt: str, response: str) -> tuple[Ids, Ids]:
        return encode_pair(tokenizer, prompt, response, max_prompt_tokens=max_prompt_tokens,
                           max_response_tokens=max_response_tokens)

    if run.algo == "sft":
        return SftObjective([enc(p, y) for p, y in examples])
    triples = []
    for p, yc, yr in examples:
        p_ids, c_ids = enc(p, yc)
        triples.append((p_ids, c_ids, enc(p, yr)[1]))
    return PreferenceObjective(triples, algo=run.algo, beta=run.beta, label_smoothing=run.label_smoothing)


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


RUN_TABLES = ("trajectories", "train_metrics", "onpolicy_pairs")   # store tables partitioned by run_id
ARCHIVE = "archive"   # <run dir>/archive/config_hash=<hash>/: an earlier configuration's checkpoints


def keep_other_config(store: Store, out_dir: Path, run_id: str, config_hash: str, log: Log) -> list[str]:
    """Before a fresh run replaces a run id's record: if that record (store rows, final checkpoint) is of another
    configuration (a smoke preset over a full run, an edited declaration), move it aside instead of losing it.
    Shards go to the store's archive (`Store.archive_partition`, no longer in any view), the final checkpoint
    and snapshots to `<run dir>/archive/config_hash=<old>/`. A rerun of the same configuration replaces its
    own record as before (it recomputes the same numbers). Returns what was moved."""
    moved: list[str] = []
    stored = set().union(*(store.partition_values(t, {"run_id": run_id}, "config_hash") for t in RUN_TABLES))
    others = sorted(h for h in stored if h is not None and h != config_hash)
    if others:
        moved += map(str, store.archive_partitions(RUN_TABLES, "run_id", run_id, {"config_hash": "+".join(others)}))
    final = Path(out_dir) / "final"
    old = read_metadata(final).get("config_hash") if final.is_dir() else None
    if old is not None and old != config_hash:
        dst = Path(out_dir) / ARCHIVE / f"config_hash={old}"
        if dst.exists():   # an earlier copy of the same configuration: replaced, as its store rows are
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for name in ("final", resume.SNAPSHOT_DIR):
            if (Path(out_dir) / name).exists():
                os.replace(Path(out_dir) / name, dst / name)
        moved.append(str(dst))
    if moved:
        log(f"{run_id}: the stored record is of another configuration ({', '.join(others) or old}, this run is "
            f"{config_hash}); kept it aside instead of replacing it: {'; '.join(moved)}")
    return moved


def _eval_frame(scores: pl.DataFrame, *, run_id: str, config_hash: str, phase: str, step: int,
                epoch: float) -> pl.DataFrame:
    return scores.with_columns(
        pl.lit(run_id).alias("run_id"),
        pl.lit(config_hash).alias("config_hash"),
        pl.lit(phase).alias("phase"),
        pl.lit(step, dtype=pl.Int64).alias("step"),
        pl.lit(epoch, dtype=pl.Float64).alias("epoch"),
    ).select(list(TRAJECTORY_SCHEMA))


@dataclass
class _Recorder:
    """Writes probe evaluations and train_metrics shards of one run."""
    store: Store
    run_id: str
    config_hash: str
    phase: str
    steps_per_epoch: int
    total_steps: int
    log: Log
    flushed_step: int = 0                             # train_metrics rows 1..flushed_step are in shards
    rows: list[dict] = field(default_factory=list)   # rows not flushed yet
    last_row: dict | None = None
    pairs: Callable[[], pl.DataFrame] | None = None   # on-policy objectives: their sampled pairs so far
    amp: Callable = contextlib.nullcontext             # autocast context of the scoring forward

    def evaluate(self, model, probes: Sequence[EncodedProbe], step: int, dev: torch.device) -> pl.DataFrame:
        te = time.perf_counter()
        with self.amp():
            scores = score_probes(model, probes, device=dev)
        frame = _eval_frame(scores, run_id=self.run_id,
                            config_hash=self.config_hash, phase=self.phase, step=step,
                            epoch=step / self.steps_per_epoch)
        self.store.write_shard("trajectories", frame, partition={"run_id": self.run_id},
                               name=resume.step_name(step), schema=TRAJECTORY_SCHEMA)
        means = frame.group_by("response_type").agg(pl.col("logp_sum").mean()).sort("response_type")
        brief = ", ".join(f"{t}={v:.1f}" for t, v in means.iter_rows())
        self.log(f"[{self.run_id}] eval step {step}/{self.total_steps} ({time.perf_counter() - te:.1f}s): {brief}")
        return frame

    def add(self, step: int, values: dict[str, float]) -> None:
        self.last_row = {"run_id": self.run_id, "config_hash": self.config_hash, "phase": self.phase,
                         "step": step, "epoch": step / self.steps_per_epoch,
                         **{c: None for c in REWARD_COLUMNS}, **values}
        self.rows.append(self.last_row)

    def flush(self, step: int) -> None:
        """One shard "steps-<first>-<last>" per flush: a resume checkpoint flushes first, so shard
        boundaries fall on checkpoints and a resumed run drops whole shards."""
        if not self.rows:
            return
        name = f"steps-{self.flushed_step + 1:07d}-{step:07d}"
        self.store.write_shard("train_metrics", pl.DataFrame(self.rows, schema=TRAIN_METRICS_SCHEMA),
                               partition={"run_id": self.run_id}, name=name, schema=TRAIN_METRICS_SCHEMA)
        if self.pairs is not None:   # on-policy: the sampled pairs of the same steps, under the same shard name
            pairs = self.pairs().filter((pl.col("step") > self.flushed_step) & (pl.col("step") <= step))
            frame = pairs.with_columns(pl.lit(self.run_id).alias("run_id"), pl.lit(self.config_hash).alias("config_hash"))
            self.store.write_shard("onpolicy_pairs", frame.select(list(ONPOLICY_PAIRS_TABLE_SCHEMA)),
                                   partition={"run_id": self.run_id}, name=name, schema=ONPOLICY_PAIRS_TABLE_SCHEMA)
        self.flushed_step, self.rows = step, []
        last = self.last_row
        extra = f" margin {last['rewards_margin']:.2f} acc {last['rewards_accuracy']:.2f}" \
            if last["rewards_margin"] is not None else ""
        self.log(f"[{self.run_id}] step {step}/{self.total_steps} loss {last['loss']:.3f} "
                 f"grad_norm {last['grad_norm']:.1f} lr {last['lr']:.2e}{extra}")


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
    if not examples:
        raise ValueError(f"run {run_id}: no training examples")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    seed_everything(run.seed)
    dev = resolve_device(device)
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
                               max_response_tokens=max_response_tokens, llm_cache=llm_cache)
    steps_per_epoch = math.ceil(objective.n / run.batch_size)
    total_steps = max(1, round(run.epochs * steps_per_epoch))
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
        save_checkpoint(model, tokenizer, resume.snapshot_path(out_dir, step),
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
        first = last = pl.read_parquet(store.shard_path("trajectories", {"run_id": run_id}, resume.step_name(0)))
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
        final = save_checkpoint(model, tokenizer, out_dir / "final", metadata=meta,
                                extra=lambda d: save_optimizer_state(model, opt, d))
        store.write_manifest("run_id", run_id, RUN_TABLES)   # lets `ldpipe check --store` spot lost shards
        resume.clear(out_dir)   # finished: a rerun trains from scratch (and rewrites every shard)
    if dp:   # the other ranks return what rank 0 wrote
        distributed.barrier()
        final = out_dir / "final"
        if not main:
            traj = lambda s: pl.read_parquet(store.shard_path("trajectories", {"run_id": run_id},  # noqa: E731
                                                              resume.step_name(s)))
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
