"""`ldpipe check`: what a run of an experiment needs, validated in seconds without training anything.

Each check calls the same function the run's step would (the dataset loader, the corpus reader, the tokenizer
and config loaders, the probe builder), so it fails with the same message (file, row, field). Found:
- the data file(s) exist and parse, every row (files up to FULL_CHECK_BYTES; above that the first
  SAMPLE_ROWS rows, and the run validates the rest); for local data, which file became which split (one line each:
  "train.jsonl → train (40 rows)", with the reason where it is not the file's name);
- a declared corpus file exists and parses;
- a pretrained model path or hub id holds a config and a tokenizer (offline unless allow_download), the format
  probes will be scored in (the chat-template decision, BOS), and what truncation cuts from each probe type;
- every run has training rows (a run with none would have zero steps);
- the train split holds the probe prompts, and the declared probe types can be made from the data.
"""
from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ldpipe.errors import LdpipeError
from ldpipe.spec import EXTEND_SUPERVISE, ExperimentSpec

FULL_CHECK_BYTES = 50 * 2**20
SAMPLE_ROWS = 1000


@dataclass
class Report:
    experiment: str
    lines: list[str] = field(default_factory=list)      # what was found, one line each
    errors: list[str] = field(default_factory=list)     # what would stop the run
    warnings: list[str] = field(default_factory=list)   # what the run would do, but likely not as meant


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _load(spec: ExperimentSpec, rep: Report) -> pl.DataFrame | None:
    from ldpipe.data.loaders import collect_split_notes
    from ldpipe.data.stage import _resolve, load_dataset

    ds = spec.dataset
    if ds.kind == "synthetic":
        rep.lines.append("dataset synthetic: built in (generated at run time)")
        return None
    path = _resolve(ds.path) if ds.path else None
    if path is not None and not path.exists():
        rep.errors.append(f"dataset.path {ds.path!r}: {path} does not exist")
        return None
    if path is None:   # hub data: only reachable when cached or online
        rep.lines.append(f"dataset {ds.kind}: from the Hugging Face hub (not read by check)")
        return None
    big = _size(path) > FULL_CHECK_BYTES
    if big and path.is_file() and path.suffix in (".jsonl", ".csv") and ds.kind == "local":
        with tempfile.TemporaryDirectory() as tmp, path.open("rb") as f:
            head = Path(tmp) / path.name
            head.write_bytes(b"".join(line for _, line in zip(range(SAMPLE_ROWS + 1), f)))
            sample = spec.model_copy(update={"dataset": ds.model_copy(update={"path": str(head)})})
            with collect_split_notes() as notes:
                prefs, _, _ = load_dataset(sample)
        rep.lines.append(f"dataset {ds.kind} {path}: first {SAMPLE_ROWS} rows parse (the file is "
                         f"{_size(path) / 2**20:.0f} MB; the run validates every row)")
        rep.lines.extend(f"  {n}" for n in notes)
        return None
    with collect_split_notes() as notes:   # local data: which file became which split, one line each
        prefs, _, _ = load_dataset(spec, sample_rows=SAMPLE_ROWS if big else None)
    counts = dict(prefs.group_by("split").len().sort("split").iter_rows())
    rep.lines.append(f"dataset {ds.kind} {path}: {prefs.height} rows parse, every row checked; splits {counts}")
    rep.lines.extend(f"  {n}" for n in notes)
    return prefs


def _model(spec: ExperimentSpec, rep: Report):
    """Check the model declaration; returns the pretrained model's tokenizer (None for the builtin model)."""
    m = spec.model
    if m.kind == "builtin":
        if m.corpus is not None:
            from ldpipe.data.corpus import read_corpus_file
            from ldpipe.paths import project_path

            corpus = project_path(m.corpus)
            docs = read_corpus_file(corpus)
            rep.lines.append(f"model builtin: corpus {corpus}: {len(docs)} documents")
        else:
            rep.lines.append("model builtin: pretrained at run time on "
                             + ("the synthetic world's corpus" if spec.dataset.kind == "synthetic"
                                else "the dataset's rows that are neither trained on nor probed"))
        rep.lines.append("scoring format: plain text as written (the builtin model's tokenizer has no chat template "
                         "and adds no BOS)")
        from ldpipe.layout import ExperimentFiles
        from ldpipe.paths import Paths

        base = ExperimentFiles(Paths.default(), spec.name).base_model(spec)   # no ensure(): check creates nothing
        if (base / "ldpipe.json").is_file():   # pretrained already: its tokenizer is on disk
            from ldpipe.model.checkpoints import load_tokenizer

            return load_tokenizer(base)
        rep.lines.append("truncation: counted by the model_probes step, once the base model (and so its tokenizer) "
                         "exists")
        return None
    from transformers import AutoConfig

    from ldpipe.model.base import _pretrained_source
    from ldpipe.model.checkpoints import load_tokenizer

    src = _pretrained_source(spec)
    where = f"experiment {spec.name!r}, model.name_or_path {m.name_or_path!r}"   # as the base-model step says
    if isinstance(src, Path) and not (src / "config.json").is_file():
        rep.errors.append(f"{where}: {src} holds no config.json (a Hugging Face model folder has config.json, "
                          "the weights and the tokenizer files)")
        return None
    try:
        tok = load_tokenizer(src, local_files_only=not m.allow_download)
        cfg = AutoConfig.from_pretrained(str(src), local_files_only=not m.allow_download)
    except LdpipeError as e:
        rep.errors.append(f"{where}: {e}")
        return None
    except Exception as e:  # noqa: BLE001 (transformers raises OSError/ValueError for a missing or bad folder)
        rep.errors.append(f"{where}: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None
    from ldpipe.model.encoding import describe_format

    rep.lines.append(f"model pretrained {src}: config ({cfg.model_type}) and tokenizer load")
    rep.lines.append(f"scoring format (probes.chat_template: {spec.probes.chat_template}): "
                     f"{describe_format(tok, spec.probes.chat_template)}")
    return tok


def _runs(spec: ExperimentSpec, prefs: pl.DataFrame, rep: Report) -> None:
    n_train = prefs.filter(pl.col("split") == "train").height
    for r in spec.runs:
        n = min(r.n_train or n_train, n_train)
        if r.algo == "sft" and r.supervise == EXTEND_SUPERVISE:
            n *= 2
        elif r.algo == "sft" and r.supervise not in ("chosen", "rejected"):
            n = min(spec.probes.n_examples, n_train)   # a probe type: one row per probe prompt
        if n == 0:
            rep.errors.append(f"run {r.name!r}: no training rows (the dataset's train split is empty), so the run "
                              "would have zero steps")
            continue
        steps = r.total_steps(n)
        rep.lines.append(f"run {r.name} ({r.algo}): {n} training examples -> {steps} optimizer steps")


def _probes(spec: ExperimentSpec, prefs: pl.DataFrame, rep: Report, tok=None) -> None:
    from ldpipe.probes.build import MODEL_STAGE_TYPES, OFFLINE_TYPES, REPHRASE_TYPES, ProbeRecipe, build_probe_set

    ps = spec.probes
    if spec.dataset.kind == "reference_probes":
        rep.lines.append("probe set: read from the reference file at run time")
        return
    asked = [t for t in (ps.types or OFFLINE_TYPES) if t in OFFLINE_TYPES and t not in MODEL_STAGE_TYPES]
    built = build_probe_set(prefs, ProbeRecipe(n_examples=ps.n_examples, selection=ps.selection, seed=ps.seed,
                                               types=tuple(asked)))
    llm = set(ps.llm.types) if ps.llm else set()
    no_llm = []
    for t, why in built.skipped.items():
        if t in REPHRASE_TYPES:
            if t not in llm:
                no_llm.append(t)
            continue                       # made by the LLM endpoint at run time
        msg = f"probe type {t}: {why}"
        (rep.errors if ps.types is not None and t in ps.types else rep.warnings).append(msg)
    if no_llm:
        msg = f"probe types {no_llm} need an LLM endpoint (probes.llm) and are skipped without one"
        (rep.warnings if ps.types is not None else rep.lines).append(msg)
    made = sorted(set(built.probes["response_type"].unique().to_list()))
    later = [t for t in (ps.types or MODEL_STAGE_TYPES) if t in MODEL_STAGE_TYPES]
    rep.lines.append(f"probe set: {built.probes['example_id'].n_unique()} prompts; from the data: {made}"
                     + (f"; from the base model at run time: {later}" if later else ""))
    if tok is not None:
        _truncation(spec, built.probes, tok, rep)
    if prefs.filter(pl.col("split") == "test").is_empty() and spec.generation_analysis.enabled:
        rep.warnings.append("no held-out (test) split: borrowing and win rate on held-out prompts will have "
                            "nothing to measure (add a 'split' column with 'test' rows, or "
                            "put them in a test.jsonl beside train.jsonl)")


def _truncation(spec: ExperimentSpec, probes: pl.DataFrame, tok, rep: Report) -> None:
    """What scoring will cut from the probe text, per type, as a compact table (the tokenizer is on disk)."""
    from ldpipe.model.scoring import truncation_counts

    ps = spec.probes
    df = truncation_counts(tok, probes, max_prompt_tokens=ps.max_prompt_tokens,
                           max_response_tokens=ps.max_response_tokens, chat_template=ps.chat_template)
    cut = df.filter((pl.col("prompts_cut") > 0) | (pl.col("responses_cut") > 0))
    limits = f"max_prompt_tokens {ps.max_prompt_tokens}, max_response_tokens {ps.max_response_tokens}"
    if cut.is_empty():
        rep.lines.append(f"truncation ({limits}): no probe prompt or response is cut")
        return
    width = max(len("type"), *(len(t) for t in cut["response_type"]))
    rep.lines.append(f"truncation ({limits}), the types that scoring cuts:")
    rep.lines.append(f"  {'type':<{width}}  {'rows':>5}  {'prompts cut':>11}  {'responses cut':>13}")
    for r in cut.iter_rows(named=True):
        rep.lines.append(f"  {r['response_type']:<{width}}  {r['rows']:>5}  {r['prompts_cut']:>11}  "
                         f"{r['responses_cut']:>13}")


def check_experiment(spec: ExperimentSpec) -> Report:
    """Every check above for one experiment; an error stops the checks that need what failed."""
    import datasets

    datasets.disable_progress_bars()     # check prints its own lines
    rep = Report(spec.name)
    try:
        prefs = _load(spec, rep)
    except LdpipeError as e:
        rep.errors.append(str(e))
        prefs = None
    tok = None
    try:
        tok = _model(spec, rep)
    except LdpipeError as e:
        rep.errors.append(str(e))
    if prefs is not None:
        for step in (_runs, functools.partial(_probes, tok=tok)):
            try:
                step(spec, prefs, rep)
            except LdpipeError as e:
                rep.errors.append(str(e))
    return rep
