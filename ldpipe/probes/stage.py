"""The probe-set stage: every probe type that needs no model (dataset, templates, LLM endpoint, user-declared
types), written to probes.parquet, with a per-type cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from ldpipe.atomic import write_json
from ldpipe.data.stage import _resolve
from ldpipe.layout import ExperimentFiles, _finish_stage, load_preferences_file
from ldpipe.schema import PROBE_SCHEMA
from ldpipe.spec import ExperimentSpec

Log = Callable[[str], None]


# ---------------------------------------------------------------- probe set
# Two stages write the probe rows: build_probes (everything that needs no model: dataset, templates, LLM
# endpoint, user-declared types) -> probes.parquet, and build_model_probes (y_init, y_selfr, random tokens and
# custom types made from them; needs the base model) -> model_probes.parquet. load_probes_file joins them.
# Each type's rows are cached under a content hash of what they depend on (probes.TypeCache), so adding a type
# builds only that type, and a rerun builds nothing and leaves both files byte-identical.

PROBE_BUILDER_VERSION = 1   # part of every per-type cache key: bump when a builder's output changes
LLM_REPHRASE_TYPES = ("chosen_gptsemantic", "chosen_gptformat", "reject_gptsemantic", "reject_gptformat")


def _probe_cache(files: ExperimentFiles):
    from ldpipe.probes.build import TypeCache

    return TypeCache(files.data_dir / "probe_cache")


def _custom_stages(ps) -> dict[str, str]:
    """custom type -> "probes" or "model": a type made (through earlier custom types) from a model-made type
    is built by the model stage."""
    from ldpipe.probes.build import MODEL_STAGE_TYPES

    stage: dict[str, str] = {}
    for ct in ps.custom_types:
        stage[ct.name] = stage.get(ct.source) or ("model" if ct.source in MODEL_STAGE_TYPES else "probes")
    return stage


def _core_types(ps, stage: str, *, reference: bool = False) -> list[str]:
    """The core types a stage makes. A reference probe file carries its own y_init / y_selfr, so for it the
    probe-set stage imports them and the model stage adds only what the file lacks."""
    from ldpipe.probes.build import MODEL_STAGE_TYPES, MODEL_TYPES, OFFLINE_TYPES

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
    from ldpipe.hashing import content_hash
    from ldpipe.probes.build import build_custom_type, custom_type_inputs

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


@dataclass(frozen=True)
class CacheUse:
    """Which response types a probe stage built now and which it took from the per-type cache."""

    built: list[str]
    reused: list[str]


@dataclass(frozen=True)
class ProbeStageResult:
    """What a probe stage wrote (`path`, rewritten only when its bytes changed: `written`) and found."""

    path: Path
    rows: int
    types: list[str]                # the response types in this stage's file
    skipped: dict[str, str]         # type -> why it was not built here
    checks: dict                    # probes.checks.check_probe_set's report
    cache: CacheUse
    written: bool


@dataclass(frozen=True)
class ProbeSetResult(ProbeStageResult):
    prompts: int                    # probe prompts
    llm: dict                       # LLM-made type -> its report (calls, preambles stripped, ...)
    rejected_kinds: dict[str, int]  # probe prompts per kind of y- (store table probe_pairs)


def build_probes(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> ProbeSetResult:
    """Stage 1 of the probe set: every type that needs no model, written to `files.probes`."""
    from ldpipe.hashing import content_hash, file_hash
    from ldpipe.probes.build import REPHRASE_TYPES, ProbeRecipe, build_probe_set, custom_type_inputs
    from ldpipe.probes.checks import check_probe_set

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
                from ldpipe.data.synthetic import SyntheticWorld, human_sentence

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
            from ldpipe.probes.llm_types import TEMPLATES

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
    return ProbeSetResult(files.probes, probes.height, types, skipped, report, CacheUse(**cache_report), written,
                          prompts=probes["example_id"].n_unique(), llm=llm_report, rejected_kinds=pairs)


def _write_probe_pairs(spec: ExperimentSpec, files: ExperimentFiles, probes: pl.DataFrame) -> dict[str, int]:
    """The store table probe_pairs (how each probe prompt's y- relates to its y+), one shard per experiment;
    returns the count of probe prompts per rejected kind ("unknown" where the dataset records none)."""
    from ldpipe.probes.checks import pair_similarity
    from ldpipe.schema import PROBE_PAIRS_SCHEMA
    from ldpipe.store.shards import Store

    kinds = None
    if spec.dataset.kind == "synthetic":
        from ldpipe.data.synthetic import SyntheticWorld

        kinds = SyntheticWorld.load(files.world).kinds
    df = pair_similarity(probes, spec.name, kinds)
    Store(files.paths.store).write_shard("probe_pairs", df, partition={"experiment": spec.name}, name="probe_pairs",
                                         schema=PROBE_PAIRS_SCHEMA)
    return dict(sorted(df.group_by(pl.col("rejected_kind").fill_null("unknown")).len().iter_rows()))


def _reference_types(path: Path, ps, limit: int | None, types: list[str]) -> tuple[pl.DataFrame, dict, dict]:
    """The asked types of the reference probe file, for the recipe's selection of its prompts."""
    from ldpipe.data.loaders import load_reference_probes
    from ldpipe.probes.build import select_indices

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
    from ldpipe.probes.llm_types import build_llm_types

    cfg = LLMConfig.from_spec(llm, cache_path=files.paths.llm_cache)
    with LLMClient(cfg) as client:
        rows, report = build_llm_types(sources, client, types=tuple(types))
        stats = client.stats.as_dict()
    log(f"LLM types {types} via {llm.model}: {stats}")
    return rows.select(list(PROBE_SCHEMA)), {"types": report, "calls": stats}
