"""Win rate of one checkpoint's generations over another's, judged by an OpenAI-compatible LLM
(docs/glossary.md#win-rate), with the reference's blind spots fixed:

- every prompt is judged twice, once with a's response as "Response A" (order a_first) and once with b's
  (b_first), so a judge that prefers a position gains neither model anything;
- the judge may answer "tie"; a verdict that cannot be parsed is kept and counted as "unparsable", not dropped
  silently.

Parsing: the last line matching `More helpful: <A|B|tie>` (quotes, brackets, asterisks allowed), else the whole
reply if it is just "A", "B" or "tie". Per judgment, winner = the model in the named slot.
    win_rate_a = (wins_a + ties / 2) / (wins_a + wins_b + ties)   over both orders (unparsable excluded)
    first_slot_share = share of A/B verdicts naming slot A (0.5: no position bias)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import polars as pl

from ldpipe.schema import WIN_RATE_JUDGMENT_SCHEMA

Log = Callable[[str], None]

# The reference prompt (docs/glossary.md#win-rate) with a tie option.
JUDGE_PROMPT = (
    "Given the history of multi-round chat, which response is more helpful?\n\nHistory:\n{prompt}\n\n"
    "Response A: {first}\n\nResponse B: {second}\n\n"
    "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
    'SECOND, on a new line, state only "A", "B" or "tie" to indicate which response is more helpful. '
    "Your response should use the format:\n\nComparison: <one-sentence comparison and explanation>\n"
    'More helpful: <"A", "B" or "tie">'
)
_VERDICT_LINE = re.compile(r"more\s+helpful\s*:\s*[\s\"'<*(\[]*(A|B|tie)[\s\"'>*)\].]*$", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """"A", "B", "tie" or None (unparsable)."""
    if not text:
        return None
    for line in reversed(text.strip().splitlines()):
        m = _VERDICT_LINE.search(line.strip())
        if m:
            v = m.group(1)
            if v.lower() == "tie":
                return "tie"
            return v if v in ("A", "B") else None   # lower-case a/b: an article, not a verdict
    bare = text.strip().strip("\"'*.<> ")
    if bare in ("A", "B"):
        return bare
    return "tie" if bare.lower() == "tie" else None


def _winner(order: str, verdict: str | None) -> str:
    if verdict is None:
        return "unparsable"
    if verdict == "tie":
        return "tie"
    a_slot = "A" if order == "a_first" else "B"
    return "a" if verdict == a_slot else "b"


def judge_pairs(client, items: Sequence[tuple[str, str, str, str]]) -> pl.DataFrame:
    """Judge (example_id, prompt, response_a, response_b) items in both orders through an ldpipe LLMClient.
    Returns columns example_id, order, verdict, winner, response_a, response_b, judge_text."""
    from ldpipe.llm import ChatRequest

    reqs, meta = [], []
    for eid, prompt, ra, rb in items:
        for order, first, second in (("a_first", ra, rb), ("b_first", rb, ra)):
            reqs.append(ChatRequest.chat(f"{eid}/{order}", JUDGE_PROMPT.format(prompt=prompt.strip(), first=first,
                                                                               second=second)))
            meta.append((eid, order, ra, rb))
    done = client.complete_many(reqs)
    rows = []
    for (eid, order, ra, rb), c in zip(meta, done):
        verdict = parse_verdict(c.text)
        rows.append({"example_id": eid, "order": order, "verdict": verdict, "winner": _winner(order, verdict),
                     "response_a": ra, "response_b": rb, "judge_text": c.text})
    return pl.DataFrame(rows, schema={k: WIN_RATE_JUDGMENT_SCHEMA[k] for k in
                                      ("example_id", "order", "verdict", "winner", "response_a", "response_b",
                                       "judge_text")})


def summarize(judgments: pl.DataFrame) -> dict:
    """Counts over both orders, win_rate_a and first_slot_share (see the module docstring)."""
    w = judgments["winner"].value_counts()
    count = dict(zip(w["winner"].to_list(), w["count"].to_list()))
    a, b, t, u = (int(count.get(k, 0)) for k in ("a", "b", "tie", "unparsable"))
    slots = judgments.filter(pl.col("verdict").is_in(["A", "B"]))["verdict"]
    decided = a + b + t
    return {"judgments": judgments.height, "prompts": judgments["example_id"].n_unique(), "wins_a": a,
            "wins_b": b, "ties": t, "unparsable": u, "win_rate_a": (a + t / 2) / decided if decided else None,
            "first_slot_share": float((slots == "A").mean()) if slots.len() else None}


def run_win_rate(spec, files, store, *, device: str = "auto", log: Log = print,
                 environ: Mapping[str, str] | None = None) -> dict:
    """Judge every declared pair; {"skipped": reason} when no judge or no pair is declared. Writes one
    win_rate_judgments shard per pair (partition experiment, name "<a>__vs__<b>")."""
    from ldpipe.analysis.checkpoints import resolve_ref
    from ldpipe.layout import load_preferences_file
    from ldpipe.llm import LLMClient, LLMConfig
    from ldpipe.model.checkpoints import load_model_and_tokenizer
    from ldpipe.model.generate import GenerationConfig, generate
    from ldpipe.model.lm import resolve_device

    wr = spec.generation_analysis.win_rate
    if wr.judge is None:
        return {"skipped": "no judge endpoint declared: set generation_analysis.win_rate.judge {model, base_url, "
                           "api_key_env} (any OpenAI-compatible server) and generation_analysis.win_rate.pairs"}
    if not wr.pairs:
        return {"skipped": "no checkpoint pairs declared: set generation_analysis.win_rate.pairs, "
                           "e.g. [[extend_dpo, dpo]]"}
    # the first n held-out prompts in the dataset file's order
    prompts = load_preferences_file(files).filter(pl.col("split") == "test").head(wr.n_prompts)
    if prompts.is_empty():
        from ldpipe.analysis.squeezing import held_out_note

        return {"skipped": held_out_note(spec, prompts, "win rate skipped (it judges held-out prompts)")}
    dev = resolve_device(device)
    ga = spec.generation_analysis
    cfg = GenerationConfig(max_new_tokens=ga.max_new_tokens, batch_size=ga.batch_size,
                           max_prompt_tokens=spec.probes.max_prompt_tokens, chat_template=spec.probes.chat_template)
    gens: dict[str, list[str]] = {}
    for ref in sorted({r for pair in wr.pairs for r in pair}):
        ck = resolve_ref(spec, ref, files)
        model, tok = load_model_and_tokenizer(ck.path, device=dev, local_files_only=not spec.model.allow_download)
        gens[ref] = generate(model, tok, prompts["prompt"].to_list(), cfg, device=dev)
    j = wr.judge
    llm_cfg = LLMConfig.from_spec(j, cache_path=files.paths.llm_cache)
    summaries = []
    with LLMClient(llm_cfg, environ=environ) as client:
        for a, b in wr.pairs:
            items = list(zip(prompts["example_id"].to_list(), prompts["prompt"].to_list(), gens[a], gens[b]))
            df = judge_pairs(client, items).with_columns(
                pl.lit(spec.name).alias("experiment"), pl.lit(a).alias("model_a"), pl.lit(b).alias("model_b"),
                pl.lit(j.model).alias("judge_model"))
            store.write_shard("win_rate_judgments", df.select(list(WIN_RATE_JUDGMENT_SCHEMA)),
                              partition={"experiment": spec.name}, name=f"{a}__vs__{b}",
                              schema=WIN_RATE_JUDGMENT_SCHEMA)
            s = {"model_a": a, "model_b": b, **summarize(df)}
            log(f"[{spec.name}] win rate {a} over {b}: {s}")
            summaries.append(s)
        calls = client.stats.as_dict()
    return {"pairs": summaries, "judge_model": j.model, "calls": calls}


@dataclass(frozen=True)
class WinRateResult:
    skipped: str | None = None                  # why nothing was judged (no judge, no pair, no held-out prompt)
    judge_model: str | None = None
    calls: dict = field(default_factory=dict)   # the judge client's call statistics
    table: pl.DataFrame | None = None           # the win_rate view's rows of the experiment


def win_rate_step(spec, files, store, *, device: str = "auto", log: Log = print, warn: Log | None = None,
                  environ: Mapping[str, str] | None = None) -> WinRateResult:
    """The win-rate analysis end to end: judgments written (run_win_rate), the experiment's win rates read back;
    or the reason it was skipped, logged (to `warn` when the dataset has no held-out prompts to judge on)."""
    from ldpipe.store.catalog import query

    info = run_win_rate(spec, files, store, device=device, log=log, environ=environ)
    if "skipped" in info:
        ((warn or log) if "held-out" in info["skipped"] else log)(f"win rate skipped: {info['skipped']}")
        return WinRateResult(skipped=info["skipped"])
    table = query(files.paths.catalog, f"select * from win_rate where experiment = '{spec.name}'")
    return WinRateResult(judge_model=info["judge_model"], calls=info["calls"], table=table)
