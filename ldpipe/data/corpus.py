"""The text a builtin base model is pretrained on, for any dataset.

The base model must know the language of the data but not the answers it is later fine-tuned or probed on
(otherwise a "rise" of y+ under SFT would partly be memory). So, by source:
- a declared `model.corpus` file: used as it is (.txt: documents separated by blank lines; .jsonl: a "text"
  field per line);
- the synthetic world: its own corpus (ldpipe.data.synthetic keeps it free of every SFT and probe sentence;
  its dialogues end in a reply);
- any other dataset: the rows that no declared run trains on and no probe uses (training rows: the first
  `n_train` of the train split in file order, every train row when a run has no cap) give whole dialogues, a
  document per response: the prompt followed by that row's chosen or rejected response, exactly as scoring
  joins them; a response whose text appears in the probe set (e.g. a test answer drawn as y_test) is left out.
  Every other row's prompt is a document of its own, cut before its reply cue (the final "Assistant:" of a
  transcript), since a question is not its answer; a prompt with no reply cue to cut (plain text) is left out.

Pretraining puts end-of-text after every document (ldpipe.model.lm.pretrain), so no document may end where a
reply starts: a corpus of bare "...\n\nAssistant:" prompts teaches P(EOS) of 0.35-0.64 right after the cue, and
the base model's greedy replies (y_init) come out empty (measured on 24 Anthropic-HH probe prompts, 24 of 24).
`ends_at_reply_cue` tells such a document; a declared corpus file is used as it is, and the base-model stage warns
when its documents do that.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.paths import project_path

SMALL_CORPUS_TOKENS = 20_000   # below this a builtin model learns little of the data's language: say so
# Bumped whenever the same dataset and declarations give a different corpus (1: bare prompts + bare responses;
# 2: dialogues, prompts cut before their reply cue), recorded in a builtin model's ldpipe.json as corpus_rule.
DATASET_CORPUS_RULE = 2
# The reply cue a transcript prompt ends in ("\n\nAssistant:", or UltraFeedback's "\nAssistant:"), trailing space
# included; ldpipe.data.transcript writes every prompt of conversational data in this form.
_REPLY_CUE = re.compile(r"\n{1,2}Assistant:\s*\Z")


@dataclass
class Corpus:
    docs: list[str]
    source: str                               # what went in, in words
    counts: dict[str, int] = field(default_factory=dict)


def file_digest(path: str) -> str:
    """The declared path and a content hash (part of the base model's config hash); 'missing' if absent."""
    from ldpipe.hashing import file_hash

    p = project_path(path)
    return f"{path}:{file_hash(p)}" if p.is_file() else f"{path}:missing"


def read_corpus_file(path: str | Path, *, max_rows: int | None = None) -> list[str]:
    """Documents of a corpus file; errors name the file, the line and the field."""
    p = Path(path)
    if not p.is_file():
        raise DataValidationError(str(p), "corpus file does not exist", field="model.corpus")
    if p.suffix == ".jsonl":
        docs: list[str] = []
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if max_rows is not None and n > max_rows:
                    break
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataValidationError(str(p), f"not a JSON object: {e}", row=n) from None
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise DataValidationError(str(p), "needs a string field 'text'", row=n, field="text")
                if text.strip():
                    docs.append(text)
    elif p.suffix in (".txt", ".md", ""):
        try:
            raw_text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataValidationError(str(p), f"not UTF-8 text (byte {e.start})") from None
        docs = [d.strip() for d in raw_text.split("\n\n") if d.strip()]
    else:
        raise DataValidationError(str(p), f"corpus files are .txt or .jsonl, not {p.suffix!r}", field="model.corpus")
    if not docs:
        raise DataValidationError(str(p), "the corpus file holds no text", field="model.corpus")
    return docs


def ends_at_reply_cue(doc: str) -> bool:
    """Whether `doc` ends in a transcript's reply cue ("...\\n\\nAssistant:"): with end-of-text after it, such a
    document teaches a base model to end its reply at once."""
    return _REPLY_CUE.search(doc) is not None


def prompt_before_reply_cue(prompt: str) -> str:
    """`prompt` without its final reply cue, trailing space dropped ("" when it has no cue: nothing to keep)."""
    m = _REPLY_CUE.search(prompt)
    return prompt[:m.start()].rstrip() if m else ""


def from_dataset(spec, prefs: pl.DataFrame, probes: pl.DataFrame | None) -> Corpus:
    """Dialogues of the rows neither trained on nor probed; other rows' prompts cut before the reply cue
    (module docstring)."""
    from ldpipe.data.selection import training_rows  # the rows each declared run trains on (file order, n_train)

    trained = {ex for r in spec.runs for ex in training_rows(prefs, r)["example_id"].to_list()}
    probed_ids = set(probes["example_id"].to_list()) if probes is not None else set()
    probed_text = set(probes["response"].to_list()) if probes is not None else set()
    docs: list[str] = []
    counts = {"prompts": 0, "responses": 0, "dialogues": 0, "prompts_alone": 0, "prompts_left_out": 0,
              "rows_trained_on": 0, "rows_probed": 0, "responses_in_probe_set": 0}
    for ex, prompt, chosen, rejected in prefs.select("example_id", "prompt", "chosen", "rejected").iter_rows():
        replies: list[str] = []
        if ex in trained:
            counts["rows_trained_on"] += 1
        elif ex in probed_ids:
            counts["rows_probed"] += 1
        else:
            for text in (chosen, rejected):
                if text in probed_text:
                    counts["responses_in_probe_set"] += 1
                elif text.strip():
                    replies.append(text)
        if replies:
            docs += [prompt + text for text in replies]   # the text scoring reads: prompt, then response
            counts["prompts"] += 1
            counts["dialogues"] += len(replies)
            counts["responses"] += len(replies)
            continue
        alone = prompt_before_reply_cue(prompt)
        if alone.strip():
            docs.append(alone)
            counts["prompts"] += 1
            counts["prompts_alone"] += 1
        elif prompt.strip():
            counts["prompts_left_out"] += 1
    source = (f"dataset {spec.dataset.kind}: {counts['dialogues']} dialogues (a prompt and one of its responses) of "
              f"rows neither trained on ({counts['rows_trained_on']} left out) nor probed ({counts['rows_probed']} "
              f"left out; {counts['responses_in_probe_set']} other responses are probe texts, left out) + "
              f"{counts['prompts_alone']} prompts of the other rows, cut before their reply cue"
              + (f" ({counts['prompts_left_out']} prompts without a reply cue to cut left out)"
                 if counts["prompts_left_out"] else ""))
    return Corpus(docs, source, counts)


def base_corpus(spec, prefs_path: Path, probes_path: Path, world_path: Path) -> Corpus:
    """The corpus of `spec`'s builtin base model (module docstring)."""
    m = spec.model
    if m.corpus is not None:
        p = project_path(m.corpus)
        docs = read_corpus_file(p)
        return Corpus(docs, f"file {p} ({len(docs)} documents)", {"documents": len(docs)})
    if spec.dataset.kind == "synthetic":
        from ldpipe.data.synthetic import SyntheticWorld

        world = SyntheticWorld.load(world_path)
        return Corpus(list(world.corpus), f"the synthetic world's corpus ({len(world.corpus)} documents)",
                      {"documents": len(world.corpus)})
    if not prefs_path.exists():
        raise LdpipeError(f"{prefs_path} is missing: materialize the dataset first")
    if not probes_path.exists():
        raise LdpipeError(f"{probes_path} is missing: materialize the probe set first (the base model's corpus "
                          "leaves out every probed row)")
    corpus = from_dataset(spec, pl.read_parquet(prefs_path), pl.read_parquet(probes_path))
    if not corpus.docs:
        raise LdpipeError(f"experiment {spec.name!r}: the builtin model's corpus is empty (no prompt text and every "
                          "row trained on or probed); declare model.corpus: <file>")
    return corpus
