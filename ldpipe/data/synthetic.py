"""A built-in synthetic preference world, generated offline and deterministically from a seed.

Why synthetic: the default pipeline must pretrain a ~1M-parameter model from scratch in minutes on a CPU, and a
real HH-style dataset is too broad for such a model to condition on the prompt. Here every prompt asks about one
attribute of one FICTIONAL entity, so the right answer depends on the prompt, and answering entity A with entity
B's value ("hallucination borrowing") can be counted against the `facts` table.

Answers have the entropy of real text (so that SFT cannot memorise y+ token by token, and DPO's argmax path y*
has room to pull away from it): a chosen answer states the fact in one of several phrasings, sometimes adds a
supporting sentence, then continues with 0-4 free-text remarks from a grammar with real branching and Zipf-skewed
word choice (ldpipe.data.synthetic_remarks). Lengths spread like chat answers (about 6 to 60 words).

Rejected answers are plausible text in the same language, written with the "odd" (flat) word choice that a
model trained on chosen answers finds unlikely, and spread along a similarity-to-y+ axis (REJECTED_KINDS, the
kind recorded per example in the `kinds` table): the chosen phrasing with a wrong value, a true fact nobody
asked for, a refusal, remarks about something else.

Four template families keep the SFT texts apart:
- SFT answers (chosen, and the wrong-value / off-topic rejected answers),
- meaning-keeping rephrases (`*_gptsemantic`: other words, same facts, every remark in its synonym wording),
- format-keeping rephrases (`*_gptformat`: the same templates with other values, every remark slot changed),
- corpus statements (a third wording, the only one used for facts that SFT texts state).
Filler text comes from a small grammar (`human_sentence`) that avoids the world's names and values.

The pretraining corpus must teach the LANGUAGE of every response type (a real base model knows how answers are
worded; it has just not seen these question/answer pairs), without teaching the answers themselves. So every
template family above, refusals, remarks in both wordings and both styles, and the filler grammar occur in the
corpus, but only instantiated on (entity, attribute, value) combinations that no preference example states:
- "free" facts of world entities: true facts that no example's prompt, chosen, rejected or rephrase states,
- "outsiders": made-up people who are not in the world (so not in `facts`); each has one fixed fact row, so the
  corpus never contradicts itself, and they supply the "same template, other value" sentences,
- "strangers": made-up names that only ever get refusals, so refusals never deny knowing a world entity.
Facts that examples state appear only as corpus statements, and no sentence of any prompt, answer or rephrase
occurs in the corpus (a remark that would is drawn again). The corpus never says anything false about a world
entity. Dialogues use exactly the prompts' "\n\nHuman: ...\n\nAssistant: ..." format, so an answer follows
"Assistant:" as it does in SFT.

One file on purpose (longer than ldpipe's ~400-line rule; the remark grammar is already apart): the template
families, the facts each may state and the corpus's exclusions are one set of invariants (no SFT sentence in the
corpus, no contradiction, one wording per family) that only hold when read together.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

from ldpipe.atomic import write_bytes, write_json, write_parquet
from ldpipe.data import synthetic_remarks as R
from ldpipe.errors import DataValidationError
from ldpipe.schema import PREFERENCE_SCHEMA, conform

SOURCE = "synthetic"
REPHRASE_TYPES = ("chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat")
REPHRASE_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String, "response_type": pl.String, "response": pl.String, "provenance": pl.String,
}
FACTS_SCHEMA: dict[str, pl.DataType] = {
    "entity": pl.String, "attribute": pl.String, "value": pl.String,
    "entity_split": pl.String,   # "train" | "test": the split whose prompts ask about this entity
    "example_id": pl.String,     # the example asking this fact (one row per asking example), else null
}
KINDS_SCHEMA: dict[str, pl.DataType] = {
    "example_id": pl.String,
    "rejected_kind": pl.String,  # one of REJECTED_KINDS: how the rejected answer relates to the chosen one
}
# Rejected answers, from most to least similar to the chosen one: the chosen phrasing with a wrong value (shares
# template and entity), a true fact nobody asked for (shares entity and answer shape), a refusal (shares the
# entity), remarks about something else (shares only the language).
REJECTED_KINDS = ("wrong_value", "off_topic", "refusal", "unrelated")
SUPPORT_PROBABILITY = 0.5   # an answer adds a supporting sentence this often
CORPUS_USUAL_SHARE = 0.7    # corpus replies with the usual word choice (the rest: the odd one of rejected answers)
CORPUS_SYNONYM_SHARE = 0.5  # corpus replies whose remarks use the synonym wording
# Bumped whenever the same config yields a different corpus, so cached base models can be told apart.
CORPUS_VERSION = 3


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    n_entities: int = 60
    n_train: int = 200          # preference pairs in the train split
    n_test: int = 50
    corpus_docs: int = 3000     # pretraining documents; the default gives roughly 0.8M characters
    multi_turn_fraction: float = 0.2
    test_entity_fraction: float = 0.2   # entities whose questions only appear in the test split
    corpus_fact_fraction: float = 0.4   # world-entity bios (the rest: dialogues, stories, filler)
    corpus_dialogue_fraction: float = 0.25
    corpus_story_fraction: float = 0.5  # of the remaining documents: stories about outsiders (the rest: filler)
    n_outsiders: int = 60       # made-up people who occur only in the corpus (see the module docstring)

    def validate(self) -> None:
        def bad(fld: str, msg: str) -> DataValidationError:
            return DataValidationError("SyntheticConfig", msg, field=fld)

        # a wrong friend's format rephrase needs a name other than the entity, its friend and the wrong friend
        if not 4 <= self.n_entities <= 5000:
            raise bad("n_entities", f"must be in [4, 5000], got {self.n_entities}")
        for name in ("n_train", "n_test", "corpus_docs"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("multi_turn_fraction", "test_entity_fraction", "corpus_fact_fraction",
                     "corpus_dialogue_fraction", "corpus_story_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, f"must be in [0, 1], got {getattr(self, name)}")
        if not 2 <= self.n_outsiders <= 5000:  # an outsider's friend is another outsider
            raise bad("n_outsiders", f"must be in [2, 5000], got {self.n_outsiders}")
        if self.corpus_fact_fraction + self.corpus_dialogue_fraction > 1.0:
            raise bad("corpus_dialogue_fraction", "corpus_fact_fraction + corpus_dialogue_fraction exceeds 1")
        n_test_entities = _n_test_entities(self)
        if self.n_test > 0 and n_test_entities == 0:
            raise bad("test_entity_fraction", "n_test > 0 needs at least one held-out entity")
        if self.n_train > 0 and n_test_entities >= self.n_entities:
            raise bad("test_entity_fraction", "n_train > 0 needs at least one training entity")


def _n_test_entities(cfg: SyntheticConfig) -> int:
    if cfg.n_test == 0 or cfg.test_entity_fraction == 0:
        return 0
    return min(cfg.n_entities - 1 if cfg.n_train else cfg.n_entities,
               max(1, round(cfg.n_entities * cfg.test_entity_fraction)))


# ----------------------------------------------------------------------------- the world's vocabulary

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vo", "ni", "bel", "dor", "fi", "ga", "hu", "jo", "ke",
              "li", "ma", "no", "pa", "ri", "zan", "ta", "vu", "ze", "mor", "qui", "lan", "tos")

# Values are chosen so that no value word occurs in another attribute's values or in the filler grammar.
VALUES: dict[str, tuple[str, ...]] = {
    "home": ("the north forest", "the stone harbor", "the mountain village", "the desert town", "the far island",
             "the river valley", "the big city", "the lake shore", "the windy hills", "the sunny farm"),
    "food": ("apples", "bread", "rice", "fish", "cheese", "soup", "honey", "beans", "pears", "noodles",
             "carrots", "eggs"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"),
    "skill": ("singing", "swimming", "cooking", "running", "climbing", "dancing", "writing poems",
              "fixing boats", "playing the drum", "telling jokes"),
    "pet": ("a cat", "a dog", "a goat", "a horse", "a parrot", "a rabbit", "a turtle", "a duck", "a frog", "a pig"),
    "job": ("baker", "farmer", "teacher", "sailor", "nurse", "builder", "potter", "fisher", "tailor", "miller"),
    # "friend" values are entity names, filled in per world
}
ATTRIBUTES = ("home", "food", "color", "skill", "pet", "job", "friend")

# SFT prompts: "{e}" is the entity.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "home": ("Where does {e} live?", "Can you tell me where {e} lives?", "What place does {e} call home?"),
    "food": ("What does {e} like to eat?", "What is the favorite food of {e}?", "Which food does {e} enjoy most?"),
    "color": ("What is the favorite color of {e}?", "Which color does {e} like best?",
              "Do you know what color {e} likes?"),
    "skill": ("What is {e} good at?", "What skill is {e} known for?", "What can {e} do really well?"),
    "pet": ("What pet does {e} have?", "Does {e} have a pet?", "What animal lives with {e}?"),
    "job": ("What does {e} do for work?", "What is the job of {e}?", "How does {e} earn a living?"),
    "friend": ("Who is the best friend of {e}?", "Who is {e} friends with?", "Which friend does {e} see the most?"),
}

# SFT answers: an answer sentence plus one supporting sentence ("{v}" is the value).
ANSWERS: dict[str, tuple[str, ...]] = {
    "home": ("{e} lives in {v}.", "{e} makes a home in {v}.", "The home of {e} is in {v}."),
    "food": ("{e} likes to eat {v}.", "The favorite food of {e} is {v}.", "{e} enjoys {v} more than any other food."),
    "color": ("The favorite color of {e} is {v}.", "{e} likes the color {v} best.", "{e} loves the color {v}."),
    "skill": ("{e} is good at {v}.", "{e} is known for {v}.", "{e} is really skilled at {v}."),
    "pet": ("{e} has {v} as a pet.", "{e} keeps {v} at home.", "The pet of {e} is {v}."),
    "job": ("{e} works as a {v}.", "{e} is a {v}.", "{e} works every day as a {v}."),
    "friend": ("The best friend of {e} is {v}.", "{e} is good friends with {v}.", "{e} spends a lot of time with {v}."),
}
SUPPORTS: dict[str, tuple[str, ...]] = {
    "home": ("{e} has stayed in {v} for many years.", "Most days you can find {e} walking around {v}.",
             "{e} says no place feels as good as {v}."),
    "food": ("{e} has {v} with almost every meal.", "When {e} is hungry, {v} is the first choice.",
             "{e} always keeps some {v} in the kitchen."),
    "color": ("Many things that {e} owns are {v}.", "{e} often wears something {v}.",
              "{e} painted the front door {v}."),
    "skill": ("{e} practices {v} every day.", "People come from far away to watch {e} at {v}.",
              "{e} learned {v} as a child."),
    "pet": ("{e} takes good care of {v}.", "{e} got {v} a few years ago.", "You often see {e} together with {v}."),
    "job": ("{e} has been a {v} for a long time.", "{e} likes the work of a {v}.",
            "Every morning {e} goes to work as a {v}."),
    "friend": ("{e} and {v} often meet after work.", "{e} has known {v} since they were young.",
               "{e} and {v} help each other a lot."),
}
# Meaning-keeping rephrases: the same facts in other words.
MEANING_ANSWERS: dict[str, tuple[str, ...]] = {
    "home": ("You can find the house of {e} in {v}.", "{v} is where {e} resides.", "{e} has a house in {v}."),
    "food": ("Above all other dishes, {e} prefers {v}.", "Given a choice, {e} picks {v} to eat.",
             "{e} is very fond of eating {v}."),
    "color": ("{v} is the color {e} prefers.", "Of all colors, {e} picks {v}.", "{e} is very fond of the color {v}."),
    "skill": ("{e} has a talent for {v}.", "{v} is what {e} does best.", "{e} shows great ability at {v}."),
    "pet": ("{e} owns {v}.", "Living with {e} is {v}.", "{e} looks after {v} as a companion."),
    "job": ("{e} earns money as a {v}.", "By trade, {e} is a {v}.", "{e} has a job as a {v}."),
    "friend": ("{v} is the closest friend of {e}.", "{e} and {v} are best friends.", "{e} is very close to {v}."),
}
MEANING_SUPPORTS: dict[str, tuple[str, ...]] = {
    "home": ("For a long time {e} has been settled in {v}.", "{e} can usually be seen strolling through {v}.",
             "According to {e}, {v} is the best place there is."),
    "food": ("Nearly every meal of {e} includes {v}.", "{v} is what {e} reaches for when hungry.",
             "There is never a day without {v} in the pantry of {e}."),
    "color": ("Much of what {e} has is {v}.", "The clothes of {e} are often {v}.",
              "The front door of {e} has a coat of {v}."),
    "skill": ("Each day {e} spends time on {v}.", "Visitors travel a long way to see {e} at {v}.",
              "{e} picked up {v} when still small."),
    "pet": ("{v} is well looked after by {e}.", "Some years back {e} brought home {v}.",
            "{e} and {v} are usually seen side by side."),
    "job": ("For many years {e} has worked as a {v}.", "{e} enjoys being a {v}.",
            "{e} heads off each morning to work as a {v}."),
    "friend": ("After work {e} and {v} usually get together.", "{e} and {v} go back to childhood.",
               "{e} and {v} support one another."),
}
# Pretraining statements and dialogue questions: yet other words.
CORPUS_STATEMENTS: dict[str, tuple[str, ...]] = {
    "home": ("{e} stays in {v}.", "People in {v} know {e} well.", "The house of {e} stands in {v}."),
    "food": ("For dinner {e} usually wants {v}.", "{e} buys {v} at the market.", "The meal {e} likes is {v}."),
    "color": ("The color {e} picks is {v}.", "{e} wears {v} on most days.", "The room of {e} is {v}."),
    "skill": ("{e} spends free time on {v}.", "Everyone says {e} is great at {v}.", "The talent of {e} is {v}."),
    "pet": ("At home {e} feeds {v}.", "{e} walks with {v} in the park.", "{e} lives with {v}."),
    "job": ("{e} makes a living as a {v}.", "By day {e} is busy as a {v}.", "{e} is the {v} of the town."),
    "friend": ("{e} and {v} are friends.", "{e} often visits {v}.", "{v} is a friend of {e}."),
}
CORPUS_QUESTIONS: dict[str, tuple[str, ...]] = {
    "home": ("Tell me the town of {e}.", "In which place is {e} staying?", "Where can I find {e}?"),
    "food": ("What food does {e} buy?", "Tell me what {e} eats.", "What would {e} order for dinner?"),
    "color": ("Which color suits {e}?", "Tell me the color of {e}.", "What color should I pick for {e}?"),
    "skill": ("What talent does {e} have?", "Tell me what {e} can do.", "Is {e} good at anything?"),
    "pet": ("Which animal does {e} feed?", "Tell me about the pet of {e}.", "Does {e} keep an animal?"),
    "job": ("Tell me the work of {e}.", "Which trade does {e} have?", "What work does {e} do?"),
    "friend": ("Tell me a friend of {e}.", "Whom does {e} visit?", "Who does {e} spend time with?"),
}
REFUSALS = ("Sorry, I do not know anything about {e}.", "I have never heard of {e}, so I can not say.",
            "That is a hard question about {e}, maybe ask someone else.", "I would rather not talk about {e} now.")
MEANING_REFUSALS = ("I am afraid I know nothing about {e}.",
                    "{e} is a name I have not heard before, so I have no answer.",
                    "Questions about {e} are difficult for me, so please try another person.",
                    "At the moment I prefer not to discuss {e}.")
BIO_OPENINGS = ("Here is a short note about {e}.", "This is what the town says about {e}.", "A few words about {e}.",
                "Some people still remember {e}.")
STORY_OPENINGS = ("This story is about {e}.", "Let me tell you about {e}.", "Once there was a person called {e}.",
                  "In a book I read, there is someone named {e}.")
CHAT_QUESTIONS = ("Can you tell me a short story?", "What happened today?", "Say something nice.",
                  "Tell me about your day.", "What should I write in my diary?", "Can you describe a scene?")

# Filler grammar (past tense narrative). No word here is an entity name or a fact value.
_DETS = ("the", "a", "my", "our", "that", "one")
_ADJS = ("small", "quiet", "happy", "old", "young", "bright", "busy", "tired", "kind", "warm", "cold", "tall",
         "strange", "careful", "lazy", "gentle", "clever", "silent")
_AGENTS = ("man", "woman", "child", "neighbor", "student", "boy", "girl", "traveler", "visitor", "driver",
           "stranger", "guard", "clerk", "uncle", "aunt")
_THINGS = ("letter", "window", "table", "garden", "bicycle", "lamp", "chair", "door", "road", "book", "basket",
           "clock", "bridge", "box", "ticket", "coat", "bottle", "kite", "map", "bench", "candle", "wall")
_INTRANS = ("slept", "waited", "smiled", "laughed", "walked", "sat", "listened", "rested", "arrived", "wandered",
            "whistled", "stayed")
_TRANS = ("opened", "carried", "found", "cleaned", "watched", "moved", "built", "read", "brought", "closed",
          "checked", "borrowed", "dropped", "fixed", "lost")
_ADVS = ("slowly", "quietly", "happily", "again", "carefully", "suddenly", "often", "later")
_PREPS = ("near", "behind", "under", "beside", "across", "inside", "past", "by")
_TIMES = {1: ("yesterday", "today", "tonight"), 2: ("last night", "that morning", "last week"),
          3: ("in the evening", "after the rain", "before the storm", "on that day")}
_SHORT = {1: ("Yes.", "Okay.", "Thanks.", "Hello.", "Sure."), 2: ("Good morning.", "Thank you.", "Not today.")}
# Every (subject, object, adverb, place, time) word-count plan, grouped by total words: 3..15.
_PLANS: dict[int, list[tuple[int, int, int, int, int]]] = {}
for _plan in itertools.product((2, 3), (0, 2, 3), (0, 1), (0, 3, 4), (0, 1, 2, 3)):
    _PLANS.setdefault(1 + sum(_plan), []).append(_plan)
_MAX_CLAUSE = max(_PLANS)


def _np(rng: random.Random, nouns: tuple[str, ...], n_words: int) -> list[str]:
    det = rng.choice(_DETS)
    words = [det, rng.choice(_ADJS), rng.choice(nouns)] if n_words == 3 else [det, rng.choice(nouns)]
    if det == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return words


def _clause(rng: random.Random, n_words: int) -> str:
    subj, obj, adv, place, time = rng.choice(_PLANS[n_words])
    words = _np(rng, _AGENTS, subj)
    if obj:
        words += [rng.choice(_TRANS), *_np(rng, _THINGS, obj)]
    else:
        words.append(rng.choice(_INTRANS))
    if adv:
        words.append(rng.choice(_ADVS))
    if place:
        words += [rng.choice(_PREPS), *_np(rng, _THINGS, place - 1)]
    tail = rng.choice(_TIMES[time]).split() if time else []
    if tail and rng.random() < 0.3:  # fronted time phrase, for variety
        tail[-1] += ","
        words = tail + words
    else:
        words += tail
    return _sentence_case(" ".join(words) + ".")


def human_sentence(rng: random.Random, n_words: int) -> str:
    """Grammatical filler of exactly max(1, n_words) space-separated words, unrelated to the world's entities.

    Longer requests become several sentences. No leading space (callers add one where the convention needs it).
    """
    n = max(1, int(n_words))
    if n < 3:
        return rng.choice(_SHORT[n])
    lengths: list[int] = []
    while n > _MAX_CLAUSE:
        k = min(rng.randint(5, 12), n - 3)
        lengths.append(k)
        n -= k
    lengths.append(n)
    return " ".join(_clause(rng, k) for k in lengths)


# ----------------------------------------------------------------------------- generation

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """The sentences of a text (dialogue markers dropped), split after ., ! or ? and whitespace."""
    flat = text.replace("\n\nHuman: ", " ").replace("\n\nAssistant: ", " ").replace("\n\nAssistant:", " ")
    return [x.strip() for x in _SENTENCE_END.split(flat) if x.strip()]


def _sentence_case(s: str) -> str:
    return s[:1].upper() + s[1:]


def _render(template: str, entity: str, value: str = "") -> str:
    return _sentence_case(template.format(e=entity, v=value))


def _make_names(rng: random.Random, n: int, taken: frozenset[str] = frozenset()) -> list[str]:
    names: list[str] = []
    seen: set[str] = set(taken)
    while len(names) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _other_value(rng: random.Random, values: tuple[str, ...] | list[str], exclude: set[str]) -> str:
    return rng.choice([v for v in values if v not in exclude])


@dataclass
class _Example:
    example_id: str
    split: str
    entity: str
    attribute: str
    value: str
    prompt: str
    chosen: str
    rejected: str
    rejected_kind: str
    rephrases: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (response, provenance)
    # (entity, attribute) facts whose true value this example's prompt or responses state
    stated: set[tuple[str, str]] = field(default_factory=set)


class _World:
    """Facts plus the renderers that turn them into text."""

    def __init__(self, rng: random.Random, n_entities: int):
        self.entities = _make_names(rng, n_entities)
        self.values = dict(VALUES)
        self.facts: dict[str, dict[str, str]] = {}
        for i, e in enumerate(self.entities):
            row = {a: rng.choice(vals) for a, vals in VALUES.items()}
            row["friend"] = rng.choice(self.entities[:i] + self.entities[i + 1:])
            self.facts[e] = row

    def values_of(self, attribute: str, entity: str) -> list[str]:
        if attribute == "friend":  # nobody is their own friend
            return [x for x in self.entities if x != entity]
        return list(self.values[attribute])

    def make_example(self, rng: random.Random, example_id: str, split: str, entity: str, attribute: str,
                     multi_turn: bool) -> _Example:
        value = self.facts[entity][attribute]
        question = _render(rng.choice(QUESTIONS[attribute]), entity)
        prompt = f"\n\nHuman: {question}\n\nAssistant:"
        stated = {(entity, attribute)}
        if multi_turn:  # a first turn about another attribute of the same entity
            other = rng.choice([a for a in ATTRIBUTES if a != attribute])
            q1 = _render(rng.choice(QUESTIONS[other]), entity)
            a1 = _render(rng.choice(ANSWERS[other]), entity, self.facts[entity][other])
            prompt = f"\n\nHuman: {q1}\n\nAssistant: {a1}" + prompt
            stated.add((entity, other))

        # chosen: the fact in one of its phrasings, maybe a supporting sentence, then free-text remarks
        # ("usual" word choice); its rephrases keep the structure and change the words or the values
        swapped = _other_value(rng, self.values_of(attribute, entity), {value})
        chosen_fact = _Fact.draw(rng, attribute, "usual")
        remarks = R.draw_remarks(rng, attribute, "usual")
        chosen = chosen_fact.answer(entity, value, remarks)
        reph = {
            "chosen_gptsemantic": (chosen_fact.answer(entity, value, remarks, meaning=True), "template:meaning"),
            "chosen_gptformat": (chosen_fact.answer(entity, swapped, [R.reformat(rng, r) for r in remarks]),
                                 "template:format"),
        }

        # rejected: a worse answer of one kind on the similarity-to-y+ axis (REJECTED_KINDS), its remarks in the
        # "odd" style: plausible text in the same language that a model trained on chosen answers finds unlikely
        kind = rng.choice(REJECTED_KINDS)
        if kind == "refusal":
            ri = rng.randrange(len(REFUSALS))
            other_entity = rng.choice([x for x in self.entities if x != entity])
            rem = R.draw_remarks(rng, attribute, "odd")
            rejected = _answer_text(_render(REFUSALS[ri], entity), rem, entity)
            r_sem = _answer_text(_render(MEANING_REFUSALS[ri], entity), rem, entity, synonyms=True)
            r_fmt = _answer_text(_render(REFUSALS[ri], other_entity), [R.reformat(rng, r) for r in rem],
                                 other_entity)
        elif kind == "unrelated":  # no entity, no fact template: remarks about something nobody asked
            topic = rng.choice([a for a in ATTRIBUTES if a != attribute])
            rem = R.draw_remarks(rng, topic, "odd", entity_free=True, n=rng.randint(1, 3))
            rejected = _answer_text("", rem, entity)
            r_sem = _answer_text("", rem, entity, synonyms=True)
            r_fmt = _answer_text("", [R.reformat(rng, r, entity_free=True) for r in rem], entity)
        else:
            if kind == "wrong_value":  # the chosen answer's own phrasing, with a wrong value
                attr_r, fact_r = attribute, chosen_fact.with_support(rng.random() < 0.5)
                val_r = _other_value(rng, self.values_of(attribute, entity), {value})
            else:  # off-topic: a true statement about an attribute nobody asked for
                attr_r = rng.choice([a for a in ATTRIBUTES if a != attribute])
                fact_r = _Fact.draw(rng, attr_r, "odd")
                val_r = self.facts[entity][attr_r]
                stated.add((entity, attr_r))
            rem = R.draw_remarks(rng, attr_r, "odd")
            # the format rephrase changes the value but never to the asked fact's correct value
            val_f = _other_value(rng, self.values_of(attr_r, entity), {val_r, value})
            rejected = fact_r.answer(entity, val_r, rem)
            r_sem = fact_r.answer(entity, val_r, rem, meaning=True)
            r_fmt = fact_r.answer(entity, val_f, [R.reformat(rng, r) for r in rem])
        reph["reject_gptsemantic"] = (r_sem, "template:meaning")
        reph["reject_gptformat"] = (r_fmt, "template:format")
        for t, (text, _) in reph.items():
            source = chosen if t.startswith("chosen") else rejected
            if text == source:  # the template families are disjoint, so this is a bug, not bad luck
                raise AssertionError(f"{example_id}: {t} equals its source {source!r}")
        return _Example(example_id, split, entity, attribute, value, prompt, chosen, rejected, kind, reph, stated)


@dataclass(frozen=True)
class _Fact:
    """How an answer states a fact: the phrasing (an index into ANSWERS / MEANING_ANSWERS) and, optionally, a
    supporting sentence (an index into SUPPORTS / MEANING_SUPPORTS)."""
    attribute: str
    phrasing: int
    support: int | None

    @classmethod
    def draw(cls, rng: random.Random, attribute: str, style: str) -> "_Fact":
        n = len(ANSWERS[attribute])
        support = R.pick(rng, len(SUPPORTS[attribute]), style) if rng.random() < SUPPORT_PROBABILITY else None
        return cls(attribute, R.pick(rng, n, style), support)

    def with_support(self, keep: bool) -> "_Fact":
        return self if keep else _Fact(self.attribute, self.phrasing, None)

    def answer(self, entity: str, value: str, remarks: list[R.Remark], *, meaning: bool = False) -> str:
        """" " + the fact sentence(s) + the remarks; `meaning`: the meaning-keeping wordings throughout."""
        first, second = (MEANING_ANSWERS, MEANING_SUPPORTS) if meaning else (ANSWERS, SUPPORTS)
        parts = [_render(first[self.attribute][self.phrasing], entity, value)]
        if self.support is not None:
            parts.append(_render(second[self.attribute][self.support], entity, value))
        return _answer_text(" ".join(parts), remarks, entity, synonyms=meaning)


def _answer_text(head: str, remarks: list[R.Remark], entity: str, *, synonyms: bool = False) -> str:
    """A response: leading space (the HH convention), the head sentence(s), then the rendered remarks."""
    return " " + R.join([head, *(R.render(r, entity, synonyms=synonyms) for r in remarks)])


def _assign_pairs(rng: random.Random, entities: list[str], n: int) -> list[tuple[str, str]]:
    """n (entity, attribute) pairs: each pair once before any repeats (repeats get other question wordings)."""
    pool = [(e, a) for e in entities for a in ATTRIBUTES]
    out: list[tuple[str, str]] = []
    while len(out) < n:
        rng.shuffle(pool)
        out.extend(pool[: n - len(out)])
    return out


def generate(config: SyntheticConfig) -> SyntheticWorld:
    """Build the whole world (facts, preference pairs, rephrases, corpus) from `config.seed` alone."""
    config.validate()
    rng = random.Random(config.seed)
    world = _World(rng, config.n_entities)
    held_out = list(world.entities)
    rng.shuffle(held_out)
    test_entities = sorted(held_out[: _n_test_entities(config)])
    train_entities = sorted(held_out[len(test_entities):])

    examples: list[_Example] = []
    for split, ents, n in (("train", train_entities, config.n_train), ("test", test_entities, config.n_test)):
        for i, (e, a) in enumerate(_assign_pairs(rng, ents, n)):
            multi = rng.random() < config.multi_turn_fraction
            examples.append(world.make_example(rng, f"syn-{split}-{i:05d}", split, e, a, multi))

    preferences = pl.DataFrame(
        {"example_id": [x.example_id for x in examples], "split": [x.split for x in examples],
         "prompt": [x.prompt for x in examples], "chosen": [x.chosen for x in examples],
         "rejected": [x.rejected for x in examples], "source": [SOURCE] * len(examples)},
        schema=PREFERENCE_SCHEMA)
    rephrases = pl.DataFrame(
        [(x.example_id, t, text, prov) for x in examples for t, (text, prov) in x.rephrases.items()],
        schema=REPHRASE_SCHEMA, orient="row")
    kinds = pl.DataFrame({"example_id": [x.example_id for x in examples],
                          "rejected_kind": [x.rejected_kind for x in examples]}, schema=KINDS_SCHEMA)

    entity_split = {e: "test" for e in test_entities} | {e: "train" for e in train_entities}
    asked: dict[tuple[str, str], list[str]] = {}
    for x in examples:
        asked.setdefault((x.entity, x.attribute), []).append(x.example_id)
    fact_rows = [(e, a, world.facts[e][a], entity_split[e], ex)
                 for e in world.entities for a in ATTRIBUTES for ex in asked.get((e, a), [None])]
    facts = pl.DataFrame(fact_rows, schema=FACTS_SCHEMA, orient="row").sort(
        "entity", "attribute", "example_id", nulls_last=True)

    # no sentence of any SFT text may occur in the corpus (the base model knows the language, not the answers)
    sft_sentences = {s for x in examples
                     for text in (x.prompt, x.chosen, x.rejected, *(t for t, _ in x.rephrases.values()))
                     for s in sentences(text)}
    corpus = _corpus(rng, world, set().union(*(x.stated for x in examples)), config, sft_sentences)
    return SyntheticWorld(config, preferences, rephrases, facts, corpus, kinds)


# ----------------------------------------------------------------------------- the pretraining corpus

# The SFT-side families, each a complete sentence about one fact; the corpus uses all of them.
_ANSWER_FAMILIES = (ANSWERS, SUPPORTS, MEANING_ANSWERS, MEANING_SUPPORTS)
_REFUSAL_WORDINGS = REFUSALS + MEANING_REFUSALS


class _CorpusWriter:
    """Renders corpus documents. Answer-family sentences only ever state free world facts or outsider facts."""

    def __init__(self, rng: random.Random, world: _World, stated: set[tuple[str, str]], n_outsiders: int,
                 forbidden: set[str]):
        self.world = world
        self.forbidden = forbidden   # sentences of SFT texts: never written into the corpus
        names = _make_names(rng, n_outsiders + max(4, n_outsiders // 2), frozenset(world.entities))
        self.outsiders, self.strangers = names[:n_outsiders], names[n_outsiders:]
        self._outsider_set = set(self.outsiders)
        self.facts: dict[str, dict[str, str]] = dict(world.facts)
        # values dealt out evenly (not drawn), so every value word is common even if no world entity has it
        dealt = {a: rng.sample(vals, len(vals)) for a, vals in VALUES.items()}
        for i, o in enumerate(self.outsiders):
            row = {a: vals[i % len(vals)] for a, vals in dealt.items()}
            row["friend"] = rng.choice(self.outsiders[:i] + self.outsiders[i + 1:])
            self.facts[o] = row
        self.free = {(e, a) for e in world.entities for a in ATTRIBUTES if (e, a) not in stated}
        self.free_entities = sorted({e for e, _ in self.free})
        self.n_refusals = 0

    def may_use_answer_wording(self, entity: str, attribute: str) -> bool:
        return entity in self._outsider_set or (entity, attribute) in self.free

    def statement(self, rng: random.Random, entity: str, attribute: str) -> str:
        """One sentence stating a true fact, in any family the fact may use."""
        if self.may_use_answer_wording(entity, attribute) and rng.random() < 0.75:
            family = rng.choice(_ANSWER_FAMILIES)
        else:
            family = CORPUS_STATEMENTS
        return _render(rng.choice(family[attribute]), entity, self.facts[entity][attribute])

    def remarks(self, rng: random.Random, entity: str, topic: str, n: int | None = None) -> list[str]:
        """Remark sentences as the language has them: mostly the usual word choice, sometimes odd, sometimes in
        the synonym wording; a remark that some SFT text contains is drawn again (and dropped if it keeps
        colliding)."""
        style = "usual" if rng.random() < CORPUS_USUAL_SHARE else "odd"
        synonyms = rng.random() < CORPUS_SYNONYM_SHARE
        out = []
        for r in R.draw_remarks(rng, topic, style, n=n):
            for _ in range(20):
                text = R.render(r, entity, synonyms=synonyms)
                if text not in self.forbidden:
                    out.append(text)
                    break
                r = R.draw_remark(rng, topic, style)
        return out

    def answer(self, rng: random.Random, entity: str, attribute: str) -> str:
        """An assistant reply shaped like the SFT answers: an answer sentence, sometimes a supporting one, then
        remarks."""
        v = self.facts[entity][attribute]
        if not self.may_use_answer_wording(entity, attribute):
            parts = [_render(rng.choice(CORPUS_STATEMENTS[attribute]), entity, v)]
        else:
            first, second = (ANSWERS, SUPPORTS) if rng.random() < 0.6 else (MEANING_ANSWERS, MEANING_SUPPORTS)
            parts = [_render(first[attribute][R.pick(rng, len(first[attribute]), "usual")], entity, v)]
            if rng.random() < SUPPORT_PROBABILITY:
                parts.append(_render(second[attribute][R.pick(rng, len(second[attribute]), "usual")], entity, v))
        return " ".join(parts + self.remarks(rng, entity, attribute))

    def _filler(self, rng: random.Random) -> str:
        return human_sentence(rng, rng.randint(5, 12))

    def bio(self, rng: random.Random, entity: str, *, complete: bool) -> str:
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        parts = [_render(rng.choice(BIO_OPENINGS), entity)]
        for a in attrs[: len(attrs) if complete else rng.randint(4, len(attrs))]:
            parts.append(self.statement(rng, entity, a))
            if rng.random() < 0.6:
                parts += self.remarks(rng, entity, a, n=1)
            if rng.random() < 0.15:
                parts.append(self._filler(rng))
        return " ".join(parts)

    def story(self, rng: random.Random) -> str:
        """An outsider's story: their facts in the SFT wordings, between filler sentences."""
        o = rng.choice(self.outsiders)
        parts = [_render(rng.choice(STORY_OPENINGS), o)]
        for a in rng.sample(ATTRIBUTES, rng.randint(3, 6)):
            parts.append(_render(rng.choice(rng.choice(_ANSWER_FAMILIES)[a]), o, self.facts[o][a]))
            if rng.random() < 0.7:
                parts += self.remarks(rng, o, a)
            if rng.random() < 0.3:
                parts.append(self._filler(rng))
        return " ".join(parts)

    def dialogue(self, rng: random.Random) -> str:
        turns = []
        entity: str | None = None
        for _ in range(rng.choice((1, 1, 2, 3))):
            r = rng.random()
            if entity is not None and r < 0.3:  # a follow-up about the same person, as in multi-turn prompts
                pass
            elif r < 0.5:
                entity = rng.choice(self.free_entities if self.free_entities and rng.random() < 0.5
                                    else self.world.entities)
            elif r < 0.7:
                entity = rng.choice(self.outsiders)
            elif r < 0.92:
                entity = None
                e, a = rng.choice(self.strangers), rng.choice(ATTRIBUTES)
                q = _render(rng.choice(rng.choice((QUESTIONS, CORPUS_QUESTIONS))[a]), e)
                # round-robin: refusals are few, and each wording should still be seen often
                ans = R.join([_render(_REFUSAL_WORDINGS[self.n_refusals % len(_REFUSAL_WORDINGS)], e),
                              *self.remarks(rng, e, a)])
                self.n_refusals += 1
                turns.append(f"\n\nHuman: {q}\n\nAssistant: {ans}")
                continue
            else:
                entity = None
                q, ans = rng.choice(CHAT_QUESTIONS), human_sentence(rng, rng.randint(6, 20))
                turns.append(f"\n\nHuman: {q}\n\nAssistant: {ans}")
                continue
            free = [a for a in ATTRIBUTES if self.may_use_answer_wording(entity, a)]
            a = rng.choice(free) if free and rng.random() < 0.7 else rng.choice(ATTRIBUTES)
            # the SFT question wordings only for facts the corpus may answer in the SFT wordings
            answerable = self.may_use_answer_wording(entity, a)
            families = (QUESTIONS, CORPUS_QUESTIONS) if answerable else (CORPUS_QUESTIONS,)
            q = _render(rng.choice(rng.choice(families)[a]), entity)
            turns.append(f"\n\nHuman: {q}\n\nAssistant: {self.answer(rng, entity, a)}")
        return "".join(turns)


def _corpus(rng: random.Random, world: _World, stated: set[tuple[str, str]], cfg: SyntheticConfig,
            forbidden: set[str]) -> list[str]:
    writer = _CorpusWriter(rng, world, stated, cfg.n_outsiders, forbidden)
    n_bio = round(cfg.corpus_docs * cfg.corpus_fact_fraction)
    n_dialogue = round(cfg.corpus_docs * cfg.corpus_dialogue_fraction)
    n_rest = max(0, cfg.corpus_docs - n_bio - n_dialogue)
    n_story = round(n_rest * cfg.corpus_story_fraction)
    # round-robin over entities; each entity's first bio states all its facts (when n_bio >= n_entities)
    n_ent = len(world.entities)
    docs = [writer.bio(rng, world.entities[i % n_ent], complete=i < n_ent) for i in range(n_bio)]
    docs += [writer.dialogue(rng) for _ in range(n_dialogue)]
    docs += [writer.story(rng) for _ in range(n_story)]
    docs += [" ".join(human_sentence(rng, rng.randint(5, 14)) for _ in range(rng.randint(3, 10)))
             for _ in range(n_rest - n_story)]
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------- the world object

_FILES = {"preferences": "preferences.parquet", "rephrases": "rephrases.parquet", "facts": "facts.parquet",
          "kinds": "kinds.parquet", "corpus": "corpus.jsonl", "manifest": "world.json"}


@dataclass
class SyntheticWorld:
    config: SyntheticConfig
    preferences: pl.DataFrame   # PREFERENCE_SCHEMA, split in {"train","test"}, source="synthetic"
    rephrases: pl.DataFrame     # REPHRASE_SCHEMA: the four *_gpt* rephrase types, from templates
    facts: pl.DataFrame         # FACTS_SCHEMA: every fact; a row per asking example where asked
    corpus: list[str]           # pretraining documents
    kinds: pl.DataFrame         # KINDS_SCHEMA: the rejected answer's kind per example

    def example_facts(self) -> pl.DataFrame:
        """example_id -> entity, attribute and correct value asked by that example's (last) question."""
        return (self.facts.filter(pl.col("example_id").is_not_null())
                .select("example_id", "entity", "attribute", "value").sort("example_id"))

    def save(self, directory: Path) -> None:
        """Parquet tables + JSONL corpus, each written atomically; the manifest goes last and records row
        counts, so `load` notices a directory left half-updated by a crash."""
        directory = Path(directory)
        for name in ("preferences", "rephrases", "facts", "kinds"):
            write_parquet(getattr(self, name), directory / _FILES[name])
        write_bytes("".join(json.dumps({"text": d}) + "\n" for d in self.corpus).encode(),
                    directory / _FILES["corpus"])
        write_json({"config": asdict(self.config), "rows": self._counts()}, directory / _FILES["manifest"])

    def _counts(self) -> dict[str, int]:
        return {"preferences": self.preferences.height, "rephrases": self.rephrases.height,
                "facts": self.facts.height, "kinds": self.kinds.height, "corpus": len(self.corpus)}

    @classmethod
    def load(cls, directory: Path) -> "SyntheticWorld":
        directory = Path(directory)
        for f in _FILES.values():
            if not (directory / f).exists():
                raise DataValidationError(str(directory), f"missing {f}: save the synthetic world first")
        manifest = json.loads((directory / _FILES["manifest"]).read_text())
        try:
            config = SyntheticConfig(**manifest["config"])
        except TypeError as e:
            raise DataValidationError(str(directory / _FILES["manifest"]), f"bad config: {e}", field="config") from e
        tables = {}
        for name, schema in (("preferences", PREFERENCE_SCHEMA), ("rephrases", REPHRASE_SCHEMA),
                             ("facts", FACTS_SCHEMA), ("kinds", KINDS_SCHEMA)):
            path = directory / _FILES[name]
            df = pl.read_parquet(path)
            try:
                tables[name] = conform(df, schema, what=str(path))
            except ValueError as e:
                raise DataValidationError(str(path), str(e)) from e
        corpus = [json.loads(line)["text"]
                  for line in (directory / _FILES["corpus"]).read_text().splitlines() if line]
        world = cls(config, tables["preferences"], tables["rephrases"], tables["facts"], corpus, tables["kinds"])
        if world._counts() != manifest["rows"]:
            raise DataValidationError(str(directory), f"row counts {world._counts()} do not match the manifest "
                                      f"{manifest['rows']}: the directory was only partly written; save again")
        return world


__all__ = ["SyntheticConfig", "SyntheticWorld", "generate", "human_sentence", "sentences", "REPHRASE_TYPES",
           "REPHRASE_SCHEMA", "FACTS_SCHEMA", "KINDS_SCHEMA", "REJECTED_KINDS", "ATTRIBUTES", "VALUES", "CORPUS_VERSION"]
