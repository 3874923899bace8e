"""Influence assets of one experiment, downstream of the catalog (so of every run):

  catalog -> <exp>/influence_matrix -> <exp>/influence_agreement (checks: projected and naive vs exact)
  catalog -> <exp>/akg
  catalog -> <exp>/influence_heatmap (PNG in metadata)

Each calls one step of ldpipe.influence.steps (which writes one shard per run into its store table, and its plots)
and turns the typed result into metadata and check results.
"""

import dagster as dg

from ldpipe import pipeline
from ldpipe.defs.common import CATALOG_KEY, md_table, png_markdown
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.spec import ExperimentSpec


def influence_assets(spec: ExperimentSpec) -> list:
    from ldpipe.influence import inputs, steps

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
        res = steps.influence_step(spec, runs, files, device=compute.device, log=context.log.info)
        return dg.MaterializeResult(metadata={"dagster/row_count": res.rows, "seconds_by_method": dg.MetadataValue.json(
            res.seconds_by_method), "runs": dg.MetadataValue.json(names), "rank": inf.rank,
            "parameters": dg.MetadataValue.json(res.parameters)})

    skip = " Not measured (passes, metadata `skipped` says why) when influence.methods lacks one of the two."
    checks = [dg.AssetCheckSpec("projected_agrees_with_exact", asset=k("influence_agreement"),
                                description=f"Spearman(projected, exact) ≥ {inf.min_spearman} at every checkpoint "
                                            "(the measured minimum is reported)." + skip),
              dg.AssetCheckSpec("linearisation_agrees_with_naive", asset=k("influence_agreement"),
                                description=f"Spearman(naive one-step SGD, exact first order) ≥ {inf.min_spearman}."
                                            + skip)]

    @dg.asset(key=k("influence_agreement"), group_name=exp, deps=[k("influence_matrix")], kinds={"duckdb"},
              check_specs=checks,
              description="Agreement of projected / naive with exact eNTK, projected_precond with exact_precond, "
                          "and of exact (SGD) / exact_precond (Adam/RMSprop state of the checkpoint) with a real "
                          "loaded-optimizer step (Spearman, relative error, sign agreement): store table "
                          "`influence_agreement`.")
    def influence_agreement(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        res = steps.agreement_step(spec, runs, pipeline.files_for(spec, ldpipe_home.paths()))
        table = res.table
        results = [dg.AssetCheckResult(check_name=v.name, passed=v.passed, severity=dg.AssetCheckSeverity.WARN,
                                       metadata=v.metadata) for v in res.checks]
        return dg.MaterializeResult(
            metadata={"dagster/row_count": table.height,
                      "agreement": dg.MetadataValue.md(md_table(table.drop("reference"), 60))},
            check_results=results)

    @dg.asset(key=k("akg"), group_name=exp, deps=[CATALOG_KEY], kinds={"pytorch", "duckdb"},
              description="A-K-G decomposition Δ log π = −η A K G per observed token, predicted vs realised "
                          "(store table `akg`, view `akg_pairs`).")
    def akg(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome, compute: Compute) -> dg.MaterializeResult:
        res = steps.akg_step(spec, runs, pipeline.files_for(spec, ldpipe_home.paths()),
                             device=compute.device, log=context.log.info)
        return dg.MaterializeResult(metadata={"dagster/row_count": res.table.height,
                                              "pairs": dg.MetadataValue.md(md_table(res.pairs, 40))})

    @dg.asset(key=k("influence_heatmap"), group_name=exp, deps=[CATALOG_KEY], kinds={"pytorch", "duckdb"},
              description="Accumulated eNTK influence heat map: rows observed types, columns SFT on each type and "
                          "DPO (store table `influence_heatmap`, PNG per run).")
    def influence_heatmap(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                          compute: Compute) -> dg.MaterializeResult:
        res = steps.heatmap_step(spec, runs, pipeline.files_for(spec, ldpipe_home.paths()),
                                 device=compute.device, log=context.log.info)
        meta: dict = {"dagster/row_count": res.rows}
        for run_name, path in res.plots.items():
            meta[f"heatmap_{run_name}"] = png_markdown(str(path), f"influence heat map {run_name}")
            meta[f"heatmap_{run_name}_path"] = dg.MetadataValue.path(str(path))
        return dg.MaterializeResult(metadata=meta)

    return [influence_matrix, influence_agreement, akg, influence_heatmap]
