"""The base-model stage: a builtin model trained offline once per config hash (ldpipe.data.corpus says on
what), or a pretrained one located; and where a run's starting weights are."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ldpipe.errors import LdpipeError
from ldpipe.layout import ExperimentFiles
from ldpipe.paths import project_dir
from ldpipe.spec import ExperimentSpec

Log = Callable[[str], None]


# ---------------------------------------------------------------- base model

PRETRAIN_FIGURES = ("val_loss", "val_ppl", "train_loss", "wall_s", "tokens_seen")


@dataclass(frozen=True)
class BaseModelResult:
    path: Path | str                 # a checkpoint folder, or a hub id
    kind: str                        # "builtin" or "pretrained"
    parameters: int
    cached: bool                     # found (a builtin model is trained once per config hash), not trained now
    corpus: str | None = None        # what a builtin model was pretrained on, in words, and how much
    corpus_docs: int | None = None
    corpus_tokens: int | None = None
    pretraining: dict[str, float] = field(default_factory=dict)   # PRETRAIN_FIGURES a builtin model recorded
    record: dict = field(default_factory=dict)                    # a builtin model's whole ldpipe.json

    @classmethod
    def builtin(cls, path: Path, record: dict, *, cached: bool) -> "BaseModelResult":
        return cls(path, "builtin", int(record.get("parameters", 0)), cached, record.get("corpus_source"),
                   record.get("corpus_docs"), record.get("corpus_tokens"),
                   {k: float(record[k]) for k in PRETRAIN_FIGURES if isinstance(record.get(k), (int, float))},
                   record)


def build_base_model(spec: ExperimentSpec, files: ExperimentFiles, *, device: str = "auto",
                     log: Log = print, warn: Log | None = None) -> BaseModelResult:
    from ldpipe.model.checkpoints import load_model_and_tokenizer, save_checkpoint
    from ldpipe.model.lm import (
        PretrainConfig,
        TinyModelConfig,
        build_model,
        count_parameters,
        pretrain,
        resolve_device,
        train_tokenizer,
    )

    m = spec.model
    if m.kind == "pretrained":
        path = _pretrained_source(spec)
        try:
            model, _ = load_model_and_tokenizer(path, local_files_only=not m.allow_download)
        except LdpipeError as e:
            raise LdpipeError(f"experiment {spec.name!r}, model.name_or_path {m.name_or_path!r}: {e}") from None
        return BaseModelResult(path, m.kind, count_parameters(model), cached=True)
    out = files.base_model(spec)
    meta_file = out / "ldpipe.json"
    from ldpipe.data.corpus import DATASET_CORPUS_RULE, SMALL_CORPUS_TOKENS, base_corpus, ends_at_reply_cue

    dataset_corpus = m.corpus is None and spec.dataset.kind != "synthetic"
    if meta_file.exists():  # trained once per config hash; delete the folder to retrain
        meta = json.loads(meta_file.read_text())
        log(f"[{spec.name}] base model cached at {out}")
        # (a model of an older corpus rule is never found here: the rule is part of the model's config hash)
        return BaseModelResult.builtin(out, meta, cached=True)

    corpus = base_corpus(spec, files.preferences, files.probes, files.world)
    log(f"[{spec.name}] base-model corpus: {corpus.source}")
    at_cue = sum(ends_at_reply_cue(d) for d in corpus.docs)
    if at_cue:
        (warn or log)(f"[{spec.name}] WARNING: {at_cue} of {len(corpus.docs)} base-model corpus documents end in a "
                      "reply cue ('Assistant:'); pretraining puts end-of-text after each, which teaches the model "
                      "to end its reply at once (empty y_init). End each document after a reply")
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus.docs, vocab_size=m.vocab_size)
    n_tokens = sum(len(ids) for ids in tok(corpus.docs, add_special_tokens=False)["input_ids"])
    if n_tokens < SMALL_CORPUS_TOKENS:
        (warn or log)(f"[{spec.name}] WARNING: the base-model corpus holds only {n_tokens:,} tokens (under "
            f"{SMALL_CORPUS_TOKENS:,}); the model will know little of the data's language. Declare a larger "
            "model.corpus file, or keep more rows out of training (runs' n_train)")
    a = m.architecture
    model = build_model(TinyModelConfig(hidden_size=a.hidden_size, num_layers=a.num_layers,
                                        num_heads=a.num_heads, intermediate_size=a.intermediate_size,
                                        max_position_embeddings=a.max_position_embeddings,
                                        seed=m.pretrain.seed), vocab_size=len(tok))
    p = m.pretrain
    dev = resolve_device(device)
    log(f"[{spec.name}] pretraining {count_parameters(model):,} parameters on {dev} for {p.steps} steps")
    stats = pretrain(model, tok, corpus.docs,
                     PretrainConfig(steps=p.steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr,
                                    warmup=p.warmup, seed=p.seed),
                     device=dev, progress=lambda d: log(f"[{spec.name}] pretrain step {d['step']}/{p.steps} "
                                                        f"{_fmt({k: v for k, v in d.items() if k != 'step'})}"))
    meta = {"kind": "builtin", "parameters": count_parameters(model), "vocab_size": len(tok),
            "config_hash": spec.model_config_hash(), "device": str(dev),
            "wall_s": round(time.perf_counter() - t0, 2), "corpus_source": corpus.source,
            "corpus_docs": len(corpus.docs), "corpus_tokens": n_tokens,
            **({"corpus_rule": DATASET_CORPUS_RULE} if dataset_corpus else {}),
            **{f"corpus_{k}": v for k, v in corpus.counts.items() if k != "documents"},
            **{k: v for k, v in stats.items()}}
    save_checkpoint(model.cpu(), tok, out, metadata=meta)
    return BaseModelResult.builtin(out, meta, cached=False)


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _pretrained_source(spec: ExperimentSpec) -> Path | str:
    """A local checkpoint (relative paths resolve against the project directory first, then the working
    directory), or the name as given: a hub id, or a missing path that the loader reports."""
    name = spec.model.name_or_path
    p = Path(name).expanduser()
    for cand in ([p] if p.is_absolute() else [project_dir() / p, p]):
        if cand.exists():
            return cand.resolve()
    return name


def base_model_path(spec: ExperimentSpec, files: ExperimentFiles) -> Path | str:
    if spec.model.kind == "pretrained":
        return _pretrained_source(spec)
    path = files.base_model(spec)
    if not (path / "ldpipe.json").exists():
        raise LdpipeError(f"base model {path} is missing: materialize the base model first")
    return path
