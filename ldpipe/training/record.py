"""What a run writes to the store: trajectory shards per evaluation, train_metrics shards closed at checkpoints, and
an earlier configuration's record moved aside (keep_other_config)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import torch

from ldpipe.layout import ARCHIVE_DIR, FINAL_DIR, SNAPSHOT_DIR, step_name
from ldpipe.model.checkpoints import read_metadata
from ldpipe.model.scoring import EncodedProbe, score_probes
from ldpipe.schema import ONPOLICY_PAIRS_TABLE_SCHEMA, TRAIN_METRICS_SCHEMA, TRAJECTORY_SCHEMA
from ldpipe.store.shards import Store
from ldpipe.training.losses import REWARD_COLUMNS

Log = Callable[[str], None]


RUN_TABLES = ("trajectories", "train_metrics", "onpolicy_pairs")   # store tables partitioned by run_id


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
    final = Path(out_dir) / FINAL_DIR
    old = read_metadata(final).get("config_hash") if final.is_dir() else None
    if old is not None and old != config_hash:
        dst = Path(out_dir) / ARCHIVE_DIR / f"config_hash={old}"
        if dst.exists():   # an earlier copy of the same configuration: replaced, as its store rows are
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for name in (FINAL_DIR, SNAPSHOT_DIR):
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
                               name=step_name(step), schema=TRAJECTORY_SCHEMA)
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
