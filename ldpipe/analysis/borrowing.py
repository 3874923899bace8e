"""Hallucination "borrowing" in generations (docs/glossary.md#borrowing): does the model answer prompt u with
material from OTHER prompts' training answers?

The probability side is the view sql/borrowing.sql (y_{j≠u} = irr_train rising with y+ during SFT). Here, per
checkpoint, greedy generations for trained (probe) prompts and held-out prompts are scored:

n-gram borrowing (any dataset). Words are lower-cased runs of [a-z0-9']; G is the set of distinct word n-grams of
the generation. own = n-grams of the prompt and of the prompt's own chosen answer; other = n-grams of the chosen
answer of some train-split prompt j ≠ u. borrowed = G ∩ other \\ own.
    borrow_share = |borrowed| / |G|,  own_share = |G ∩ own| / |G|  (null when G is empty)
So a generation that copies another prompt's answer (sharing no n-gram with its own) scores 1.0, one that
copies its own answer scores 0.0. For a held-out prompt every train prompt is "other".

Fact borrowing (built-in synthetic world only). Fact values are the `value` strings of the world's facts table
(friend values are entity names). M = the distinct fact values mentioned in the generation (whole-word matches,
longest first, no overlaps; the prompt's own entity name is not counted). A value is foreign when it is a fact
value of another entity and none of the prompt entity's facts has it.
    fact_borrow_share = |foreign ∩ M| / |M|  (null when M is empty);  correct_value: the asked fact's value ∈ M
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import polars as pl

from ldpipe.analysis.plots import panels_png, per_run, subplots
from ldpipe.analysis.squeezing import has_repeat, ngram_list
from ldpipe.errors import DataValidationError
from ldpipe.probes.checks import word_list
from ldpipe.schema import GENERATION_BORROWING_SCHEMA

Log = Callable[[str], None]


def ngram_set(text: str, n: int) -> set[tuple[str, ...]]:
    return set(ngram_list(word_list(text), n))


class AnswerIndex:
    """Which train prompts' chosen answers hold each word n-gram."""

    def __init__(self, train_answers: Mapping[str, str], n: int = 3):
        self.n = n
        self.owners: dict[tuple[str, ...], set[str]] = {}
        for eid, answer in train_answers.items():
            for g in ngram_set(answer, n):
                self.owners.setdefault(g, set()).add(eid)

    def score(self, example_id: str, prompt: str, own_answer: str, generation: str) -> dict:
        grams = ngram_set(generation, self.n)
        own = ngram_set(prompt, self.n) | ngram_set(own_answer, self.n)
        n_own = len(grams & own)
        n_borrowed = sum(1 for g in grams - own if self.owners.get(g, set()) - {example_id})
        total = len(grams)
        return {"ngram": self.n, "n_ngrams": total, "n_own": n_own, "n_borrowed": n_borrowed,
                "borrow_share": n_borrowed / total if total else None,
                "own_share": n_own / total if total else None}


class FactIndex:
    """Fact values of a synthetic world by entity, and which example asks which (entity, value)."""

    def __init__(self, facts: pl.DataFrame, example_facts: pl.DataFrame):
        for col in ("entity", "value"):
            if col not in facts.columns:
                raise DataValidationError("synthetic facts table", f"missing column {col!r}", field=col)
        self.values_of: dict[str, set[tuple[str, ...]]] = {}
        for entity, value in facts.select("entity", "value").unique().iter_rows():
            self.values_of.setdefault(entity, set()).add(tuple(word_list(value)))
        self.all_values = sorted(set().union(*self.values_of.values()) if self.values_of else set(),
                                 key=lambda v: (-len(v), v))
        self.asked = {eid: (e, tuple(word_list(v))) for eid, e, v in
                      example_facts.select("example_id", "entity", "value").iter_rows()}

    def mentioned(self, text: str, exclude: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
        """Distinct fact values occurring as whole words in `text`, longest first, non-overlapping."""
        words = word_list(text)
        used = [False] * len(words)
        found: set[tuple[str, ...]] = set()
        for v in self.all_values:
            k = len(v)
            for i in range(len(words) - k + 1):
                if tuple(words[i:i + k]) == v and not any(used[i:i + k]):
                    for j in range(i, i + k):
                        used[j] = True
                    if v != exclude:
                        found.add(v)
        return found

    def score(self, example_id: str, generation: str) -> dict:
        if example_id not in self.asked:
            return {"n_fact_values": None, "n_foreign_values": None, "fact_borrow_share": None,
                    "correct_value": None}
        entity, value = self.asked[example_id]
        own = self.values_of.get(entity, set())
        m = self.mentioned(generation, exclude=tuple(word_list(entity)))
        foreign = {v for v in m if v not in own}
        return {"n_fact_values": len(m), "n_foreign_values": len(foreign),
                "fact_borrow_share": len(foreign) / len(m) if m else None, "correct_value": value in m}


def score_generations(prompts: pl.DataFrame, generations: Sequence[str], answers: AnswerIndex,
                      facts: FactIndex | None, repeat_ngram: int = 3) -> list[dict]:
    """One row per prompt (columns example_id, split, prompt, chosen) with its generation's borrowing scores and
    whether it repeats a word n-gram (the squeezing analysis's repeater definition)."""
    rows = []
    for (eid, split, prompt, chosen), gen in zip(prompts.select("example_id", "split", "prompt", "chosen").iter_rows(),
                                                 generations):
        row = {"example_id": eid, "split": split, "generation": gen, **answers.score(eid, prompt, chosen, gen),
               "repeats": has_repeat(gen, repeat_ngram)}
        row.update(facts.score(eid, gen) if facts is not None else
                   {"n_fact_values": None, "n_foreign_values": None, "fact_borrow_share": None, "correct_value": None})
        rows.append(row)
    return rows


BORROWING_HELD_OUT = "held-out borrowing skipped (only the trained probe prompts are scored)"


def run_borrowing(spec, files, store, *, device: str = "auto", log: Log = print,
                  warn: Log | None = None) -> pl.DataFrame:
    """generation_borrowing rows for every run and checkpoint; one shard per run (rewritten on rerun).
    Without a test split there are no held-out rows: `warn` (default `log`) gets held_out_note's line."""
    from ldpipe.analysis.generations import generation_config, greedy_generations, per_checkpoint
    from ldpipe.analysis.squeezing import generation_prompts, held_out_note
    from ldpipe.layout import load_preferences_file, load_probes_file
    from ldpipe.model.checkpoints import load_model_and_tokenizer
    from ldpipe.model.lm import resolve_device

    g = spec.generation_analysis
    dev = resolve_device(device)
    prefs, probes = load_preferences_file(files), load_probes_file(files)
    prompts = generation_prompts(prefs, probes, g.n_prompts)
    note = held_out_note(spec, prefs, BORROWING_HELD_OUT)
    if note:
        (warn or log)(note)
    train = prefs.filter(pl.col("split") == "train")
    answers = AnswerIndex(dict(train.select("example_id", "chosen").iter_rows()), g.borrow_ngram)
    facts = None
    if spec.dataset.kind == "synthetic":
        from ldpipe.data.synthetic import SyntheticWorld

        world = SyntheticWorld.load(files.world)
        facts = FactIndex(world.facts, world.example_facts())
    cfg = generation_config(spec)

    def measure(ck) -> list[dict]:
        gens = greedy_generations(ck.path, prompts["prompt"].to_list(), cfg, files.data_dir / "generation_cache",
                                  device=dev, load=lambda: load_model_and_tokenizer(
                                      ck.path, device=dev, local_files_only=not spec.model.allow_download))
        return score_generations(prompts, gens, answers, facts, g.repeat_ngram)

    out = per_checkpoint(spec, files, store, "generation_borrowing", GENERATION_BORROWING_SCHEMA, measure,
                         snapshots=g.snapshots)
    log(f"[{spec.name}] borrowing: {out.height} generations scored")
    return out


def summarize(rows: pl.DataFrame) -> pl.DataFrame:
    """Mean shares per (run_id, checkpoint, step, split)."""
    return (rows.group_by("run_id", "checkpoint", "step", "split")
            .agg(pl.len().alias("n"), pl.col("borrow_share").mean(), pl.col("own_share").mean(),
                 pl.col("fact_borrow_share").mean(), pl.col("correct_value").cast(pl.Float64).mean().alias(
                     "correct_rate"))
            .sort("run_id", "step", "split"))


def plot_borrowing(curves: pl.DataFrame, summary: pl.DataFrame, *, title: str) -> bytes:
    """PNG: (left) change of log π(y_{j≠u}) per run from the borrowing view; (right) mean borrow share per
    checkpoint step, solid for trained prompts, dashed for held-out ones."""
    fig, axes = subplots(1, 2, figsize=(11, 4))
    for rid, c, part, mine in per_run(curves, summary):
        if not part.is_empty():
            axes[0].plot(part["step"], part["delta_irr_train"], "-", color=c, label=f"{rid} y_j≠u")
            axes[0].plot(part["step"], part["delta_irr_hum"], ":", color=c, label=f"{rid} y_hum")
        for split, style in (("train", "o-"), ("test", "s--")):
            s = mine.filter(pl.col("split") == split)
            if not s.is_empty():
                y = s["fact_borrow_share"] if s["fact_borrow_share"].null_count() < s.height else s["borrow_share"]
                axes[1].plot(s["step"], y, style, color=c, label=f"{rid} {split}")
    axes[0].axhline(0, color="black", linewidth=0.5)
    axes[0].set(xlabel="optimizer step", ylabel="change since step 0 (nats)", title="other prompts' answers")
    axes[1].set(xlabel="checkpoint step", ylabel="share", ylim=(-0.05, 1.05),
                title="borrowed share in generations (fact values if known, else n-grams)")
    return panels_png(fig, axes, title)


@dataclass(frozen=True)
class BorrowingResult:
    rows: pl.DataFrame           # generation_borrowing rows (per run, checkpoint and prompt)
    summary: pl.DataFrame        # mean shares per run, checkpoint and split
    curves: pl.DataFrame         # the borrowing view's rows of the experiment's runs
    plot: Path                   # the saved borrowing plot
    held_out: str                # how many held-out prompts were generated from, or why none were


def borrowing_step(spec, files, store, *, device: str = "auto", log: Log = print,
                   warn: Log | None = None) -> BorrowingResult:
    """The borrowing analysis end to end: generation_borrowing rows written, the
    experiment's borrowing curves read back and plotted to <plots>/<exp>.borrowing.png."""
    from ldpipe.analysis.curves import save_plot
    from ldpipe.analysis.squeezing import held_out_summary
    from ldpipe.layout import load_preferences_file
    from ldpipe.store.catalog import query_runs

    rows = run_borrowing(spec, files, store, device=device, log=log, warn=warn)
    curves = query_runs(files.paths.catalog, "borrowing", [spec.run_id(r) for r in spec.runs])
    summary = summarize(rows)
    png = save_plot(plot_borrowing(curves, summary, title=f"{spec.name}: hallucination borrowing"),
                    files.paths.plots / f"{spec.name}.borrowing.png")
    return BorrowingResult(rows, summary, curves, Path(png), held_out_summary(spec, load_preferences_file(files),
                                                                              BORROWING_HELD_OUT))
