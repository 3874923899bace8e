"""The built-in synthetic preference world: determinism, contracts, and the properties probes rely on."""
from __future__ import annotations

import random
import re
import time

import polars as pl
import pytest

from ldpipe.errors import DataValidationError
from ldpipe.schema import PREFERENCE_SCHEMA
from ldpipe.synthetic import (ATTRIBUTES, FACTS_SCHEMA, REPHRASE_SCHEMA, REPHRASE_TYPES, VALUES, SyntheticConfig,
                              SyntheticWorld, generate, human_sentence)


def _has_word(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return generate(SyntheticConfig())


@pytest.fixture(scope="module")
def joined(world: SyntheticWorld) -> pl.DataFrame:
    """One row per example: preference columns + the asked fact + the four rephrases as columns."""
    reph = world.rephrases.pivot(on="response_type", index="example_id", values="response")
    return world.preferences.join(world.example_facts(), on="example_id").join(reph, on="example_id")


def test_default_is_fast_and_deterministic(world: SyntheticWorld) -> None:
    t0 = time.perf_counter()
    again = generate(SyntheticConfig())
    assert time.perf_counter() - t0 < 2.0
    for name in ("preferences", "rephrases", "facts"):
        assert getattr(again, name).equals(getattr(world, name)), name
    assert again.corpus == world.corpus


def test_different_seed_differs(world: SyntheticWorld) -> None:
    other = generate(SyntheticConfig(seed=1))
    assert not other.preferences.equals(world.preferences)
    assert set(other.facts["entity"]) != set(world.facts["entity"])
    assert other.corpus != world.corpus


def test_schemas_and_sizes_follow_config() -> None:
    cfg = SyntheticConfig(seed=3, n_entities=10, n_train=30, n_test=8, corpus_docs=100)
    w = generate(cfg)
    assert w.preferences.schema == pl.Schema(PREFERENCE_SCHEMA)
    assert w.rephrases.schema == pl.Schema(REPHRASE_SCHEMA)
    assert w.facts.schema == pl.Schema(FACTS_SCHEMA)
    counts = dict(w.preferences.group_by("split").len().iter_rows())
    assert counts == {"train": 30, "test": 8}
    assert w.preferences["example_id"].n_unique() == 38
    assert set(w.preferences["source"]) == {"synthetic"}
    assert len(w.corpus) == 100
    assert w.facts["entity"].n_unique() == 10
    # every fact once, plus one extra row per further example asking the same fact
    assert w.facts.filter(pl.col("example_id").is_null()).height + 38 >= 10 * len(ATTRIBUTES)
    assert w.example_facts().height == 38
    # four rephrase rows per example
    assert w.rephrases.group_by("example_id").len()["len"].to_list() == [4] * 38
    assert set(w.rephrases["response_type"]) == set(REPHRASE_TYPES)


def test_more_examples_than_pairs_reuses_facts() -> None:
    # 4 entities, one held out: 3 * 7 = 21 train pairs for 30 train examples
    w = generate(SyntheticConfig(n_entities=4, n_train=30, n_test=5, corpus_docs=20))
    ef = w.example_facts()
    assert ef.height == 35
    train_pairs = ef.join(w.preferences.select("example_id", "split"), on="example_id") \
        .filter(pl.col("split") == "train").select("entity", "attribute").unique()
    assert train_pairs.height == 21  # every pair used before any repeats


def test_prompts_are_hh_style_and_multi_turn_follows_fraction(world: SyntheticWorld) -> None:
    prompts = world.preferences["prompt"].to_list()
    assert all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") for p in prompts)
    multi = sum(p.count("\n\nHuman:") > 1 for p in prompts)
    assert 0.1 * len(prompts) < multi < 0.3 * len(prompts)  # default fraction 0.2
    single = generate(SyntheticConfig(multi_turn_fraction=0.0, corpus_docs=10))
    assert all(p.count("\n\nHuman:") == 1 for p in single.preferences["prompt"])


def test_chosen_states_the_correct_fact_and_rejected_is_worse(joined: pl.DataFrame, world: SyntheticWorld) -> None:
    for r in joined.iter_rows(named=True):
        last_question = r["prompt"].rsplit("\n\nHuman:", 1)[1]
        assert _has_word(last_question, r["entity"]), r
        assert r["chosen"].startswith(" ") and r["rejected"].startswith(" ")
        assert _has_word(r["chosen"], r["entity"]) and _has_word(r["chosen"], r["value"]), r
        assert r["rejected"] != r["chosen"]
        assert not _has_word(r["rejected"], r["value"]), r  # refusals, wrong values, off-topic facts
    words = joined.select(pl.col("chosen", "rejected").str.split(" ").list.len().mean())
    assert words["rejected"][0] < words["chosen"][0]
    # prompts about different entities/attributes really need different answers
    assert joined.select("entity", "attribute").unique().height > 0.9 * world.config.n_train


def test_facts_table_is_consistent(world: SyntheticWorld) -> None:
    f = world.facts.select("entity", "attribute", "value").unique()
    assert f.height == world.config.n_entities * len(ATTRIBUTES)  # one value per (entity, attribute)
    for a, vals in VALUES.items():
        assert set(f.filter(pl.col("attribute") == a)["value"]) <= set(vals)
    friends = f.filter(pl.col("attribute") == "friend")
    assert set(friends["value"]) <= set(f["entity"])
    assert (friends["value"] != friends["entity"]).all()


def test_rephrases_differ_and_keep_or_change_meaning(joined: pl.DataFrame, world: SyntheticWorld) -> None:
    entities = world.facts["entity"].unique().to_list()
    for r in joined.iter_rows(named=True):
        assert r["chosen_gptsemantic"] != r["chosen"] and r["chosen_gptformat"] != r["chosen"]
        assert r["reject_gptsemantic"] != r["rejected"] and r["reject_gptformat"] != r["rejected"]
        # semantic keeps the fact; format keeps the words but swaps the value for another of the attribute
        assert _has_word(r["chosen_gptsemantic"], r["value"]), r
        assert not _has_word(r["chosen_gptformat"], r["value"]), r
        pool = VALUES.get(r["attribute"]) or [e for e in entities if e != r["entity"]]
        assert any(_has_word(r["chosen_gptformat"], v) for v in pool if v != r["value"]), r
        # format-keeping: same words once the values are masked
        mask = lambda s, v: re.sub(rf"\b{re.escape(v)}\b", "<V>", s)  # noqa: E731
        swapped = next(v for v in pool if v != r["value"] and _has_word(r["chosen_gptformat"], v))
        assert mask(r["chosen_gptformat"], swapped) == mask(r["chosen"], r["value"])
        # a rejected answer's format rephrase never turns into the correct answer
        assert not _has_word(r["reject_gptformat"], r["value"]), r


def test_splits_are_disjoint_and_hold_out_entities(joined: pl.DataFrame) -> None:
    train = joined.filter(pl.col("split") == "train")
    test = joined.filter(pl.col("split") == "test")
    assert set(train["example_id"]).isdisjoint(test["example_id"])
    assert set(train["entity"]).isdisjoint(test["entity"])
    assert test.height == 50 and train.height == 200


def test_corpus_states_the_world_in_other_words(world: SyntheticWorld) -> None:
    text = "\n".join(world.corpus)
    assert 300_000 <= len(text) <= 1_000_000
    for y in world.preferences["chosen"]:
        assert y.strip() not in text
        assert y.strip().split(". ")[0] + "." not in text  # not even the answer sentence alone
    # every fact (test entities included) appears in some document next to its entity
    facts = world.facts.select("entity", "attribute", "value").unique()
    for e, a, v in facts.iter_rows():
        assert any(_has_word(d, e) and _has_word(d, v) for d in world.corpus if e in d), (e, a, v)
    assert any("\n\nHuman: " in d and "\n\nAssistant: " in d for d in world.corpus)


def test_save_load_round_trip(world: SyntheticWorld, tmp_path) -> None:
    world.save(tmp_path / "w")
    back = SyntheticWorld.load(tmp_path / "w")
    assert back.config == world.config
    for name in ("preferences", "rephrases", "facts"):
        assert getattr(back, name).equals(getattr(world, name)), name
    assert back.corpus == world.corpus
    assert not [p for p in (tmp_path / "w").iterdir() if ".tmp-" in p.name]  # no temp files left behind


def test_load_detects_partial_or_missing_files(world: SyntheticWorld, tmp_path) -> None:
    d = tmp_path / "w"
    world.save(d)
    lines = (d / "corpus.jsonl").read_text().splitlines(keepends=True)
    (d / "corpus.jsonl").write_text("".join(lines[:-5]))
    with pytest.raises(DataValidationError, match="manifest"):
        SyntheticWorld.load(d)
    (d / "facts.parquet").unlink()
    with pytest.raises(DataValidationError, match="facts.parquet"):
        SyntheticWorld.load(d)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(DataValidationError, match="n_entities"):
        generate(SyntheticConfig(n_entities=3))
    with pytest.raises(DataValidationError, match="multi_turn_fraction"):
        generate(SyntheticConfig(multi_turn_fraction=1.5))
    with pytest.raises(DataValidationError, match="test_entity_fraction"):
        generate(SyntheticConfig(test_entity_fraction=0.0))


def test_human_sentence_length_determinism_and_vocabulary(world: SyntheticWorld) -> None:
    value_words = {w for vals in VALUES.values() for v in vals for w in v.split()} - {"the", "a"}
    names = set(world.facts["entity"])
    rng = random.Random(7)
    for n in list(range(1, 61)) + [120]:
        s = human_sentence(rng, n)
        assert len(s.split(" ")) == n, (n, s)
        assert s[0].isupper() and s.endswith((".", "!")), s
        words = {w.strip(".,").lower() for w in s.split(" ")}
        assert not words & value_words, s
        assert not {w.capitalize() for w in words} & names
    assert human_sentence(random.Random(1), 20) == human_sentence(random.Random(1), 20)
    assert human_sentence(random.Random(1), 20) != human_sentence(random.Random(2), 20)
    assert len(human_sentence(rng, 0).split(" ")) == 1
