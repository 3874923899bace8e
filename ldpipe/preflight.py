"""`ldpipe check`: what a run of an experiment needs, validated in seconds without training anything.

Each check calls the same function the run's step would (the dataset loader, the corpus reader, the tokenizer
and config loaders, the probe builder), so it fails with the same message (file, row, field). Found:
- the data file(s) exist and parse, every row (files up to FULL_CHECK_BYTES; above that the first
  SAMPLE_ROWS rows, and the run validates the rest); for local data, which file became which split (one line each:
  "train.jsonl → train (40 rows)", with the reason where it is not the file's name);
- a declared corpus file exists and parses;
- a pretrained model path or hub id holds a config and a tokenizer (offline unless allow_download), the format
  probes will be scored in (the chat-template decision, BOS), and what truncation cuts from each probe type;
- every run has training rows (a run with none would have zero steps), and its optimizer steps and probe
  evaluations stay under a sane ceiling (MAX_RUN_STEPS, MAX_EVALUATIONS: a warning past them);
- the train split holds the probe prompts (probes.n_examples <= train rows, the synthetic world's n_train
  included), and the declared probe types can be made from the data;
- what a run will need: a builtin architecture's parameters and training memory (weights, gradients and Adam's two
  moments, 4 bytes each, plus activations) against the machine's available memory, and generation lengths against
  the bounds the model and the run enforce.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ldpipe.errors import LdpipeError
from ldpipe.spec import EXTEND_SUPERVISE, ExperimentSpec

FULL_CHECK_BYTES = 50 * 2**20
SAMPLE_ROWS = 1000
MAX_RUN_STEPS = 1_000_000      # optimizer steps of one run past which check warns
MAX_EVALUATIONS = 10_000       # probe evaluations of one run past which check warns
TRAIN_BYTES_PER_PARAM = 4 * 4  # fp32 weights, gradients and Adam's two moments


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


def _train_rows(spec: ExperimentSpec, prefs: pl.DataFrame | None) -> tuple[int, str] | None:
    """(rows of the train split, where that number comes from), or None when check cannot know it (hub data)."""
    if prefs is not None:
        return prefs.filter(pl.col("split") == "train").height, f"the train split of dataset.path {spec.dataset.path!r}"
    if spec.dataset.kind == "synthetic":
        return spec.dataset.synthetic.n_train, "dataset.synthetic.n_train"
    return None


def _runs(spec: ExperimentSpec, n_train: int, rep: Report) -> None:
    n_probe_rows = spec.probes.n_examples * len(spec.probes.types or ("chosen", "rejected"))   # at least these
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
        evals = steps // r.eval_every + 2            # step 0, every eval_every steps, the last
        rep.lines.append(f"run {r.name} ({r.algo}): {n} training examples -> {steps} optimizer steps")
        if steps > MAX_RUN_STEPS or evals > MAX_EVALUATIONS:
            rep.warnings.append(
                f"run {r.name!r}: {steps:,} optimizer steps x {evals:,} probe evaluations (of at least "
                f"{n_probe_rows:,} sequences each) is past check's ceiling of {MAX_RUN_STEPS:,} steps and "
                f"{MAX_EVALUATIONS:,} evaluations (runs[{r.name}].epochs {r.epochs:g}, batch_size {r.batch_size}, "
                f"eval_every {r.eval_every}); it would run for a very long time")
        if r.batch_size > n:
            rep.warnings.append(f"run {r.name!r}: runs[{r.name}].batch_size {r.batch_size:,} is more than its {n} "
                                f"training examples, so every step takes all {n}")
        if r.pairs == "on_policy" and r.on_policy_settings.max_new_tokens >= spec.probes.max_response_tokens:
            # the bound the on-policy run enforces when it starts (ldpipe.training.onpolicy)
            rep.errors.append(f"run {r.name!r}: runs[{r.name}].on_policy.max_new_tokens "
                              f"({r.on_policy_settings.max_new_tokens:,}) must be below probes.max_response_tokens "
                              f"({spec.probes.max_response_tokens}), which also caps training responses")


def available_memory() -> int | None:
    """Bytes of memory available to a new process now (MemAvailable in /proc/meminfo, else the free physical
    pages), or None where neither can be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def builtin_parameters(spec: ExperimentSpec) -> int:
    """Parameters of the builtin GPT-NeoX (ldpipe.model.lm.build_model: untied input and output embeddings)."""
    a, v = spec.model.architecture, spec.model.vocab_size
    h, i = a.hidden_size, a.intermediate_size
    per_layer = 4 * h * h + 2 * h * i + 9 * h + i   # qkv + dense (+ biases), the MLP, two layer norms
    return 2 * v * h + a.num_layers * per_layer + 2 * h


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GB" if n >= 2**30 else f"{n / 2**20:,.0f} MB"


def _builtin_size(spec: ExperimentSpec, n_train: int | None, rep: Report) -> None:
    """The builtin model's parameters and training memory against the machine's available memory, and generation
    lengths against its positions. `n_train`: the train rows, where known (a batch takes at most those)."""
    m = spec.model
    a = m.architecture
    params = builtin_parameters(spec)
    refs = 1 if any(r.algo in ("dpo", "ipo") for r in spec.runs) else 0       # a frozen reference model
    tokens = max([m.pretrain.batch_size * m.pretrain.seq_len]
                 + [min(r.batch_size, 2 * (n_train or r.batch_size)) * (spec.probes.max_prompt_tokens + spec.probes.max_response_tokens)
                    * (2 if r.algo != "sft" else 1) for r in spec.runs])      # the largest batch's tokens
    tokens = min(tokens, 2**40)
    seq = max(m.pretrain.seq_len, spec.probes.max_prompt_tokens + spec.probes.max_response_tokens)
    activations = tokens * a.num_layers * (16 * a.hidden_size + 2 * a.intermediate_size + 2 * a.num_heads * seq) * 4
    need = params * (TRAIN_BYTES_PER_PARAM + 4 * refs) + activations
    have = available_memory()
    what = (f"model.architecture (hidden_size {a.hidden_size}, num_layers {a.num_layers}, intermediate_size "
            f"{a.intermediate_size}, vocab_size {m.vocab_size}): {params:,} parameters; training needs about "
            f"{_gb(need)} (weights, gradients and Adam at {TRAIN_BYTES_PER_PARAM} bytes a parameter"
            + (", a reference model" if refs else "") + f", activations {_gb(activations)})")
    if have is not None and need > have:
        rep.errors.append(f"{what}, more than the {_gb(have)} of memory available on this machine")
    else:
        rep.lines.append(what + (f" of {_gb(have)} available" if have is not None else ""))
    gen = spec.probes.generation.max_new_tokens
    if gen > a.max_position_embeddings:
        rep.errors.append(f"probes.generation.max_new_tokens ({gen:,}) is more than the builtin model's "
                          f"{a.max_position_embeddings} positions (model.architecture.max_position_embeddings)")


def _probes(spec: ExperimentSpec, prefs: pl.DataFrame, rep: Report, tok=None) -> None:
    from ldpipe.probes.build import MODEL_STAGE_TYPES, OFFLINE_TYPES, REPHRASE_TYPES, ProbeRecipe, build_probe_set

    ps = spec.probes
    rows = _train_rows(spec, prefs)
    if rows is not None and ps.n_examples > rows[0]:
        rep.errors.append(_too_few_rows(ps.n_examples, *rows))
        return
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


def _too_few_rows(n_examples: int, rows: int, where: str) -> str:
    return (f"probes.n_examples {n_examples:,} is more than the {rows:,} rows of {where}: the probe prompts are "
            "drawn from the train split; lower probes.n_examples or add rows")


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
    rows = _train_rows(spec, prefs)
    if spec.model.kind == "builtin":
        _builtin_size(spec, rows[0] if rows else spec.dataset.limit, rep)
    if rows is not None:
        _runs(spec, rows[0], rep)
    if prefs is not None:
        try:
            _probes(spec, prefs, rep, tok=tok)
        except LdpipeError as e:
            rep.errors.append(str(e))
    elif rows is not None and spec.probes.n_examples > rows[0]:   # the synthetic world: its declared n_train
        rep.errors.append(_too_few_rows(spec.probes.n_examples, *rows))
    return rep
