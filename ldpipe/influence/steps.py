"""The influence analyses as pipeline steps: each computes over the selected runs, writes its rows (one shard per
run) and its plots, and returns a typed result the Dagster assets only turn into metadata and check results. The
catalog's views read the new rows with no refresh (ldpipe.store.catalog)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from ldpipe.analysis.directions import CheckOutcome
from ldpipe.schema import AKG_SCHEMA, INFLUENCE_AGREEMENT_SCHEMA, INFLUENCE_HEATMAP_SCHEMA, INFLUENCE_SCHEMA
from ldpipe.spec import ExperimentSpec, RunSpec
from ldpipe.store.shards import Store

Log = Callable[[str], None]


def _write(files, table: str, df: pl.DataFrame, run_id: str, schema: dict) -> None:
    Store(files.paths.store).write_shard(table, df, partition={"run_id": run_id}, name=table, schema=schema)


@dataclass(frozen=True)
class InfluenceResult:
    rows: int
    seconds_by_method: dict[str, dict[str, float]]   # run -> method -> seconds
    parameters: dict[str, str]                        # run -> which parameters the eNTK is over, in words


def influence_step(spec: ExperimentSpec, runs: list[RunSpec], files, *,
                   device: str = "cpu", log: Log = print) -> InfluenceResult:
    """The influence matrix of every selected run (store table `influence`)."""
    from ldpipe.influence.runs import compute_influence, influence_parameters

    timings, total = {}, 0
    for run in runs:
        df, secs = compute_influence(spec, run, files, device=device, log=log)
        _write(files, "influence", df, spec.run_id(run), INFLUENCE_SCHEMA)
        timings[run.name] = secs
        total += df.height
    return InfluenceResult(total, timings, {r.name: influence_parameters(r) for r in runs})


@dataclass(frozen=True)
class AgreementResult:
    table: pl.DataFrame            # influence_agreement rows of every selected run
    checks: list[CheckOutcome]     # projected vs exact, and the linearisation (exact vs naive)


AGREEMENT_CHECKS = (("projected_agrees_with_exact", "projected"), ("linearisation_agrees_with_naive", "naive"))


def agreement_step(spec: ExperimentSpec, runs: list[RunSpec], files) -> AgreementResult:
    """Agreement between the estimates of each run's stored influence (store table `influence_agreement`), and the
    two checks: the lowest Spearman of each estimate against exact must reach influence.min_spearman."""
    from ldpipe.influence.runs import agreement_table

    store = Store(files.paths.store)
    frames = []
    made: dict[str, int] = {}   # influence rows per method, over the runs: tells "not comparable" from "not made"
    for run in runs:
        inf_rows = store.read("influence", run_id=spec.run_id(run))
        for method, n in inf_rows.group_by("method").len().iter_rows() if not inf_rows.is_empty() else ():
            made[method] = made.get(method, 0) + n
        df = agreement_table(inf_rows) if not inf_rows.is_empty() else pl.DataFrame(schema=INFLUENCE_AGREEMENT_SCHEMA)
        _write(files, "influence_agreement", df, spec.run_id(run), INFLUENCE_AGREEMENT_SCHEMA)
        frames.append(df)
    table = pl.concat(frames) if frames else pl.DataFrame(schema=INFLUENCE_AGREEMENT_SCHEMA)
    checks = [agreement_check(name, table.filter(pl.col("estimate") == estimate), spec, estimate, made)
              for name, estimate in AGREEMENT_CHECKS]
    return AgreementResult(table, checks)


def agreement_check(name: str, part: pl.DataFrame, spec: ExperimentSpec, estimate: str,
                    made: dict[str, int] | None = None) -> CheckOutcome:
    """One agreement check over the `influence_agreement` rows of `estimate` against exact (`part`): passes when the
    lowest Spearman reaches influence.min_spearman. Nothing to compare because the setup cannot (a method not in
    influence.methods, or no checkpoint with 2 shared entries of the two, e.g. influence.n_naive: 1) is not a
    failure and not a NaN: the check passes with metadata `skipped` saying why (printed as SKIP by `ldpipe run`).
    A declared method that wrote no influence rows at all (`made`: rows per method) fails: that is a broken step,
    not an inapplicable check. A Spearman that is undefined (one side constant at a checkpoint) fails, naming the
    checkpoints."""
    threshold = spec.influence.min_spearman
    if part.is_empty():
        methods = list(spec.influence.methods)
        missing = [m for m in (estimate, "exact") if m not in methods]
        if missing:
            why = f"not measured: influence.methods {methods} has no {' or '.join(map(repr, missing))} to compare"
            return CheckOutcome(name, True, {"skipped": why, "threshold": threshold, "entries_compared": 0})
        counts = {m: (made or {}).get(m, 0) for m in (estimate, "exact")}
        if made is not None and not all(counts.values()):
            return CheckOutcome(name, False, {"reason": f"declared in influence.methods but no influence rows were "
                                                        f"written: {counts}", "threshold": threshold,
                                              "entries_compared": 0})
        why = (f"not measured: no checkpoint has 2 or more entries of both {estimate!r} and 'exact' (rows made: "
               f"{counts})")
        return CheckOutcome(name, True, {"skipped": why, "threshold": threshold, "entries_compared": 0})
    undefined = part.filter(pl.col("spearman").is_nan())
    defined = part.filter(~pl.col("spearman").is_nan())
    meta: dict = {"threshold": threshold, "entries_compared": int(part["n"].sum())}
    if not defined.is_empty():
        meta |= {"min_spearman": float(defined["spearman"].min()),
                 "max_relative_error": float(defined["relative_error"].max())}
    if not undefined.is_empty():
        meta["spearman_undefined_at"] = [f"{r}:{c}" for r, c in undefined.select("run_id", "checkpoint").rows()]
        meta["reason"] = "Spearman undefined (one side's values are all equal) at a checkpoint"
    return CheckOutcome(name, undefined.is_empty() and meta["min_spearman"] >= threshold, meta)


@dataclass(frozen=True)
class AkgResult:
    table: pl.DataFrame            # akg rows: per observed token, predicted vs realised
    pairs: pl.DataFrame            # per (checkpoint, training example, observed probe): the sums


def akg_step(spec: ExperimentSpec, runs: list[RunSpec], files, *, device: str = "cpu",
             log: Log = print) -> AkgResult:
    """The A-K-G decomposition of every selected run (store table `akg`)."""
    from ldpipe.influence.runs import compute_akg

    frames = []
    for run in runs:
        df = compute_akg(spec, run, files, device=device, log=log)
        _write(files, "akg", df, spec.run_id(run), AKG_SCHEMA)
        frames.append(df)
    table = pl.concat(frames) if frames else pl.DataFrame(schema=AKG_SCHEMA)
    pairs = (table.group_by("run_id", "checkpoint", "train_example_id", "observed_example_id",
                            "observed_response_type", maintain_order=True)
             .agg(pl.col("predicted_delta").sum().alias("predicted"), pl.col("realised_delta").sum()
                  .alias("realised"), pl.col("pi_token").mean().alias("mean_pi"), pl.col("g_norm").first()))
    return AkgResult(table, pairs)


@dataclass(frozen=True)
class HeatmapResult:
    rows: int
    plots: dict[str, Path]          # run -> its accumulated heat map PNG


def heatmap_step(spec: ExperimentSpec, runs: list[RunSpec], files, *,
                 device: str = "cpu", log: Log = print) -> HeatmapResult:
    """The influence heat map of every selected run (store table `influence_heatmap`, a PNG per run)."""
    from ldpipe.analysis.curves import save_plot
    from ldpipe.influence.heatmap import compute_heatmap, plot_heatmap

    total, plots = 0, {}
    for run in runs:
        df = compute_heatmap(spec, run, files, device=device, log=log)
        _write(files, "influence_heatmap", df, spec.run_id(run), INFLUENCE_HEATMAP_SCHEMA)
        total += df.height
        png = plot_heatmap(df, title=f"{spec.run_id(run)}: accumulated eNTK influence")
        plots[run.name] = Path(save_plot(png, files.paths.plots / f"{spec.name}.{run.name}.influence_heatmap.png"))
    return HeatmapResult(total, plots)
