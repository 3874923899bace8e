"""Can this setting squeeze? Per-evaluation diagnostics of the argmax path y* against y+, from trajectories.

Ren & Sutherland (ICLR 2025) explain DPO's squeezing effect: a negative gradient on a y- that sits in a
low-probability valley moves the freed mass to the tokens that are already most likely, so the teacher-forced
argmax path y* gains and pulls away from y+. Whether a model and dataset leave room for that is visible before
and during the run:

- gap_per_token: mean over prompts of (log π(y*|x) − log π(y+|x)) / |y+|. If y+ is the argmax path almost
  everywhere (SFT memorised it token by token) the gap is ~0: y* ≈ y+, and y* cannot rise while y+ falls.
- argmax_share: the share of y+'s token positions where the y+ token is the argmax (pooled over prompts).
- rejected_logp_per_token: mean over prompts of log π(y−|x) / |y−|, the "valley depth" of y−.

The view sql/squeezing.sql computes the same columns in DuckDB (a test keeps them equal).
"""
from __future__ import annotations

import polars as pl

DIAGNOSTIC_COLUMNS = ("gap_per_token", "argmax_share", "rejected_logp_per_token")


def squeeze_diagnostics(traj: pl.DataFrame) -> pl.DataFrame:
    """Per (run_id, step) of `traj` (TRAJECTORY_SCHEMA rows): n_examples, mean_logp_chosen, mean_logp_argmax,
    argmax_gap (mean summed gap) and the DIAGNOSTIC_COLUMNS (module docstring); sorted by run_id, step."""
    chosen = traj.filter(pl.col("response_type") == "chosen")
    out = chosen.group_by("run_id", "step").agg(
        pl.len().alias("n_examples"),
        pl.col("logp_sum").mean().alias("mean_logp_chosen"),
        pl.col("argmax_logp_sum").mean().alias("mean_logp_argmax"),
        (pl.col("argmax_logp_sum") - pl.col("logp_sum")).mean().alias("argmax_gap"),
        ((pl.col("argmax_logp_sum") - pl.col("logp_sum")) / pl.col("n_tokens")).mean().alias("gap_per_token"),
        (pl.col("argmax_match").sum() / pl.col("n_tokens").filter(pl.col("argmax_match").is_not_null()).sum())
        .alias("argmax_share"),
    )
    # argmax_share is null where no row has argmax_match (shards written before the column)
    out = out.with_columns(pl.when(pl.col("argmax_share").is_nan()).then(None).otherwise(pl.col("argmax_share"))
                           .alias("argmax_share"))
    valley = (traj.filter(pl.col("response_type") == "rejected").group_by("run_id", "step")
              .agg(pl.col("logp_mean").mean().alias("rejected_logp_per_token")))
    return out.join(valley, on=["run_id", "step"], how="left").sort("run_id", "step")


def start_end(diag: pl.DataFrame) -> dict[str, float | None]:
    """The diagnostics of one run at its first and last evaluation: {<col>_start, <col>_end} rounded to 4
    places (None where unknown), for check metadata."""
    if diag.is_empty():
        return {}
    first, last = diag.row(0, named=True), diag.row(diag.height - 1, named=True)
    out: dict[str, float | None] = {}
    for col in DIAGNOSTIC_COLUMNS:
        for tag, row in (("start", first), ("end", last)):
            v = row.get(col)
            out[f"{col}_{tag}"] = None if v is None else round(float(v), 4)
    return out


__all__ = ["DIAGNOSTIC_COLUMNS", "squeeze_diagnostics", "start_end"]
