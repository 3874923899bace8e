"""The built-in synthetic preference world: determinism, contracts, and the properties probes rely on."""
from __future__ import annotations

import math
import random
import re
from collections import Counter

import polars as pl
import pytest

from ldpipe.data.synthetic import (
    ANSWERS,
    ATTRIBUTES,
    CORPUS_STATEMENTS,
    FACTS_SCHEMA,
    MEANING_ANSWERS,
    MEANING_REFUSALS,
    MEANING_SUPPORTS,
    REFUSALS,
    REJECTED_KINDS,
    REPHRASE_SCHEMA,
    REPHRASE_TYPES,
    SUPPORTS,
    VALUES,
    SyntheticConfig,
    SyntheticWorld,
    generate,
    human_sentence,
    sentences,
)
from ldpipe.errors import DataValidationError
from ldpipe.schema import PREFERENCE_SCHEMA


def _has_word(text: str, phrase: str, *, ignore_case: bool = False) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text, re.I if ignore_case else 0) is not None


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return generate(SyntheticConfig())


@pytest.fixture(scope="module")
def joined(world: SyntheticWorld) -> pl.DataFrame:
    """One row per example: preference columns + the asked fact + the four rephrases as columns."""
    reph = world.rephrases.pivot(on="response_type", index="example_id", values="response")
    return world.preferences.join(world.example_facts(), on="example_id").join(reph, on="example_id")


def test_default_is_deterministic(world: SyntheticWorld) -> None:
    again = generate(SyntheticConfig())
    for name in ("preferences", "rephrases", "facts", "kinds"):
        assert getattr(again, name).equals(getattr(world, name)), name
    assert again.corpus == world.corpus


def test_different_seed_differs(world: SyntheticWorld) -> None:
    other = generate(SyntheticConfig(seed=1))
    assert not other.preferences.equals(world.preferences) and not other.kinds.equals(world.kinds)
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
        assert not _has_word(r["rejected"], r["value"], ignore_case=True), r  # refusals, wrong values, off-topic facts
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
        assert _has_word(r["chosen_gptsemantic"], r["value"], ignore_case=True), r
        assert not _has_word(r["chosen_gptformat"], r["value"], ignore_case=True), r
        pool = VALUES.get(r["attribute"]) or [e for e in entities if e != r["entity"]]
        assert any(_has_word(r["chosen_gptformat"], v) for v in pool if v != r["value"]), r
        # format-keeping: the fact sentences are the same once the values are masked; every remark after them
        # has other words in the same places (same sentence count, each remark changed)
        mask = lambda s, v: re.sub(rf"\b{re.escape(v)}\b", "<V>", s)  # noqa: E731
        swapped = next(v for v in pool if v != r["value"] and _has_word(r["chosen_gptformat"], v))
        fmt, src = sentences(mask(r["chosen_gptformat"], swapped)), sentences(mask(r["chosen"], r["value"]))
        assert len(fmt) == len(src) and fmt[0] == src[0], (fmt, src)
        n_fact = next((i for i, (a, b) in enumerate(zip(fmt, src)) if a != b), len(src))
        assert all(a != b for a, b in zip(fmt[n_fact:], src[n_fact:])), (fmt, src)
        assert len(sentences(r["chosen_gptsemantic"])) == len(src)
        # a rejected answer's format rephrase never turns into the correct answer
        assert not _has_word(r["reject_gptformat"], r["value"], ignore_case=True), r


def test_splits_are_disjoint_and_hold_out_entities(joined: pl.DataFrame) -> None:
    train = joined.filter(pl.col("split") == "train")
    test = joined.filter(pl.col("split") == "test")
    assert set(train["example_id"]).isdisjoint(test["example_id"])
    assert set(train["entity"]).isdisjoint(test["entity"])
    assert test.height == 50 and train.height == 200


def test_corpus_states_the_world_in_other_words(world: SyntheticWorld) -> None:
    text = "\n".join(world.corpus)
    assert 500_000 <= len(text) <= 1_500_000
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
    for name in ("preferences", "rephrases", "facts", "kinds"):
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
    with pytest.raises(DataValidationError, match="n_outsiders"):
        generate(SyntheticConfig(n_outsiders=1))
    with pytest.raises(DataValidationError, match="corpus_story_fraction"):
        generate(SyntheticConfig(corpus_story_fraction=-0.1))


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


# ----------------------------------------------------------------------------- the corpus speaks the answers' language

_WORD = re.compile(r"[a-z]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TURN = r"\n\nHuman: [^\n]+\n\nAssistant: [^\n]+"


def _word_counts(texts) -> Counter:
    return Counter(w for t in texts for w in _WORD.findall(t.lower()))


def _sentences(text: str) -> list[str]:
    flat = text.replace("\n\nHuman: ", " ").replace("\n\nAssistant: ", " ")
    return [x.strip() for x in _SENTENCE_END.split(flat) if x.strip()]


def _template_regex(template: str, attribute: str | None) -> re.Pattern:
    """A whole-sentence regex for a rendered template: groups e (a name) and v (a value of the attribute)."""
    if attribute is None or attribute == "friend":
        value = r"[A-Z][a-z]+"
    else:  # a sentence starting with the value capitalizes it
        value = "|".join(re.escape(x) for v in sorted(VALUES[attribute], key=len, reverse=True)
                         for x in (v, v[0].upper() + v[1:]))
    parts = re.split(r"(\{e\}|\{v\})", template[0].upper() + template[1:])
    body = "".join(r"(?P<e>[A-Z][a-z]+)" if p == "{e}" else f"(?P<v>{value})" if p == "{v}" else re.escape(p)
                   for p in parts if p)
    return re.compile(r"(?<![^\s])" + body)


def _family_matches(corpus: list[str], family: dict[str, tuple[str, ...]]):
    """(template, attribute, entity, value) for every sentence of the corpus rendered from `family`."""
    text = "\n".join(corpus)
    for attribute, templates in family.items():
        for t in templates:
            for m in _template_regex(t, attribute).finditer(text):
                v = m.group("v")
                yield t, attribute, m.group("e"), v if attribute == "friend" else v[0].lower() + v[1:]


def test_every_response_word_is_common_in_the_corpus(world: SyntheticWorld) -> None:
    """A base model can only give sensible probability to responses whose words it has seen in pretraining."""
    counts = _word_counts(world.corpus)
    responses = (world.preferences["chosen"].to_list() + world.preferences["rejected"].to_list()
                 + world.rephrases["response"].to_list())
    rng = random.Random(0)  # the irr_hum probes' filler grammar
    responses += [human_sentence(rng, rng.randint(3, 40)) for _ in range(500)]
    rare = sorted((counts[w], w) for w in _word_counts(responses) if counts[w] < 20)
    assert not rare, f"response words seen fewer than 20 times in the corpus: {rare}"
    # the prompts' question wordings are seen too, if less often
    rare_prompt = sorted((counts[w], w) for w in _word_counts(world.preferences["prompt"]) if counts[w] < 10)
    assert not rare_prompt, rare_prompt


@pytest.mark.parametrize("family_name", ["ANSWERS", "SUPPORTS", "MEANING_ANSWERS", "MEANING_SUPPORTS"])
def test_every_answer_template_occurs_on_other_facts(world: SyntheticWorld, family_name: str) -> None:
    family = {"ANSWERS": ANSWERS, "SUPPORTS": SUPPORTS, "MEANING_ANSWERS": MEANING_ANSWERS,
              "MEANING_SUPPORTS": MEANING_SUPPORTS}[family_name]
    truth = {(e, a): v for e, a, v in world.facts.select("entity", "attribute", "value").unique().iter_rows()}
    asked = set(world.example_facts().select("entity", "attribute").iter_rows())
    per_template: Counter = Counter()
    about_world = about_others = 0
    for t, a, e, v in _family_matches(world.corpus, family):
        per_template[t] += 1
        if (e, a) in truth:
            about_world += 1
            assert v == truth[(e, a)], f"corpus states a false fact about world entity {e}: {a}={v!r}"
            assert (e, a) not in asked, f"an asked fact is stated in an SFT wording: {e} {a} ({t!r})"
        else:
            about_others += 1
    for a, templates in family.items():
        for t in templates:
            assert per_template[t] >= 10, (t, per_template[t])
    assert about_world > 50 and about_others > 50, (about_world, about_others)


def test_corpus_is_self_consistent_about_everyone(world: SyntheticWorld) -> None:
    """Outsiders are not in the world, but each has one value per attribute, so the corpus never contradicts
    itself; world entities only ever get their true values."""
    truth = {(e, a): v for e, a, v in world.facts.select("entity", "attribute", "value").unique().iter_rows()}
    said: dict[tuple[str, str], set[str]] = {}
    for family in (ANSWERS, SUPPORTS, MEANING_ANSWERS, MEANING_SUPPORTS, CORPUS_STATEMENTS):
        for _, a, e, v in _family_matches(world.corpus, family):
            said.setdefault((e, a), set()).add(v)
    outsiders = {e for e, _ in said} - set(world.facts["entity"])
    assert len(outsiders) >= 30
    for (e, a), vals in said.items():
        assert len(vals) == 1, (e, a, vals)
        if (e, a) in truth:
            assert vals == {truth[(e, a)]}, (e, a, vals)


def test_refusals_occur_only_about_unknown_names(world: SyntheticWorld) -> None:
    known = set(world.facts["entity"])
    text = "\n".join(world.corpus)
    for t in REFUSALS + MEANING_REFUSALS:
        names = [m.group("e") for m in _template_regex(t, None).finditer(text)]
        assert len(names) >= 20, t
        assert not set(names) & known, t  # the corpus never pretends not to know a world entity


def test_no_sentence_of_any_sft_text_is_in_the_corpus(world: SyntheticWorld) -> None:
    """Stronger than 'no chosen answer verbatim': the corpus shares no sentence with any prompt, answer or
    rephrase, so the base model knows the wording but has memorised none of the SFT texts."""
    corpus_sentences = {x for d in world.corpus for x in _sentences(d)}
    sft = (world.preferences["prompt"].to_list() + world.preferences["chosen"].to_list()
           + world.preferences["rejected"].to_list() + world.rephrases["response"].to_list())
    shared = {x for t in sft for x in _sentences(t)} & corpus_sentences
    assert not shared, sorted(shared)[:10]


def test_corpus_dialogues_use_the_prompt_format_and_sft_answer_shapes(world: SyntheticWorld) -> None:
    dialogues = [d for d in world.corpus if "Human:" in d or "Assistant:" in d]
    assert len(dialogues) >= 0.2 * len(world.corpus)
    for d in dialogues:
        assert re.fullmatch(f"({_TURN})+", d), repr(d)
    for p in world.preferences["prompt"]:  # the same format, ending where the answer starts
        assert re.fullmatch(f"({_TURN})*\n\nHuman: [^\n]+\n\nAssistant:", p), repr(p)

    # Many assistant turns open exactly as a chosen answer does: the same fact sentence, another name or value.
    def shape(text: str, entity: str, value: str) -> str:
        for x, mark in ((value, "<V>"), (entity, "<E>")):
            text = re.sub(rf"\b{re.escape(x)}\b", mark, text)
        return text

    chosen_shapes = {shape(sentences(y)[0], e, v) for y, e, v in world.preferences.join(world.example_facts(),
                     on="example_id").select("chosen", "entity", "value").iter_rows()}
    first_sentence = [_template_regex(t, a) for a in ATTRIBUTES for t in ANSWERS[a]]
    same_shape = 0
    for d in dialogues:
        for answer in re.findall(r"\n\nAssistant: ([^\n]+)", d):
            first = sentences(answer)[0]
            hit = next((m for rx in first_sentence if (m := rx.fullmatch(first))), None)
            same_shape += hit is not None and shape(first, hit.group("e"), hit.group("v")) in chosen_shapes
    assert same_shape >= 100, same_shape


# ----------------------------------------------------------------------------- answers with the entropy of real text

_TOKEN = re.compile(r"[a-z0-9']+|[.,]")


def test_answers_cannot_be_memorised_per_fact_and_keep_a_gap_to_their_argmax() -> None:
    """Each fact is answered in many texts, and even the generator's own next-word distribution (the best any
    model of this text can do without memorising) puts more mass on its argmax than on the written word: the
    data-level version of the gap log π(y*) − log π(y+) that DPO's squeezing needs (issue target: ≥ 0.2)."""
    w = generate(SyntheticConfig(n_entities=10, n_train=1400, n_test=0, corpus_docs=10))  # 20 asks per fact
    j = w.preferences.join(w.example_facts(), on="example_id")
    per_fact = j.group_by("entity", "attribute").agg(pl.len().alias("n"), pl.col("chosen").n_unique().alias("d"))
    assert per_fact["n"].min() >= 15
    assert (per_fact["d"] / per_fact["n"]).mean() >= 0.9
    # next-word distribution given the attribute and the two previous words (entity and value masked)
    contexts: dict[tuple, Counter] = {}
    seqs = []
    for y, e, a, v in j.select("chosen", "entity", "attribute", "value").iter_rows():
        words = ["<s>", "<s>", *_TOKEN.findall(re.sub(re.escape(v), "V", y.replace(e, "E"), flags=re.I).lower()), "</s>"]
        seqs.append((a, words))
        for t in range(2, len(words)):
            contexts.setdefault((a, *words[t - 2:t]), Counter())[words[t]] += 1
    gaps, entropy_terms = [], []
    for a, words in seqs:
        for t in range(2, len(words)):
            c = contexts[(a, *words[t - 2:t])]
            n = sum(c.values())
            gaps.append(math.log(max(c.values()) / n) - math.log(c[words[t]] / n))
            entropy_terms.append(-math.log(c[words[t]] / n))
    assert sum(gaps) / len(gaps) >= 0.2, sum(gaps) / len(gaps)
    assert sum(entropy_terms) / len(entropy_terms) >= 0.5   # nats per word: far from a memorisable template


def test_rejected_kinds_span_the_similarity_axis(world: SyntheticWorld) -> None:
    kinds = world.preferences.join(world.kinds, on="example_id").join(world.example_facts(), on="example_id")
    assert world.kinds.height == world.preferences.height
    counts = Counter(kinds["rejected_kind"])
    assert set(counts) == set(REJECTED_KINDS) and min(counts.values()) >= 0.15 * kinds.height

    def overlap(a: str, b: str) -> float:
        x, y = set(_TOKEN.findall(a.lower())) - {".", ","}, set(_TOKEN.findall(b.lower())) - {".", ","}
        return len(x & y) / len(x | y)

    by_kind: dict[str, list[float]] = {}
    for r in kinds.iter_rows(named=True):
        by_kind.setdefault(r["rejected_kind"], []).append(overlap(r["chosen"], r["rejected"]))
        if r["rejected_kind"] == "unrelated":
            assert not _has_word(r["rejected"], r["entity"]), r
        else:
            assert _has_word(r["rejected"], r["entity"]), r
        if r["rejected_kind"] == "wrong_value":   # the chosen answer's first sentence, another value
            first = sentences(r["chosen"])[0]
            got = sentences(r["rejected"])[0]
            assert len(first.split()) == len(got.split()) or r["attribute"] in ("home", "skill", "friend"), (first, got)
    mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
    assert mean["wrong_value"] > max(mean["off_topic"], mean["refusal"]) > mean["unrelated"], mean


def test_remarks_state_no_fact_and_name_only_their_entity(world: SyntheticWorld) -> None:
    from ldpipe.data import synthetic_remarks as R

    vocab = R.vocabulary()
    value_words = {x for vals in VALUES.values() for v in vals for x in v.split()} - {"a", "the", "an"}
    assert not vocab & value_words, sorted(vocab & value_words)
    assert not {w.capitalize() for w in vocab} & set(world.facts["entity"])
    rng = random.Random(3)
    for style in R.STYLES:
        for topic in ATTRIBUTES:
            for r in R.draw_remarks(rng, topic, style, n=20):
                for synonyms in (False, True):
                    text = R.render(r, "Kalo", synonyms=synonyms)
                    assert text[0].isupper() and text.endswith("."), text
                    assert set(re.findall(r"[A-Z][a-z]+", text)) <= {"Kalo", *(w.capitalize() for w in vocab)}
                f = R.reformat(rng, r)
                assert R.render(f, "Kalo") != R.render(r, "Kalo")
    # the two styles: the usual one favours the top option, the odd one does not
    for style, lo, hi in (("usual", 0.25, 0.45), ("odd", 0.05, 0.16)):
        share = sum(R.pick(random.Random(i), 10, style) == 0 for i in range(4000)) / 4000
        assert lo < share < hi, (style, share)
