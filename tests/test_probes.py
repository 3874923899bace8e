"""The offline probe-set builder, on the real synthetic world."""
from __future__ import annotations

import polars as pl
import pytest

from ldpipe.data.synthetic import SyntheticConfig, SyntheticWorld, generate
from ldpipe.errors import DataValidationError, SpecError
from ldpipe.probes.build import MODEL_TYPES, OFFLINE_TYPES, REPHRASE_TYPES, ProbeRecipe, build_probe_set, shuffle_words
from ldpipe.probes.checks import check_probe_set
from ldpipe.schema import PROBE_SCHEMA

BUILT_WITHOUT_TOKENIZER = tuple(t for t in OFFLINE_TYPES if t != "random_tokens")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return generate(SyntheticConfig())


@pytest.fixture(scope="module")
def build(world: SyntheticWorld):
    return build_probe_set(world.preferences, ProbeRecipe(n_examples=40), rephrases=world.rephrases)


def _by_type(probes: pl.DataFrame, t: str) -> dict[str, str]:
    return dict(probes.filter(pl.col("response_type") == t).select("example_id", "response").iter_rows())


def _words(s: str) -> list[str]:
    return s.strip().split(" ")


def test_every_type_for_every_example(build, world: SyntheticWorld) -> None:
    p = build.probes
    assert p.schema == pl.Schema(PROBE_SCHEMA)
    assert p["example_id"].n_unique() == 40
    assert p.height == 40 * len(BUILT_WITHOUT_TOKENIZER)
    assert build.skipped.keys() == {"random_tokens"} and "tokenizer" in build.skipped["random_tokens"]
    report = check_probe_set(p, BUILT_WITHOUT_TOKENIZER)
    assert report["n_missing"] == 0 and report["duplicates"] == 0 and report["prompt_mismatch"] == 0
    assert report["shuffles_are_permutations"] and report["shuffle_checked"] == 80
    assert report["irr_train_equals_chosen"] == 0 and report["rephrases_identical_to_source"] == 0
    assert p.sort("example_id", "response_type").equals(p)
    # probe prompts come from the train split; every row of a prompt carries that prompt
    prefs = world.preferences
    train = dict(prefs.filter(pl.col("split") == "train").select("example_id", "prompt").iter_rows())
    assert all(train[i] == prompt for i, prompt in p.select("example_id", "prompt").iter_rows())
    assert _by_type(p, "chosen") == {i: dict(prefs.select("example_id", "chosen").iter_rows())[i] for i in train
                                     if i in set(p["example_id"])}
    reph = world.rephrases.filter(pl.col("response_type") == "chosen_gptformat")
    assert _by_type(p, "chosen_gptformat").items() <= dict(reph.select("example_id", "response").iter_rows()).items()


def test_irr_train_is_another_probe_examples_chosen(build) -> None:
    p = build.probes
    chosen = _by_type(p, "chosen")
    rows = p.filter(pl.col("response_type") == "irr_train")
    sources = set()
    for i, resp, prov in rows.select("example_id", "response", "provenance").iter_rows():
        j = prov.removeprefix("irr_train:")
        assert j != i and j in chosen, prov          # another probe example ...
        assert resp == chosen[j] and resp != chosen[i]  # ... whose chosen differs from ours
        sources.add(j)
    assert len(sources) > 20  # spread over the probe set, not one fixed example


def test_irr_train_redraws_when_texts_are_identical(world: SyntheticWorld) -> None:
    # three examples share one chosen text: they must never draw each other
    prefs = world.preferences.with_row_index().with_columns(
        pl.when(pl.col("index") < 3).then(pl.lit(" same answer")).otherwise(pl.col("chosen")).alias("chosen")
    ).drop("index")
    b = build_probe_set(prefs, ProbeRecipe(n_examples=6, selection="first", types=("chosen", "irr_train")))
    assert check_probe_set(b.probes, ["chosen", "irr_train"])["irr_train_equals_chosen"] == 0
    assert b.probes.filter(pl.col("response_type") == "irr_train").height == 6


def test_irr_test_comes_from_the_test_split(build, world: SyntheticWorld) -> None:
    test = dict(world.preferences.filter(pl.col("split") == "test").select("example_id", "chosen").iter_rows())
    rows = build.probes.filter(pl.col("response_type") == "irr_test")
    assert rows.height == 40
    for resp, prov in rows.select("response", "provenance").iter_rows():
        j = prov.removeprefix("irr_test:")
        assert j in test and test[j] == resp


def test_shuffles_are_true_permutations(build) -> None:
    p = build.probes
    chosen, perm = _by_type(p, "chosen"), _by_type(p, "random_permute")
    irr_test, nonhum = _by_type(p, "irr_test"), _by_type(p, "random_nonhum")
    for i in chosen:
        for src, out in ((chosen[i], perm[i]), (irr_test[i], nonhum[i])):
            assert sorted(_words(out)) == sorted(_words(src))
            assert out != src and out.startswith(" ") == src.startswith(" ")
    hum = _by_type(p, "irr_hum")
    assert all(len(_words(hum[i])) == len(_words(chosen[i])) and hum[i].startswith(" ") for i in chosen)


def test_shuffle_words_edge_cases() -> None:
    import random

    rng = random.Random(0)
    assert shuffle_words(" same same same", rng) == " same same same"   # nothing distinct to move
    assert shuffle_words(" a b", rng) == " b a"                          # the only other order
    assert shuffle_words("x", rng) == "x"


def test_first_vs_random_selection(world: SyntheticWorld) -> None:
    train_ids = world.preferences.filter(pl.col("split") == "train")["example_id"].to_list()
    first = build_probe_set(world.preferences, ProbeRecipe(n_examples=10, selection="first", types=("chosen",)))
    rand = build_probe_set(world.preferences, ProbeRecipe(n_examples=10, selection="random", types=("chosen",)))
    assert sorted(first.probes["example_id"]) == sorted(train_ids[:10])
    picked = set(rand.probes["example_id"])
    assert len(picked) == 10 and picked <= set(train_ids) and picked != set(train_ids[:10])


def test_same_recipe_same_frame_and_seed_changes_draws(world: SyntheticWorld, build) -> None:
    again = build_probe_set(world.preferences, ProbeRecipe(n_examples=40), rephrases=world.rephrases)
    assert again.probes.equals(build.probes)
    # same examples (first N), different seed: the random draws change, the dataset rows do not
    a = build_probe_set(world.preferences, ProbeRecipe(n_examples=40, selection="first", seed=0))
    b = build_probe_set(world.preferences, ProbeRecipe(n_examples=40, selection="first", seed=1))
    for t in ("chosen", "rejected"):
        assert _by_type(a.probes, t) == _by_type(b.probes, t)
    for t in ("irr_train", "irr_test", "irr_hum", "random_permute", "random_nonhum"):
        assert _by_type(a.probes, t) != _by_type(b.probes, t), t
    # a type's draws do not depend on which other types are requested
    only = build_probe_set(world.preferences, ProbeRecipe(n_examples=40, selection="first", types=("random_nonhum",)))
    assert _by_type(only.probes, "random_nonhum") == _by_type(a.probes, "random_nonhum")


def test_random_tokens_with_a_real_tokenizer(world: SyntheticWorld) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(world.corpus[:500], vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    b = build_probe_set(world.preferences, ProbeRecipe(n_examples=20, types=("chosen", "random_tokens")),
                        tokenizer=tok)
    assert "random_tokens" not in b.skipped
    chosen, rnd = _by_type(b.probes, "chosen"), _by_type(b.probes, "random_tokens")
    assert rnd.keys() == chosen.keys()
    drawn = []
    for i, y in chosen.items():
        n = len(tok.encode(y, add_special_tokens=False))
        ids = tok.encode(rnd[i], add_special_tokens=False)
        assert rnd[i] != y and "<|endoftext|>" not in rnd[i] and "<|pad|>" not in rnd[i]
        assert "\ufffd" not in rnd[i]  # no lone byte fragments
        assert n // 2 <= len(ids) <= 2 * n  # as many tokens as y+, up to re-tokenization merges/splits
        drawn += ids
    assert len(set(drawn)) > 100  # spread over the vocabulary, not a few frequent tokens
    # the raw `tokenizers.Tokenizer` works too and gives the same ids for the same seed
    raw = build_probe_set(world.preferences, ProbeRecipe(n_examples=20, types=("random_tokens",)),
                          tokenizer=bpe._tokenizer)
    assert _by_type(raw.probes, "random_tokens") == rnd


def test_check_probe_set_reports_problems(build) -> None:
    p = build.probes
    victim = p["example_id"][0]
    gap = p.filter(~((pl.col("example_id") == victim) & (pl.col("response_type") == "irr_hum")))
    r = check_probe_set(gap, BUILT_WITHOUT_TOKENIZER)
    assert r["missing"] == [{"example_id": victim, "response_type": "irr_hum"}] and r["n_missing"] == 1
    chosen = _by_type(p, "chosen")[victim]
    tampered = {"irr_train": chosen, "chosen_gptsemantic": chosen, "random_permute": chosen + " extra"}
    bad = p.with_columns(pl.struct("example_id", "response_type", "response").map_elements(
        lambda r: tampered.get(r["response_type"], r["response"]) if r["example_id"] == victim else r["response"],
        return_dtype=pl.String).alias("response"))
    r = check_probe_set(bad, BUILT_WITHOUT_TOKENIZER)
    assert r["shuffles_are_permutations"] is False and r["shuffle_failures"] == 1
    assert r["irr_train_equals_chosen"] == 1 and r["rephrases_identical_to_source"] == 1
    lw = r["length_words"]["chosen"]
    assert lw["min"] <= lw["mean"] <= lw["max"] and lw["rows"] == 40


def test_skips_are_reported(world: SyntheticWorld) -> None:
    no_test = world.preferences.filter(pl.col("split") == "train")
    b = build_probe_set(no_test, ProbeRecipe(n_examples=10, types=OFFLINE_TYPES + MODEL_TYPES))
    assert set(b.skipped) == {*REPHRASE_TYPES, "irr_test", "random_nonhum", "random_tokens", *MODEL_TYPES}
    assert "test" in b.skipped["irr_test"] and "model" in b.skipped["chosen_initial"]
    assert set(b.probes["response_type"]) == {"chosen", "rejected", "irr_train", "irr_hum", "random_permute"}


def test_bad_inputs_give_clear_errors(world: SyntheticWorld) -> None:
    with pytest.raises(DataValidationError, match="preferences.*missing column.*'rejected'"):
        build_probe_set(world.preferences.drop("rejected"), ProbeRecipe(n_examples=5))
    nulled = world.preferences.with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(None).otherwise(pl.col("chosen")).alias("chosen"))
    with pytest.raises(DataValidationError, match="row 7, field 'chosen'"):
        build_probe_set(nulled, ProbeRecipe(n_examples=5))
    with pytest.raises(DataValidationError, match="train split has 200.*n_examples=500"):
        build_probe_set(world.preferences, ProbeRecipe(n_examples=500))
    with pytest.raises(SpecError, match="unknown response type"):
        build_probe_set(world.preferences, ProbeRecipe(types=("chosen", "chosn")))
    partial = world.rephrases.filter(~((pl.col("example_id") == "syn-train-00000")
                                       & (pl.col("response_type") == "chosen_gptformat")))
    with pytest.raises(DataValidationError, match="no 'chosen_gptformat' rephrase for probe example 'syn-train-00000'"):
        build_probe_set(world.preferences, ProbeRecipe(n_examples=5, selection="first"), rephrases=partial)


def test_pair_similarity_records_kind_and_word_overlap(build, world: SyntheticWorld) -> None:
    from ldpipe.probes.checks import pair_similarity, word_overlap
    from ldpipe.schema import PROBE_PAIRS_SCHEMA

    assert word_overlap("The cat sat.", "the CAT ran") == pytest.approx(2 / 4) and word_overlap("", "") == 0.0
    pairs = pair_similarity(build.probes, "exp", world.kinds)
    assert pairs.schema == pl.Schema(PROBE_PAIRS_SCHEMA) and pairs.height == 40
    kinds = dict(world.kinds.iter_rows())
    assert all(kinds[e] == k for e, k in pairs.select("example_id", "rejected_kind").iter_rows())
    assert pairs["word_overlap"].is_between(0, 1).all() and pairs["word_overlap"].n_unique() > 10
    # without the dataset's labels the kind is unknown, the measured overlap is the same
    plain = pair_similarity(build.probes, "exp")
    assert plain["rejected_kind"].null_count() == 40 and plain["word_overlap"].equals(pairs["word_overlap"])
