"""Offline probe-set builder: one row per (probe prompt, response type), PROBE_SCHEMA.

Probe prompts are TRAIN-split examples (the paper probes training prompts). Each response type has its own
seeded generator (`random.Random(f"{seed}:{type}")`), so adding or dropping a type never changes the draws of
the others. Types that need something not given (rephrases, a tokenizer, a model, a test split) are skipped and
reported in `ProbeBuild.skipped` rather than silently missing.

Differences from the reference implementation (docs/glossary.md#departures), on purpose:
- irr_test comes from the held-out "test" split (the reference drew it from the probe's own split);
- generated texts (irr_hum, random_permute, random_nonhum) keep y+'s leading whitespace, so the first token is
  tokenized as in y+ (the reference's missing space biased the first token);
- every draw is seeded (the reference never seeded `random`).
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

from ldpipe.errors import DataValidationError, SpecError
from ldpipe.schema import CORE_RESPONSE_TYPES, PREFERENCE_SCHEMA, PROBE_SCHEMA, require_frame

REPHRASE_TYPES = ("chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat")
MODEL_TYPES = ("chosen_initial", "chosen_selfr")
MODEL_STAGE_TYPES = (*MODEL_TYPES, "random_tokens")   # built by the model-probe stage (need the base model)
OFFLINE_TYPES = ("chosen", "rejected", *REPHRASE_TYPES, "irr_train", "irr_test", "irr_hum", "random_permute",
                 "random_nonhum", "random_tokens")
_REPHRASE_COLUMNS = ("example_id", "response_type", "response", "provenance")
_MAX_REDRAWS = 100


@dataclass(frozen=True)
class ProbeRecipe:
    n_examples: int = 50
    selection: Literal["first", "random"] = "random"   # the reference takes the first N
    seed: int = 0
    types: tuple[str, ...] = OFFLINE_TYPES

    def validate(self) -> None:
        if self.n_examples < 1:
            raise SpecError(f"probe recipe: n_examples must be >= 1, got {self.n_examples}")
        if self.selection not in ("first", "random"):
            raise SpecError(f"probe recipe: selection must be 'first' or 'random', got {self.selection!r}")
        unknown = [t for t in self.types if t not in CORE_RESPONSE_TYPES]
        if unknown:
            raise SpecError(f"probe recipe: unknown response type(s) {unknown}; known: {list(CORE_RESPONSE_TYPES)}")
        if len(set(self.types)) != len(self.types):
            raise SpecError(f"probe recipe: duplicate response types in {list(self.types)}")


@dataclass
class ProbeBuild:
    probes: pl.DataFrame        # PROBE_SCHEMA, sorted by (example_id, response_type)
    skipped: dict[str, str] = field(default_factory=dict)  # response_type -> why it was not built


# ----------------------------------------------------------------------------- text helpers

def _lead(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def _words(text: str) -> list[str]:
    """The reference's word split: strip, then split on single spaces. Used to MAKE texts (shuffles, truncations,
    y_hum's length), so the built-in probe set stays as it was; checks and statistics use `split_words`."""
    return text.strip().split(" ")


def split_words(text: str) -> list[str]:
    """Words as the checks and statistics count them: runs of non-whitespace (str.split()), so a text with double
    spaces or line breaks (as real reference files have) counts the same words however it is spaced."""
    return text.split()


def shuffle_words(text: str, rng: random.Random) -> str:
    """A word-level permutation of `text` that differs from it whenever it has two distinct words."""
    words = _words(text)
    out = list(words)
    if len(set(words)) > 1:
        for _ in range(_MAX_REDRAWS):
            rng.shuffle(out)
            if out != words:
                break
        else:  # astronomically unlikely; swap two distinct words so the result still differs
            i = next(k for k in range(1, len(words)) if words[k] != words[0])
            out = list(words)
            out[0], out[i] = out[i], out[0]
    return _lead(text) + " ".join(out)


def _is_permutation(a: str, b: str) -> bool:
    return sorted(split_words(a)) == sorted(split_words(b))


# ----------------------------------------------------------------------------- validation

def _validate_preferences(prefs: Any) -> pl.DataFrame:
    src = "preferences"
    prefs = require_frame(prefs, PREFERENCE_SCHEMA, source=src)
    for col in ("example_id", "split", "prompt", "chosen", "rejected"):
        if prefs[col].dtype != pl.String:
            raise DataValidationError(src, f"expected strings, got {prefs[col].dtype}", field=col)
        nulls = prefs[col].is_null().arg_true()
        if len(nulls):
            raise DataValidationError(src, "null value", row=int(nulls[0]), field=col)
    dup = prefs["example_id"].is_duplicated().arg_true()
    if len(dup):
        raise DataValidationError(src, f"duplicate example_id {prefs['example_id'][int(dup[0])]!r}",
                                  row=int(dup[0]), field="example_id")
    bad = (~prefs["split"].is_in(["train", "test"])).arg_true()
    if len(bad):
        raise DataValidationError(src, f"split must be 'train' or 'test', got {prefs['split'][int(bad[0])]!r}",
                                  row=int(bad[0]), field="split")
    return prefs


def _rephrase_lookup(rephrases: Any, wanted: list[str], ids: list[str]) -> tuple[dict, dict[str, str]]:
    """{(example_id, type): (response, provenance)} for the wanted types, and the types it cannot supply."""
    src = "rephrases"
    rephrases = require_frame(rephrases, _REPHRASE_COLUMNS, source=src)
    df = rephrases.with_row_index("_row").filter(pl.col("response_type").is_in(wanted)
                                                  & pl.col("example_id").is_in(ids))
    lookup: dict[tuple[str, str], tuple[str, str]] = {}
    for row in df.iter_rows(named=True):
        key = (row["example_id"], row["response_type"])
        if row["response"] is None:
            raise DataValidationError(src, "null response", row=row["_row"], field="response")
        if key in lookup:
            raise DataValidationError(src, f"duplicate rephrase for {key}", row=row["_row"], field="response_type")
        lookup[key] = (row["response"], row["provenance"] or "rephrases")
    skipped: dict[str, str] = {}
    for t in wanted:
        have = {i for (i, tt) in lookup if tt == t}
        if not have:
            skipped[t] = "the rephrases table has no rows of this type for the probe examples"
        elif len(have) < len(ids):
            gap = next(i for i in ids if i not in have)
            raise DataValidationError(src, f"no {t!r} rephrase for probe example {gap!r} "
                                      f"({len(ids) - len(have)} of {len(ids)} missing)", field="example_id")
    return lookup, skipped


# ----------------------------------------------------------------------------- token sampler

class _TokenSampler:
    """Uniform random token ids (special tokens excluded) for a HF tokenizer or a raw `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Any):
        if hasattr(tokenizer, "all_special_ids"):  # transformers tokenizer
            self._encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False,
                                                        clean_up_tokenization_spaces=False)
            size, special = len(tokenizer), set(tokenizer.all_special_ids)
        elif hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
            self._encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
            size = tokenizer.get_vocab_size(with_added_tokens=True)
            special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
            special = {tokenizer.token_to_id(s) for s in special}
        else:
            raise TypeError(f"random_tokens: unsupported tokenizer type {type(tokenizer).__name__}")
        # Byte-level vocabularies hold lone UTF-8 fragments that decode to U+FFFD; drawing them would make
        # text that re-tokenizes into many more tokens than were drawn, so only tokens that are text count.
        self.ids = [i for i in range(size) if i not in special and "\ufffd" not in self._decode([i])]
        if not self.ids:
            raise DataValidationError("tokenizer", "has no non-special tokens to draw from")

    def sample_like(self, text: str, rng: random.Random) -> str:
        n = len(self._encode(text))
        return self._decode([rng.choice(self.ids) for _ in range(n)])


# ----------------------------------------------------------------------------- builder

def select_indices(n_total: int, n: int, selection: str, seed: int) -> list[int]:
    """Which of `n_total` rows become probe prompts: the first `n` (the reference) or a seeded random `n`,
    kept in table order so "first" and "random" differ only in which rows are taken."""
    n = min(n, n_total)
    if selection == "first":
        return list(range(n))
    return sorted(random.Random(f"{seed}:selection").sample(range(n_total), n))


def random_token_rows(chosen: Sequence[str], tokenizer: Any, seed: int) -> list[tuple[str, str]]:
    """y_rnd as uniformly random token ids of `tokenizer`, as many as each y+ has, decoded; seeded per type."""
    sampler, r = _TokenSampler(tokenizer), random.Random(f"{seed}:random_tokens")
    return [(sampler.sample_like(y, r), f"uniform_tokens:seed={seed}") for y in chosen]


def build_probe_set(preferences: pl.DataFrame, recipe: ProbeRecipe, *, rephrases: pl.DataFrame | None = None,
                    tokenizer: Any = None,
                    human_sentence: Callable[[random.Random, int], str] | None = None) -> ProbeBuild:
    """Build the probe set for `recipe` from a preference table (PREFERENCE_SCHEMA), fully offline."""
    recipe.validate()
    prefs = _validate_preferences(preferences)
    if human_sentence is None:
        from ldpipe.data.synthetic import human_sentence
    train = prefs.filter(pl.col("split") == "train")
    test = prefs.filter(pl.col("split") == "test")
    if train.height < recipe.n_examples:
        raise DataValidationError("preferences", f"the train split has {train.height} example(s) but the recipe "
                                  f"asks for n_examples={recipe.n_examples}", field="split")
    picked = select_indices(train.height, recipe.n_examples, recipe.selection, recipe.seed)
    probe = train.select(pl.all().gather(picked))
    ids: list[str] = probe["example_id"].to_list()
    prompts: list[str] = probe["prompt"].to_list()
    chosen: list[str] = probe["chosen"].to_list()
    rejected: list[str] = probe["rejected"].to_list()
    n = len(ids)
    types = list(recipe.types)

    def rng(t: str) -> random.Random:
        return random.Random(f"{recipe.seed}:{t}")

    built: dict[str, list[tuple[str, str]]] = {}   # type -> [(response, provenance)] aligned with ids
    skipped: dict[str, str] = {}
    for t in types:
        if t in MODEL_TYPES:
            skipped[t] = "needs a model to generate (built by the model-based probe step)"

    if "chosen" in types:
        built["chosen"] = [(y, "dataset") for y in chosen]
    if "rejected" in types:
        built["rejected"] = [(y, "dataset") for y in rejected]

    wanted = [t for t in REPHRASE_TYPES if t in types]
    if wanted:
        if rephrases is None:
            skipped |= {t: "no rephrases table given (LLM-made rephrases come from an API step)" for t in wanted}
        else:
            lookup, not_there = _rephrase_lookup(rephrases, wanted, ids)
            skipped |= not_there
            for t in wanted:
                if t not in not_there:
                    built[t] = [lookup[(i, t)] for i in ids]

    if "irr_train" in types:
        r = rng("irr_train")
        rows: list[tuple[str, str]] = []
        for u in range(n):
            others = [j for j in range(n) if j != u and chosen[j] != chosen[u]]
            if not others:
                skipped["irr_train"] = (f"probe example {ids[u]!r} has no other probe example with a different "
                                        "chosen response")
                break
            j = r.choice(others)
            rows.append((chosen[j], f"irr_train:{ids[j]}"))
        else:
            built["irr_train"] = rows

    irr_test: list[tuple[str, str]] | None = None
    if "irr_test" in types or "random_nonhum" in types:
        if test.height == 0:
            why = "the preference table has no 'test' split to draw unrelated answers from"
            skipped |= {t: why for t in ("irr_test", "random_nonhum") if t in types}
        else:
            r = rng("irr_test")  # drawn even when only random_nonhum is asked, so both stay consistent
            t_ids, t_chosen = test["example_id"].to_list(), test["chosen"].to_list()
            irr_test = []
            for u in range(n):
                others = [j for j in range(test.height) if t_chosen[j] != chosen[u]] or list(range(test.height))
                j = r.choice(others)
                irr_test.append((t_chosen[j], f"irr_test:{t_ids[j]}"))
            if "irr_test" in types:
                built["irr_test"] = irr_test

    if "irr_hum" in types:
        r = rng("irr_hum")
        built["irr_hum"] = [(_lead(y) + human_sentence(r, len(_words(y))), f"human_sentence:seed={recipe.seed}")
                            for y in chosen]
    if "random_permute" in types:
        r = rng("random_permute")
        built["random_permute"] = [(shuffle_words(y, r), f"shuffle:chosen:seed={recipe.seed}") for y in chosen]
    if "random_nonhum" in types and irr_test is not None:
        r = rng("random_nonhum")
        built["random_nonhum"] = [(shuffle_words(y, r), f"shuffle:{prov}:seed={recipe.seed}")
                                  for y, prov in irr_test]
    if "random_tokens" in types:
        if tokenizer is None:
            skipped["random_tokens"] = "no tokenizer given (needs the model's vocabulary)"
        else:
            built["random_tokens"] = random_token_rows(chosen, tokenizer, recipe.seed)

    records = [(ids[u], t, prompts[u], resp, prov)
               for t, rows in built.items() for u, (resp, prov) in enumerate(rows)]
    probes = pl.DataFrame(records, schema=PROBE_SCHEMA, orient="row").sort("example_id", "response_type")
    return ProbeBuild(probes=probes, skipped={t: skipped[t] for t in types if t in skipped})


# ----------------------------------------------------------------------------- user-declared types

_PLACEHOLDER = re.compile(r"{(source|chosen|rejected|prompt)}")


def custom_type_inputs(ct: Any) -> list[str]:
    """The response types a custom type reads (its source, plus chosen/rejected named in a template)."""
    needed = [ct.source]
    if ct.transform == "template":
        needed += [f for f in ("chosen", "rejected") if "{" + f + "}" in ct.text and f not in needed]
    return needed


def build_custom_type(ct: Any, pool: Mapping[str, pl.DataFrame], *, seed: int) -> tuple[pl.DataFrame | None, str]:
    """Rows of the user-declared type `ct` (a `spec.CustomTypeSpec`) made from the rows in `pool`
    ({type: PROBE_SCHEMA rows}); or (None, why) when an input type is absent. Deterministic: the only random
    transform (shuffle_words) draws from `random.Random(f"{seed}:custom:{name}")`."""
    inputs: dict[str, dict[str, tuple[str, str]]] = {}
    for t in custom_type_inputs(ct):
        frame = pool.get(t)
        if frame is None or frame.is_empty():
            return None, f"its input type {t!r} was not built"
        inputs[t] = {i: (pr, y) for i, pr, y in frame.select("example_id", "prompt", "response").iter_rows()}
    ids = sorted(inputs[ct.source])
    for t, rows in inputs.items():
        gap = next((i for i in ids if i not in rows), None)
        if gap is not None:
            return None, f"its input type {t!r} has no row for probe example {gap!r}"
    rng = random.Random(f"{seed}:custom:{ct.name}")
    records = []
    for i in ids:
        prompt, src = inputs[ct.source][i]
        if ct.transform == "shuffle_words":
            out, how = shuffle_words(src, rng), f"shuffle:seed={seed}"
        elif ct.transform == "reverse_words":
            out, how = _lead(src) + " ".join(reversed(_words(src))), "reverse_words"
        elif ct.transform == "truncate":
            words = _words(src)
            keep = ct.words if ct.words is not None else max(1, math.ceil(ct.fraction * len(words)))
            out, how = _lead(src) + " ".join(words[:keep]), f"truncate:{ct.words or ct.fraction}"
        elif ct.transform == "template":
            values = {"source": src, "prompt": prompt, **{t: rows[i][1] for t, rows in inputs.items()}}
            # placeholders give the stripped texts; the result takes the source's leading whitespace
            body = _PLACEHOLDER.sub(lambda m: values[m.group(1)].strip(), ct.text)
            out, how = _lead(src) + body.strip(), "template"
        else:  # the spec admits only the four above
            raise SpecError(f"custom type {ct.name!r}: unknown transform {ct.transform!r}")
        records.append((i, ct.name, prompt, out, f"custom:{ct.name}:{how}:from={ct.source}"))
    return pl.DataFrame(records, schema=PROBE_SCHEMA, orient="row"), ""


# ----------------------------------------------------------------------------- per-type cache



class TypeCache:
    """Content-addressed store of one response type's rows: `<dir>/<type>-<key>.parquet`, where the key hashes
    everything the rows depend on (recipe, inputs' hashes, builder version). A type whose key is present is
    reused, so adding a type builds only that type and a rerun builds nothing."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def path(self, t: str, key: str) -> Path:
        return self.dir / f"{t}-{key}.parquet"

    def get(self, t: str, key: str) -> pl.DataFrame | None:
        p = self.path(t, key)
        if not p.is_file():
            return None
        try:
            df = pl.read_parquet(p)
        except Exception:  # a damaged entry is rebuilt, not trusted
            return None
        return df if list(df.columns) == list(PROBE_SCHEMA) else None

    def get_info(self, t: str, key: str) -> dict:
        """The build report stored with an entry (e.g. an LLM type's stripped-preamble count); {} if none."""
        p = self.path(t, key).with_suffix(".json")
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    def put(self, t: str, key: str, df: pl.DataFrame, info: dict | None = None) -> None:
        from ldpipe.atomic import write_json, write_parquet

        if info:   # the report first: an entry is only used once its Parquet file exists
            write_json(info, self.path(t, key).with_suffix(".json"))
        write_parquet(df.select(list(PROBE_SCHEMA)), self.path(t, key))
