"""Probe-set assets of one experiment: <exp>/dataset -> <exp>/probe_set -> <exp>/model_probes.

`probe_set` holds every type that needs no model; `model_probes` (after the base model) adds y_init, y_selfr,
uniformly random tokens and custom types made from them, and counts with the base model's tokenizer what scoring
truncates from the whole probe set (metadata `truncation`, store table probe_truncation). Training runs depend on
both (`probe_keys`) and read their union (`pipeline.load_probes_file`). Neither asset is partitioned: each type's rows are cached under a
content hash of their inputs (see pipeline.py), so adding a type builds only that type and a rerun builds none,
while `ldpipe run` can still materialize the whole graph in one call.
"""

import dagster as dg
import polars as pl

from ldpipe import pipeline
from ldpipe.defs.common import md_table
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.spec import ExperimentSpec


def probe_keys(spec: ExperimentSpec) -> list[dg.AssetKey]:
    """The probe assets a training run reads (its probe set)."""
    return [dg.AssetKey([spec.name, "probe_set"]), dg.AssetKey([spec.name, "model_probes"])]


def _preview(probes: pl.DataFrame) -> str:
    """The first row of every response type."""
    if probes.is_empty():
        return "(no rows)"
    first = (probes.group_by("response_type", maintain_order=True).first()
             .select("response_type", "example_id", "response", "provenance").sort("response_type"))
    return md_table(first, 60)


def _lengths(checks: dict) -> str:
    from ldpipe.probes.checks import length_table

    table = length_table(checks)
    return md_table(table, 60) if not table.is_empty() else "(no rows)"


def _truncation(counts: dict[str, dict]) -> str:
    """What scoring cuts from each response type (store table probe_truncation), as a markdown table."""
    if not counts:
        return "(no rows)"
    return md_table(pl.DataFrame([{"response_type": t, **c} for t, c in sorted(counts.items())]).select(
        "response_type", "rows", "prompts_cut", "prompt_tokens_dropped", "responses_cut", "response_tokens_dropped"),
        60)


def _cache_meta(info) -> dict:
    """Metadata every probe stage reports (a probes.stage.ProbeStageResult): types built and reused, and whether
    its file changed."""
    return {"types_built": dg.MetadataValue.json(info.cache.built),
            "types_reused": dg.MetadataValue.json(info.cache.reused),
            "file_rewritten": info.written}


def probe_assets(spec: ExperimentSpec) -> list:
    exp = spec.name
    k = lambda *parts: dg.AssetKey([exp, *parts])  # noqa: E731

    @dg.asset(key=k("dataset"), group_name=exp, kinds={"parquet"},
              description=f"Preference pairs ({spec.dataset.kind}) for experiment {exp}.")
    def dataset(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_dataset(spec, files, log=context.log.info)
        prefs = pipeline.load_preferences_file(files)
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(info.path)),
            "dagster/row_count": info.rows,
            "splits": dg.MetadataValue.json(info.splits),
            "preview": dg.MetadataValue.md(md_table(prefs.select("example_id", "split", "prompt", "chosen",
                                                                  "rejected"), 10)),
        })

    probe_checks = [dg.AssetCheckSpec("every_type_for_every_prompt", asset=k("probe_set")),
                    dg.AssetCheckSpec("perturbations_valid", asset=k("probe_set"))]

    @dg.asset(key=k("probe_set"), group_name=exp, deps=[k("dataset")], kinds={"parquet"},
              check_specs=probe_checks,
              description="Long table: one row per (probe prompt, response type) with provenance; every type "
                          "that needs no model (dataset, templates/LLM rephrases, draws, custom types).")
    def probe_set(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_probes(spec, files, log=context.log.info)
        probes = pl.read_parquet(info.path)   # this stage's rows only (the model stage may be stale)
        checks = info.checks
        gaps = checks.get("missing", [])
        quality = {
            "shuffle_failures": checks.get("shuffle_failures", 0),
            "irr_train_equals_chosen": checks.get("irr_train_equals_chosen", 0),
            "rephrases_identical_to_source": checks.get("rephrases_identical_to_source", 0),
            "duplicates": checks.get("duplicates", 0),
            "prompt_mismatch": checks.get("prompt_mismatch", 0),
        }
        stripped = {t: r.get("preambles_stripped", 0) for t, r in info.llm.items()}
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(info.path)),
                "dagster/row_count": info.rows,
                "prompts": info.prompts,
                "types": dg.MetadataValue.json(info.types),
                "skipped_types": dg.MetadataValue.json(info.skipped),
                "llm": dg.MetadataValue.json(info.llm),
                "preambles_stripped": dg.MetadataValue.json(stripped),
                "length_stats": dg.MetadataValue.json(checks.get("length_words", {})),
                "length_per_type": dg.MetadataValue.md(_lengths(checks)),
                "preview_per_type": dg.MetadataValue.md(_preview(probes)),
                **_cache_meta(info),
            },
            check_results=[
                dg.AssetCheckResult(check_name="every_type_for_every_prompt", passed=len(gaps) == 0,
                                    metadata={"gaps": len(gaps), "first_gaps": dg.MetadataValue.json(gaps[:20])}),
                dg.AssetCheckResult(check_name="perturbations_valid", passed=not any(quality.values()),
                                    metadata={**quality, "preambles_stripped": sum(stripped.values())}),
            ],
        )

    model_checks = [
        dg.AssetCheckSpec("model_types_for_every_prompt", asset=k("model_probes"),
                          description="Every probe prompt has every type of the whole probe set, model-made ones "
                                      "included (gaps listed)."),
        dg.AssetCheckSpec("model_types_informative", asset=k("model_probes"),
                          description="Fails when a model-made type (y_init, y_selfr, ...) is empty for more than "
                                      "half of the probe prompts (ERROR: e.g. a base model that ends its reply "
                                      "at once), or when y_selfr copies y+ verbatim (WARN); a few empty outputs "
                                      "pass. The verdict is one line (the check's description)."),
    ]

    @dg.asset(key=k("model_probes"), group_name=exp, deps=[k("probe_set"), k("base_model")], pool="gpu",
              kinds={"parquet", "pytorch"}, check_specs=model_checks,
              description="Model-made probe rows: y_init (the base model's reply), y_selfr (its rephrase of y+), "
                          "uniformly random tokens of its vocabulary, and custom types made from them.")
    def model_probes(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                     compute: Compute) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_model_probes(spec, files, device=compute.device, log=context.log.info,
                                           warn=context.log.warning)
        rows = pl.read_parquet(info.path)
        checks = info.checks
        gaps = checks.get("missing", [])
        from ldpipe.probes.checks import model_types_verdict

        informative, verdict, verdict_meta = model_types_verdict(checks, info.types)
        own = {t: v for t, v in checks.get("length_words", {}).items() if t in info.types}
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(info.path)),
                "dagster/row_count": info.rows,
                "types": dg.MetadataValue.json(info.types),
                "skipped_types": dg.MetadataValue.json(info.skipped),
                "generation": dg.MetadataValue.json(info.generation),
                "model": info.model,
                "length_stats": dg.MetadataValue.json(own),
                "length_per_type": dg.MetadataValue.md(_lengths(checks)),   # the whole probe set
                "truncation": dg.MetadataValue.json(info.truncation),    # the whole probe set, per type
                "truncation_per_type": dg.MetadataValue.md(_truncation(info.truncation)),
                "truncation_warnings": dg.MetadataValue.json(info.truncation_warnings),
                "preview_per_type": dg.MetadataValue.md(_preview(rows)),
                **_cache_meta(info),
            },
            check_results=[
                dg.AssetCheckResult(check_name="model_types_for_every_prompt", passed=len(gaps) == 0,
                                    metadata={"gaps": len(gaps), "first_gaps": dg.MetadataValue.json(gaps[:20])}),
                dg.AssetCheckResult(check_name="model_types_informative", passed=informative, description=verdict,
                                    severity=(dg.AssetCheckSeverity.ERROR if verdict_meta["mostly_empty"]
                                              else dg.AssetCheckSeverity.WARN),
                                    metadata={**verdict_meta,
                                              "empty_by_type": dg.MetadataValue.json(verdict_meta["empty_by_type"]),
                                              "mostly_empty": dg.MetadataValue.json(verdict_meta["mostly_empty"])}),
            ],
        )

    return [dataset, probe_set, model_probes]
