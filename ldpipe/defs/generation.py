"""Generation-based analyses of one experiment, downstream of the catalog:
<exp>/squeezing, <exp>/borrowing, <exp>/win_rate, and the toy <exp>/squeeze_toy (no upstream)."""

import dagster as dg
import polars as pl

from ldpipe import pipeline
from ldpipe.analysis.curves import save_plot
from ldpipe.defs.common import CATALOG_KEY, md_table, png_markdown
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.spec import ExperimentSpec
from ldpipe.store.shards import Store

TOY_CHECK = "negative_gradient_on_valley_squeezes_into_argmax"


def generation_assets(spec: ExperimentSpec) -> list:
    exp = spec.name
    k = lambda *parts: dg.AssetKey([exp, *parts])  # noqa: E731

    def squeezing_metadata(res) -> dict:
        stats, curves = res.stats, res.curves
        meta = {"dagster/row_count": stats.height, "plot": png_markdown(str(res.plot), "squeezing"),
                "plot_path": dg.MetadataValue.path(str(res.plot)),
                "checkpoints": dg.MetadataValue.md(md_table(stats.select(
                    "run_id", "checkpoint", "step", "mean_max_prob", "mean_entropy", "repeater_rate",
                    "mean_gen_words"), 60)), "held_out": res.held_out}
        if not curves.is_empty():
            last = curves.filter(pl.col("step") == pl.col("step").max().over("run_id"))
            meta["final_change"] = dg.MetadataValue.md(md_table(
                last.select("run_id", "phase", "step", "delta_chosen", "delta_argmax", "delta_gap", "gap_per_token",
                            "argmax_share", "rejected_logp_per_token"), 40))
            first = curves.filter(pl.col("step") == pl.col("step").min().over("run_id"))
            meta["can_it_squeeze_at_start"] = dg.MetadataValue.md(md_table(
                first.select("run_id", "phase", "gap_per_token", "argmax_share", "rejected_logp_per_token"), 40))
        return meta

    def borrowing_metadata(res) -> dict:
        return {"dagster/row_count": res.rows.height, "plot": png_markdown(str(res.plot), "borrowing"),
                "plot_path": dg.MetadataValue.path(str(res.plot)),
                "by_checkpoint": dg.MetadataValue.md(md_table(res.summary, 80)),
                "examples": dg.MetadataValue.md(md_table(res.rows.filter(pl.col("checkpoint") == "final").select(
                    "run_id", "example_id", "split", "generation", "borrow_share", "fact_borrow_share"), 12)),
                "held_out": res.held_out}

    def win_rate_metadata(res) -> dict:
        if res.skipped is not None:
            return {"skipped": res.skipped}
        return {"judge_model": res.judge_model, "calls": dg.MetadataValue.json(res.calls),
                "win_rates": dg.MetadataValue.md(md_table(res.table, 40)), "dagster/row_count": res.table.height}

    # (asset name, analysis step, its metadata, kinds, description)
    analyses = [
        ("squeezing", "ldpipe.analysis.squeezing.squeezing_step", squeezing_metadata, {"pytorch", "duckdb"},
         "Squeezing: log π(y*) vs log π(y+) over training with the diagnostics that say whether a setting can "
         "squeeze (per-token gap, argmax share, valley depth of y-; view squeezing), per kind of rejected answer "
         "(view squeezing_by_rejected), and per checkpoint the peakiness of next-token distributions along y+ and "
         "the repeater rate of greedy generations (table generation_stats)."),
        ("borrowing", "ldpipe.analysis.borrowing.borrowing_step", borrowing_metadata, {"pytorch", "duckdb"},
         "Hallucination borrowing: the y_j≠u curve (view borrowing) and, per checkpoint, the share of generated "
         "n-grams / fact values that belong to other prompts' answers (table generation_borrowing)."),
        ("win_rate", "ldpipe.analysis.winrate.win_rate_step", win_rate_metadata, {"pytorch", "openai"},
         "LLM-judge win rate between declared checkpoint pairs (both A/B orders; ties and unparsable verdicts "
         "counted; view win_rate). Skipped, with the reason, when generation_analysis.win_rate.judge is not "
         "declared."),
    ]
    steps = [_step_asset(spec, name, step, meta, kinds=kinds, description=desc)
             for name, step, meta, kinds, desc in analyses]

    @dg.asset(key=k("squeeze_toy"), group_name=exp, kinds={"numpy"},
              check_specs=[dg.AssetCheckSpec(TOY_CHECK, asset=k("squeeze_toy"),
                                             description="Measured: after one negative-gradient step on a valley "
                                                         "class of a peaky softmax (panel D0), does only the "
                                                         "argmax y* gain probability?")],
              description="The paper's squeezing toy (one softmax step, docs/glossary.md#squeezing): π before vs after "
                          "per panel; panel D0 is the negative gradient on a valley class.")
    def squeeze_toy(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        from ldpipe.analysis.squeeze_toy import PANELS, plot_panel, run_panel, summary_row

        paths = ldpipe_home.paths()
        results = {kind: run_panel(kind) for kind in PANELS}   # each panel once: the table and the plots
        rows = [summary_row(r) for r in results.values()]
        meta: dict = {"panels": dg.MetadataValue.md(md_table(pl.DataFrame(rows).select(
            "panel", "description", "minus_class", "plus_class", "y_star", "delta_pi_star", "frac_others_fall",
            "only_argmax_rises", "n_rise"), 10))}
        for panel in ("B", "C", "D0"):
            png = save_plot(plot_panel(results[panel]), paths.plots / f"{exp}.squeeze_toy.{panel}.png")
            meta[f"plot_{panel}"] = png_markdown(str(png), f"squeeze toy panel {panel}")
        d0 = next(r for r in rows if r["panel"] == "D0")
        check = dg.AssetCheckResult(
            check_name=TOY_CHECK, passed=bool(d0["only_argmax_rises"]), severity=dg.AssetCheckSeverity.WARN,
            metadata={"only_argmax_rises": bool(d0["only_argmax_rises"]), "n_rise": int(d0["n_rise"]),
                      "delta_pi_star": float(d0["delta_pi_star"]), "frac_others_fall": float(d0["frac_others_fall"]),
                      "pi0_minus": float(d0["pi0_minus"])})
        return dg.MaterializeResult(metadata=meta, check_results=[check])

    if not spec.generation_analysis.enabled:
        return [squeeze_toy]
    return [*steps, squeeze_toy]


def _step_asset(spec: ExperimentSpec, name: str, step: str, metadata, *, kinds: set[str], description: str):
    """The asset <exp>/<name>: downstream of the catalog, in the gpu pool, it runs one generation analysis step
    (`step`: "module.function", imported when the asset runs, so torch and transformers load in the run worker
    and not in the code server) and turns its typed result into metadata with `metadata(result)`."""
    @dg.asset(key=dg.AssetKey([spec.name, name]), group_name=spec.name, deps=[CATALOG_KEY], pool="gpu",
              kinds=kinds, description=description)
    def step_asset(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                   compute: Compute) -> dg.MaterializeResult:
        import importlib

        module, function = step.rsplit(".", 1)
        run_step = getattr(importlib.import_module(module), function)
        files = pipeline.files_for(spec, ldpipe_home.paths())
        res = run_step(spec, files, Store(files.paths.store), device=compute.device, log=context.log.info,
                       warn=context.log.warning)
        return dg.MaterializeResult(metadata=metadata(res))

    return step_asset
