"""Free-text remarks of the synthetic world: the part of an answer that a model cannot memorise.

Real chat answers continue after the fact with free text whose next word is genuinely uncertain, and word
choice in real text is skewed: a few wordings are common, most are rare (Zipf's law). A remark here is one
sentence drawn from a small grammar with real branching at every slot:

    [intro] subject verb object [tail].        e.g. "By the way, the neighbors talk about the garden a lot."
    [intro] subject is/are adjective about object [tail].

Every slot option is a (usual wording, same-meaning synonym) pair, and options are ranked by how common they
are. Two writing styles draw the options:
- "usual" (chosen answers and the pretraining corpus): option k of n is drawn with probability ∝ 1/(k+1)
  (Zipf, exponent 1). Even a model that knows the language perfectly then puts most mass on the top option,
  so the teacher-forced argmax path y* and the written answer y+ differ at the remark's branching points
  (expected log π(y*) − log π(y+) = log p_max + entropy ≈ 0.8 nats per 10-option slot);
- "odd" (rejected answers): every option equally likely. Plausible text in the same language, with word
  choices the model finds unlikely: the off-policy y− of preference data, which SFT on y+ leaves in a valley.

A remark is kept as its choices, so the world can render it three ways: as written, with every option
replaced by its synonym (a meaning-keeping rephrase), or with every option replaced by another option of the
same slot (a format-keeping rephrase that changes the meaning).

No option contains a fact value of the world or another entity's name, so remarks never state a fact; the
subject slot may name the answer's own entity ("{e}").
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

ZIPF_EXPONENT = 1.0
STYLES = ("usual", "odd")

# Each option: (usual wording, synonym). Ordered by rank: the first is the most common.
INTROS: tuple[tuple[str, str], ...] = (
    ("", ""), ("I think", "I feel"), ("Also,", "Besides,"), ("As I understand it,", "To my knowledge,"),
    ("I believe", "I suppose"), ("By the way,", "Incidentally,"), ("In fact,", "Indeed,"),
    ("Honestly,", "Frankly,"), ("I heard that", "I was told that"), ("To be fair,", "In all fairness,"),
)
# (wording, synonym, plural?)
SUBJECTS: tuple[tuple[str, str, bool], ...] = (
    ("{e}", "{e}", False), ("they", "they", True), ("people", "folks", True),
    ("the neighbors", "the people next door", True), ("everyone", "everybody", False),
    ("the family of {e}", "the household of {e}", False), ("friends of {e}", "pals of {e}", True),
    ("visitors", "guests", True), ("the children", "the kids", True), ("an old classmate", "a former classmate", False),
)
# (singular, plural, synonym singular, synonym plural)
VERBS: tuple[tuple[str, str, str, str], ...] = (
    ("likes", "like", "is fond of", "are fond of"), ("talks about", "talk about", "speaks about", "speak about"),
    ("enjoys", "enjoy", "relishes", "relish"), ("thinks about", "think about", "reflects on", "reflect on"),
    ("remembers", "remember", "recalls", "recall"), ("asks about", "ask about", "inquires about", "inquire about"),
    ("chats about", "chat about", "gossips about", "gossip about"),
    ("dreams about", "dream about", "fantasizes about", "fantasize about"),
    ("laughs about", "laugh about", "chuckles about", "chuckle about"),
    ("worries about", "worry about", "frets about", "fret about"),
)
ADJECTIVES: tuple[tuple[str, str], ...] = (
    ("glad", "pleased"), ("curious", "inquisitive"), ("proud", "boastful"), ("excited", "thrilled"),
    ("serious", "earnest"), ("calm", "relaxed"), ("nervous", "anxious"), ("picky", "fussy"),
    ("hopeful", "optimistic"), ("modest", "humble"),
)
# Objects depend on what was asked, so a remark still fits its prompt.
OBJECTS: dict[str, tuple[tuple[str, str], ...]] = {
    "home": (("the neighborhood", "the local area"), ("the old house", "the aged dwelling"),
             ("the garden", "the yard"), ("the quiet streets", "the calm roads"), ("the view", "the scenery"),
             ("the market square", "the public square"), ("the weather there", "the climate there"),
             ("the local shops", "the nearby stores"), ("the long winters", "the lengthy winters"),
             ("the front porch", "the entrance porch")),
    "food": (("warm meals", "hot dishes"), ("dinner", "supper"), ("the kitchen", "the cookhouse"),
             ("new recipes", "fresh recipes"), ("breakfast", "the morning meal"), ("the market", "the bazaar"),
             ("snacks", "nibbles"), ("lunch with friends", "midday meals with pals"),
             ("the dinner table", "the supper table"), ("sweet desserts", "sugary treats")),
    "color": (("bright clothes", "vivid garments"), ("paintings", "artworks"), ("the walls", "the partitions"),
              ("flowers", "blossoms"), ("new shoes", "fresh footwear"), ("the evening sky", "the dusk sky"),
              ("painted doors", "colored doors"), ("soft scarves", "gentle shawls"), ("the sunset", "the dusk"),
              ("old photos", "aged pictures")),
    "skill": (("practice", "training"), ("the next show", "the coming performance"), ("lessons", "classes"),
              ("the old days", "times past"), ("a contest", "a competition"), ("new tricks", "fresh techniques"),
              ("the crowd", "the audience"), ("hard work", "tough effort"), ("an old mentor", "a former coach"),
              ("the festival", "the fair")),
    "pet": (("long walks", "lengthy strolls"), ("feeding time", "mealtime"), ("the vet", "the animal doctor"),
            ("the backyard", "the rear garden"), ("toys", "playthings"), ("naps in the sun", "dozes in the sunlight"),
            ("the park", "the public gardens"), ("a warm bed", "a cozy bed"), ("bath day", "wash day"),
            ("a new collar", "a fresh collar")),
    "job": (("the workshop", "the workroom"), ("long days", "lengthy days"), ("the customers", "the clients"),
            ("the boss", "the manager"), ("the tools", "the equipment"), ("a day off", "a free day"),
            ("the pay", "the wages"), ("the early shift", "the morning shift"), ("the coworkers", "the colleagues"),
            ("a promotion", "an advancement")),
    "friend": (("old times", "the past"), ("weekend plans", "plans for the weekend"), ("long talks", "lengthy chats"),
               ("shared secrets", "private secrets"), ("board games", "table games"),
               ("trips together", "journeys together"), ("birthday parties", "birthday celebrations"),
               ("letters", "notes"), ("the summer", "summertime"), ("school days", "student days")),
}
TAILS: tuple[tuple[str, str], ...] = (
    ("", ""), ("a lot", "very much"), ("every day", "daily"), ("these days", "nowadays"),
    ("quite often", "fairly often"), ("on weekends", "on Saturdays and Sundays"), ("more than anything", "above all"),
    ("all the time", "constantly"), ("now and then", "occasionally"), ("in the evening", "after sunset"),
)
# (template, weight rank): "verb" remarks are the common shape
SHAPES = ("verb", "adjective")
# Remarks per answer: 0..4 with these weights (most chat answers add a sentence or two, a few ramble on).
N_REMARK_WEIGHTS = (0.15, 0.35, 0.3, 0.15, 0.05)


def _zipf(n: int) -> list[float]:
    return [1.0 / (k + 1) ** ZIPF_EXPONENT for k in range(n)]


def pick(rng: random.Random, n: int, style: str) -> int:
    """An option index of a slot with n options, in the given style (module docstring)."""
    if style == "usual":
        return rng.choices(range(n), weights=_zipf(n))[0]
    if style == "odd":
        return rng.randrange(n)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


@dataclass(frozen=True)
class Remark:
    """One remark sentence as its slot choices (indices into the option tables above)."""
    topic: str          # the attribute whose OBJECTS it talks about
    shape: int          # index into SHAPES
    intro: int
    subject: int
    predicate: int      # VERBS index ("verb" shape) or ADJECTIVES index ("adjective" shape)
    obj: int
    tail: int


def draw_remark(rng: random.Random, topic: str, style: str, *, entity_free: bool = False) -> Remark:
    """One remark about `topic` (an attribute). `entity_free`: the subject never names the entity."""
    subjects = [i for i, s in enumerate(SUBJECTS) if not (entity_free and "{e}" in s[0])]
    shape = pick(rng, len(SHAPES), style)
    preds = VERBS if SHAPES[shape] == "verb" else ADJECTIVES
    return Remark(topic, shape, pick(rng, len(INTROS), style), subjects[pick(rng, len(subjects), style)],
                  pick(rng, len(preds), style), pick(rng, len(OBJECTS[topic]), style), pick(rng, len(TAILS), style))


def draw_remarks(rng: random.Random, topic: str, style: str, *, entity_free: bool = False,
                 n: int | None = None) -> list[Remark]:
    """A chat answer's remarks: `n`, or a count drawn from N_REMARK_WEIGHTS."""
    if n is None:
        n = rng.choices(range(len(N_REMARK_WEIGHTS)), weights=N_REMARK_WEIGHTS)[0]
    return [draw_remark(rng, topic, style, entity_free=entity_free) for _ in range(n)]


def render(r: Remark, entity: str, *, synonyms: bool = False) -> str:
    """The remark as a sentence; with `synonyms`, every option in its same-meaning wording."""
    k = 1 if synonyms else 0
    subj, subj_syn, plural = SUBJECTS[r.subject]
    words = [INTROS[r.intro][k], subj_syn if synonyms else subj]
    if SHAPES[r.shape] == "verb":
        sg, pl, syn_sg, syn_pl = VERBS[r.predicate]
        words.append((syn_pl if plural else syn_sg) if synonyms else (pl if plural else sg))
    else:
        words += ["are" if plural else "is", ADJECTIVES[r.predicate][k], "about"]
    words += [OBJECTS[r.topic][r.obj][k], TAILS[r.tail][k]]
    text = " ".join(w for w in words if w).format(e=entity) + "."
    return text[:1].upper() + text[1:]


def reformat(rng: random.Random, r: Remark, *, entity_free: bool = False) -> Remark:
    """Same shape, every slot changed to another option (an empty intro or tail stays empty, a filled one
    stays filled): the format kept, the meaning changed."""
    def other(i: int, n: int, *, keep_empty: bool = False) -> int:
        if keep_empty and i == 0:
            return 0
        choices = [j for j in range(1 if keep_empty else 0, n) if j != i]
        return rng.choice(choices)

    preds = VERBS if SHAPES[r.shape] == "verb" else ADJECTIVES
    subjects = [i for i, s in enumerate(SUBJECTS) if i != r.subject and not (entity_free and "{e}" in s[0])]
    return Remark(r.topic, r.shape, other(r.intro, len(INTROS), keep_empty=True), rng.choice(subjects),
                  other(r.predicate, len(preds)), other(r.obj, len(OBJECTS[r.topic])),
                  other(r.tail, len(TAILS), keep_empty=True))


def join(sentences: Sequence[str]) -> str:
    return " ".join(s for s in sentences if s)


def vocabulary() -> set[str]:
    """Every lower-cased word any remark can contain (besides the entity's name)."""
    out: set[str] = {"is", "are", "about"}
    tables: list = [INTROS, ADJECTIVES, TAILS, *OBJECTS.values()]
    for table in tables:
        for opt in table:
            for text in opt:
                out.update(text.lower().replace(",", "").split())
    for s in SUBJECTS:
        for text in s[:2]:
            out.update(text.lower().replace("{e}", "").split())
    for v in VERBS:
        for text in v:
            out.update(text.lower().split())
    return out


__all__ = ["Remark", "STYLES", "ZIPF_EXPONENT", "draw_remark", "draw_remarks", "join", "pick", "reformat", "render",
           "vocabulary"]
