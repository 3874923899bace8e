"""Turn the YAML declarations in assets/ into Dagster assets, checks and jobs.

Per experiment `<exp>` (asset group `<exp>`):
  <exp>/dataset -> <exp>/probe_set -> <exp>/base_model -> <exp>/run_<name> (pool "gpu")
  (a run declared with `start_from: <parent>` depends on <exp>/run_<parent> instead of the base model)
then the shared `catalog` (DuckDB views) -> <exp>/learning_curves.
Assets exchange files, not Python objects: no model or tensor goes through an IO manager.
"""

import base64
import os
from pathlib import Path

import dagster as dg
import polars as pl

from ldpipe import pipeline
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.paths import project_dir
from ldpipe.spec import ExperimentSpec, RunSpec, load_experiments

CATALOG_KEY = dg.AssetKey("catalog")


class RunOverrides(dg.Config):
    """Launch-time overrides of a declared run (e.g. a quick smoke run from the launchpad)."""

    epochs: float | None = None
    lr: float | None = None
    eval_every: int | None = None
    batch_size: int | None = None
    seed: int | None = None

    def apply(self, run: RunSpec) -> RunSpec:
        changes = {k: v for k, v in self.model_dump().items() if v is not None}
        return run.model_copy(update=changes) if changes else run


def declarations_dir() -> Path:
    env = os.environ.get("LDPIPE_ASSETS_DIR")
    return Path(env).resolve() if env else project_dir() / "assets"


def _md_table(df: pl.DataFrame, max_rows: int = 20) -> str:
    cols = df.columns
    rows = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in df.head(max_rows).iter_rows():
        rows.append(" | ".join(_cell(v) for v in r))
    return "\n".join(rows)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    s = str(v).replace("\n", "⏎").replace("|", "\\|")
    return s if len(s) <= 80 else s[:77] + "..."


def _png_markdown(png_path: str, alt: str) -> dg.MetadataValue:
    data = base64.b64encode(Path(png_path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def experiment_assets(spec: ExperimentSpec) -> list:
    exp = spec.name
    k = lambda *parts: dg.AssetKey([exp, *parts])  # noqa: E731

    @dg.asset(key=k("dataset"), group_name=exp, kinds={"parquet"},
              description=f"Preference pairs ({spec.dataset.kind}) for experiment {exp}.")
    def dataset(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_dataset(spec, files, log=context.log.info)
        prefs = pipeline.load_preferences_file(files)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(info["path"]),
            "dagster/row_count": info["rows"],
            "splits": dg.MetadataValue.json(info["splits"]),
            "preview": dg.MetadataValue.md(_md_table(prefs.select("example_id", "split", "prompt", "chosen",
                                                                  "rejected"), 10)),
        })

    probe_checks = [dg.AssetCheckSpec("every_type_for_every_prompt", asset=k("probe_set")),
                    dg.AssetCheckSpec("perturbations_valid", asset=k("probe_set"))]

    @dg.asset(key=k("probe_set"), group_name=exp, deps=[k("dataset")], kinds={"parquet"},
              check_specs=probe_checks,
              description="Long table: one row per (probe prompt, response type) with provenance.")
    def probe_set(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_probes(spec, files, log=context.log.info)
        probes = pipeline.load_probes_file(files)
        checks = info["checks"]
        preview = (probes.group_by("response_type", maintain_order=True).first()
                   .select("response_type", "example_id", "response", "provenance").sort("response_type"))
        gaps = checks.get("missing", [])
        quality = {
            "shuffle_failures": checks.get("shuffle_failures", 0),
            "irr_train_equals_chosen": checks.get("irr_train_equals_chosen", 0),
            "rephrases_identical_to_source": checks.get("rephrases_identical_to_source", 0),
        }
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(info["path"]),
                "dagster/row_count": info["rows"],
                "prompts": info["prompts"],
                "types": dg.MetadataValue.json(info["types"]),
                "skipped_types": dg.MetadataValue.json(info["skipped"]),
                "llm": dg.MetadataValue.json(info.get("llm", {})),
                "length_stats": dg.MetadataValue.json(checks.get("length_stats", {})),
                "preview_per_type": dg.MetadataValue.md(_md_table(preview, 40)),
            },
            check_results=[
                dg.AssetCheckResult(check_name="every_type_for_every_prompt", passed=len(gaps) == 0,
                                    metadata={"gaps": len(gaps), "first_gaps": dg.MetadataValue.json(gaps[:20])}),
                dg.AssetCheckResult(check_name="perturbations_valid", passed=not any(quality.values()),
                                    metadata=quality),
            ],
        )

    @dg.asset(key=k("base_model"), group_name=exp, deps=[k("dataset")], pool="gpu", kinds={"pytorch"},
              description="Tokenizer + causal LM checkpoint (built-in: trained offline once per config hash).")
    def base_model(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                   compute: Compute) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_base_model(spec, files, device=compute.device, log=context.log.info)
        meta = {"path": dg.MetadataValue.path(info["path"]), "cached": info.get("cached", False),
                "parameters": info.get("parameters", 0)}
        for key in ("val_loss", "val_ppl", "train_loss", "wall_s", "tokens_seen"):
            if isinstance(info.get(key), (int, float)):
                meta[key] = float(info[key])
        return dg.MaterializeResult(metadata=meta)

    run_assets = [_run_asset(spec, run) for run in spec.runs]

    @dg.asset(key=k("learning_curves"), group_name=exp, deps=[CATALOG_KEY], kinds={"duckdb"},
              description="Per-type learning curves (view sql/learning_curves.sql) and a PNG per run.")
    def learning_curves(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.learning_curves(spec, files, log=context.log.info)
        curves: pl.DataFrame = info["curves"]
        meta: dict = {"dagster/row_count": info["rows"]}
        for name, png in info["plots"].items():
            meta[f"plot_{name}"] = _png_markdown(png, f"learning curves {name}")
            meta[f"plot_{name}_path"] = dg.MetadataValue.path(png)
        if not curves.is_empty():
            last = curves.filter(pl.col("step") == pl.col("step").max().over("run_id"))
            meta["final_change_by_type"] = dg.MetadataValue.md(_md_table(
                last.select("run_id", "step", "response_type", "mean_logp", "mean_delta"), 60))
        return dg.MaterializeResult(metadata=meta)

    return [dataset, probe_set, base_model, *run_assets, learning_curves]


def _run_check(run: RunSpec) -> tuple[str, str]:
    """Name and description of a run's measured (WARN-only) check."""
    if run.algo == "sft":
        return "sft_raises_supervised_target", (f"Measured: does SFT raise log π of the supervised type(s) "
                                                f"({run.supervise}) on the probe prompts?")
    return (f"{run.algo}_widens_chosen_rejected_gap",
            f"Measured: does {run.algo.upper()} raise log π(y+) − log π(y−) on the probe prompts?")


def _run_check_result(run: RunSpec, name: str, deltas: dict[str, float]) -> dg.AssetCheckResult:
    if run.algo == "sft":
        got = [deltas.get(t) for t in run.supervised_types]
        measured = min(got) if None not in got else None
        what = run.supervise
    else:
        c, r = deltas.get("chosen"), deltas.get("rejected")
        measured = c - r if c is not None and r is not None else None
        what = "chosen - rejected"
    return dg.AssetCheckResult(
        check_name=name, passed=measured is not None and measured > 0, severity=dg.AssetCheckSeverity.WARN,
        metadata={"measured_delta": float(measured) if measured is not None else float("nan"),
                  "response_type": what})


def _run_asset(spec: ExperimentSpec, declared: RunSpec):
    exp = spec.name
    key = dg.AssetKey([exp, f"run_{declared.name}"])
    check_name, check_desc = _run_check(declared)
    check = dg.AssetCheckSpec(check_name, asset=key, description=check_desc)
    # A chained run starts from its parent run's final checkpoint (and uses it as DPO reference).
    start = (dg.AssetKey([exp, f"run_{declared.start_from}"]) if declared.start_from
             else dg.AssetKey([exp, "base_model"]))
    origin = f"run '{declared.start_from}'" if declared.start_from else "the base model"

    @dg.asset(key=key, group_name=exp, pool="gpu", kinds={"pytorch"},
              deps=[start, dg.AssetKey([exp, "probe_set"])],
              check_specs=[check], tags={"ldpipe/algo": declared.algo},
              description=f"{declared.algo.upper()} run '{declared.name}' from {origin} with probe tracking every "
                          f"{declared.eval_every} steps; trajectories go to the Parquet store.")
    def run_asset(context: dg.AssetExecutionContext, config: RunOverrides, ldpipe_home: LdpipeHome,
                  compute: Compute) -> dg.MaterializeResult:
        run = config.apply(declared)
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.train_run(spec, run, files, device=compute.device, log=context.log.info)
        meta = {
            "run_id": info["run_id"], "config_hash": info["config_hash"], "algo": info["algo"],
            "checkpoint": dg.MetadataValue.path(info["checkpoint"]),
            "steps": info["steps"], "evals": info["evals"], "wall_s": info["wall_s"],
            "device": info["device"], "final_loss": info["final_loss"], "train_examples": info["train_examples"],
            # steps of the runs before this one in its chain: add to `step` to put a chain on one axis
            "step_offset": info["step_offset"],
            "delta_logp_by_type": dg.MetadataValue.json(info["delta_by_type"]),
        }
        if info["start_from"]:
            meta["start_from"] = info["start_from"]
            meta["parent_config_hash"] = info["parent_config_hash"]
        meta.update({f"final_{k}": float(v) for k, v in info["final_rewards"].items()})
        return dg.MaterializeResult(metadata=meta,
                                    check_results=[_run_check_result(run, check_name, info["delta_by_type"])])

    return run_asset


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
    assets.append(catalog_asset(specs))
    jobs = [dg.define_asset_job("all_experiments", selection=dg.AssetSelection.all(),
                                description="Materialize every declared experiment end to end.")]
    for spec in specs:
        jobs.append(dg.define_asset_job(f"{spec.name}_pipeline",
                                        selection=dg.AssetSelection.groups(spec.name) | dg.AssetSelection.keys(
                                            CATALOG_KEY), description=f"Experiment {spec.name} end to end."))
    return dg.Definitions(assets=assets, jobs=jobs)


@dg.definitions
def experiments() -> dg.Definitions:
    return build_defs(load_experiments(declarations_dir()))
