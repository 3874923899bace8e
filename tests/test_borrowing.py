"""Hallucination borrowing: n-gram and fact-value shares with known answers, and the y_j≠u view."""
from __future__ import annotations

import polars as pl
import pytest
from conftest import REPO

from ldpipe.analysis.borrowing import AnswerIndex, FactIndex, score_generations, summarize
from ldpipe.data.synthetic import SyntheticConfig, generate
from ldpipe.schema import TRAJECTORY_SCHEMA
from ldpipe.store.catalog import query, refresh_catalog
from ldpipe.store.shards import Store

ANSWERS = {"u": "the red fox jumps over the lazy dog", "j": "a green frog sits on a wet log",
           "k": "my blue bird sings in the early morning"}


def test_copying_another_answer_is_full_borrowing_and_copying_own_is_none():
    idx = AnswerIndex(ANSWERS, n=3)
    other = idx.score("u", "tell me a story", ANSWERS["u"], ANSWERS["j"])
    assert other["borrow_share"] == 1.0 and other["own_share"] == 0.0 and other["n_ngrams"] == 6
    own = idx.score("u", "tell me a story", ANSWERS["u"], ANSWERS["u"])
    assert own["borrow_share"] == 0.0 and own["own_share"] == 1.0
    # starts like j, then new words: 2 of its 6 trigrams are j's
    mixed = idx.score("u", "tell me a story", ANSWERS["u"], "a green frog sits quietly near some water")
    assert mixed["n_ngrams"] == 6 and mixed["n_borrowed"] == 2
    assert mixed["borrow_share"] == pytest.approx(2 / 6)
    # an n-gram in the prompt is the prompt's own, even if another answer has it
    in_prompt = idx.score("u", "a green frog sits", ANSWERS["u"], "a green frog sits")
    assert in_prompt["n_borrowed"] == 0 and in_prompt["own_share"] == 1.0
    # a held-out prompt (not in the index): every train answer is "other"
    held = idx.score("t", "q", "an unrelated own answer here", ANSWERS["u"])
    assert held["borrow_share"] == 1.0
    empty = idx.score("u", "q", ANSWERS["u"], "too short")
    assert empty["n_ngrams"] == 0 and empty["borrow_share"] is None


def test_fact_values_hand_made():
    facts = pl.DataFrame({"entity": ["Kalo", "Kalo", "Miren", "Miren"], "attribute": ["food", "friend"] * 2,
                          "value": ["apples", "Miren", "the stone harbor", "Kalo"]})
    asked = pl.DataFrame({"example_id": ["e1"], "entity": ["Kalo"], "attribute": ["food"], "value": ["apples"]})
    idx = FactIndex(facts, asked)
    # Kalo's own name is not a fact value mention; "Miren" is Kalo's friend (own)
    own = idx.score("e1", "Kalo likes apples and sees Miren.")
    assert own == {"n_fact_values": 2, "n_foreign_values": 0, "fact_borrow_share": 0.0, "correct_value": True}
    foreign = idx.score("e1", "Kalo lives in the stone harbor.")
    assert foreign == {"n_fact_values": 1, "n_foreign_values": 1, "fact_borrow_share": 1.0, "correct_value": False}
    assert idx.score("e1", "Nothing known here.")["fact_borrow_share"] is None
    assert idx.score("zz", "apples")["n_fact_values"] is None       # not an asking example
    # whole words only, longest first: "the stone harbor" is one mention, "harbor" alone none
    assert idx.mentioned("a harbor") == set()


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(seed=3, n_entities=16, n_train=32, n_test=8, corpus_docs=0))


def test_synthetic_world_known_answers(world):
    prefs = world.preferences
    ef = world.example_facts()
    idx = FactIndex(world.facts, ef)
    values_of = {}
    for e, v in world.facts.select("entity", "value").iter_rows():
        values_of.setdefault(e, set()).add(v)
    asked = {eid: (e, v) for eid, e, v in ef.select("example_id", "entity", "value").iter_rows()}
    train = prefs.filter(pl.col("split") == "train").sort("example_id")
    u = train.row(0, named=True)
    eu, vu = asked[u["example_id"]]
    # another example about another entity whose value and name are none of u's entity's values
    j = next(r for r in train.iter_rows(named=True)
             if asked[r["example_id"]][0] != eu and asked[r["example_id"]][1] not in values_of[eu]
             and asked[r["example_id"]][0] not in values_of[eu])
    borrowed = idx.score(u["example_id"], j["chosen"])
    assert borrowed["fact_borrow_share"] == 1.0 and borrowed["correct_value"] is False
    own = idx.score(u["example_id"], u["chosen"])
    assert own["fact_borrow_share"] == 0.0 and own["correct_value"] is True

    answers = AnswerIndex(dict(train.select("example_id", "chosen").iter_rows()), 3)
    prompts = pl.DataFrame([{k: u[k] for k in ("example_id", "split", "prompt", "chosen")},
                            {k: u[k] for k in ("example_id", "split", "prompt", "chosen")}])
    rows = score_generations(prompts, [u["chosen"], j["chosen"]], answers, idx)
    assert rows[0]["borrow_share"] == 0.0 and rows[0]["fact_borrow_share"] == 0.0
    assert rows[1]["borrow_share"] > 0 and rows[1]["fact_borrow_share"] == 1.0
    s = summarize(pl.DataFrame([{"run_id": "r", "checkpoint": "final", "step": 3, **r} for r in rows]))
    assert s.height == 1 and s["n"][0] == 2 and s["correct_rate"][0] == 0.5


def _traj(run_id: str, step: int, rows: list[tuple[str, str, float]]) -> pl.DataFrame:
    return pl.DataFrame([{"run_id": run_id, "config_hash": "h", "phase": "sft", "step": step, "epoch": step / 10,
                          "example_id": e, "response_type": t, "logp_sum": lp, "n_tokens": 5, "logp_mean": lp / 5,
                          "argmax_logp_sum": lp / 2} for e, t, lp in rows], schema=TRAJECTORY_SCHEMA)


def test_borrowing_view_known_values(tmp_path):
    store = Store(tmp_path / "store")
    store.write_shard("trajectories", _traj("x.sft", 0, [("a", "chosen", -10), ("a", "irr_train", -20),
                                                          ("b", "irr_train", -30), ("a", "irr_test", -25)]),
                      partition={"run_id": "x.sft"}, name="step-0")
    store.write_shard("trajectories", _traj("x.sft", 5, [("a", "chosen", -4), ("a", "irr_train", -17),
                                                          ("b", "irr_train", -25), ("a", "irr_test", -24)]),
                      partition={"run_id": "x.sft"}, name="step-5")
    refresh_catalog(tmp_path / "c.duckdb", tmp_path / "store", REPO / "sql")
    v = query(tmp_path / "c.duckdb", "select * from borrowing order by step")
    assert v["step"].to_list() == [0, 5] and v["n_examples"].to_list() == [2, 2]
    last = v.row(1, named=True)
    assert last["delta_chosen"] == 6 and last["delta_irr_train"] == 4 and last["delta_irr_test"] == 1
    assert last["borrow_minus_test"] == 3 and last["delta_irr_hum"] is None
