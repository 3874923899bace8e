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

    @property
    def model_probes(self) -> Path:   # model-made probe rows (y_init, y_selfr, random tokens)
        return self.data_dir / "model_probes.parquet"

    @property
    def model_probe_report(self) -> Path:
        return self.data_dir / "model_probe_report.json"

    def base_model(self, spec: ExperimentSpec) -> Path:
        # keyed by hash only, so experiments declaring the same data and model share one checkpoint
        return self.paths.models / f"base-{spec.model_config_hash()}"

    def run_dir(self, run: RunSpec) -> Path:
        return self.paths.models / self.name / "runs" / run.name

    def resume_dir(self, run: RunSpec) -> Path:
        """Resume checkpoints of an unfinished run (ldpipe.resume; removed when the run finishes)."""
        return self.run_dir(run) / "resume"

    def snapshot_dir(self, run: RunSpec, step: int) -> Path:
        """The model-only checkpoint of `run` after `step` optimizer steps (RunSpec.snapshot_every)."""
        return self.run_dir(run) / "checkpoints" / f"step-{step:07d}"

    def curves_png(self, run: RunSpec | None = None) -> Path:
        return self.paths.plots / f"{self.name}{'.' + run.name if run else ''}.learning_curves.png"


def files_for(spec: ExperimentSpec, paths: Paths | None = None) -> ExperimentFiles:
    return ExperimentFiles((paths or Paths.default()).ensure(), spec.name)


# ---------------------------------------------------------------- dataset

def load_dataset(spec: ExperimentSpec, *, sample_rows: int | None = None):
    """The declared preference data (PREFERENCE_SCHEMA), the source's extra facts, and the synthetic world (or
    None). Nothing is written: the dataset stage and `ldpipe check` both use it, so both give the same errors.
    `sample_rows` (check of a large file): read only that many rows of it."""
    ds = spec.dataset
    world = None
    if ds.kind == "synthetic":
        from ldpipe.synthetic import SyntheticConfig, generate

        s = ds.synthetic
        world = generate(SyntheticConfig(seed=s.seed, n_entities=s.n_entities, n_train=s.n_train,
                                         n_test=s.n_test, corpus_docs=s.corpus_docs))
        prefs = world.preferences
        extra = {"corpus_docs": len(world.corpus), "corpus_chars": sum(map(len, world.corpus)),
                 "facts": world.facts.height}
    elif ds.kind == "reference_probes":
        from ldpipe.data import reference_to_preferences

        prefs = reference_to_preferences(_resolve(ds.path), limit=sample_rows or ds.limit)
        extra = {}
    else:
        from ldpipe.data import DataSource, load_preferences

        prefs = load_preferences(DataSource(kind=ds.kind, path=str(_resolve(ds.path)) if ds.path else None,
                                            columns=dict(ds.columns), limit=ds.limit))
        extra = {}
    return prefs.select(list(PREFERENCE_SCHEMA)), extra, world


def build_dataset(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> dict:
    ds = spec.dataset
    prefs, extra, world = load_dataset(spec)
    if world is not None:
        world.save(files.world)
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
# Two stages write the probe rows: build_probes (everything that needs no model: dataset, templates, LLM
# endpoint, user-declared types) -> probes.parquet, and build_model_probes (y_init, y_selfr, random tokens and
# custom types made from them; needs the base model) -> model_probes.parquet. load_probes_file joins them.
# Each type's rows are cached under a content hash of what they depend on (probes.TypeCache), so adding a type
# builds only that type, and a rerun builds nothing and leaves both files byte-identical.

PROBE_BUILDER_VERSION = 1   # part of every per-type cache key: bump when a builder's output changes
LLM_REPHRASE_TYPES = ("chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat")


def _probe_cache(files: ExperimentFiles):
    from ldpipe.probes import TypeCache

    return TypeCache(files.data_dir / "probe_cache")


def _custom_stages(ps) -> dict[str, str]:
    """custom type -> "probes" or "model": a type made (through earlier custom types) from a model-made type
    is built by the model stage."""
    from ldpipe.probes import MODEL_STAGE_TYPES

    stage: dict[str, str] = {}
    for ct in ps.custom_types:
        stage[ct.name] = stage.get(ct.source) or ("model" if ct.source in MODEL_STAGE_TYPES else "probes")
    return stage


def _core_types(ps, stage: str, *, reference: bool = False) -> list[str]:
    """The core types a stage makes. A reference probe file carries its own y_init / y_selfr, so for it the
    probe-set stage imports them and the model stage adds only what the file lacks."""
    from ldpipe.probes import MODEL_STAGE_TYPES, MODEL_TYPES, OFFLINE_TYPES

    wanted = list(ps.types) if ps.types is not None else [*OFFLINE_TYPES, *MODEL_TYPES]
    in_model = set(MODEL_STAGE_TYPES) - (set(MODEL_TYPES) if reference and stage == "probes" else set())
    return [t for t in wanted if (t in in_model) == (stage == "model")]


def _fetch(cache, keys: dict[str, str], make: Callable[[list[str]], tuple[pl.DataFrame, dict[str, str], dict]],
           pool: dict[str, pl.DataFrame], status: dict[str, str], skipped: dict[str, str],
           info: dict[str, dict]) -> None:
    """Fill `pool` with the rows of every type in `keys`: from the cache where its key is stored, else from
    one call of `make(missing types) -> (rows, {type: why skipped}, {type: build report})`."""
    missing = []
    for t, key in keys.items():
        rows = cache.get(t, key)
        if rows is None:
            missing.append(t)
        else:
            pool[t], status[t] = rows, "reused"
            info[t] = cache.get_info(t, key)
    if not missing:
        return
    built, why, reports = make(missing)
    for t in missing:
        rows = built.filter(pl.col("response_type") == t).select(list(PROBE_SCHEMA)).sort("example_id")
        if t in why or rows.is_empty():
            skipped[t] = why.get(t, "no rows were built")
            continue
        cache.put(t, keys[t], rows, info=reports.get(t, {}))
        pool[t], status[t], info[t] = rows, "built", reports.get(t, {})


def _fetch_custom(cache, ps, names: list[str], keys: dict[str, str], pool, status, skipped, info) -> list[str]:
    """Build/reuse the user-declared types `names` (in declaration order) from the rows in `pool`."""
    from ldpipe.probes import build_custom_type, content_hash, custom_type_inputs

    done = []
    for ct in ps.custom_types:
        if ct.name not in names:
            continue
        lacking = [t for t in custom_type_inputs(ct) if t not in keys or t not in pool]
        if lacking:
            skipped[ct.name] = f"its input type {lacking[0]!r} was not built"
            continue
        keys[ct.name] = content_hash({"v": PROBE_BUILDER_VERSION, "custom": ct.model_dump(mode="json"),
                                      "seed": ps.seed, "inputs": [keys[t] for t in custom_type_inputs(ct)]})

        def make(_missing: list[str], ct=ct) -> tuple[pl.DataFrame, dict, dict]:
            rows, why = build_custom_type(ct, pool, seed=ps.seed)
            if rows is None:
                return pl.DataFrame(schema=PROBE_SCHEMA), {ct.name: why}, {}
            return rows, {}, {ct.name: {"transform": ct.transform, "from": ct.source}}

        _fetch(cache, {ct.name: keys[ct.name]}, make, pool, status, skipped, info)
        done.append(ct.name)
    return done


def _write_if_changed(df: pl.DataFrame, path: Path) -> bool:
    """Write `df` as Parquet unless the file already holds exactly these bytes (a rerun leaves it untouched)."""
    import io

    from ldpipe.atomic import write_bytes

    buf = io.BytesIO()
    df.write_parquet(buf)
    data = buf.getvalue()
    if path.is_file() and path.read_bytes() == data:
        return False
    write_bytes(data, path)
    return True


def _finish_stage(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return (pl.concat(frames) if frames else pl.DataFrame(schema=PROBE_SCHEMA)).select(list(PROBE_SCHEMA)) \
        .sort("example_id", "response_type")


def build_probes(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> dict:
    """Stage 1 of the probe set: every type that needs no model, written to `files.probes`."""
    from ldpipe.probes import (REPHRASE_TYPES, ProbeRecipe, build_probe_set, check_probe_set, content_hash,
                               custom_type_inputs, file_hash)

    ps, ds = spec.probes, spec.dataset
    cache = _probe_cache(files)
    wanted = _core_types(ps, "probes", reference=ds.kind == "reference_probes")
    stages = _custom_stages(ps)
    customs = [ct.name for ct in ps.custom_types if stages[ct.name] == "probes"]
    llm_types = [t for t in (ps.llm.types if ps.llm else ()) if t in wanted]
    # types built only as inputs (of LLM rephrases or custom types) are not written unless wanted
    needed = list(dict.fromkeys([*wanted, *(["chosen", "rejected"] if llm_types else []),
                                 *(t for ct in ps.custom_types if ct.name in customs
                                   for t in custom_type_inputs(ct) if t not in stages)]))
    pool: dict[str, pl.DataFrame] = {}
    status: dict[str, str] = {}
    skipped: dict[str, str] = {}
    info: dict[str, dict] = {}
    recipe = {"v": PROBE_BUILDER_VERSION, "kind": ds.kind, "n": ps.n_examples, "selection": ps.selection,
              "seed": ps.seed}
    keys: dict[str, str] = {}
    if ds.kind == "reference_probes":
        ref = _resolve(ds.path)
        base = {**recipe, "file": file_hash(ref), "limit": ds.limit}
        keys = {t: content_hash({**base, "type": t}) for t in needed}
        _fetch(cache, keys, lambda missing: _reference_types(ref, ps, ds.limit, missing), pool, status, skipped,
               info)
    else:
        base = {**recipe, "preferences": file_hash(files.preferences)}
        offline = [t for t in needed if t not in llm_types]
        reph_file = files.world / "rephrases.parquet"
        for t in offline:
            extra = {"rephrases": file_hash(reph_file)} if t in REPHRASE_TYPES and ds.kind == "synthetic" else {}
            keys[t] = content_hash({**base, "type": t, **extra})

        def make_offline(missing: list[str]) -> tuple[pl.DataFrame, dict, dict]:
            rephrases, human = None, None
            if ds.kind == "synthetic":
                from ldpipe.synthetic import SyntheticWorld, human_sentence

                rephrases, human = SyntheticWorld.load(files.world).rephrases, human_sentence
            recipe_ = ProbeRecipe(n_examples=ps.n_examples, selection=ps.selection, seed=ps.seed, types=tuple(missing))
            build = build_probe_set(load_preferences_file(files), recipe_, rephrases=rephrases, human_sentence=human)
            why = dict(build.skipped)
            for t in LLM_REPHRASE_TYPES:
                if t in why:
                    why[t] = ("needs an LLM endpoint: declare probes.llm (model, base_url, api_key_env) in the "
                              "experiment YAML; every other type was built")
            return build.probes, why, {}

        _fetch(cache, keys, make_offline, pool, status, skipped, info)
        if llm_types:
            llm = ps.llm
            from ldpipe.llm_types import TEMPLATES

            params = {"model": llm.model, "temperature": llm.temperature, "top_p": llm.top_p,
                      "max_tokens": llm.max_tokens, "templates": content_hash(TEMPLATES)}
            # irr_hum's word count now splits on any whitespace: rows asked with the single-space count are not reused
            llm_keys = {t: content_hash({**base, "type": t, "llm": params,
                                         "sources": [keys.get("chosen"), keys.get("rejected")],
                                         **({"words": "whitespace"} if t == "irr_hum" else {})})
                        for t in llm_types}
            keys |= llm_keys

            def make_llm(missing: list[str]) -> tuple[pl.DataFrame, dict, dict]:
                sources = _finish_stage([pool[t] for t in ("chosen", "rejected") if t in pool])
                rows, report = _add_llm_types(sources, llm, missing, files, log)
                calls = report["calls"]
                return rows, {}, {t: {**report["types"].get(t, {}), "calls": calls} for t in missing}

            _fetch(cache, llm_keys, make_llm, pool, status, skipped, info)
    done = _fetch_custom(cache, ps, customs, keys, pool, status, skipped, info)
    for t in _core_types(ps, "model"):
        if t not in pool:
            skipped[t] = f"built by the model-probe stage ({spec.name}/model_probes): it needs the base model"
    out_types = [t for t in [*wanted, *done] if t in pool]
    probes = _finish_stage([pool[t] for t in out_types])
    types = sorted(probes["response_type"].unique().to_list())
    report = check_probe_set(probes, types)
    written = _write_if_changed(probes, files.probes)
    pairs = _write_probe_pairs(spec, files, probes)
    built = sorted(t for t in out_types if status.get(t) == "built")
    cache_report = {"built": built, "reused": sorted(t for t in out_types if status.get(t) == "reused")}
    llm_report = {t: info.get(t, {}) for t in llm_types if t in pool}
    write_json({"skipped": skipped, "checks": report, "llm": llm_report, "cache": cache_report,
                "keys": {t: keys[t] for t in out_types}}, files.probe_report)
    for t, why in skipped.items():
        log(f"[{spec.name}] probe type {t} not built here: {why}")
    log(f"[{spec.name}] probe set: {probes['example_id'].n_unique()} prompts x {len(types)} types; built "
        f"{built or 'nothing'}, reused {len(cache_report['reused'])} type(s) from the cache"
        f"{'' if written else '; file unchanged'}")
    return {"rows": probes.height, "prompts": probes["example_id"].n_unique(), "types": types,
            "skipped": skipped, "checks": report, "llm": llm_report, "cache": cache_report, "written": written,
            "path": str(files.probes), "rejected_kinds": pairs}


def _write_probe_pairs(spec: ExperimentSpec, files: ExperimentFiles, probes: pl.DataFrame) -> dict[str, int]:
    """The store table probe_pairs (how each probe prompt's y- relates to its y+), one shard per experiment;
    returns the count of probe prompts per rejected kind ("unknown" where the dataset records none)."""
    from ldpipe.probes import pair_similarity
    from ldpipe.schema import PROBE_PAIRS_SCHEMA
    from ldpipe.store import Store

    kinds = None
    if spec.dataset.kind == "synthetic":
        from ldpipe.synthetic import SyntheticWorld

        kinds = SyntheticWorld.load(files.world).kinds
    df = pair_similarity(probes, spec.name, kinds)
    Store(files.paths.store).write_shard("probe_pairs", df, partition={"experiment": spec.name}, name="probe_pairs",
                                         schema=PROBE_PAIRS_SCHEMA)
    return dict(sorted(df.group_by(pl.col("rejected_kind").fill_null("unknown")).len().iter_rows()))


def _reference_types(path: Path, ps, limit: int | None, types: list[str]) -> tuple[pl.DataFrame, dict, dict]:
    """The asked types of the reference probe file, for the recipe's selection of its prompts."""
    from ldpipe.data import load_reference_probes
    from ldpipe.probes import select_indices

    probes = load_reference_probes(path, limit=limit)
    ids = probes["example_id"].unique(maintain_order=True).to_list()
    picked = [ids[i] for i in select_indices(len(ids), ps.n_examples, ps.selection, ps.seed)]
    probes = probes.filter(pl.col("example_id").is_in(picked) & pl.col("response_type").is_in(types))
    have = set(probes["response_type"].unique().to_list())
    why = {t: f"the reference file {path.name} has no {t!r} field" for t in types if t not in have}
    return probes, why, {}


def _add_llm_types(sources: pl.DataFrame, llm, types: list[str], files: ExperimentFiles,
                   log: Log) -> tuple[pl.DataFrame, dict]:
    """Make `types` through an OpenAI-compatible endpoint from the chosen/rejected rows in `sources`; completed
    calls are also cached in the ldpipe home, so a crashed run resumes without repeat calls."""
    from ldpipe.llm import LLMClient, LLMConfig
    from ldpipe.llm_types import build_llm_types

    cfg = LLMConfig.from_spec(llm, cache_path=files.paths.llm_cache)
    with LLMClient(cfg) as client:
        rows, report = build_llm_types(sources, client, types=tuple(types))
        stats = client.stats.as_dict()
    log(f"LLM types {types} via {llm.model}: {stats}")
    return rows.select(list(PROBE_SCHEMA)), {"types": report, "calls": stats}


# ---------------------------------------------------------------- model-made probe types

def model_fingerprint(ref: Path | str) -> dict[str, str]:
    """Content hashes of a checkpoint's weights+config and of its tokenizer files (files over 64 MiB by
    size and mtime, so a multi-GB model is not re-read); a hub id stands for itself."""
    from ldpipe.probes import content_hash, file_hash

    p = Path(ref)
    if not p.is_dir():
        return {"weights": f"hub:{ref}", "tokenizer": f"hub:{ref}"}
    weights, tok = {}, {}
    for f in sorted(x for x in p.iterdir() if x.is_file() and x.name != "ldpipe.json"):
        st = f.stat()
        h = file_hash(f) if st.st_size <= 64 << 20 else f"{st.st_size}:{st.st_mtime_ns}"
        (tok if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")) else weights)[f.name] = h
    return {"weights": content_hash(weights), "tokenizer": content_hash(tok)}


def _cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    ends = [text.find(s) for s in stops if s and s in text]
    return (text[:min(ends)].strip(), True) if ends else (text.strip(), False)


def build_model_probes(spec: ExperimentSpec, files: ExperimentFiles, *, device: str = "auto",
                       log: Log = print, warn: Log | None = None) -> dict:
    """Stage 2 of the probe set: y_init (`chosen_initial`, the base model's own reply to the probe prompt),
    y_selfr (`chosen_selfr`, its continuation of a rephrase instruction + y+), uniformly random tokens of its
    vocabulary (`random_tokens`) and custom types made from these; written to `files.model_probes`. Also counts,
    with the base model's tokenizer, what scoring cuts from the whole probe set (`_probe_truncation`); `warn`
    (default `log`) gets a line per type of which more than a quarter of the prompts or responses are cut."""
    from ldpipe.probes import (check_probe_set, content_hash, file_hash, frame_hash, random_token_rows)

    ps, gen = spec.probes, spec.probes.generation
    if not files.probes.exists():
        raise LdpipeError(f"{files.probes} is missing: materialize {spec.name}/probe_set first")
    stage1 = pl.read_parquet(files.probes)
    probe_sha = file_hash(files.probes)
    present = set(stage1["response_type"].unique().to_list())
    wanted, skipped = [], {}
    for t in _core_types(ps, "model"):
        if t in present:
            skipped[t] = "already in the probe set (provided by the dataset)"
        else:
            wanted.append(t)
    stages = _custom_stages(ps)
    customs = [ct.name for ct in ps.custom_types if stages[ct.name] == "model"]
    chosen = stage1.filter(pl.col("response_type") == "chosen").sort("example_id")
    cache = _probe_cache(files)
    pool: dict[str, pl.DataFrame] = {t: stage1.filter(pl.col("response_type") == t) for t in present}
    status: dict[str, str] = {}
    info: dict[str, dict] = {}
    keys: dict[str, str] = {}
    seed = ps.seed if gen.seed is None else gen.seed
    decoding = ({"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "seed": seed}
                if gen.do_sample else {"do_sample": False})
    fp: dict[str, str] = {}
    model_ref: Path | str = ""
    if wanted and chosen.is_empty():
        skipped |= {t: "the probe set has no 'chosen' rows to make it from" for t in wanted}
        wanted = []
    if wanted:
        model_ref = base_model_path(spec, files)
        fp = model_fingerprint(model_ref)
        src = frame_hash(chosen.select("example_id", "prompt", "response"))
        gen_params = {**decoding, "max_new_tokens": gen.max_new_tokens, "stop": list(gen.stop),
                      "max_prompt_tokens": ps.max_prompt_tokens}
        for t in wanted:
            body: dict = {"v": PROBE_BUILDER_VERSION, "type": t, "source": src}
            if t == "random_tokens":
                body |= {"tokenizer": fp["tokenizer"], "seed": ps.seed}
            else:
                body |= {"model": fp["weights"], "tokenizer": fp["tokenizer"], "generation": gen_params}
                if t == "chosen_selfr":
                    body["template"] = gen.selfr_template
            keys[t] = content_hash(body)
        for t in present:   # stage-1 types as inputs of custom types
            keys[t] = content_hash({"stage1": frame_hash(pool[t])})

        def make(missing: list[str]) -> tuple[pl.DataFrame, dict, dict]:
            return _generate_model_types(missing, chosen, model_ref, fp, gen, decoding, ps, seed, device, log)

        _fetch(cache, {t: keys[t] for t in wanted}, make, pool, status, skipped, info)
    else:
        for t in present:
            keys[t] = content_hash({"stage1": frame_hash(pool[t])})
    done = _fetch_custom(cache, ps, customs, keys, pool, status, skipped, info)
    out_types = [t for t in [*wanted, *done] if t in pool and t not in present]
    rows = _finish_stage([pool[t] for t in out_types])
    # checks over the union, so y_selfr is compared with y+ and every prompt is checked for every type
    union = _finish_stage([stage1, rows])
    report = check_probe_set(union, sorted(union["response_type"].unique().to_list()))
    truncation, trunc_warnings = _probe_truncation(spec, files, union)
    for w in trunc_warnings:
        (warn or log)(w)
    written = _write_if_changed(rows, files.model_probes)
    cache_report = {"built": sorted(t for t in out_types if status.get(t) == "built"),
                    "reused": sorted(t for t in out_types if status.get(t) == "reused")}
    gen_report = {t: info.get(t, {}) for t in out_types}
    write_json({"probe_set_sha": probe_sha, "skipped": skipped, "checks": report, "generation": gen_report,
                "cache": cache_report, "model": str(model_ref), "fingerprint": fp, "truncation": truncation,
                "truncation_warnings": trunc_warnings, "keys": {t: keys[t] for t in out_types}},
               files.model_probe_report)
    for t, why in skipped.items():
        log(f"[{spec.name}] model probe type {t} not built: {why}")
    log(f"[{spec.name}] model probes: {out_types}; built {cache_report['built'] or 'nothing'}, reused "
        f"{cache_report['reused'] or 'nothing'}{'' if written else '; file unchanged'}")
    return {"rows": rows.height, "types": out_types, "skipped": skipped, "checks": report,
            "generation": gen_report, "cache": cache_report, "written": written, "path": str(files.model_probes),
            "model": str(model_ref), "truncation": truncation, "truncation_warnings": trunc_warnings}


TRUNCATION_WARN_SHARE = 0.25   # warn when more than this share of a type's prompts or responses is cut


def _probe_truncation(spec: ExperimentSpec, files: ExperimentFiles,
                      probes: pl.DataFrame) -> tuple[dict[str, dict], list[str]]:
    """The store table probe_truncation: per response type of `probes` (the whole probe set), how many prompts
    and responses scoring cuts with the base model's tokenizer and the probes.max_*_tokens limits, and the
    tokens it drops; one shard per experiment. Returns ({type: counts}, warnings for the types of which more
    than TRUNCATION_WARN_SHARE of the prompts or responses are cut)."""
    from ldpipe.models import load_tokenizer
    from ldpipe.schema import PROBE_TRUNCATION_SCHEMA
    from ldpipe.scoring import truncation_counts
    from ldpipe.store import Store

    ps = spec.probes
    tok = load_tokenizer(base_model_path(spec, files), local_files_only=not spec.model.allow_download)
    df = truncation_counts(tok, probes, max_prompt_tokens=ps.max_prompt_tokens,
                           max_response_tokens=ps.max_response_tokens, source=str(files.probes))
    df = df.with_columns(pl.lit(spec.name).alias("experiment")).select(list(PROBE_TRUNCATION_SCHEMA))
    Store(files.paths.store).write_shard("probe_truncation", df, partition={"experiment": spec.name},
                                         name="probe_truncation", schema=PROBE_TRUNCATION_SCHEMA)
    counts = {r["response_type"]: {k: v for k, v in r.items() if k not in ("experiment", "response_type")}
              for r in df.iter_rows(named=True)}
    warnings = []
    # one line for prompts and one for responses, each naming every type over the share (a real probe file can
    # have all 14 types cut: 28 lines would bury the rest of the run's output)
    for what, setting, kept in (
            ("prompts", "probes.max_prompt_tokens", f"the last {ps.max_prompt_tokens} tokens of a prompt"),
            ("responses", "probes.max_response_tokens",
             f"the first {ps.max_response_tokens - 1} tokens of a response, then EOS")):
        over = [(t, c) for t, c in counts.items() if c["rows"] and c[f"{what}_cut"] / c["rows"] > TRUNCATION_WARN_SHARE]
        if over:
            each = "; ".join(f"{t!r}: {c[f'{what}_cut']} of {c['rows']} {what} ({c[f'{what}_cut'] / c['rows']:.0%})"
                             for t, c in over)
            dropped = sum(c[f"{what[:-1]}_tokens_dropped"] for _, c in over)
            warnings.append(f"[{spec.name}] more than {TRUNCATION_WARN_SHARE:.0%} of the {what} of {len(over)} probe "
                            f"type(s) are cut by scoring, {dropped} tokens dropped in all (scoring keeps {kept}); "
                            f"raise {setting} to score them whole: {each}")
    return counts, warnings


def _generate_model_types(types: list[str], chosen: pl.DataFrame, model_ref, fp: dict, gen, decoding: dict, ps,
                          seed: int, device: str, log: Log) -> tuple[pl.DataFrame, dict, dict]:
    from ldpipe.generate import GenerationConfig, generate
    from ldpipe.models import load_model_and_tokenizer, load_tokenizer
    from ldpipe.probes import random_token_rows

    ids, prompts, ys = (chosen[c].to_list() for c in ("example_id", "prompt", "response"))
    lead = [y[: len(y) - len(y.lstrip())] for y in ys]
    records: list[tuple[str, str, str, str, str]] = []
    reports: dict[str, dict] = {}
    if "random_tokens" in types:
        tok = load_tokenizer(model_ref)
        for i, p, (text, prov) in zip(ids, prompts, random_token_rows(ys, tok, ps.seed)):
            records.append((i, "random_tokens", p, text, prov))
        reports["random_tokens"] = {"made": len(ids)}
    todo = [t for t in ("chosen_initial", "chosen_selfr") if t in types]
    if todo:
        model, tok = load_model_and_tokenizer(model_ref, device=device)
        how = (f"sample:t={gen.temperature}:p={gen.top_p}:seed={seed}" if gen.do_sample else "greedy")
        for t in todo:
            if t == "chosen_initial":
                inputs, budget = prompts, ps.max_prompt_tokens
            else:   # the instruction must survive left-truncation, so the budget covers y+ too
                inputs = [gen.selfr_template.replace("{chosen}", y.strip()) for y in ys]
                budget = ps.max_prompt_tokens + ps.max_response_tokens
            cfg = GenerationConfig(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                                   temperature=gen.temperature, top_p=gen.top_p, seed=seed,
                                   batch_size=gen.batch_size, max_prompt_tokens=budget)
            outs = generate(model, tok, inputs, cfg)
            stopped = empty = 0
            for i, p, ld, y, out in zip(ids, prompts, lead, ys, outs):
                text, cut = _cut(out, tuple(gen.stop))
                stopped += cut
                empty += not text
                records.append((i, t, p, ld + text, f"base_model:{fp['weights'][:8]}:{how}"
                                + (":selfr" if t == "chosen_selfr" else "")))
            reports[t] = {"made": len(ids), "stopped_at_marker": stopped, "empty": empty, "decoding": how}
            log(f"generated {t}: {len(ids)} rows ({how}), {empty} empty, {stopped} cut at a stop marker")
    return pl.DataFrame(records, schema=PROBE_SCHEMA, orient="row"), {}, reports


def load_probes_file(files: ExperimentFiles) -> pl.DataFrame:
    """The whole probe set: the probe-set stage's rows plus, once built, the model-made ones."""
    from ldpipe.probes import file_hash

    if not files.probes.exists():
        raise LdpipeError(f"{files.probes} is missing: materialize the probe set first")
    probes = pl.read_parquet(files.probes)
    if not files.model_probes.exists():
        return probes
    report = json.loads(files.model_probe_report.read_text()) if files.model_probe_report.exists() else {}
    if report.get("probe_set_sha") != file_hash(files.probes):
        raise LdpipeError(f"{files.model_probes} was built from another version of {files.probes}: materialize "
                          f"{files.name}/model_probes again (or delete {files.model_probes})")
    both = _finish_stage([probes, pl.read_parquet(files.model_probes)])
    dup = both.select("example_id", "response_type").is_duplicated()
    if dup.any():
        i = int(dup.arg_true()[0])
        raise LdpipeError(f"{files.model_probes} repeats probe row ({both['example_id'][i]!r}, "
                          f"{both['response_type'][i]!r}) of {files.probes}")
    return both


# ---------------------------------------------------------------- base model

def build_base_model(spec: ExperimentSpec, files: ExperimentFiles, *, device: str = "auto",
                     log: Log = print, warn: Log | None = None) -> dict:
    from ldpipe.models import (PretrainConfig, TinyModelConfig, build_model, count_parameters,
                               load_model_and_tokenizer, pretrain, resolve_device, save_checkpoint,
                               train_tokenizer)

    m = spec.model
    if m.kind == "pretrained":
        path = _pretrained_source(spec)
        try:
            model, _ = load_model_and_tokenizer(path, local_files_only=not m.allow_download)
        except LdpipeError as e:
            raise LdpipeError(f"experiment {spec.name!r}, model.name_or_path {m.name_or_path!r}: {e}") from None
        return {"path": str(path), "parameters": count_parameters(model), "cached": True, "kind": m.kind}
    out = files.base_model(spec)
    meta_file = out / "ldpipe.json"
    if meta_file.exists():  # trained once per config hash; delete the folder to retrain
        meta = json.loads(meta_file.read_text())
        log(f"[{spec.name}] base model cached at {out}")
        return {**meta, "path": str(out), "cached": True}
    from ldpipe.corpus import SMALL_CORPUS_TOKENS, base_corpus

    corpus = base_corpus(spec, files.preferences, files.probes, files.world)
    log(f"[{spec.name}] base-model corpus: {corpus.source}")
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
            **{f"corpus_{k}": v for k, v in corpus.counts.items() if k != "documents"},
            **{k: v for k, v in stats.items()}}
    save_checkpoint(model.cpu(), tok, out, metadata=meta)
    return {**meta, "path": str(out), "cached": False}


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


# ---------------------------------------------------------------- training runs

def train_run(spec: ExperimentSpec, run: RunSpec, files: ExperimentFiles, *, store_root: Path | None = None,
              device: str = "auto", log: Log = print) -> dict:
    """Train one declared run from its start point (base model or parent run), tracking the probe set.

    Resumes from the run's resume checkpoint when one with the same config hash exists
    (`resumed_from` in the result: its step, else None)."""
    from ldpipe.models import configure_threads, load_tokenizer
    from ldpipe.scoring import encode_probes
    from ldpipe.store import Store
    from ldpipe.train import run_training

    configure_threads()
    prefs = load_preferences_file(files)
    probes = load_probes_file(files)
    train = training_rows(prefs, run)
    examples = _training_examples(train, probes, run)
    start = start_point(spec, run, files)
    config_hash = spec.run_config_hash(run, parent_hash=start.parent_hash)
    parent = spec.parent(run)
    if parent is not None and start.parent_hash != spec.run_config_hash(parent):
        # expected when this launch overrides the declaration too (a preset): then it is no warning
        overridden = run != spec.run(run.name)
        log(f"[{spec.run_id(run)}] {'' if overridden else 'WARNING: '}run {parent.name!r} checkpoint was trained with config hash "
            f"{start.parent_hash}, its declaration now hashes to {spec.run_config_hash(parent)} (launch-time "
            f"override or stale checkpoint); this run's config hash records the checkpoint's")
    if run.trainer == "trl":   # TRL's SFTTrainer/DPOTrainer with ldpipe's tracking callback (ldpipe.trl_run)
        from ldpipe.trl_run import run_trl as train_fn
        tracked = probes
    else:
        import functools

        tok = load_tokenizer(start.path)
        # an on-policy judge caches in this run's home, not in whatever LDPIPE_HOME says
        train_fn = functools.partial(run_training, llm_cache=files.paths.llm_cache)
        tracked = encode_probes(tok, probes, max_prompt_tokens=spec.probes.max_prompt_tokens,
                                max_response_tokens=spec.probes.max_response_tokens)
    result = train_fn(run, run_id=spec.run_id(run), config_hash=config_hash, model_path=start.path,
                          examples=examples, probes=tracked, store=Store(store_root or files.paths.store),
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
            "wall_s": round(result.wall_s, 2), "device": result.device, "precision": result.precision,
            "final_loss": result.final_loss,
            "train_examples": len(examples), "final_rewards": rewards, "resumed_from": result.resumed_from,
            "delta_by_type": {t: round(d, 3) for t, d in delta.select("response_type", "delta").iter_rows()}}


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: a checkpoint, the steps already taken before it, the parent's config hash."""

    path: Path | str
    step_offset: int = 0
    parent_hash: str | None = None


def start_point(spec: ExperimentSpec, run: RunSpec, files: ExperimentFiles) -> StartPoint:
    """The base model, or the final checkpoint of the run named by `start_from`."""
    from ldpipe.models import is_checkpoint, read_metadata

    parent = spec.parent(run)
    if parent is None:
        return StartPoint(base_model_path(spec, files))
    ckpt = files.run_dir(parent) / "final"
    meta = read_metadata(ckpt) if is_checkpoint(ckpt) else {}
    if "steps" not in meta or "config_hash" not in meta:
        raise LdpipeError(f"run {run.name!r} starts from run {parent.name!r}, but its final checkpoint {ckpt} is "
                          f"missing or incomplete: materialize {spec.name}/run_{parent.name} first")
    # Recursive: the parent's own offset plus its steps puts a whole chain on one step axis.
    return StartPoint(ckpt, int(meta.get("step_offset", 0)) + int(meta["steps"]), str(meta["config_hash"]))


def training_rows(prefs: pl.DataFrame, run: RunSpec) -> pl.DataFrame:
    """The train-split rows `run` trains on, in the order of the dataset file (the preferences file keeps the
    rows as read), cut to the first `run.n_train`: "first N" means the file's first N rows, not the first N ids
    in string order (with ids "0", "1", "10", "100" that would skip rows 2-9)."""
    train = prefs.filter(pl.col("split") == "train")
    return train.head(run.n_train) if run.n_train else train


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

    from ldpipe.paths import sql_dirs

    paths = files.paths if isinstance(files, ExperimentFiles) else files
    return refresh_catalog(paths.catalog, paths.store, sql_dirs(sql_dir))


def learning_curves(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> dict:
    from ldpipe.analysis.curves import plot_learning_curves, save_plot
    from ldpipe.catalog import query

    ids = [spec.run_id(r) for r in spec.runs]
    in_list = ", ".join(f"'{i}'" for i in ids) or "''"
    curves = query(files.paths.catalog, f"select * from learning_curves where run_id in ({in_list})")
    pngs, chains = {}, {}
    smooth = spec.curves.ema
    note = f" (EMA {smooth})" if smooth else ""
    for run in spec.runs:
        part = curves.filter(pl.col("run_id") == spec.run_id(run))
        if part.is_empty():
            continue
        png = plot_learning_curves(part, title=f"{spec.run_id(run)}: change of log π(y|x) per response type{note}",
                                   smooth=smooth)
        pngs[run.name] = str(save_plot(png, files.curves_png(run)))
        if run.start_from is None:
            continue
        # a chained run: every phase (e.g. SFT then DPO) on one axis, from the first run's first evaluation
        chain, r = [], run
        while r is not None:
            chain.insert(0, (spec.run_id(r), f"{r.name} ({r.algo})"))
            r = spec.parent(r)
        if all(not curves.filter(pl.col("run_id") == c).is_empty() for c, _ in chain):
            from ldpipe.analysis.curves import chain_curves

            joined, bounds = chain_curves(curves, chain)
            png = plot_learning_curves(joined, title=f"{' → '.join(c for _, c in chain)}: change of log π(y|x) "
                                                     f"since the first phase{note}", smooth=smooth, boundaries=bounds)
            chains[run.name] = str(save_plot(png, files.paths.plots / f"{spec.name}.{run.name}.chain.png"))
    log(f"[{spec.name}] learning curves: {curves.height} rows, plots {list(pngs.values()) + list(chains.values())}")
    return {"rows": curves.height, "plots": pngs, "chain_plots": chains, "curves": curves}
