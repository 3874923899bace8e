"""The LLM-made probe types: y_gpts+/-, y_gptf+/- (rephrases of y+/y-) and y_hum (a length-matched random sentence).

Prompts and sampling defaults are the reference implementation's (docs/glossary.md: system "You are a helpful assistant.",
temperature 0.7, top_p 1). Two of its defects are fixed here:
- chatty preambles ("Sure! Here is a random sentence with 12 words:", "Output:", wrapping quotes) are stripped and
  counted per type (the reference kept them in 38% of y_hum rows);
- outputs take the source response's leading whitespace (HH responses start with " "; the reference's GPT texts
  did not, so their first token was tokenized differently from y+'s).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import polars as pl

from ldpipe.errors import DataValidationError, SpecError
from ldpipe.llm import ChatRequest, LLMClient
from ldpipe.schema import PROBE_SCHEMA, require_frame

# Verbatim from the reference notebook (`generate dataset.ipynb` cell 22), including the trailing "Output: ".
TEMPLATES: dict[str, str] = {
    "gptsemantic": "Given the reference sentence, please generate an output sentence. Please use different words as "
                   "much as possible while keeping the meaning of the reference sentence unchanged. Please only "
                   "return the output sentence.\n\nReference sentence: {ref_sentence}\n\nOutput: ",
    "gptformat": "Given the reference sentence, please generate an output sentence. Please change the meaning of the "
                 "reference sentence as much as possible while keeping the format of it. Please only return the "
                 "output sentence.\n\nReference sentence: {ref_sentence}\n\nOutput: ",
    "random_sentence": "Please generate a random sentence with {n} words.",
}

# response type -> (the probe type it is made from, the template it uses)
LLM_TYPE_SPECS: dict[str, tuple[str, str]] = {
    "chosen_gptsemantic": ("chosen", "gptsemantic"),
    "chosen_gptformat": ("chosen", "gptformat"),
    "reject_gptsemantic": ("rejected", "gptsemantic"),
    "reject_gptformat": ("rejected", "gptformat"),
    "irr_hum": ("chosen", "random_sentence"),
}
LLM_TYPES = tuple(LLM_TYPE_SPECS)

# ----------------------------------------------------------------------------- preamble stripping
# Only lead-ins that talk about the task (a sentence / output / rephrase) are cut: a bare "Sure!" may be the
# content itself, since many HH answers start that way.
_TASK_NOUN = r"(?:sentence|output|rephrase|rephrased|rephrasing|paraphrase|paraphrased|rewrite|rewritten)"
_LEAD_IN = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|absolutely|okay|ok|alright|great|no problem)(?: thing)?[!.,]*\s*)?"
    r"(?:here(?:'s|’s|\s+is|\s+are)|below\s+is|this\s+is)\b[^:\n]{0,100}?\b" + _TASK_NOUN + r"\b[^:\n]{0,80}:\s*",
    re.I)
_LABEL = re.compile(
    r"^\s*(?:output|rephrase|paraphrase|(?:(?:the|an?)\s+)?(?:(?:output|rephrased|reworded|revised|modified|new|"
    r"random|generated|paraphrased)\s+)?sentence)\s*:\s*", re.I)
_QUOTES = (('"', '"'), ("“", "”"), ("'", "'"))


def strip_preamble(text: str) -> tuple[str, bool]:
    """`text` without a chatty lead-in, an "Output:"-style label or wrapping quotes; and whether anything went.
    Surrounding whitespace is always removed (the reference `.strip()`'d too) but does not count as stripping."""
    out = text.strip()
    for pattern in (_LEAD_IN, _LABEL):
        m = pattern.match(out)
        if m and out[m.end():].strip():
            out = out[m.end():].strip()
    for open_q, close_q in _QUOTES:
        inner = out[1:-1]
        if len(out) >= 2 and out[0] == open_q and out[-1] == close_q and open_q not in inner and close_q not in inner:
            out = inner.strip()
            break
    if not out:  # nothing but a preamble: keep it so the row is visibly bad rather than empty
        return text.strip(), False
    return out, out != text.strip()


def _lead(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def llm_prompt(template_name: str, source: str, templates: Mapping[str, str] = TEMPLATES) -> str:
    """The user message for one probe; `source` is y+ or y- as stored (it is stripped, as in the reference)."""
    template = templates[template_name]
    if template_name == "random_sentence":   # words split on any whitespace (a double space is not a word)
        return template.replace("{n}", str(len(source.split())))
    # replace(), not format(): a user template may hold literal braces
    return template.replace("{ref_sentence}", source.strip())


# ----------------------------------------------------------------------------- builder

def _sources(probes: Any, needed: set[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """{(example_id, source type): (prompt, response)} for the needed source types, validated."""
    src = "probes"
    probes = require_frame(probes, PROBE_SCHEMA, source=src)
    out: dict[tuple[str, str], tuple[str, str]] = {}
    rows = probes.with_row_index("_row").filter(pl.col("response_type").is_in(sorted(needed)))
    for r in rows.iter_rows(named=True):
        for col in ("example_id", "prompt", "response"):
            if not isinstance(r[col], str):
                raise DataValidationError(src, f"expected a string, got {r[col]!r}", row=r["_row"], field=col)
        key = (r["example_id"], r["response_type"])
        if key in out:
            raise DataValidationError(src, f"duplicate {key[1]!r} row for probe example {key[0]!r}",
                                      row=r["_row"], field="response_type")
        out[key] = (r["prompt"], r["response"])
    return out


def build_llm_types(probes: pl.DataFrame, client: LLMClient, types: Sequence[str] = LLM_TYPES, *,
                    templates: Mapping[str, str] = TEMPLATES,
                    progress: Callable[[int, int], None] | None = None) -> tuple[pl.DataFrame, dict]:
    """New PROBE_SCHEMA rows of the LLM-made `types` for every probe example in `probes` (which must hold the
    chosen/rejected rows they are made from), and a report {type: {"made", "preambles_stripped", ...}}.

    Rephrases of one text are one sample (same cache key wherever the text recurs); y_hum is sampled per probe
    example, since many examples ask for the same word count."""
    unknown = [t for t in types if t not in LLM_TYPE_SPECS]
    if unknown:
        raise SpecError(f"LLM probe types: unknown type(s) {unknown}; known: {list(LLM_TYPES)}")
    if len(set(types)) != len(types):
        raise SpecError(f"LLM probe types: duplicates in {list(types)}")
    lacking = sorted({LLM_TYPE_SPECS[t][1] for t in types} - set(templates))
    if lacking:
        raise SpecError(f"LLM probe types: no template for {lacking}")
    sources = _sources(probes, {LLM_TYPE_SPECS[t][0] for t in types})
    ids = sorted(probes["example_id"].unique().drop_nulls().to_list())
    system = client.config.system_message

    jobs: list[tuple[str, str, str, str]] = []   # (example_id, type, prompt, source response)
    requests: list[ChatRequest] = []
    for t in types:
        source_type, template = LLM_TYPE_SPECS[t]
        for i in ids:
            if (i, source_type) not in sources:
                raise DataValidationError("probes", f"probe example {i!r} has no {source_type!r} row, which "
                                          f"{t!r} is made from", field="response_type")
            prompt, source = sources[(i, source_type)]
            jobs.append((i, t, prompt, source))
            requests.append(ChatRequest.chat(f"{i}/{t}", llm_prompt(template, source, templates), system=system,
                                             sample=i if template == "random_sentence" else ""))
    completions = client.complete_many(requests, progress=progress)

    model = client.config.model
    report = {t: {"made": 0, "preambles_stripped": 0, "from_cache": 0, "empty": 0, "truncated": 0,
                  "over_max_response_chars": 0, "chars_dropped": 0, "identical_to_source": 0} for t in types}
    records = []
    for (i, t, prompt, source), done in zip(jobs, completions):
        source_type, template = LLM_TYPE_SPECS[t]
        # If the source itself opens like a preamble ("Here's a sentence you could say: ..."), a rephrase that
        # keeps the opening is content, not chatter.
        text, stripped = (done.text.strip(), False) if strip_preamble(source)[1] and template != "random_sentence" \
            else strip_preamble(done.text)
        rep = report[t]
        rep["made"] += 1
        rep["preambles_stripped"] += stripped
        rep["from_cache"] += done.cached
        rep["empty"] += not text
        rep["truncated"] += done.finish_reason == "length"   # hit max_tokens: the text is cut off
        rep["over_max_response_chars"] += done.dropped_chars > 0   # cut to llm.max_response_chars by ldpipe
        rep["chars_dropped"] += done.dropped_chars
        rep["identical_to_source"] += template != "random_sentence" and text == source.strip()
        records.append((i, t, prompt, _lead(source) + text, f"llm:{model}:{template}"))
    frame = pl.DataFrame(records, schema=PROBE_SCHEMA, orient="row").sort("example_id", "response_type")
    return frame, report


__all__ = ["build_llm_types", "strip_preamble", "llm_prompt", "TEMPLATES", "LLM_TYPES", "LLM_TYPE_SPECS"]
