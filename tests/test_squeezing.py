"""Squeezing statistics (repeater rate, peakiness, the y* vs y+ view) and an in-process materialization of the
generation-based assets (squeezing, borrowing, win_rate with a real local judge server, squeeze_toy)."""
from __future__ import annotations

import math
import shutil

import dagster as dg
import polars as pl
import pytest
import torch
from conftest import REPO
from fake_openai import FakeOpenAI

from ldpipe.analysis.squeeze_stats import squeeze_diagnostics, start_end
from ldpipe.analysis.squeezing import generation_prompts, has_repeat, peakiness, repeater_stats
from ldpipe.model.lm import TinyModelConfig, build_model, train_tokenizer
from ldpipe.schema import TRAJECTORY_SCHEMA
from ldpipe.store.catalog import query, refresh_catalog
from ldpipe.store.shards import Store


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


def _traj(run_id: str, rows) -> pl.DataFrame:
    """Trajectory rows (step, example, type, logp_sum, argmax_logp_sum, n_tokens, argmax_match)."""
    return pl.DataFrame([{"run_id": run_id, "config_hash": "h", "phase": "dpo", "step": st, "epoch": 0.0,
                          "example_id": e, "response_type": t, "logp_sum": float(lp), "n_tokens": n,
                          "logp_mean": lp / n, "argmax_logp_sum": float(am), "argmax_match": m}
                         for st, e, t, lp, am, n, m in rows], schema=TRAJECTORY_SCHEMA)


# Two prompts a, b; y+ of a has 4 tokens, of b 8; y- of a has 5 tokens. Step 0 -> step 4: y* gains, y+ falls.
KNOWN = [(0, "a", "chosen", -10, -6, 4, 2), (0, "b", "chosen", -20, -12, 8, 4), (0, "a", "rejected", -50, -1, 5, 0),
         (4, "a", "chosen", -14, -3, 4, 1), (4, "b", "chosen", -26, -9, 8, 2), (4, "a", "rejected", -60, -1, 5, 0)]


def test_squeeze_diagnostics_known_values():
    d = squeeze_diagnostics(_traj("x.dpo", KNOWN))
    assert d["step"].to_list() == [0, 4] and d["n_examples"].to_list() == [2, 2]
    s0, s4 = d.row(0, named=True), d.row(1, named=True)
    # gap per token: a (−6 − −10)/4 = 1, b (−12 − −20)/8 = 1 -> 1; at step 4: 11/4 and 17/8 -> (2.75 + 2.125)/2
    assert s0["gap_per_token"] == pytest.approx(1.0) and s4["gap_per_token"] == pytest.approx(2.4375)
    assert s0["argmax_share"] == pytest.approx(6 / 12) and s4["argmax_share"] == pytest.approx(3 / 12)
    assert s0["rejected_logp_per_token"] == pytest.approx(-10.0) and s4["rejected_logp_per_token"] == -12.0
    assert s4["argmax_gap"] == pytest.approx(14.0)
    assert start_end(d) == {"gap_per_token_start": 1.0, "gap_per_token_end": 2.4375, "argmax_share_start": 0.5,
                            "argmax_share_end": 0.25, "rejected_logp_per_token_start": -10.0,
                            "rejected_logp_per_token_end": -12.0}
    # shards written before argmax_match existed: the share is unknown, not 0
    old = squeeze_diagnostics(_traj("x.dpo", KNOWN).with_columns(pl.lit(None, pl.Int64).alias("argmax_match")))
    assert old["argmax_share"].null_count() == 2 and old["gap_per_token"].to_list() == d["gap_per_token"].to_list()


def test_squeezing_view_known_values_match_the_library(tmp_path):
    store = Store(tmp_path / "store")
    traj = _traj("x.dpo", KNOWN)
    for step in (0, 4):
        store.write_shard("trajectories", traj.filter(pl.col("step") == step), partition={"run_id": "x.dpo"},
                          name=f"step-{step}")
    refresh_catalog(tmp_path / "c.duckdb", tmp_path / "store", REPO / "sql")
    v = query(tmp_path / "c.duckdb", "select * from squeezing order by step")
    assert v["n_examples"].to_list() == [2, 2]
    last = v.row(1, named=True)
    assert last["mean_logp_chosen"] == -20 and last["mean_logp_argmax"] == -6
    assert last["delta_chosen"] == -5 and last["delta_argmax"] == 3 and last["argmax_gap"] == 14
    assert last["delta_gap"] == pytest.approx(8.0)
    lib = squeeze_diagnostics(traj)
    for col in ("gap_per_token", "argmax_share", "rejected_logp_per_token", "argmax_gap", "mean_logp_argmax"):
        assert v[col].to_list() == pytest.approx(lib[col].to_list()), col


def _dpo_check(rows):
    from ldpipe.analysis.directions import evaluate_run
    from ldpipe.spec import RunSpec

    run = RunSpec(name="dpo", algo="dpo")
    return {c.name: c for c in evaluate_run(run, _traj("x.dpo", rows))}["dpo_squeezing_argmax_rises"]


def test_squeezing_check_asks_for_argmax_gain_and_a_wider_gap():
    c = _dpo_check(KNOWN)   # y* +3, y+ −5: gap widens by 8
    assert c.passed and c.metadata["delta_argmax"] == 3 and c.metadata["delta_gap"] == 8
    assert c.metadata["chosen_fell"] is True and c.metadata["gap_per_token_end"] == 2.4375
    # y+ rising does not fail it, as long as y* gains more (y+ +6 at step 4: delta +1, gap +2)
    up = [(st, e, t, lp + (6 if st == 4 and t == "chosen" else 0), am, n, m) for st, e, t, lp, am, n, m in KNOWN]
    c = _dpo_check(up)
    assert c.passed and c.metadata["chosen_fell"] is False and c.metadata["delta_gap"] == 2
    # y* gains but y+ gains more: the gap narrows, no squeeze
    narrow = [(st, e, t, lp + (12 if st == 4 and t == "chosen" else 0), am, n, m) for st, e, t, lp, am, n, m in KNOWN]
    c = _dpo_check(narrow)
    assert not c.passed and c.metadata["delta_argmax"] == 3 and c.metadata["delta_gap"] == -4
    # the gap widens because y+ falls, but y* falls too: no squeeze
    fall = [(st, e, t, lp - (10 if st == 4 and t == "chosen" else 0), am - (5 if st == 4 else 0), n, m)
            for st, e, t, lp, am, n, m in KNOWN]
    c = _dpo_check(fall)
    assert not c.passed and c.metadata["delta_argmax"] == -2 and c.metadata["delta_gap"] == 13


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


def test_squeezing_by_rejected_view_known_values(tmp_path):
    """Four probe prompts: two with a y- like y+ (kind wrong_value, overlap 0.4), two unlike (unrelated, 0.05);
    y* gains only on the unlike ones; repeats from the generations at the start and final checkpoints."""
    from ldpipe.schema import GENERATION_BORROWING_SCHEMA, PROBE_PAIRS_SCHEMA

    store = Store(tmp_path / "store")
    rows = []
    for e, (d_lp, d_am) in {"a": (-4, -2), "b": (-2, 0), "c": (-6, 4), "d": (-2, 6)}.items():
        rows += [(0, e, "chosen", -20, -10, 10, 5), (8, e, "chosen", -20 + d_lp, -10 + d_am, 10, 5)]
    store.write_shard("trajectories", _traj("x.dpo", rows), partition={"run_id": "x.dpo"}, name="all")
    store.write_shard("probe_pairs", pl.DataFrame(
        {"experiment": ["x"] * 4, "example_id": list("abcd"),
         "rejected_kind": ["wrong_value", "wrong_value", "unrelated", "unrelated"],
         "word_overlap": [0.4, 0.4, 0.05, 0.05]}, schema=PROBE_PAIRS_SCHEMA), partition={"experiment": "x"},
        name="probe_pairs")
    gen = [{"run_id": "x.dpo", "checkpoint": ck, "step": st, "example_id": e, "split": "train", "generation": "g",
            "ngram": 3, "n_ngrams": 1, "n_own": 0, "n_borrowed": 0, "repeats": rep}
           for ck, st, reps in (("start", 0, [False, False, False, False]), ("final", 8, [False, False, True, True]))
           for e, rep in zip("abcd", reps)]
    store.write_shard("generation_borrowing", pl.DataFrame(gen, schema_overrides=GENERATION_BORROWING_SCHEMA)
                      .select(pl.col(c).cast(t) if c in gen[0] else pl.lit(None, t).alias(c)
                              for c, t in GENERATION_BORROWING_SCHEMA.items()),
                      partition={"run_id": "x.dpo"}, name="generation_borrowing")
    refresh_catalog(tmp_path / "c.duckdb", tmp_path / "store", REPO / "sql")
    v = query(tmp_path / "c.duckdb", "select * from squeezing_by_rejected order by bucket_by, bucket")
    by = {(r["bucket_by"], r["bucket"]): r for r in v.iter_rows(named=True)}
    assert set(by) == {("rejected_kind", "unrelated"), ("rejected_kind", "wrong_value"),
                       ("word_overlap", "0.0-0.1"), ("word_overlap", "0.3-1.0")}
    near, far = by[("rejected_kind", "wrong_value")], by[("rejected_kind", "unrelated")]
    assert near["n_examples"] == 2 and near["delta_argmax"] == -1 and near["delta_chosen"] == -3
    assert near["delta_gap"] == 2 and far["delta_argmax"] == 5 and far["delta_gap"] == 9
    assert far["gap_per_token_start"] == 1 and far["gap_per_token_end"] == pytest.approx(1.9)
    assert far["repeater_rate_start"] == 0 and far["repeater_rate_end"] == 1 and near["repeater_rate_end"] == 0
    assert by[("word_overlap", "0.0-0.1")]["delta_gap"] == far["delta_gap"]
    assert near["mean_word_overlap"] == pytest.approx(0.4)


def test_study_comparisons_pair_runs_and_compare_squeeze():
    from ldpipe.analysis.directions import collateral_pairs, compare_squeeze, sft_length_pairs
    from ldpipe.spec import load_experiment

    spec = load_experiment(REPO / "assets" / "squeezing_study.yaml")
    assert not spec.run_by_default
    assert [(a.name, b.name) for a, b in sft_length_pairs(spec)] == [("dpo_after_1ep", "dpo_after_4ep")]
    # the extend run is compared with the DPO after the plain SFT of the same number of optimizer steps
    assert [(a.name, b.name) for a, b in collateral_pairs(spec)] == [("dpo_after_4ep", "dpo_after_extend")]
    default = load_experiment(REPO / "assets" / "default.yaml")
    assert default.run_by_default and sft_length_pairs(default) == []
    more = compare_squeeze("longer_sft_squeezes_more", [("a", {"delta_gap": 1.0}, "b", {"delta_gap": 3.0})])
    assert more.passed and more.metadata["second_delta_gap"] == 3.0
    assert not compare_squeeze("extend_sft_squeezes_less", [("a", {"delta_gap": 1.0}, "b", {"delta_gap": 3.0})]).passed
    assert compare_squeeze("extend_sft_squeezes_less", [("a", {"delta_gap": 3.0}, "b", {"delta_gap": 1.0})]).passed
    assert not compare_squeeze("longer_sft_squeezes_more", []).passed    # nothing measured is not a pass
