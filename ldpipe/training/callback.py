"""Probe tracking inside any Hugging Face `transformers.Trainer` (TRL's SFTTrainer and DPOTrainer included).

    from ldpipe.training.callback import ProbeTrackingCallback
    trainer = SFTTrainer(..., callbacks=[ProbeTrackingCallback(probes, "store/", run_id="mine.sft")])

Every `eval_every` optimizer steps (and at step 0 and the last step) the callback scores the probe set with
ldpipe's scorer and writes the same `trajectories` rows as ldpipe's own loop (same schema, run_id, config hash,
phase, one shard per evaluation), plus `train_metrics` rows from the trainer's logs. It needs no Dagster.

- Distributed (accelerate, torchrun, DeepSpeed): only the main process scores and writes; the others go on.
- Resumed runs (`trainer.train(resume_from_checkpoint=...)`): rows written after the checkpoint's step are
  removed first and redone, so every evaluation's rows are in the store exactly once.
- A fresh run (step 0) replaces the rows an earlier run under the same run_id wrote.
- The model is scored in eval mode (no dropout) and fp32, then put back in the mode it was in.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import polars as pl
from transformers import TrainerCallback

from ldpipe.layout import step_name
from ldpipe.model.encoding import describe_format, uses_chat_template
from ldpipe.model.scoring import EncodedProbe, encode_probes, score_probes
from ldpipe.schema import TRAIN_METRICS_SCHEMA, TRAJECTORY_SCHEMA
from ldpipe.store.shards import Store
from ldpipe.training import resume
from ldpipe.training.losses import STAT_COLUMNS

RUN_TABLES = ("trajectories", "train_metrics")
# trainer log keys -> train_metrics columns (TRL's DPO logs rewards/*; `loss` and `grad_norm` every trainer logs)
_LOG_COLUMNS = {"loss": "loss", "grad_norm": "grad_norm", "learning_rate": "lr", **STAT_COLUMNS}


class ProbeTrackingCallback(TrainerCallback):
    """Score `probes` every `eval_every` optimizer steps of a Trainer run and write ldpipe store rows.

    probes: a probe table (ldpipe.schema.PROBE_SCHEMA: example_id, response_type, prompt, response), a Parquet
        file of one, or already encoded probes (ldpipe.model.scoring.EncodedProbe).
    store: an ldpipe Store or its root folder (e.g. `<ldpipe home>/store`).
    run_id / config_hash / phase: the identity columns of every row (phase: "sft", "dpo", "ipo", ...).
    tokenizer: encodes `probes`; default: the trainer's processing class.
    max_prompt_tokens / max_response_tokens: ldpipe's truncation (the prompt's last, the response's first tokens).
    chat_template: "auto" renders each probe with the tokenizer's chat template when it has one, as TRL's trainers
        render conversational data; "none" scores the text as written, as they tokenize plain-text data. Pass the
        setting that matches your dataset's format (ldpipe.model.encoding states the contract); not given, it is
        "auto", and with a templated tokenizer the callback logs that choice and how to change it.
    """

    def __init__(self, probes: pl.DataFrame | str | Path | Sequence[EncodedProbe], store: Store | str | Path, *,
                 run_id: str, config_hash: str = "", phase: str = "sft", eval_every: int = 10, tokenizer: Any = None,
                 max_prompt_tokens: int = 96, max_response_tokens: int = 64, chat_template: str | None = None,
                 log: Callable[[str], None] | None = None):
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        self.store = store if isinstance(store, Store) else Store(Path(store))
        self.run_id, self.config_hash, self.phase, self.eval_every = run_id, config_hash, phase, eval_every
        self.tokenizer, self.limits = tokenizer, (max_prompt_tokens, max_response_tokens)
        self.chat_template = chat_template
        self._probes = pl.read_parquet(probes) if isinstance(probes, (str, Path)) else probes
        self._encoded: list[EncodedProbe] | None = None
        self._rows: list[dict] = []
        self._flushed = 0
        self.scored: list[int] = []           # steps scored in this process (tests, progress)
        self.log = log or (lambda msg: None)

    # -- scoring -------------------------------------------------------------------------------------------
    def _encode(self, tokenizer: Any) -> list[EncodedProbe]:
        if self._encoded is None:
            if isinstance(self._probes, pl.DataFrame):
                tok = self.tokenizer or tokenizer
                if tok is None:
                    raise ValueError("ProbeTrackingCallback needs a tokenizer (none given, and the trainer has no "
                                     "processing_class)")
                setting = self.chat_template or "auto"
                self._encoded = encode_probes(tok, self._probes, max_prompt_tokens=self.limits[0],
                                              max_response_tokens=self.limits[1], chat_template=setting)
                self.log(f"[{self.run_id}] probes scored as {describe_format(tok, setting)}")
                if self.chat_template is None and uses_chat_template(tok, "auto"):
                    self.log(f"[{self.run_id}] chat_template not given: probes are rendered with the tokenizer's chat "
                             "template, as TRL renders conversational data; pass chat_template='none' if the "
                             "trainer's dataset is plain text (TRL tokenizes that as written)")
            else:
                self._encoded = list(self._probes)
        return self._encoded

    def _score(self, model: Any, tokenizer: Any, step: int, epoch: float) -> None:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            scores = score_probes(model, self._encode(tokenizer))
        finally:
            model.train(was_training)
        frame = scores.with_columns(
            pl.lit(self.run_id).alias("run_id"), pl.lit(self.config_hash).alias("config_hash"),
            pl.lit(self.phase).alias("phase"), pl.lit(step, dtype=pl.Int64).alias("step"),
            pl.lit(float(epoch), dtype=pl.Float64).alias("epoch")).select(list(TRAJECTORY_SCHEMA))
        self.store.write_shard("trajectories", frame, partition={"run_id": self.run_id},
                               name=step_name(step), schema=TRAJECTORY_SCHEMA)
        self.scored.append(step)
        means = frame.group_by("response_type").agg(pl.col("logp_sum").mean()).sort("response_type")
        self.log(f"[{self.run_id}] eval step {step} ({time.perf_counter() - t0:.1f}s): "
                 + ", ".join(f"{t}={v:.1f}" for t, v in means.iter_rows()))

    def _flush(self, step: int) -> None:
        rows = [r for r in self._rows if self._flushed < r["step"] <= step]
        if rows:
            self.store.write_shard("train_metrics", pl.DataFrame(rows, schema=TRAIN_METRICS_SCHEMA),
                                   partition={"run_id": self.run_id}, name=f"steps-{self._flushed + 1:07d}-{step:07d}",
                                   schema=TRAIN_METRICS_SCHEMA)
        self._rows = [r for r in self._rows if r["step"] > step]
        self._flushed = step

    # -- trainer events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.global_step == 0:   # a fresh run replaces what an earlier one under this run_id wrote
            for table in RUN_TABLES:
                self.store.delete_partition(table, {"run_id": self.run_id})
            self._score(model, processing_class, 0, 0.0)
        else:                        # resumed: the rows after the checkpoint are redone, so drop them
            removed = resume.truncate_store(self.store, self.run_id, state.global_step)
            self._flushed = state.global_step
            self.log(f"[{self.run_id}] resumed at step {state.global_step}; removed rows written after it: "
                     f"{removed}")

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero and state.global_step % self.eval_every == 0:
            self._score(model, processing_class, state.global_step, state.epoch or 0.0)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the trainer logs a step after its on_step_end: an evaluated step's metrics close a train_metrics shard
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {c: None for c in TRAIN_METRICS_SCHEMA}
        row.update(run_id=self.run_id, config_hash=self.config_hash, phase=self.phase, step=state.global_step,
                   epoch=float(state.epoch or 0.0))
        for key, col in _LOG_COLUMNS.items():
            if isinstance(logs.get(key), (int, float)):
                row[col] = float(logs[key])
        # the trainer logs the norm before clipping; the influence analyses need the step's scale factor
        max_norm = getattr(args, "max_grad_norm", None)
        if row["grad_norm"] is not None:
            row["clip_factor"] = min(1.0, max_norm / row["grad_norm"]) if max_norm and row["grad_norm"] > 0 else 1.0
        self._rows = [r for r in self._rows if r["step"] != state.global_step] + [row]
        if state.global_step in self.scored:
            self._flush(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        # a trainer checkpoint closes a train_metrics shard, so a run resumed from it has lost no step's metrics
        if state.is_world_process_zero:
            self._flush(state.global_step)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.global_step not in self.scored:
            self._score(model, processing_class, state.global_step, state.epoch or 0.0)
        self._flush(state.global_step)
        self.store.write_manifest("run_id", self.run_id, RUN_TABLES)   # `ldpipe check --store` spots lost shards
