"""Turn the YAML declarations in assets/ into Dagster assets, checks and jobs.

Per experiment `<exp>` (asset group `<exp>`):
  <exp>/dataset -> <exp>/probe_set -> <exp>/base_model -> <exp>/run_<name> (pool "gpu")
  (a run declared with `start_from: <parent>` depends on <exp>/run_<parent> instead of the base model)
then the shared `catalog` (DuckDB views) -> <exp>/learning_curves and the analyses.
Assets exchange files, not Python objects: no model or tensor goes through an IO manager.
Each stage's assets live in their own module (probes, training, ...); this one assembles them.
"""

import dagster as dg
import polars as pl

from ldpipe import pipeline
from ldpipe.defs.common import CATALOG_KEY, declarations_dir, md_table, png_markdown
from ldpipe.defs.probes import probe_assets
from ldpipe.defs.resources import LdpipeHome
from ldpipe.defs.training import RunOverrides, training_assets  # noqa: F401  (RunOverrides: public)
from ldpipe.spec import ExperimentSpec, load_experiments

__all__ = ["build_defs", "declarations_dir", "experiment_assets", "RunOverrides"]


def experiment_assets(spec: ExperimentSpec) -> list:
    exp = spec.name
    k = lambda *parts: dg.AssetKey([exp, *parts])  # noqa: E731

    @dg.asset(key=k("learning_curves"), group_name=exp, deps=[CATALOG_KEY], kinds={"duckdb"},
              description="Per-type learning curves (view sql/learning_curves.sql) and a PNG per run.")
    def learning_curves(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.learning_curves(spec, files, log=context.log.info)
        curves = info.curves
        meta: dict = {"dagster/row_count": curves.height}
        for name, png in info.plots.items():
            meta[f"plot_{name}"] = png_markdown(str(png), f"learning curves {name}")
            meta[f"plot_{name}_path"] = dg.MetadataValue.path(str(png))
        for name, png in info.chain_plots.items():   # chained runs: all phases on one axis
            meta[f"chain_plot_{name}"] = png_markdown(str(png), f"chain ending in {name}")
        if not curves.is_empty():
            last = curves.filter(pl.col("step") == pl.col("step").max().over("run_id"))
            meta["final_change_by_type"] = dg.MetadataValue.md(md_table(
                last.select("run_id", "step", "response_type", "mean_logp", "mean_delta"), 60))
        return dg.MaterializeResult(metadata=meta)

    return [*probe_assets(spec), *training_assets(spec), learning_curves]


def catalog_asset(specs: list[ExperimentSpec]):
    deps = [dg.AssetKey([s.name, f"run_{r.name}"]) for s in specs for r in s.runs]

    @dg.asset(key=CATALOG_KEY, deps=deps, group_name="catalog", kinds={"duckdb"},
              description="DuckDB catalog: views over the Parquet store and one view per sql/*.sql file. "
                          "The only DuckDB writer; it swaps in a new file atomically.")
    def catalog(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        info = pipeline.refresh(ldpipe_home.paths(), ldpipe_home.sql_path())
        context.log.info(f"catalog views: {info.get('views')}")
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(info.get("path"))),
            "views": dg.MetadataValue.json(info.get("views", [])),
            "shards": dg.MetadataValue.json(info.get("tables", {})),
        })

    return catalog


def build_defs(specs: list[ExperimentSpec]) -> dg.Definitions:
    assets: list = []
    for spec in specs:
        assets.extend(experiment_assets(spec))
        # Analyses (each module: `<name>_assets(spec) -> list`, downstream of the catalog) go here.
        from ldpipe.defs.generation import generation_assets
        assets.extend(generation_assets(spec))
        from ldpipe.defs.influence import influence_assets
        assets.extend(influence_assets(spec))
    assets.append(catalog_asset(specs))
    jobs = [dg.define_asset_job("all_experiments", selection=dg.AssetSelection.all(),
                                description="Materialize every declared experiment end to end.")]
    for spec in specs:
        jobs.append(dg.define_asset_job(f"{spec.name}_pipeline",
                                        selection=dg.AssetSelection.groups(spec.name) | dg.AssetSelection.keys(
                                            CATALOG_KEY), description=f"Experiment {spec.name} end to end."))
    from ldpipe.defs.automation import automation
    schedules, sensors = automation(specs)
    # Schedules and sensors (ldpipe.defs.automation) go here.
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules, sensors=sensors)


@dg.definitions
def experiments() -> dg.Definitions:
    return build_defs(load_experiments(declarations_dir()))
