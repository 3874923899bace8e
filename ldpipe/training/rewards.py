"""Built-in reward functions for on-policy DPO: offline, deterministic, text in -> float out.

A reward is built by a factory in `REWARDS` from a `RewardContext` (the run's training examples, and the frozen
reference model's scoring function), then called as `reward(prompt, response) -> float`; higher is better.

- `synthetic_facts`: for the built-in synthetic world. The prompt's last question names an entity and an
  attribute; the reward counts the facts a response states (value words of the world's attributes and entity
  names, matched as whole words) and scores (correct - wrong) / (correct + wrong) in [-1, 1]: 1 for the right
  value alone, -1 for only wrong values or other entities ("hallucination borrowing"), 0 for a refusal, filler,
  or a true statement about another attribute of the same entity. The facts it checks against are read off the
  training examples (each chosen answer states its question's fact; multi-turn prompts state one more), or given
  in full with `SyntheticFactReward.from_facts(world.facts)`.
- `distinct_ngrams`: any text; minus the share of repeated word bigrams (0 = no repeats), the degenerate
  repetition small policies fall into when sampled. An empty response scores -1.
- `ref_logp_mean`: any text; the mean per-token log-prob of the response (EOS included) under the reference model
  (the run's starting checkpoint): a fluency reward that never ties in practice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from ldpipe.data.synthetic import ANSWERS, ATTRIBUTES, QUESTIONS, SUPPORTS, VALUES
from ldpipe.errors import LdpipeError


class Reward(Protocol):
    def __call__(self, prompt: str, response: str) -> float: ...


@dataclass
class RewardContext:
    examples: Sequence[tuple[str, ...]]     # the run's training examples, prompt first
    # mean per-token log pi_ref(response | prompt) of a batch, from the frozen reference (None: not available)
    ref_logp_mean: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None


_NAME = r"(?P<e>[A-Z][a-z]+)"
_TURN = re.compile(r"Human: (?P<q>.*?)\n\nAssistant:(?P<a>.*?)(?=\n\nHuman: |\Z)", re.S)


_QUESTION_RES = [(a, re.compile(re.escape(t).replace(r"\{e\}", _NAME))) for a in ATTRIBUTES for t in QUESTIONS[a]]
_VALUE_RES = {a: [(v, re.compile(rf"\b{re.escape(v)}\b", re.I)) for v in vals] for a, vals in VALUES.items()}
_NAME_RE = re.compile(r"\b[A-Z][a-z]+\b")
# the SFT answer wordings of the friend fact, to read the friend's name off a chosen answer
_FRIEND_RES = [re.compile(re.escape(t).replace(r"\{e\}", _NAME).replace(r"\{v\}", r"(?P<v>[A-Z][a-z]+)"))
               for t in ANSWERS["friend"] + SUPPORTS["friend"]]


def parse_question(question: str) -> tuple[str, str] | None:
    """(entity, attribute) of a synthetic-world question, or None when it is not one."""
    q = question.strip()
    for attr, rx in _QUESTION_RES:
        m = rx.fullmatch(q)
        if m:
            return m.group("e"), attr
    return None


def _turns(prompt: str) -> list[tuple[str, str]]:
    """(question, answer) per Human/Assistant turn; the last answer is empty."""
    return [(m.group("q"), m.group("a").strip()) for m in _TURN.finditer(prompt)]


@dataclass
class SyntheticFactReward:
    """Fact-based reward for the synthetic world (see the module docstring)."""

    facts: dict[str, dict[str, str]]                 # entity -> attribute -> true value
    names: set[str] = field(default_factory=set)     # every known entity name

    def __post_init__(self) -> None:
        self.names |= set(self.facts) | {row["friend"] for row in self.facts.values() if "friend" in row}

    @classmethod
    def from_facts(cls, facts) -> "SyntheticFactReward":
        """From a facts table (FACTS_SCHEMA: entity, attribute, value)."""
        table: dict[str, dict[str, str]] = {}
        for e, a, v in facts.select("entity", "attribute", "value").iter_rows():
            table.setdefault(e, {})[a] = v
        return cls(table)

    @classmethod
    def from_examples(cls, examples: Sequence[tuple[str, ...]]) -> "SyntheticFactReward":
        """Facts read off (prompt, chosen, ...) examples: each asked fact's value from its chosen answer, plus
        the facts that multi-turn prompts' earlier answers state."""
        table: dict[str, dict[str, str]] = {}
        parsed = 0
        for ex in examples:
            turns = _turns(ex[0])
            if not turns:
                continue
            if len(ex) > 1:
                turns[-1] = (turns[-1][0], ex[1])
            for q, answer in turns:
                asked = parse_question(q)
                if asked is None or not answer:
                    continue
                parsed += 1
                e, a = asked
                value = _stated_value(answer, e, a)
                if value is not None:
                    table.setdefault(e, {}).setdefault(a, value)
        if not parsed:
            raise LdpipeError("reward 'synthetic_facts' found no synthetic-world question in the training "
                              "prompts; it scores only the built-in synthetic dataset (use another reward or a judge)")
        return cls(table)

    def __call__(self, prompt: str, response: str) -> float:
        turns = _turns(prompt)
        asked = parse_question(turns[-1][0]) if turns else None
        if asked is None:
            return 0.0
        e, a = asked
        known = self.facts.get(e, {})
        correct = wrong = 0
        for b, regexes in _VALUE_RES.items():
            for v, rx in regexes:
                if not rx.search(response):
                    continue
                if b == a:
                    truth = known.get(a)
                    if truth is None:
                        continue
                    correct, wrong = correct + (v == truth), wrong + (v != truth)
                elif b in known and known[b] != v:
                    wrong += 1      # a false statement about another attribute of the entity
        for name in set(_NAME_RE.findall(response)) & self.names - {e}:
            if a == "friend" and known.get("friend") == name:
                correct += 1
            elif a == "friend" or known.get("friend") != name:
                wrong += 1          # another entity: a wrong friend, or facts borrowed from someone else
        total = correct + wrong
        return (correct - wrong) / total if total else 0.0


def _stated_value(answer: str, entity: str, attribute: str) -> str | None:
    """The one value of `attribute` an answer states (the friend: from the SFT answer wordings), else None."""
    if attribute == "friend":
        for rx in _FRIEND_RES:
            m = rx.search(answer)
            if m and m.group("e") == entity and m.group("v") != entity:
                return m.group("v")
        return None
    found = [v for v, rx in _VALUE_RES[attribute] if rx.search(answer)]
    return found[0] if len(found) == 1 else None


def repeated_ngram_share(words: Sequence[str], n: int = 2) -> float:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_ngrams(prompt: str, response: str) -> float:
    words = response.lower().split()
    return -1.0 if not words else -repeated_ngram_share(words)


@dataclass
class RefLogpReward:
    """Mean per-token log-prob under the reference; `score_batch` scores many replies in one forward."""
    ref_logp_mean: Callable[[Sequence[str], Sequence[str]], list[float]]

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(x) for x in self.ref_logp_mean(prompts, responses)]

    def __call__(self, prompt: str, response: str) -> float:
        return self.score_batch([prompt], [response])[0]


def _ref_logp(ctx: RewardContext) -> Reward:
    if ctx.ref_logp_mean is None:
        raise LdpipeError("reward 'ref_logp_mean' needs the reference model: use it in an on-policy run")
    return RefLogpReward(ctx.ref_logp_mean)


# name -> factory(context) -> reward
REWARDS: dict[str, Callable[[RewardContext], Reward]] = {
    "synthetic_facts": lambda ctx: SyntheticFactReward.from_examples(ctx.examples),
    "distinct_ngrams": lambda ctx: distinct_ngrams,
    "ref_logp_mean": _ref_logp,
}


def make_reward(name: str, context: RewardContext | Iterable[tuple[str, ...]]) -> Reward:
    """The built-in reward `name`; `context` may be just the training examples."""
    if name not in REWARDS:
        raise LdpipeError(f"unknown reward {name!r}; built-in rewards: {sorted(REWARDS)}")
    ctx = context if isinstance(context, RewardContext) else RewardContext(list(context))
    return REWARDS[name](ctx)


__all__ = ["REWARDS", "RefLogpReward", "Reward", "RewardContext", "SyntheticFactReward", "distinct_ngrams",
           "make_reward", "parse_question", "repeated_ngram_share"]
