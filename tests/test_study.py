"""The declared squeezing study (assets/squeezing_study.yaml) at smoke size: its runs, chains, run-comparing checks
and the per-kind view, materialized in-process on a tiny model (the study's own model takes minutes)."""
from __future__ import annotations

import dagster as dg
import polars as pl
import pytest
import yaml
from conftest import REPO, TINY_YAML


@pytest.mark.slow
def test_squeezing_study_at_smoke_size(tiny_project):
    from ldpipe.defs.experiments import build_defs
    from ldpipe.defs.resources import Compute, LdpipeHome
    from ldpipe.defs.training import preset_run_config
    from ldpipe.paths import Paths
    from ldpipe.spec import load_experiment
    from ldpipe.store.catalog import query

    study = yaml.safe_load((REPO / "assets" / "squeezing_study.yaml").read_text())
    tiny = yaml.safe_load(TINY_YAML)
    # the study's runs and analyses, on the tiny world and model
    study.update(dataset=tiny["dataset"], model=tiny["model"],
                 probes={**tiny["probes"], "n_examples": 8},
                 generation_analysis={"n_prompts": 4, "max_new_tokens": 8})
    (tiny_project / "assets" / "tiny.yaml").unlink()
    path = tiny_project / "assets" / "squeezing_study.yaml"
    path.write_text(yaml.safe_dump(study))
    spec = load_experiment(path)
    assert not spec.run_by_default and len(spec.runs) == 6

    defs = build_defs([spec])
    result = dg.materialize(list(defs.assets), resources={"ldpipe_home": LdpipeHome(),
                                                          "compute": Compute(device="cpu")},
                            run_config=preset_run_config(spec, "smoke"), instance=dg.DagsterInstance.ephemeral())
    assert result.success
    checks = {(c.asset_key.to_user_string(), c.check_name): c for c in result.get_asset_check_evaluations()}
    # the run-comparing checks, each with the pair it compared and the measured squeeze of both runs
    longer = checks[("squeezing_study/paper_directions", "longer_sft_squeezes_more")]
    pair = longer.metadata["pairs"].value[0]
    assert (pair["first_run"], pair["second_run"]) == ("dpo_after_1ep", "dpo_after_4ep")
    assert longer.passed == (pair["second_delta_gap"] > pair["first_delta_gap"])
    extend = checks[("squeezing_study/paper_directions", "extend_sft_squeezes_less")]
    pair = extend.metadata["pairs"].value[0]
    assert (pair["first_run"], pair["second_run"]) == ("dpo_after_4ep", "dpo_after_extend")
    assert extend.passed == (pair["second_delta_gap"] < pair["first_delta_gap"])
    # every DPO run's squeezing check reports its diagnostics
    for run in ("dpo_after_1ep", "dpo_after_4ep", "dpo_after_extend"):
        c = checks[(f"squeezing_study/run_{run}", "dpo_squeezing_argmax_rises")]
        md = {k: v.value for k, v in c.metadata.items()}
        assert {"delta_argmax", "delta_gap", "chosen_fell", "gap_per_token_start", "argmax_share_end",
                "rejected_logp_per_token_start"} <= set(md)
        assert c.passed == (md["delta_argmax"] > 0 and md["delta_gap"] > 0)

    cat = Paths.default().catalog
    view = query(cat, "select * from squeezing_by_rejected where bucket_by = 'rejected_kind'")
    assert set(view["run_id"]) == {f"squeezing_study.{r.name}" for r in spec.runs}
    kinds = query(cat, "select rejected_kind, count(*) as n from probe_pairs group by all")
    assert kinds["n"].sum() == 8 and kinds["rejected_kind"].null_count() == 0
    assert view.group_by("run_id").agg(pl.col("n_examples").sum())["n_examples"].to_list() == [8] * 6
    # repeats come from the greedy generations of the (first 4) probe prompts at the start and final checkpoints
    assert view["repeater_rate_end"].drop_nulls().is_between(0, 1).all()
    assert view["repeater_rate_end"].null_count() < view.height
