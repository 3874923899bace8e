"""The pipeline's stages as plain functions: dataset -> probe set -> base model -> runs -> catalog -> curves.

Each stage reads its inputs from and writes its outputs to files under `Paths`
(Parquet, checkpoints), returns a small summary dict, and does not need Dagster:
the Dagster assets in `ldpipe.defs` only call these.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from ldpipe.atomic import write_json, write_parquet
from ldpipe.errors import LdpipeError
from ldpipe.paths import Paths, project_dir
from ldpipe.schema import PREFERENCE_SCHEMA, PROBE_SCHEMA
from ldpipe.spec import EXTEND_SUPERVISE, ExperimentSpec, RunSpec

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExperimentFiles:
    """Where one experiment's artifacts live."""

    paths: Paths
    name: str

    @property
    def data_dir(self) -> Path:
        return self.paths.datasets / self.name

    @property
    def preferences(self) -> Path:
        return self.data_dir / "preferences.parquet"

    @property
    def world(self) -> Path:
        return self.data_dir / "world"

    @property
    def probes(self) -> Path:
        return self.data_dir / "probes.parquet"

    @property
    def probe_report(self) -> Path:
        return self.data_dir / "probe_report.json"

    def base_model(self, spec: ExperimentSpec) -> Path:
        # keyed by hash only, so experiments declaring the same data and model share one checkpoint
        return self.paths.models / f"base-{spec.model_config_hash()}"

    def run_dir(self, run: RunSpec) -> Path:
        return self.paths.models / self.name / "runs" / run.name

    def curves_png(self, run: RunSpec | None = None) -> Path:
        return self.paths.plots / f"{self.name}{'.' + run.name if run else ''}.learning_curves.png"


def files_for(spec: ExperimentSpec, paths: Paths | None = None) -> ExperimentFiles:
    return ExperimentFiles((paths or Paths.default()).ensure(), spec.name)


# ---------------------------------------------------------------- dataset

def build_dataset(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> dict:
    ds = spec.dataset
    if ds.kind == "synthetic":
        from ldpipe.synthetic import SyntheticConfig, generate

        s = ds.synthetic
        world = generate(SyntheticConfig(seed=s.seed, n_entities=s.n_entities, n_train=s.n_train,
                                         n_test=s.n_test, corpus_docs=s.corpus_docs))
        world.save(files.world)
        prefs = world.preferences
        extra = {"corpus_docs": len(world.corpus), "corpus_chars": sum(map(len, world.corpus)),
                 "facts": world.facts.height}
    elif ds.kind == "reference_probes":
        from ldpipe.data import reference_to_preferences

        prefs = reference_to_preferences(_resolve(ds.path), limit=ds.limit)
        extra = {}
    else:
        from ldpipe.data import DataSource, load_preferences

        prefs = load_preferences(DataSource(kind=ds.kind, path=str(_resolve(ds.path)) if ds.path else None,
                                            columns=dict(ds.columns), limit=ds.limit))
        extra = {}
    prefs = prefs.select(list(PREFERENCE_SCHEMA))
    write_parquet(prefs, files.preferences)
    counts = dict(prefs.group_by("split").len().sort("split").iter_rows())
    log(f"[{spec.name}] dataset {ds.kind}: {counts}")
    return {"kind": ds.kind, "rows": prefs.height, "splits": counts, "path": str(files.preferences), **extra}


def _resolve(path: str | None) -> Path:
    if path is None:
        raise LdpipeError("a path is required")
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_dir() / p


def load_preferences_file(files: ExperimentFiles) -> pl.DataFrame:
    if not files.preferences.exists():
        raise LdpipeError(f"{files.preferences} is missing: materialize the dataset first")
    return pl.read_parquet(files.preferences)


# ---------------------------------------------------------------- probe set

def build_probes(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> dict:
    from ldpipe.probes import ProbeRecipe, build_probe_set, check_probe_set

    ps = spec.probes
    skipped: dict[str, str] = {}
    if spec.dataset.kind == "reference_probes":
        from ldpipe.data import load_reference_probes

        probes = load_reference_probes(_resolve(spec.dataset.path))
        ids = probes["example_id"].unique(maintain_order=True).to_list()
        if ps.selection == "random":
            import random

            ids = sorted(random.Random(ps.seed).sample(ids, min(ps.n_examples, len(ids))), key=ids.index)
        probes = probes.filter(pl.col("example_id").is_in(ids[: ps.n_examples]))
        if ps.types:
            probes = probes.filter(pl.col("response_type").is_in(list(ps.types)))
    else:
        prefs = load_preferences_file(files)
        rephrases = None
        human = None
        if spec.dataset.kind == "synthetic":
            from ldpipe.synthetic import SyntheticWorld, human_sentence

            rephrases = SyntheticWorld.load(files.world).rephrases
            human = human_sentence
        kwargs = {"n_examples": ps.n_examples, "selection": ps.selection, "seed": ps.seed}
        if ps.types:
            kwargs["types"] = tuple(ps.types)
        build = build_probe_set(prefs, ProbeRecipe(**kwargs), rephrases=rephrases, human_sentence=human)
        probes, skipped = build.probes, dict(build.skipped)
        for t in LLM_REPHRASE_TYPES:
            if t in skipped and ps.llm is None:
                skipped[t] = ("needs an LLM endpoint: declare probes.llm (model, base_url, api_key_env) in the "
                              "experiment YAML; every other type was built")
    llm_report: dict = {}
    if ps.llm is not None:
        probes, llm_report = _add_llm_types(probes, ps.llm, files, log)
        for t in ps.llm.types:
            skipped.pop(t, None)
    probes = probes.select(list(PROBE_SCHEMA)).sort("example_id", "response_type")
    types = sorted(probes["response_type"].unique().to_list())
    report = check_probe_set(probes, types)
    write_parquet(probes, files.probes)
    write_json({"skipped": skipped, "checks": report, "llm": llm_report}, files.probe_report)
    for t, why in skipped.items():
        log(f"[{spec.name}] probe type {t} not built: {why}")
    log(f"[{spec.name}] probe set: {probes['example_id'].n_unique()} prompts x {len(types)} types")
    return {"rows": probes.height, "prompts": probes["example_id"].n_unique(), "types": types,
            "skipped": skipped, "checks": report, "llm": llm_report, "path": str(files.probes)}


LLM_REPHRASE_TYPES = ("chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat")


def _add_llm_types(probes: pl.DataFrame, llm, files: ExperimentFiles, log: Log) -> tuple[pl.DataFrame, dict]:
    """Make `llm.types` through an OpenAI-compatible endpoint; completed calls are cached in the ldpipe home,
    so a rerun (or a resumed run after a crash) makes no repeat calls."""
    from ldpipe.llm import LLMClient, LLMConfig
    from ldpipe.llm_types import build_llm_types

    cfg = LLMConfig(base_url=llm.base_url, model=llm.model, api_key_env=llm.api_key_env,
                    concurrency=llm.concurrency, temperature=llm.temperature, top_p=llm.top_p,
                    max_tokens=llm.max_tokens, timeout_s=llm.timeout_s, max_attempts=llm.max_attempts,
                    use_batch_api=llm.use_batch_api, cache_path=files.paths.home / "llm_cache.sqlite")
    with LLMClient(cfg) as client:
        rows, report = build_llm_types(probes, client, types=tuple(llm.types))
        stats = client.stats.as_dict()
    log(f"LLM types {list(llm.types)} via {llm.model}: {stats}")
    kept = probes.filter(~pl.col("response_type").is_in(list(llm.types)))
    return pl.concat([kept, rows.select(list(PROBE_SCHEMA))]), {"types": report, "calls": stats}


def load_probes_file(files: ExperimentFiles) -> pl.DataFrame:
    if not files.probes.exists():
        raise LdpipeError(f"{files.probes} is missing: materialize the probe set first")
    return pl.read_parquet(files.probes)


# ---------------------------------------------------------------- base model

def build_base_model(spec: ExperimentSpec, files: ExperimentFiles, *, device: str = "auto",
                     log: Log = print) -> dict:
    from ldpipe.models import (PretrainConfig, TinyModelConfig, build_model, count_parameters,
                               load_model_and_tokenizer, pretrain, resolve_device, save_checkpoint,
                               train_tokenizer)

    m = spec.model
    if m.kind == "pretrained":
        path = _resolve(m.name_or_path) if Path(m.name_or_path).expanduser().exists() else m.name_or_path
        model, _ = load_model_and_tokenizer(path, local_files_only=not m.allow_download)
        return {"path": str(path), "parameters": count_parameters(model), "cached": True, "kind": m.kind}
    out = files.base_model(spec)
    meta_file = out / "ldpipe.json"
    if meta_file.exists():  # trained once per config hash; delete the folder to retrain
        meta = json.loads(meta_file.read_text())
        log(f"[{spec.name}] base model cached at {out}")
        return {**meta, "path": str(out), "cached": True}
    if spec.dataset.kind != "synthetic":
        raise LdpipeError(f"experiment {spec.name!r}: model.kind 'builtin' is pretrained on the built-in "
                          "synthetic corpus; use dataset.kind 'synthetic' or model.kind 'pretrained'")
    from ldpipe.synthetic import SyntheticWorld

    world = SyntheticWorld.load(files.world)
    t0 = time.perf_counter()
    tok = train_tokenizer(world.corpus, vocab_size=m.vocab_size)
    a = m.architecture
    model = build_model(TinyModelConfig(hidden_size=a.hidden_size, num_layers=a.num_layers,
                                        num_heads=a.num_heads, intermediate_size=a.intermediate_size,
                                        max_position_embeddings=a.max_position_embeddings,
                                        seed=m.pretrain.seed), vocab_size=len(tok))
    p = m.pretrain
    dev = resolve_device(device)
    log(f"[{spec.name}] pretraining {count_parameters(model):,} parameters on {dev} for {p.steps} steps")
    stats = pretrain(model, tok, world.corpus,
                     PretrainConfig(steps=p.steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr,
                                    warmup=p.warmup, seed=p.seed),
                     device=dev, progress=lambda d: log(f"[{spec.name}] pretrain {_fmt(d)}"))
    meta = {"kind": "builtin", "parameters": count_parameters(model), "vocab_size": len(tok),
            "config_hash": spec.model_config_hash(), "device": str(dev),
            "wall_s": round(time.perf_counter() - t0, 2), **{k: v for k, v in stats.items()}}
    save_checkpoint(model.cpu(), tok, out, metadata=meta)
    return {**meta, "path": str(out), "cached": False}


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def base_model_path(spec: ExperimentSpec, files: ExperimentFiles) -> Path | str:
    if spec.model.kind == "pretrained":
        p = Path(spec.model.name_or_path).expanduser()
        return _resolve(spec.model.name_or_path) if p.exists() else spec.model.name_or_path
    path = files.base_model(spec)
    if not (path / "ldpipe.json").exists():
        raise LdpipeError(f"base model {path} is missing: materialize the base model first")
    return path


# ---------------------------------------------------------------- training runs

def train_run(spec: ExperimentSpec, run: RunSpec, files: ExperimentFiles, *, store_root: Path | None = None,
              device: str = "auto", log: Log = print) -> dict:
    """Train one declared run from its start point (base model or parent run), tracking the probe set."""
    from ldpipe.models import configure_threads, load_tokenizer
    from ldpipe.scoring import encode_probes
    from ldpipe.store import Store
    from ldpipe.train import run_training

    configure_threads()
    prefs = load_preferences_file(files)
    probes = load_probes_file(files)
    train = prefs.filter(pl.col("split") == "train").sort("example_id")
    if run.n_train:
        train = train.head(run.n_train)
    examples = _training_examples(train, probes, run)
    start = start_point(spec, run, files)
    config_hash = spec.run_config_hash(run, parent_hash=start.parent_hash)
    parent = spec.parent(run)
    if parent is not None and start.parent_hash != spec.run_config_hash(parent):
        log(f"[{spec.run_id(run)}] WARNING: run {parent.name!r} checkpoint was trained with config hash "
            f"{start.parent_hash}, its declaration now hashes to {spec.run_config_hash(parent)} (launch-time "
            f"override or stale checkpoint); this run's config hash records the checkpoint's")
    tok = load_tokenizer(start.path)
    encoded = encode_probes(tok, probes, max_prompt_tokens=spec.probes.max_prompt_tokens,
                            max_response_tokens=spec.probes.max_response_tokens)
    result = run_training(run, run_id=spec.run_id(run), config_hash=config_hash, model_path=start.path,
                          examples=examples, probes=encoded, store=Store(store_root or files.paths.store),
                          out_dir=files.run_dir(run), max_prompt_tokens=spec.probes.max_prompt_tokens,
                          max_response_tokens=spec.probes.max_response_tokens, device=device,
                          step_offset=start.step_offset,
                          checkpoint_metadata={"start_from": run.start_from, "parent_config_hash": start.parent_hash},
                          log=log)
    delta = (result.last_eval.group_by("response_type").agg(pl.col("logp_sum").mean().alias("end"))
             .join(result.first_eval.group_by("response_type").agg(pl.col("logp_sum").mean().alias("start")),
                   on="response_type").with_columns((pl.col("end") - pl.col("start")).alias("delta"))
             .sort("response_type"))
    rewards = {k: v for k, v in result.final_metrics.items() if k.startswith("rewards_") and v is not None}
    return {"run_id": result.run_id, "config_hash": config_hash, "algo": run.algo, "start_from": run.start_from,
            "parent_config_hash": start.parent_hash, "step_offset": result.step_offset,
            "checkpoint": str(result.checkpoint), "steps": result.steps, "evals": result.evals,
            "wall_s": round(result.wall_s, 2), "device": result.device, "final_loss": result.final_loss,
            "train_examples": len(examples), "final_rewards": rewards,
            "delta_by_type": {t: round(d, 3) for t, d in delta.select("response_type", "delta").iter_rows()}}


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: a checkpoint, the steps already taken before it, the parent's config hash."""

    path: Path | str
    step_offset: int = 0
    parent_hash: str | None = None


def start_point(spec: ExperimentSpec, run: RunSpec, files: ExperimentFiles) -> StartPoint:
    """The base model, or the final checkpoint of the run named by `start_from`."""
    from ldpipe.models import read_metadata

    parent = spec.parent(run)
    if parent is None:
        return StartPoint(base_model_path(spec, files))
    ckpt = files.run_dir(parent) / "final"
    meta = read_metadata(ckpt) if (ckpt / "config.json").is_file() else {}
    if "steps" not in meta or "config_hash" not in meta:
        raise LdpipeError(f"run {run.name!r} starts from run {parent.name!r}, but its final checkpoint {ckpt} is "
                          f"missing or incomplete: materialize {spec.name}/run_{parent.name} first")
    # Recursive: the parent's own offset plus its steps puts a whole chain on one step axis.
    return StartPoint(ckpt, int(meta.get("step_offset", 0)) + int(meta["steps"]), str(meta["config_hash"]))


def _training_examples(train: pl.DataFrame, probes: pl.DataFrame, run: RunSpec) -> list[tuple[str, ...]]:
    """(prompt, response) pairs for SFT; (prompt, chosen, rejected) triples of the train split for DPO/IPO."""
    if run.algo == "sft":
        return _training_pairs(train, probes, run.supervise)
    return list(zip(train["prompt"].to_list(), train["chosen"].to_list(), train["rejected"].to_list()))


def _training_pairs(train: pl.DataFrame, probes: pl.DataFrame, supervise: str) -> list[tuple[str, str]]:
    """(prompt, target) pairs. `chosen`/`rejected` come from the train split, "chosen+rejected" gives both,
    interleaved per prompt (extend-SFT); any other probe type is supervised on the probe prompts
    themselves (the paper's heat-map runs)."""
    if supervise == EXTEND_SUPERVISE:
        return [pair for p, c, r in zip(train["prompt"].to_list(), train["chosen"].to_list(),
                                        train["rejected"].to_list()) for pair in ((p, c), (p, r))]
    if supervise in ("chosen", "rejected"):
        return list(zip(train["prompt"].to_list(), train[supervise].to_list()))
    sel = probes.filter(pl.col("response_type") == supervise)
    if sel.is_empty():
        raise LdpipeError(f"supervise: response type {supervise!r} is not in the probe set; "
                          f"have {sorted(probes['response_type'].unique().to_list())}")
    return list(zip(sel["prompt"].to_list(), sel["response"].to_list()))


# ---------------------------------------------------------------- catalog and curves

def refresh(files: ExperimentFiles | Paths, sql_dir: Path | None = None) -> dict:
    from ldpipe.catalog import refresh_catalog

    paths = files.paths if isinstance(files, ExperimentFiles) else files
    return refresh_catalog(paths.catalog, paths.store, sql_dir or project_dir() / "sql")


def learning_curves(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> dict:
    from ldpipe.analysis.curves import plot_learning_curves, save_plot
    from ldpipe.catalog import query

    ids = [spec.run_id(r) for r in spec.runs]
    in_list = ", ".join(f"'{i}'" for i in ids) or "''"
    curves = query(files.paths.catalog, f"select * from learning_curves where run_id in ({in_list})")
    pngs = {}
    for run in spec.runs:
        part = curves.filter(pl.col("run_id") == spec.run_id(run))
        if part.is_empty():
            continue
        png = plot_learning_curves(part, title=f"{spec.run_id(run)}: change of log π(y|x) per response type")
        pngs[run.name] = str(save_plot(png, files.curves_png(run)))
    log(f"[{spec.name}] learning curves: {curves.height} rows, plots {list(pngs.values())}")
    return {"rows": curves.height, "plots": pngs, "curves": curves}
