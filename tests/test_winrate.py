"""LLM-judge win rate against a real local OpenAI-compatible server (tests/fake_openai.py)."""
from __future__ import annotations

import re

import polars as pl
import pytest
from conftest import REPO
from fake_openai import FakeOpenAI  # tests/ is on sys.path (pytest's default "prepend" import mode)

from ldpipe.analysis.winrate import JUDGE_PROMPT, judge_pairs, parse_verdict, run_win_rate, summarize
from ldpipe.llm import LLMClient, LLMConfig
from ldpipe.schema import WIN_RATE_JUDGMENT_SCHEMA
from ldpipe.spec import parse_experiment
from ldpipe.store.catalog import query, refresh_catalog
from ldpipe.store.shards import Store

ITEMS = [(f"ex{i}", f"\n\nHuman: question {i}?\n\nAssistant:", f"answer a{i}", f"answer b{i}") for i in range(4)]


def client_for(srv: FakeOpenAI, tmp_path) -> LLMClient:
    cfg = LLMConfig(base_url=srv.base_url, model="judge", api_key_env="LDPIPE_TEST_JUDGE_KEY", temperature=0.0,
                    cache_path=tmp_path / "llm.sqlite", max_attempts=2, backoff_base_s=0.01, timeout_s=5)
    return LLMClient(cfg, environ={"LDPIPE_TEST_JUDGE_KEY": "sk-judge"})


def slots(user: str) -> tuple[str, str]:
    m = re.search(r"Response A: (.*)\n\nResponse B: (.*)\n\nFIRST", user, re.S)
    return m.group(1), m.group(2)


@pytest.mark.parametrize("text, want", [
    ("Comparison: A is better.\nMore helpful: A", "A"),
    ('Comparison: x\nMore helpful: "B"', "B"),
    ("Comparison: same\nMore helpful: tie", "tie"),
    ("Comparison: x\n**More helpful:** <B>", "B"),
    ("B", "B"),
    ("  tie. ", "tie"),
    ("I think both are fine.", None),
    ("More helpful: a", None),          # lower-case a is an article, not a verdict
    ("More helpful: C", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_position_biased_judge_gives_fifty_percent_after_swapping(server, tmp_path):
    server.decorate = lambda user, reply: "Comparison: the first one.\nMore helpful: A"
    with client_for(server, tmp_path) as client:
        df = judge_pairs(client, ITEMS)
    assert df.height == 2 * len(ITEMS) and set(df["order"]) == {"a_first", "b_first"}
    s = summarize(df)
    assert (s["wins_a"], s["wins_b"], s["ties"], s["unparsable"]) == (4, 4, 0, 0)
    assert s["win_rate_a"] == 0.5 and s["first_slot_share"] == 1.0
    # the judge saw each response in both slots
    seen = [slots(b["messages"][-1]["content"]) for b in server.chat_bodies]
    assert ("answer a0", "answer b0") in seen and ("answer b0", "answer a0") in seen


def test_content_judge_wins_in_both_orders_and_unparsable_ties_are_counted(server, tmp_path):
    def judge(user: str, reply: str) -> str:
        first, second = slots(user)
        if "question 3" in user:
            return "I cannot decide between these."          # unparsable
        if "question 2" in user:
            return "Comparison: equal.\nMore helpful: tie"
        return "Comparison: x\nMore helpful: " + ("A" if first.startswith("answer a") else "B")

    server.decorate = judge
    with client_for(server, tmp_path) as client:
        df = judge_pairs(client, ITEMS)
        calls = client.stats.as_dict()["requests"]
    s = summarize(df)
    assert (s["wins_a"], s["wins_b"], s["ties"], s["unparsable"]) == (4, 0, 2, 2)
    assert s["win_rate_a"] == pytest.approx((4 + 1) / 6)
    assert df.filter(pl.col("example_id") == "ex3")["winner"].to_list() == ["unparsable", "unparsable"]
    assert calls == 8
    # a rerun is answered from the cache: no new request
    with client_for(server, tmp_path) as client:
        again = judge_pairs(client, ITEMS)
        assert client.stats.as_dict()["requests"] == 0
    assert again["winner"].to_list() == df["winner"].to_list()

    # the view agrees with summarize()
    store = Store(tmp_path / "store")
    full = df.with_columns(pl.lit("e").alias("experiment"), pl.lit("x").alias("model_a"),
                           pl.lit("y").alias("model_b"), pl.lit("judge").alias("judge_model"))
    store.write_shard("win_rate_judgments", full, partition={"experiment": "e"}, name="x__vs__y",
                      schema=WIN_RATE_JUDGMENT_SCHEMA)
    refresh_catalog(tmp_path / "c.duckdb", tmp_path / "store", REPO / "sql")
    row = query(tmp_path / "c.duckdb", "select * from win_rate").row(0, named=True)
    assert (row["wins_a"], row["wins_b"], row["ties"], row["unparsable"]) == (4, 0, 2, 2)
    assert row["n_prompts"] == 4 and row["n_judgments"] == 8
    assert row["win_rate_a"] == pytest.approx(s["win_rate_a"])
    assert row["first_slot_share"] == pytest.approx(s["first_slot_share"])


def test_prompt_is_the_reference_prompt_with_a_tie_option():
    text = JUDGE_PROMPT.format(prompt="P", first="X", second="Y")
    assert text.startswith("Given the history of multi-round chat, which response is more helpful?")
    assert "Response A: X\n\nResponse B: Y" in text and '"tie"' in text


def test_skipped_without_a_judge_and_refs_validated(tmp_path):
    spec = parse_experiment({"name": "x", "runs": [{"name": "a"}]}, source="t")
    info = run_win_rate(spec, files=None, store=None)
    assert "no judge endpoint declared" in info["skipped"]
    spec = parse_experiment({"name": "x", "runs": [{"name": "a"}], "generation_analysis": {"win_rate": {
        "judge": {"model": "m", "base_url": "http://127.0.0.1:1/v1"}}}}, source="t")
    assert "no checkpoint pairs" in run_win_rate(spec, files=None, store=None)["skipped"]
    from ldpipe.errors import SpecError

    with pytest.raises(SpecError, match="names no run"):
        parse_experiment({"name": "x", "runs": [{"name": "a"}],
                          "generation_analysis": {"win_rate": {"pairs": [["a", "b@start"]]}}}, source="t")
    with pytest.raises(SpecError, match="checkpoint reference"):
        parse_experiment({"name": "x", "runs": [{"name": "a"}],
                          "generation_analysis": {"win_rate": {"pairs": [["a", "a@later"]]}}}, source="t")
