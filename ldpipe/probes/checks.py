"""Probe-set quality: word lists and overlaps (y-/y+ similarity), and the checks of a probe set (every type for every
prompt, valid perturbations, lengths)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import polars as pl

from ldpipe.errors import DataValidationError
from ldpipe.probes.build import REPHRASE_TYPES, _is_permutation
from ldpipe.schema import PROBE_SCHEMA

# ----------------------------------------------------------------------------- checks

_WORD = re.compile(r"[a-z0-9']+")


def word_list(text: str) -> list[str]:
    """The words of a text as the analyses count them: lower-cased runs of [a-z0-9']."""
    return _WORD.findall(text.lower())


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the word sets (word_list) of two texts (0 when both are empty)."""
    x, y = set(word_list(a)), set(word_list(b))
    return len(x & y) / len(x | y) if x | y else 0.0


def pair_similarity(probes: pl.DataFrame, experiment: str, kinds: pl.DataFrame | None = None) -> pl.DataFrame:
    """PROBE_PAIRS_SCHEMA rows: per probe prompt with both y+ and y-, their word overlap and (from `kinds`, an
    example_id -> rejected_kind table, when the dataset records one) the kind of the rejected answer."""
    from ldpipe.schema import PROBE_PAIRS_SCHEMA

    wide = {t: dict(probes.filter(pl.col("response_type") == t).select("example_id", "response").iter_rows())
            for t in ("chosen", "rejected")}
    ids = sorted(set(wide["chosen"]) & set(wide["rejected"]))
    label = dict(kinds.select("example_id", "rejected_kind").iter_rows()) if kinds is not None else {}
    return pl.DataFrame({"experiment": [experiment] * len(ids), "example_id": ids,
                         "rejected_kind": [label.get(i) for i in ids],
                         "word_overlap": [word_overlap(wide["chosen"][i], wide["rejected"][i]) for i in ids]},
                        schema=PROBE_PAIRS_SCHEMA)


def check_probe_set(probes: pl.DataFrame, types: Sequence[str]) -> dict:
    """Measured facts about a probe set, for asset checks: gaps, shuffle validity, leaks, lengths."""
    src = "probes"
    missing_cols = [c for c in PROBE_SCHEMA if c not in probes.columns]
    if missing_cols:
        raise DataValidationError(src, f"missing column(s) {missing_cols}; have {probes.columns}",
                                  field=missing_cols[0])
    ids = probes["example_id"].unique().sort().to_list()
    by_key: dict[tuple[str, str], str] = {}
    duplicates = 0
    for i, t, resp in probes.select("example_id", "response_type", "response").iter_rows():
        if (i, t) in by_key:
            duplicates += 1
        by_key[(i, t)] = resp
    gaps = [{"example_id": i, "response_type": t} for i in ids for t in types if (i, t) not in by_key]
    prompt_mismatch = probes.group_by("example_id").agg(pl.col("prompt").n_unique().alias("k")) \
        .filter(pl.col("k") > 1).height

    def pairs(a: str, b: str) -> list[tuple[str, str]]:
        return [(by_key[(i, a)], by_key[(i, b)]) for i in ids if (i, a) in by_key and (i, b) in by_key]

    shuffle_pairs = pairs("random_permute", "chosen") + pairs("random_nonhum", "irr_test")
    shuffle_failures = sum(not _is_permutation(x, y) for x, y in shuffle_pairs)
    rephrase_pairs = [p for t in REPHRASE_TYPES for p in pairs(t, "chosen" if t.startswith("chosen") else "rejected")]
    lengths = (probes.with_columns(pl.col("response").str.count_matches(r"\S+").alias("w"),
                                   pl.col("response").str.len_chars().alias("c"),
                                   (pl.col("response").str.strip_chars() == "").fill_null(True).alias("e"))
               .group_by("response_type")
               .agg(pl.col("w").mean().alias("mean"), pl.col("w").min().alias("min"), pl.col("w").max().alias("max"),
                    pl.col("c").mean().alias("chars_mean"), pl.col("c").max().alias("chars_max"),
                    pl.col("e").sum().alias("empty"), pl.len().alias("rows"))
               .sort("response_type"))
    return {
        "n_examples": len(ids),
        "n_rows": probes.height,
        "types": list(types),
        "missing": gaps,
        "n_missing": len(gaps),
        "duplicates": duplicates,
        "prompt_mismatch": prompt_mismatch,
        "shuffles_are_permutations": shuffle_failures == 0,
        "shuffle_checked": len(shuffle_pairs),
        "shuffle_failures": shuffle_failures,
        "irr_train_equals_chosen": sum(x == y for x, y in pairs("irr_train", "chosen")),
        "rephrases_identical_to_source": sum(x == y for x, y in rephrase_pairs),
        "selfr_identical_to_chosen": sum(x == y for x, y in pairs("chosen_selfr", "chosen")),
        "empty_responses": int(probes["response"].str.strip_chars().eq("").fill_null(True).sum()),
        "empty_by_type": {r["response_type"]: int(r["empty"]) for r in lengths.iter_rows(named=True) if r["empty"]},
        "length_words": {r["response_type"]: {"mean": round(r["mean"], 2), "min": r["min"], "max": r["max"],
                                              "rows": r["rows"]} for r in lengths.iter_rows(named=True)},
        "length_chars": {r["response_type"]: {"mean": round(r["chars_mean"], 1), "max": r["chars_max"]}
                         for r in lengths.iter_rows(named=True)},
    }


MOSTLY_EMPTY_SHARE = 0.5   # model_types_informative fails when a model-made type is empty for more than this share
_SYMBOL = {"chosen_initial": "y_init", "chosen_selfr": "y_selfr"}
_WHY_EMPTY = {"chosen_initial": "the base model ends its reply at once",
              "chosen_selfr": "the base model ends its rephrase at once"}


def model_types_verdict(report: dict, types: Sequence[str]) -> tuple[bool, str, dict]:
    """The check `model_types_informative` over the model-made `types` of a `check_probe_set` report: (passed, the
    verdict in one line, metadata; `mostly_empty` lists the types that failed for being empty).

    It fails when a model-made type is empty for MORE THAN HALF of the probe prompts (MOSTLY_EMPTY_SHARE), e.g.
    "y_init empty for 24 of 24 prompts: the base model ends its reply at once": that type's curves would only
    score the end-of-text token. A few empty replies pass (the reference's own file has 21 empty y_init in 500
    rows). It also fails when y_selfr copies y+ verbatim for any prompt (then it is no rephrase)."""
    rows = {t: int(w["rows"]) for t, w in report.get("length_words", {}).items()}
    empty = {t: n for t, n in report.get("empty_by_type", {}).items() if t in types}
    identical = int(report.get("selfr_identical_to_chosen", 0)) if "chosen_selfr" in types else 0
    failed, noted, mostly_empty = [], [], []
    for t in types:
        n, e = rows.get(t, 0), empty.get(t, 0)
        line = f"{_SYMBOL.get(t, t)} empty for {e} of {n} prompts"
        if n and e > MOSTLY_EMPTY_SHARE * n:
            mostly_empty.append(t)
            failed.append(f"{line}: {_WHY_EMPTY[t]}" if t in _WHY_EMPTY else line)
        elif e:
            noted.append(line)
    if identical:
        failed.append(f"y_selfr copies y+ verbatim for {identical} of {rows.get('chosen_selfr', 0)} prompts")
    if failed:
        verdict = "; ".join(failed)
    elif noted:
        verdict = "; ".join(noted) + f" (at most {MOSTLY_EMPTY_SHARE:.0%} may be)"
    else:
        verdict = "no empty model-made response" + ("" if types else " (no model-made type)")
    return not failed, verdict, {"empty_by_type": empty, "mostly_empty": mostly_empty,
                                 "selfr_identical_to_chosen": identical, "mostly_empty_share": MOSTLY_EMPTY_SHARE}


def length_table(report: dict) -> pl.DataFrame:
    """Per-type length statistics of a `check_probe_set` report, as a table for metadata."""
    words, chars, empty = report.get("length_words", {}), report.get("length_chars", {}), report.get("empty_by_type", {})
    return pl.DataFrame([{"response_type": t, "rows": w["rows"], "words_mean": float(w["mean"]), "words_min": w["min"],
                          "words_max": w["max"], "chars_mean": float(chars.get(t, {}).get("mean", 0.0)),
                          "empty": empty.get(t, 0)} for t, w in sorted(words.items())])
