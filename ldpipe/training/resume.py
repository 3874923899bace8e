"""Resume checkpoints of a training run, model snapshots, and rolling the store back to a checkpoint.

Layout under a run's directory (`ExperimentFiles.run_dir(run)`):

    resume/step-0000040/state.pt      model, optimizer, LR scheduler, RNG states, objective state (torch.save)
    resume/step-0000040/resume.json   run_id, config_hash, step, total_steps, n_examples, evals
    checkpoints/step-0000040/         model-only HF checkpoint (snapshot_every), ldpipe.json has step/run_id/hash

A resume checkpoint is written into `resume/.tmp-...` and `os.replace`d into place, so a
`step-*` directory is always complete; only the newest is kept. The data position is the step:
`batch_schedule` is a pure function of (n, batch_size, seed), so step s resumes at its s-th batch.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ldpipe.atomic import free_space, fsync_dir, is_disk_full
from ldpipe.errors import LdpipeError
from ldpipe.layout import RESUME_DIR, SNAPSHOT_DIR, step_name
from ldpipe.store.shards import Store

STATE_FILE = "state.pt"
META_FILE = "resume.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_TRAJ_SHARD = re.compile(r"^step-(\d+)\.parquet$")
_METRICS_SHARD = re.compile(r"^steps-(\d+)-(\d+)\.parquet$")


# ------------------------------------------------------------------ RNG

def rng_state() -> dict:
    """Python, numpy and torch (CPU and every CUDA device) generator states, in torch.load-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ save / find / load

def save(run_dir: Path, step: int, *, meta: dict, model, optimizer, scheduler, objective_state: dict | None) -> Path:
    """Write the resume checkpoint for `step` atomically and drop older ones; returns its directory."""
    root = Path(run_dir) / RESUME_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    final = root / step_name(step)
    try:
        tmp.mkdir()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng_state(), "objective": objective_state}
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
        for f in (STATE_FILE, META_FILE):       # data on disk before the rename makes the directory visible
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():                       # os.replace cannot overwrite a non-empty directory
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise LdpipeError(f"no space left on {root} while writing the resume checkpoint of step {step} "
                              f"({free_space(root)} free); free some space and rerun: training resumes from the "
                              "last checkpoint that was written") from None
        raise
    fsync_dir(root)
    for d in root.iterdir():   # the newest checkpoint is the only one a rerun uses; temp dirs are a killed save's
        m = _STEP_DIR.match(d.name)
        if (m and int(m.group(1)) < step) or d.name.startswith(".tmp-"):
            shutil.rmtree(d, ignore_errors=True)
    return final


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict

    def load(self) -> dict:
        """The saved state, on the CPU (RNG states must be CPU tensors; load_state_dict moves the rest)."""
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:   # atomic writes make this unlikely; say which directory to delete
            raise LdpipeError(f"resume checkpoint {self.path} cannot be read ({e}); delete it to train "
                              "from scratch") from e


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete resume checkpoint of a run (whatever its config hash), or None."""
    root = Path(run_dir) / RESUME_DIR
    found: list[Checkpoint] = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / META_FILE).is_file() and (d / STATE_FILE).is_file():
                found.append(Checkpoint(d, int(m.group(1)), json.loads((d / META_FILE).read_text())))
    return max(found, key=lambda c: c.step, default=None)


def clear(run_dir: Path, *, snapshots: bool = False) -> None:
    """Remove the resume state (and, for a fresh start, the model snapshots of an earlier run)."""
    shutil.rmtree(Path(run_dir) / RESUME_DIR, ignore_errors=True)
    if snapshots:
        shutil.rmtree(Path(run_dir) / SNAPSHOT_DIR, ignore_errors=True)


def drop_snapshots_after(run_dir: Path, step: int) -> None:
    """Remove snapshots after `step` and the temp dirs of a snapshot write that was killed, so that
    `checkpoints/step-*` lists complete snapshots of this run's history only."""
    d = Path(run_dir) / SNAPSHOT_DIR
    if d.is_dir():
        for p in d.iterdir():
            m = _STEP_DIR.match(p.name)
            if (m and int(m.group(1)) > step) or (not m and p.name.startswith("step-")):
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------ the store

def _partition_dir(store: Store, table: str, run_id: str) -> Path:
    return store.partition_dir(table, {"run_id": run_id})


def truncate_store(store: Store, run_id: str, step: int) -> dict[str, int]:
    """Remove a run's rows after `step`: trajectory shards of later evaluations, train_metrics shards that
    end later (one that straddles `step`, left by an earlier checkpoint spacing, is rewritten up to it)."""
    removed = {"trajectories": 0, "train_metrics": 0}
    d = _partition_dir(store, "trajectories", run_id)
    for p in sorted(d.glob("*.parquet")) if d.is_dir() else []:
        m = _TRAJ_SHARD.match(p.name)
        if m and int(m.group(1)) > step:
            p.unlink(missing_ok=True)
            removed["trajectories"] += 1
    # step-range shards ("steps-<first>-<last>"): train_metrics, and on-policy runs' sampled pairs
    for table in ("train_metrics", "onpolicy_pairs"):
        d = _partition_dir(store, table, run_id)
        for p in sorted(d.glob("*.parquet")) if d.is_dir() else []:
            m = _METRICS_SHARD.match(p.name)
            if not m or int(m.group(2)) <= step:
                continue
            first = int(m.group(1))
            if first <= step:
                kept = pl.read_parquet(p).filter(pl.col("step") <= step)
                store.write_shard(table, kept, partition={"run_id": run_id}, name=f"steps-{first:07d}-{step:07d}")
            p.unlink(missing_ok=True)
            removed[table] = removed.get(table, 0) + 1
    return removed


def store_problem(store: Store, run_id: str, step: int) -> str | None:
    """Why the store cannot continue a run at `step` (None: it can): the step-0 evaluation and
    train_metrics rows 1..step, each exactly once, must be there."""
    if not store.shard_path("trajectories", {"run_id": run_id}, step_name(0)).is_file():
        return "the step-0 evaluation shard is missing"
    d = _partition_dir(store, "train_metrics", run_id)
    shards = sorted(d.glob("*.parquet")) if d.is_dir() else []
    steps = pl.concat([pl.read_parquet(p, columns=["step"]) for p in shards])["step"].sort().to_list() \
        if shards else []
    if steps != list(range(1, step + 1)):
        return f"train_metrics hold {len(steps)} rows, not steps 1..{step} once each"
    return None

