"""The text a builtin base model is pretrained on, for any dataset.

The base model must know the language of the data but not the answers it is later fine-tuned or probed on
(otherwise a "rise" of y+ under SFT would partly be memory). So, by source:
- a declared `model.corpus` file: used as it is (.txt: documents separated by blank lines; .jsonl: a "text"
  field per line);
- the synthetic world: its own corpus (ldpipe.data.synthetic keeps it free of every SFT and probe sentence);
- any other dataset: every row's prompt (a question is not its answer), plus the chosen and rejected
  responses of the rows that no declared run trains on and no probe uses: training rows (the first
  `n_train` of the train split in file order; every train row when a run has no cap), probe prompts, and
  any response whose text appears in the probe set (e.g. a test answer drawn as y_test) are left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.paths import project_path

SMALL_CORPUS_TOKENS = 20_000   # below this a builtin model learns little of the data's language: say so


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


def from_dataset(spec, prefs: pl.DataFrame, probes: pl.DataFrame | None) -> Corpus:
    """Prompts of every row; responses of the rows neither trained on nor probed (module docstring)."""
    from ldpipe.data.selection import training_rows  # the rows each declared run trains on (file order, n_train)

    trained = {ex for r in spec.runs for ex in training_rows(prefs, r)["example_id"].to_list()}
    probed_ids = set(probes["example_id"].to_list()) if probes is not None else set()
    probed_text = set(probes["response"].to_list()) if probes is not None else set()
    docs = [p for p in prefs["prompt"].to_list() if p.strip()]
    counts = {"prompts": len(docs), "responses": 0, "rows_trained_on": 0, "rows_probed": 0,
              "responses_in_probe_set": 0}
    for ex, chosen, rejected in prefs.select("example_id", "chosen", "rejected").iter_rows():
        if ex in trained:
            counts["rows_trained_on"] += 1
            continue
        if ex in probed_ids:
            counts["rows_probed"] += 1
            continue
        for text in (chosen, rejected):
            if text in probed_text:
                counts["responses_in_probe_set"] += 1
            elif text.strip():
                docs.append(text)
                counts["responses"] += 1
    source = (f"dataset {spec.dataset.kind}: {counts['prompts']} prompts (every row) + {counts['responses']} "
              f"responses of rows neither trained on ({counts['rows_trained_on']} left out) nor probed "
              f"({counts['rows_probed']} left out; {counts['responses_in_probe_set']} other responses are probe "
              f"texts, left out)")
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
