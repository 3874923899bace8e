"""Squeezing statistics (repeater rate, peakiness, the y* vs y+ view) and an in-process materialization of the
generation-based assets (squeezing, borrowing, win_rate with a real local judge server, squeeze_toy)."""
from __future__ import annotations

import math
import shutil

import dagster as dg
import polars as pl
import pytest
import torch

from ldpipe.analysis.squeezing import generation_prompts, has_repeat, peakiness, repeater_stats
from ldpipe.catalog import query, refresh_catalog
from ldpipe.models import TinyModelConfig, build_model, train_tokenizer
from ldpipe.schema import TRAJECTORY_SCHEMA
from ldpipe.store import Store

from conftest import REPO
from fake_openai import FakeOpenAI


def test_repeat_definition():
    assert has_repeat("the cat sat. The cat sat again", 3)          # "the cat sat" twice (case, punctuation off)
    assert not has_repeat("the cat sat on the mat", 3)              # "the" twice is a 1-gram repeat only
    assert has_repeat("the cat sat on the mat", 1)
    assert not has_repeat("too short", 3)
    s = repeater_stats(["a b c a b c", "a b c d", "x"], 3)
    assert s["n_generations"] == 3 and s["repeater_rate"] == pytest.approx(1 / 3)
    # distinct/total trigrams: 3/4 for the first, 2/2 for the second; "x" has none and is left out
    assert s["mean_distinct_ngrams"] == pytest.approx((3 / 4 + 1) / 2)
    assert s["mean_gen_words"] == pytest.approx((6 + 4 + 1) / 3)
    assert repeater_stats([], 3)["repeater_rate"] is None


def test_peakiness_of_a_uniform_model_is_known():
    torch.manual_seed(0)
    tok = train_tokenizer([f"word{i} and more text {i % 5}" for i in range(50)], vocab_size=300)
    model = build_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        vocab_size=len(tok))
    pairs = [([1, 2, 3], [4, 5, 6, 7]), ([8], [9, 10])]
    trained = peakiness(model, pairs)
    assert trained["n_positions"] == 6 and 0 < trained["mean_max_prob"] <= 1
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()   # all logits 0: pi is uniform over the vocabulary
    v = model.get_output_embeddings().weight.shape[0]
    u = peakiness(model, pairs)
    assert u["mean_max_prob"] == pytest.approx(1 / v)
    assert u["mean_entropy"] == pytest.approx(math.log(v), rel=1e-5)
    assert u["mean_logp_token"] == pytest.approx(-math.log(v), rel=1e-5)


def test_generation_prompts_pick_trained_and_held_out():
    prefs = pl.DataFrame({"example_id": ["t1", "t2", "t3", "h1", "h2"], "split": ["train"] * 3 + ["test"] * 2,
                          "prompt": ["p1", "p2", "p3", "q1", "q2"], "chosen": ["c1", "c2", "c3", "d1", "d2"],
                          "rejected": [""] * 5, "source": ["s"] * 5})
    probes = pl.DataFrame({"example_id": ["t3", "t2"], "response_type": ["chosen"] * 2, "prompt": ["p3", "p2"],
                           "response": ["c3", "c2"], "provenance": ["d"] * 2})
    got = generation_prompts(prefs, probes, 5)
    assert got["example_id"].to_list() == ["t2", "t3", "h1", "h2"]
    assert got["split"].to_list() == ["train", "train", "test", "test"]
    assert generation_prompts(prefs, probes, 1)["example_id"].to_list() == ["t2", "h1"]


def test_squeezing_view_known_values(tmp_path):
    store = Store(tmp_path / "store")
    for step, (lp_a, am_a, lp_b, am_b) in ((0, (-10, -6, -20, -12)), (4, (-14, -3, -26, -9))):
        rows = [("a", "chosen", lp_a, am_a), ("b", "chosen", lp_b, am_b), ("a", "rejected", -50.0, -1.0)]
        df = pl.DataFrame([{"run_id": "x.dpo", "config_hash": "h", "phase": "dpo", "step": step, "epoch": 0.0,
                            "example_id": e, "response_type": t, "logp_sum": float(lp), "n_tokens": 4,
                            "logp_mean": lp / 4, "argmax_logp_sum": float(am)} for e, t, lp, am in rows],
                          schema=TRAJECTORY_SCHEMA)
        store.write_shard("trajectories", df, partition={"run_id": "x.dpo"}, name=f"step-{step}")
    refresh_catalog(tmp_path / "c.duckdb", tmp_path / "store", REPO / "sql")
    v = query(tmp_path / "c.duckdb", "select * from squeezing order by step")
    assert v["n_examples"].to_list() == [2, 2]
    last = v.row(1, named=True)
    assert last["mean_logp_chosen"] == -20 and last["mean_logp_argmax"] == -6
    assert last["delta_chosen"] == -5 and last["delta_argmax"] == 3 and last["argmax_gap"] == 14


@pytest.mark.slow
def test_materialize_generation_assets(tiny_project):
    from ldpipe.defs.experiments import build_defs
    from ldpipe.defs.resources import Compute, LdpipeHome
    from ldpipe.paths import Paths
    from ldpipe.spec import load_experiments

    srv = FakeOpenAI().start()
    srv.decorate = lambda user, reply: "Comparison: the first.\nMore helpful: A"   # pure position bias
    try:
        decl = tiny_project / "assets" / "tiny.yaml"
        decl.write_text(decl.read_text() + (
            "generation_analysis:\n  n_prompts: 3\n  max_new_tokens: 8\n"
            f"  win_rate: {{judge: {{model: judge, base_url: '{srv.base_url}', api_key_env: LDPIPE_TEST_NO_KEY}}, "
            "pairs: [[sft, sft@start]], n_prompts: 2}\n"))
        defs = build_defs(load_experiments(tiny_project / "assets"))
        assets = list(defs.assets)
        mine = [dg.AssetKey(["tiny", n]) for n in ("squeezing", "borrowing", "win_rate", "squeeze_toy")]
        resources = {"ldpipe_home": LdpipeHome(), "compute": Compute(device="cpu")}
        instance = dg.DagsterInstance.ephemeral()
        up = dg.materialize(assets, selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*mine),
                            resources=resources, instance=instance)
        assert up.success
        paths = Paths.default()
        run_dir = paths.models / "tiny" / "runs" / "sft"
        # a snapshot holding the final weights: its statistics must equal final's
        shutil.copytree(run_dir / "final", run_dir / "checkpoints" / "step-0000002")
        result = dg.materialize(assets, selection=dg.AssetSelection.assets(*mine), resources=resources,
                                instance=instance)
        assert result.success
    finally:
        srv.stop()
    mats = {m.asset_key.to_user_string(): m.materialization for m in result.get_asset_materialization_events()}
    assert set(mats) == {"tiny/squeezing", "tiny/borrowing", "tiny/win_rate", "tiny/squeeze_toy"}
    for key in ("tiny/squeezing", "tiny/borrowing"):
        assert "data:image/png;base64," in mats[key].metadata["plot"].value

    stats = query(paths.catalog, "select * from generation_stats order by step")
    assert stats["checkpoint"].to_list() == ["start", "step-0000002", "final"]
    assert stats["n_generations"].to_list() == [6, 6, 6] and (stats["n_prompts"] == 6).all()
    assert ((stats["mean_max_prob"] > 0) & (stats["mean_max_prob"] <= 1)).all()
    assert ((stats["repeater_rate"] >= 0) & (stats["repeater_rate"] <= 1)).all()
    snap, final, start = (stats.filter(pl.col("checkpoint") == c).row(0, named=True)
                          for c in ("step-0000002", "final", "start"))
    for col in ("mean_max_prob", "mean_entropy", "repeater_rate"):
        assert snap[col] == pytest.approx(final[col])
    assert start["mean_logp_token"] != pytest.approx(final["mean_logp_token"])   # training moved the model
    curve = query(paths.catalog, "select * from squeezing where run_id = 'tiny.sft'")
    assert curve.height >= 2 and (curve.filter(pl.col("step") == 0)["delta_chosen"].abs() < 1e-9).all()

    borrow = query(paths.catalog, "select * from generation_borrowing")
    assert borrow.height == 3 * 6 and sorted(set(borrow["split"])) == ["test", "train"]
    shares = borrow["borrow_share"].drop_nulls()
    assert ((shares >= 0) & (shares <= 1)).all()
    assert query(paths.catalog, "select count(*) as n from borrowing")["n"][0] >= 2

    wr = query(paths.catalog, "select * from win_rate").row(0, named=True)
    assert (wr["model_a"], wr["model_b"], wr["n_prompts"], wr["n_judgments"]) == ("sft", "sft@start", 2, 4)
    assert wr["win_rate_a"] == 0.5 and wr["first_slot_share"] == 1.0

    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    toy = checks["negative_gradient_on_valley_squeezes_into_argmax"]
    assert toy.passed and toy.metadata["only_argmax_rises"].value is True
