"""The Dagster code location: definitions load, and the whole graph materializes in-process."""
import dagster as dg
import duckdb
import polars as pl
import pytest

from ldpipe.defs.experiments import build_defs
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.paths import Paths
from ldpipe.spec import load_experiments
from ldpipe.store.catalog import query


def test_repo_definitions_load():
    from ldpipe.definitions import defs

    d = defs()
    keys = {k.to_user_string() for k in d.resolve_asset_graph().get_all_asset_keys()}
    for part in ("dataset", "probe_set", "base_model", "run_sft", "learning_curves"):
        assert f"default/{part}" in keys
    assert "catalog" in keys
    graph = d.resolve_asset_graph()
    run_node = graph.get(dg.AssetKey(["default", "run_sft"]))
    assert run_node.pools == {"gpu"}  # training is gated by the gpu pool
    assert dg.AssetKey(["default", "base_model"]) in run_node.parent_keys
    assert d.resolve_job_def("all_experiments") is not None
    checks = {c.name for c in graph.asset_check_keys}
    assert {"every_type_for_every_prompt", "perturbations_valid", "sft_raises_supervised_target",
            "dpo_widens_chosen_rejected_gap"} <= checks
    # a chained run depends on its parent run, not on the base model
    dpo_node = graph.get(dg.AssetKey(["default", "run_dpo"]))
    assert dg.AssetKey(["default", "run_sft"]) in dpo_node.parent_keys
    assert dg.AssetKey(["default", "base_model"]) not in dpo_node.parent_keys


@pytest.mark.slow
def test_materialize_tiny_experiment_end_to_end(tiny_project):
    # plus a short DPO run chained after the SFT run
    decl = tiny_project / "assets" / "tiny.yaml"
    decl.write_text(decl.read_text() + "  - {name: dpo, algo: dpo, start_from: sft, epochs: 0.5, batch_size: 8, "
                                       "lr: 1.0e-3, eval_every: 2}\n")
    specs = load_experiments(tiny_project / "assets")
    defs = build_defs(specs)
    resources = {"ldpipe_home": LdpipeHome(), "compute": Compute(device="cpu")}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(list(defs.assets), resources=resources, instance=instance)
    assert result.success

    mats = {m.asset_key.to_user_string(): m.materialization for m in result.get_asset_materialization_events()}
    assert {"tiny/dataset", "tiny/probe_set", "tiny/base_model", "tiny/run_sft", "tiny/run_dpo", "catalog",
            "tiny/learning_curves"} <= set(mats)
    sft_steps = mats["tiny/run_sft"].metadata["steps"].value
    assert mats["tiny/run_dpo"].metadata["step_offset"].value == sft_steps
    assert mats["tiny/run_dpo"].metadata["start_from"].value == "sft"
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["every_type_for_every_prompt"].passed
    assert checks["perturbations_valid"].passed
    # reported, not asserted: a 1-epoch run of a 2-layer model may or may not raise y+;
    # the check must carry the measured number either way.
    assert "measured_delta" in checks["sft_raises_supervised_target"].metadata
    assert "measured_delta" in checks["dpo_widens_chosen_rejected_gap"].metadata

    paths = Paths.default()
    traj = pl.read_parquet(paths.store / "trajectories" / "**" / "*.parquet")
    from ldpipe import pipeline  # the whole probe set: probes.parquet + the model-made rows

    probes = pipeline.load_probes_file(pipeline.files_for(specs[0], paths))
    assert sorted(traj["run_id"].unique().to_list()) == ["tiny.dpo", "tiny.sft"]
    assert dict(traj.group_by("run_id").agg(pl.col("phase").unique().first()).iter_rows()) == {
        "tiny.sft": "sft", "tiny.dpo": "dpo"}
    for run_id in ("tiny.sft", "tiny.dpo"):
        part = traj.filter(pl.col("run_id") == run_id)
        steps = sorted(part["step"].unique().to_list())
        assert steps[0] == 0 and len(steps) >= 2
        # every (step, example, type) exactly once, for every probe row
        assert part.group_by("step", "example_id", "response_type").len()["len"].max() == 1
        assert part.height == len(steps) * probes.height
    assert traj["logp_sum"].is_finite().all() and (traj["logp_sum"] < 0).all()

    curves = query(paths.catalog, "select * from learning_curves where run_id = 'tiny.sft'")
    assert set(curves["response_type"].unique().to_list()) == set(probes["response_type"].unique().to_list())
    assert (curves.filter(pl.col("step") == 0)["mean_delta"].abs() < 1e-9).all()
    png = paths.plots / "tiny.sft.learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = mats["tiny/learning_curves"].metadata["plot_sft"].value
    assert md.startswith("![") and "data:image/png;base64," in md

    # the catalog opens read-only from another client while nothing holds a write lock
    con = duckdb.connect(str(paths.catalog), read_only=True)
    n = con.execute("select count(*) from trajectories").fetchone()[0]
    con.close()
    assert n == traj.height

    # the base model is trained once: a rerun of the graph reuses it and rewrites the same shards
    before = sorted(p.name for p in (paths.store / "trajectories").rglob("*.parquet"))
    result2 = dg.materialize(list(defs.assets), resources=resources, instance=instance)
    assert result2.success
    mats2 = {m.asset_key.to_user_string(): m.materialization for m in result2.get_asset_materialization_events()}
    assert mats2["tiny/base_model"].metadata["cached"].value is True
    after = sorted(p.name for p in (paths.store / "trajectories").rglob("*.parquet"))
    assert before == after
    traj2 = pl.read_parquet(paths.store / "trajectories" / "**" / "*.parquet")
    assert traj2.height == traj.height
    # CPU training is deterministic for a seed: the rerun reproduces every trajectory value
    cols = ["run_id", "step", "example_id", "response_type"]
    diff = traj.sort(cols)["logp_sum"] - traj2.sort(cols)["logp_sum"]
    assert diff.abs().max() < 1e-6
