"""Squeezing statistics at a run's checkpoints (docs/glossary.md#squeezing).

The view sql/squeezing.sql follows log π(y*) against log π(y+) over training from the trajectories. This module
adds what needs the model itself, per checkpoint (start, snapshots, final; see analysis/checkpoints.py):

- peakiness of the next-token distributions along the probe set's chosen responses y+ (teacher-forced, EOS
  included): mean over all pooled response positions t of max_v π(v | x, y+_<t) and of the entropy
  -Σ_v π log π (nats). Squeezing makes π peakier: max-prob up, entropy down.
- repeater rate of greedy generations (probe prompts and held-out prompts): a generation "repeats" when some
  word n-gram (n = `repeat_ngram`, words = lower-cased runs of [a-z0-9']) occurs at least twice in it; the rate
  is the share of generations that repeat (generations shorter than n words count as not repeating).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import torch

from ldpipe.analysis.plots import panels_png, per_run, subplots
from ldpipe.model.lm import eval_mode
from ldpipe.probes.checks import word_list
from ldpipe.schema import GENERATION_STATS_SCHEMA

Log = Callable[[str], None]


def ngram_list(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def has_repeat(text: str, n: int = 3) -> bool:
    """Some word n-gram occurs at least twice in `text`."""
    counts = Counter(ngram_list(word_list(text), n))
    return any(c >= 2 for c in counts.values())


def repeater_stats(generations: Sequence[str], n: int = 3) -> dict:
    """repeater_rate, mean_distinct_ngrams (distinct/total n-grams over generations with >= n words),
    mean_gen_words, n_generations."""
    if not generations:
        return {"n_generations": 0, "repeater_rate": None, "mean_distinct_ngrams": None, "mean_gen_words": None}
    distinct = []
    for g in generations:
        grams = ngram_list(word_list(g), n)
        if grams:
            distinct.append(len(set(grams)) / len(grams))
    return {"n_generations": len(generations),
            "repeater_rate": sum(has_repeat(g, n) for g in generations) / len(generations),
            "mean_distinct_ngrams": sum(distinct) / len(distinct) if distinct else None,
            "mean_gen_words": sum(len(word_list(g)) for g in generations) / len(generations)}


@torch.no_grad()
def peakiness(model, pairs: Sequence[tuple[list[int], list[int]]], device=None) -> dict:
    """Teacher-forced next-token statistics over the response positions of (prompt_ids, response_ids) pairs,
    pooled over all positions: n_positions, mean_max_prob, mean_entropy, mean_logp_token."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    n = 0
    s_max = s_ent = s_lp = 0.0
    with eval_mode(model):
        for p, r in pairs:
            ids = torch.tensor([p + r], device=dev)
            logits = model(input_ids=ids).logits[0, len(p) - 1: len(p) + len(r) - 1].float()
            logp = torch.log_softmax(logits, dim=-1)
            prob = logp.exp()
            s_max += prob.max(dim=-1).values.sum().item()
            s_ent += -(prob * logp).sum(dim=-1).sum().item()
            s_lp += logp.gather(1, torch.tensor(r, device=dev)[:, None]).sum().item()
            n += len(r)
    if n == 0:
        return {"n_positions": 0, "mean_max_prob": None, "mean_entropy": None, "mean_logp_token": None}
    return {"n_positions": n, "mean_max_prob": s_max / n, "mean_entropy": s_ent / n, "mean_logp_token": s_lp / n}


def held_out_note(spec, prefs: pl.DataFrame, what: str) -> str | None:
    """None when the dataset has held-out (split "test") rows; else the line an analysis reports in its log and
    metadata instead of silently leaving its held-out part empty: `what` says what it skips."""
    if prefs.filter(pl.col("split") == "test").height:
        return None
    ds = spec.dataset
    where = f"{spec.name}/dataset ({ds.kind}{': ' + str(ds.path) if ds.path else ''})"
    return f"no held-out (test) split in dataset {where}: {what}"


def generation_prompts(prefs: pl.DataFrame, probes: pl.DataFrame, n: int) -> pl.DataFrame:
    """The prompts generated from: up to n probe prompts (split "train": they are trained on) and the first n
    held-out prompts (split "test"), with their own chosen answer. Columns example_id, split, prompt, chosen.
    "First" is the order of the dataset file (the preference table's row order), not of the ids."""
    probe_ids = sorted(probes["example_id"].unique().to_list())
    trained = prefs.filter((pl.col("split") == "train") & pl.col("example_id").is_in(probe_ids))
    if trained.is_empty():   # probe ids not in the preference table (e.g. reference probe files): use probes
        trained = (probes.filter(pl.col("response_type") == "chosen")
                   .select("example_id", pl.lit("train").alias("split"), "prompt", pl.col("response").alias("chosen")))
    test = prefs.filter(pl.col("split") == "test")
    cols = ["example_id", "split", "prompt", "chosen"]
    return pl.concat([trained.select(cols).head(n), test.select(cols).head(n)])


def checkpoint_stats(model, chosen_pairs, generations: Sequence[str], *, repeat_ngram: int, device=None) -> dict:
    """Peakiness over `chosen_pairs` and repeater statistics of the checkpoint's greedy `generations`."""
    return {**peakiness(model, chosen_pairs, device), **repeater_stats(list(generations), repeat_ngram),
            "repeat_ngram": repeat_ngram}


SQUEEZING_HELD_OUT = "held-out generations skipped (the repeater rate covers the trained probe prompts only)"


def run_squeezing(spec, files, store, *, device: str = "auto", log: Log = print,
                  warn: Log | None = None) -> pl.DataFrame:
    """generation_stats rows for every run and checkpoint of `spec`; one shard per run (rewritten on rerun).
    Without a test split, `warn` (default `log`) gets held_out_note's line."""
    from ldpipe.analysis.generations import generation_config, greedy_generations, per_checkpoint
    from ldpipe.layout import load_preferences_file, load_probes_file
    from ldpipe.model.checkpoints import load_model_and_tokenizer
    from ldpipe.model.lm import resolve_device
    from ldpipe.model.scoring import encode_pair

    g = spec.generation_analysis
    dev = resolve_device(device)
    prefs, probes = load_preferences_file(files), load_probes_file(files)
    chosen = probes.filter(pl.col("response_type") == "chosen").sort("example_id")
    prompts = generation_prompts(prefs, probes, g.n_prompts)["prompt"].to_list()
    note = held_out_note(spec, prefs, SQUEEZING_HELD_OUT)
    if note:
        (warn or log)(note)
    cfg = generation_config(spec)

    def measure(ck) -> dict:
        model, tok = load_model_and_tokenizer(ck.path, device=dev, local_files_only=not spec.model.allow_download)
        pairs = [encode_pair(tok, p, r, max_prompt_tokens=spec.probes.max_prompt_tokens,
                             max_response_tokens=spec.probes.max_response_tokens,
                             chat_template=spec.probes.chat_template)
                 for p, r in chosen.select("prompt", "response").iter_rows()]
        gens = greedy_generations(ck.path, prompts, cfg, files.data_dir / "generation_cache",
                                  load=lambda: (model, tok), device=dev)
        stats = {**checkpoint_stats(model, pairs, gens, repeat_ngram=g.repeat_ngram, device=dev),
                 "n_prompts": len(pairs)}
        log(f"[{ck.run_id}] {ck.label}: max-prob {stats['mean_max_prob']}, repeater rate {stats['repeater_rate']}")
        return stats

    return per_checkpoint(spec, files, store, "generation_stats", GENERATION_STATS_SCHEMA, measure,
                          snapshots=g.snapshots)


def plot_squeezing(curves: pl.DataFrame, stats: pl.DataFrame, *, title: str) -> bytes:
    """PNG, one colour per run. Top: change of mean log π(y+) (solid) and log π(y*) (dashed) from the squeezing
    view; the per-token gap (y* − y+) along y+; the share of y+ positions that are the argmax. Bottom: the valley
    depth of y− (per-token log π(y−)); mean max-prob and repeater rate per checkpoint step. The top middle panel
    says at a glance whether a setting CAN squeeze: near 0, y+ is the argmax path and y* cannot pull away."""
    fig, axes = subplots(2, 3, figsize=(13, 7.5))
    ax = axes.flatten()
    for rid, c, part, s in per_run(curves, stats):
        if not part.is_empty():
            ax[0].plot(part["step"], part["delta_chosen"], "-", color=c, label=f"{rid} y+")
            ax[0].plot(part["step"], part["delta_argmax"], "--", color=c, label=f"{rid} y*")
            for i, col in ((1, "gap_per_token"), (2, "argmax_share"), (3, "rejected_logp_per_token")):
                if col in part.columns and part[col].null_count() < part.height:
                    ax[i].plot(part["step"], part[col], "-", color=c, label=rid)
        if not s.is_empty():
            ax[4].plot(s["step"], s["mean_max_prob"], "o-", color=c, label=rid)
            ax[5].plot(s["step"], s["repeater_rate"], "o-", color=c, label=rid)
    ax[0].axhline(0, color="black", linewidth=0.5)
    ax[1].axhline(0, color="black", linewidth=0.5)
    ax[0].set(xlabel="optimizer step", ylabel="change since step 0 (nats)", title="log π(y+) vs log π(y*)")
    ax[1].set(xlabel="optimizer step", ylabel="nats per token of y+",
              title="gap log π(y*) − log π(y+) per token\n(≈0: y+ is the argmax path, nothing to squeeze into)")
    ax[2].set(xlabel="optimizer step", ylabel="share of y+ positions", title="y+ token is the argmax",
              ylim=(-0.05, 1.05))
    ax[3].set(xlabel="optimizer step", ylabel="nats per token of y−",
              title="valley depth: log π(y−) per token\n(lower: a deeper valley, a stronger squeeze)")
    ax[4].set(xlabel="checkpoint step", ylabel="mean max_v π(v)", title="peakiness along y+")
    ax[5].set(xlabel="checkpoint step", ylabel="share of generations", title="repeater rate (greedy)",
              ylim=(-0.05, 1.05))
    return panels_png(fig, ax, title)


@dataclass(frozen=True)
class SqueezingResult:
    stats: pl.DataFrame          # generation_stats rows (per run and checkpoint)
    curves: pl.DataFrame         # the squeezing view's rows of the experiment's runs
    plot: Path                   # the saved 2x3 squeezing plot
    held_out: str                # how many held-out prompts were generated from, or why none were


def squeezing_step(spec, files, store, *, device: str = "auto", log: Log = print,
                   warn: Log | None = None) -> SqueezingResult:
    """The squeezing analysis end to end: generation_stats rows written (the catalog's views read them at
    query time), the experiment's squeezing curves read back and plotted to <plots>/<exp>.squeezing.png."""
    from ldpipe.analysis.curves import save_plot
    from ldpipe.layout import load_preferences_file
    from ldpipe.store.catalog import query_runs

    stats = run_squeezing(spec, files, store, device=device, log=log, warn=warn)
    curves = query_runs(files.paths.catalog, "squeezing", [spec.run_id(r) for r in spec.runs])
    png = save_plot(plot_squeezing(curves, stats, title=f"{spec.name}: squeezing"),
                    files.paths.plots / f"{spec.name}.squeezing.png")
    return SqueezingResult(stats, curves, Path(png), held_out_summary(spec, load_preferences_file(files),
                                                                       SQUEEZING_HELD_OUT))


def held_out_summary(spec, prefs: pl.DataFrame, what: str) -> str:
    """Asset metadata `held_out`: how many held-out (test) prompts were generated from, or the line saying that
    part was skipped because the dataset has no test split."""
    n = min(prefs.filter(pl.col("split") == "test").height, spec.generation_analysis.n_prompts)
    return held_out_note(spec, prefs, what) or f"{n} held-out (test) prompts generated from"
