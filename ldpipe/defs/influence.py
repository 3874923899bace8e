"""Influence assets of one experiment (issue 5), downstream of the catalog (so of every run):

  catalog -> <exp>/influence_matrix -> <exp>/influence_agreement (checks: projected and naive vs exact)
  catalog -> <exp>/akg
  catalog -> <exp>/influence_heatmap (PNG in metadata)

Each writes one shard per run (partition run_id) into its store table and refreshes the catalog.
The work lives in ldpipe.influence.runs.
"""

import dagster as dg
import polars as pl

from ldpipe import pipeline
from ldpipe.defs.common import CATALOG_KEY, md_table, png_markdown
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.schema import AKG_SCHEMA, INFLUENCE_AGREEMENT_SCHEMA, INFLUENCE_HEATMAP_SCHEMA, INFLUENCE_SCHEMA
from ldpipe.spec import ExperimentSpec
from ldpipe.store.shards import Store


def _write(files, table: str, df: pl.DataFrame, run_id: str, schema: dict) -> None:
    Store(files.paths.store).write_shard(table, df, partition={"run_id": run_id}, name=table, schema=schema)


def influence_assets(spec: ExperimentSpec) -> list:
    from ldpipe.influence import heatmap, inputs
    from ldpipe.influence import runs as ir

    runs = inputs.influence_runs(spec)
    if not runs:
        return []
    exp = spec.name
    inf = spec.influence
    k = lambda *parts: dg.AssetKey([exp, *parts])  # noqa: E731
    names = [r.name for r in runs]

    @dg.asset(key=k("influence_matrix"), group_name=exp, deps=[CATALOG_KEY], kinds={"pytorch", "duckdb"},
              description=f"Cross-example influence Δ log π(y_j|x_j) of one update on training example i, runs "
                          f"{names}, at their start/snapshot/final checkpoints; methods {list(inf.methods)} "
                          "(store table `influence`, view `influence_accumulated`).")
    def influence_matrix(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                         compute: Compute) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        timings, total = {}, 0
        for run in runs:
            df, secs = ir.compute_influence(spec, run, files, device=compute.device, log=context.log.info)
            _write(files, "influence", df, spec.run_id(run), INFLUENCE_SCHEMA)
            timings[run.name] = secs
            total += df.height
        pipeline.refresh(files, ldpipe_home.sql_path())
        return dg.MaterializeResult(metadata={"dagster/row_count": total, "seconds_by_method": dg.MetadataValue.json(
            timings), "runs": dg.MetadataValue.json(names), "rank": inf.rank,
            "parameters": dg.MetadataValue.json({r.name: ir.influence_parameters(r) for r in runs})})

    checks = [dg.AssetCheckSpec("projected_agrees_with_exact", asset=k("influence_agreement"),
                                description=f"Spearman(projected, exact) ≥ {inf.min_spearman} at every checkpoint "
                                            "(the measured minimum is reported)."),
              dg.AssetCheckSpec("linearisation_agrees_with_naive", asset=k("influence_agreement"),
                                description=f"Spearman(naive one-step SGD, exact first order) ≥ {inf.min_spearman}.")]

    @dg.asset(key=k("influence_agreement"), group_name=exp, deps=[k("influence_matrix")], kinds={"duckdb"},
              check_specs=checks,
              description="Agreement of projected / naive with exact eNTK, projected_precond with exact_precond, "
                          "and of exact (SGD) / exact_precond (Adam/RMSprop state of the checkpoint) with a real "
                          "loaded-optimizer step (Spearman, relative error, sign agreement): store table "
                          "`influence_agreement`.")
    def influence_agreement(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        store = Store(files.paths.store)
        frames = []
        for run in runs:
            inf_rows = store.read("influence", run_id=spec.run_id(run))
            df = ir.agreement_table(inf_rows) if not inf_rows.is_empty() else pl.DataFrame(
                schema=INFLUENCE_AGREEMENT_SCHEMA)
            _write(files, "influence_agreement", df, spec.run_id(run), INFLUENCE_AGREEMENT_SCHEMA)
            frames.append(df)
        pipeline.refresh(files, ldpipe_home.sql_path())
        table = pl.concat(frames)
        results = []
        for check, est in (("projected_agrees_with_exact", "projected"), ("linearisation_agrees_with_naive", "naive")):
            part = table.filter(pl.col("estimate") == est)
            low = part["spearman"].min() if not part.is_empty() else None
            results.append(dg.AssetCheckResult(
                check_name=check, passed=low is not None and low >= inf.min_spearman,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"min_spearman": float(low) if low is not None else float("nan"),
                          "threshold": inf.min_spearman,
                          "max_relative_error": (float(part["relative_error"].max()) if low is not None
                                                 else float("nan")),
                          "entries_compared": int(part["n"].sum()) if low is not None else 0}))
        return dg.MaterializeResult(
            metadata={"dagster/row_count": table.height,
                      "agreement": dg.MetadataValue.md(md_table(table.drop("reference"), 60))},
            check_results=results)

    @dg.asset(key=k("akg"), group_name=exp, deps=[CATALOG_KEY], kinds={"pytorch", "duckdb"},
              description="A-K-G decomposition Δ log π = −η A K G per observed token, predicted vs realised "
                          "(store table `akg`, view `akg_pairs`).")
    def akg(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome, compute: Compute) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        frames = []
        for run in runs:
            df = ir.compute_akg(spec, run, files, device=compute.device, log=context.log.info)
            _write(files, "akg", df, spec.run_id(run), AKG_SCHEMA)
            frames.append(df)
        pipeline.refresh(files, ldpipe_home.sql_path())
        table = pl.concat(frames)
        summary = (table.group_by("run_id", "checkpoint", "train_example_id", "observed_example_id",
                                  "observed_response_type", maintain_order=True)
                   .agg(pl.col("predicted_delta").sum().alias("predicted"), pl.col("realised_delta").sum()
                        .alias("realised"), pl.col("pi_token").mean().alias("mean_pi"), pl.col("g_norm").first()))
        return dg.MaterializeResult(metadata={"dagster/row_count": table.height,
                                              "pairs": dg.MetadataValue.md(md_table(summary, 40))})

    @dg.asset(key=k("influence_heatmap"), group_name=exp, deps=[CATALOG_KEY], kinds={"pytorch", "duckdb"},
              description="Accumulated eNTK influence heat map: rows observed types, columns SFT on each type and "
                          "DPO (store table `influence_heatmap`, PNG per run).")
    def influence_heatmap(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                          compute: Compute) -> dg.MaterializeResult:
        from ldpipe.analysis.curves import save_plot

        files = pipeline.files_for(spec, ldpipe_home.paths())
        meta: dict = {}
        total = 0
        for run in runs:
            df = heatmap.compute_heatmap(spec, run, files, device=compute.device, log=context.log.info)
            _write(files, "influence_heatmap", df, spec.run_id(run), INFLUENCE_HEATMAP_SCHEMA)
            total += df.height
            png = heatmap.plot_heatmap(df, title=f"{spec.run_id(run)}: accumulated eNTK influence")
            path = save_plot(png, files.paths.plots / f"{exp}.{run.name}.influence_heatmap.png")
            meta[f"heatmap_{run.name}"] = png_markdown(str(path), f"influence heat map {run.name}")
            meta[f"heatmap_{run.name}_path"] = dg.MetadataValue.path(str(path))
        pipeline.refresh(files, ldpipe_home.sql_path())
        meta["dagster/row_count"] = total
        return dg.MaterializeResult(metadata=meta)

    return [influence_matrix, influence_agreement, akg, influence_heatmap]
