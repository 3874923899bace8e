"""Column contracts shared by every ldpipe module.

All tables are long and use named columns (never positional arrays): the
reference implementation's positional npy rows changed layout four times and
broke its own notebooks (learning-dynamics.md §6).
"""
from __future__ import annotations

import polars as pl

# A preference dataset: one row per (prompt, chosen, rejected) pair.
PREFERENCE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,   # unique within the dataset
    "split": pl.String,        # "train" | "test"
    "prompt": pl.String,       # ends with "\n\nAssistant:" for HH-style data
    "chosen": pl.String,       # y+ (leading space kept, as in HH)
    "rejected": pl.String,     # y-
    "source": pl.String,       # where the row came from (dataset name / file)
}

# A probe set in long form: one row per (probe example, response type).
PROBE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,     # the probe prompt's id (x_u)
    "response_type": pl.String,  # e.g. "chosen", "rejected", "irr_train", ...
    "prompt": pl.String,
    "response": pl.String,
    "provenance": pl.String,     # how the response was made (e.g. "dataset", "template:meaning", "shuffle:seed=3")
}

# One probe-trajectory row: the log-probability of one probe response at one step of one run.
TRAJECTORY_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "config_hash": pl.String,
    "phase": pl.String,          # "sft" | "dpo" | ...
    "step": pl.Int64,            # optimizer steps done before this evaluation
    "epoch": pl.Float64,         # step / steps_per_epoch
    "example_id": pl.String,
    "response_type": pl.String,
    "logp_sum": pl.Float64,      # sum over response tokens (EOS included) of log pi
    "n_tokens": pl.Int64,
    "logp_mean": pl.Float64,     # logp_sum / n_tokens
    "argmax_logp_sum": pl.Float64,  # teacher-forced sum of log max_v pi (the paper's y*)
}

# Training metrics: one row per optimizer step.
TRAIN_METRICS_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "config_hash": pl.String,
    "phase": pl.String,
    "step": pl.Int64,
    "epoch": pl.Float64,
    "loss": pl.Float64,
    "grad_norm": pl.Float64,     # before clipping
    "clip_factor": pl.Float64,   # min(1, max_norm / grad_norm)
    "lr": pl.Float64,
    # DPO/IPO only (null for SFT), TRL-style batch means before the step's update:
    "rewards_chosen": pl.Float64,    # beta * (log pi(y+) - log pi_ref(y+))
    "rewards_rejected": pl.Float64,  # beta * (log pi(y-) - log pi_ref(y-))
    "rewards_accuracy": pl.Float64,  # share of pairs with rewards_chosen > rewards_rejected
    "rewards_margin": pl.Float64,    # rewards_chosen - rewards_rejected
}

# Canonical response types. Users may declare more in assets/ YAML.
CORE_RESPONSE_TYPES = (
    "chosen",            # y+
    "rejected",          # y-
    "chosen_gptsemantic",   # y_gpts+: meaning-keeping rephrase of y+
    "chosen_gptformat",     # y_gptf+: format-keeping, meaning-changing rephrase of y+
    "reject_gptsemantic",   # y_gpts-
    "reject_gptformat",     # y_gptf-
    "irr_train",         # y_{j!=u}: another probe prompt's chosen answer
    "irr_test",          # y_test: a chosen answer from the held-out split
    "irr_hum",           # y_hum: irrelevant human-like sentence of similar length
    "random_permute",    # y_urnd: word shuffle of y+
    "random_nonhum",     # y_rnd (reference): word shuffle of an unrelated answer
    "random_tokens",     # y_rnd (uniform random tokens)
    "chosen_initial",    # y_init: the base model's own reply
    "chosen_selfr",      # y_selfr: the base model's self-rephrase of y+
)


def empty_frame(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def conform(df: pl.DataFrame, schema: dict[str, pl.DataType], *, what: str) -> pl.DataFrame:
    """Select and cast `df` to `schema`, failing with a message naming the missing columns."""
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; have {df.columns}")
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])


def require_frame(df: object, columns, *, source: str) -> pl.DataFrame:
    """`df` must be a polars DataFrame holding `columns`; otherwise a DataValidationError naming the source."""
    from ldpipe.errors import DataValidationError

    if not isinstance(df, pl.DataFrame):
        raise DataValidationError(source, f"expected a polars DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataValidationError(source, f"missing column(s) {missing}; have {df.columns}", field=missing[0])
    return df
