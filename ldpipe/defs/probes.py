"""Probe-set assets of one experiment: <exp>/dataset -> <exp>/probe_set."""

import dagster as dg

from ldpipe import pipeline
from ldpipe.defs.common import md_table
from ldpipe.defs.resources import LdpipeHome
from ldpipe.spec import ExperimentSpec


def probe_keys(spec: ExperimentSpec) -> list[dg.AssetKey]:
    """The probe assets a training run reads (its probe set)."""
    return [dg.AssetKey([spec.name, "probe_set"])]


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
            "path": dg.MetadataValue.path(info["path"]),
            "dagster/row_count": info["rows"],
            "splits": dg.MetadataValue.json(info["splits"]),
            "preview": dg.MetadataValue.md(md_table(prefs.select("example_id", "split", "prompt", "chosen",
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
                "preview_per_type": dg.MetadataValue.md(md_table(preview, 40)),
            },
            check_results=[
                dg.AssetCheckResult(check_name="every_type_for_every_prompt", passed=len(gaps) == 0,
                                    metadata={"gaps": len(gaps), "first_gaps": dg.MetadataValue.json(gaps[:20])}),
                dg.AssetCheckResult(check_name="perturbations_valid", passed=not any(quality.values()),
                                    metadata=quality),
            ],
        )

    return [dataset, probe_set]
