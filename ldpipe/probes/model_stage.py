"""The model-probe stage: y_init, y_selfr, random tokens and the custom types made from them (they need the base
model), written to model_probes.parquet; also the truncation counts of the whole probe set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from ldpipe.atomic import write_json
from ldpipe.errors import LdpipeError
from ldpipe.layout import ExperimentFiles, _finish_stage
from ldpipe.model.base import base_model_path
from ldpipe.model.encoding import ENCODING_VERSION
from ldpipe.probes.stage import (
    PROBE_BUILDER_VERSION,
    CacheUse,
    ProbeStageResult,
    _core_types,
    _custom_stages,
    _fetch,
    _fetch_custom,
    _probe_cache,
    _write_if_changed,
)
from ldpipe.schema import PROBE_SCHEMA
from ldpipe.spec import ExperimentSpec

Log = Callable[[str], None]


# ---------------------------------------------------------------- model-made probe types

def model_fingerprint(ref: Path | str) -> dict[str, str]:
    """Content hashes of a checkpoint's weights+config and of its tokenizer files (files over 64 MiB by
    size and mtime, so a multi-GB model is not re-read); a hub id stands for itself."""
    from ldpipe.hashing import content_hash, file_hash

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


@dataclass(frozen=True)
class ModelProbesResult(ProbeStageResult):
    generation: dict                  # model-made type -> its report (made, empty, stopped at a marker, decoding)
    model: str                        # the base model the types were made with ("" when none was needed)
    truncation: dict[str, dict]       # per response type of the whole probe set: what scoring cuts
    truncation_warnings: list[str]


def build_model_probes(spec: ExperimentSpec, files: ExperimentFiles, *, device: str = "auto",
                       log: Log = print, warn: Log | None = None) -> ModelProbesResult:
    """Stage 2 of the probe set: y_init (`chosen_initial`, the base model's own reply to the probe prompt),
    y_selfr (`chosen_selfr`, its continuation of a rephrase instruction + y+), uniformly random tokens of its
    vocabulary (`random_tokens`) and custom types made from these; written to `files.model_probes`. Also counts,
    with the base model's tokenizer, what scoring cuts from the whole probe set (`_probe_truncation`); `warn`
    (default `log`) gets a line per type of which more than a quarter of the prompts or responses are cut."""
    from ldpipe.hashing import content_hash, file_hash, frame_hash
    from ldpipe.probes.checks import check_probe_set

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
        if spec.model.kind != "builtin":   # BOS and chat templates (ldpipe.model.encoding) changed what is generated
            gen_params |= {"encoding": ENCODING_VERSION, "chat_template": ps.chat_template}
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
    return ModelProbesResult(files.model_probes, rows.height, out_types, skipped, report, CacheUse(**cache_report),
                             written, generation=gen_report, model=str(model_ref), truncation=truncation,
                             truncation_warnings=trunc_warnings)


TRUNCATION_WARN_SHARE = 0.25   # warn when more than this share of a type's prompts or responses is cut


def _probe_truncation(spec: ExperimentSpec, files: ExperimentFiles,
                      probes: pl.DataFrame) -> tuple[dict[str, dict], list[str]]:
    """The store table probe_truncation: per response type of `probes` (the whole probe set), how many prompts
    and responses scoring cuts with the base model's tokenizer and the probes.max_*_tokens limits, and the
    tokens it drops; one shard per experiment. Returns ({type: counts}, warnings for the types of which more
    than TRUNCATION_WARN_SHARE of the prompts or responses are cut)."""
    from ldpipe.model.checkpoints import load_tokenizer
    from ldpipe.model.scoring import truncation_counts
    from ldpipe.schema import PROBE_TRUNCATION_SCHEMA
    from ldpipe.store.shards import Store

    ps = spec.probes
    tok = load_tokenizer(base_model_path(spec, files), local_files_only=not spec.model.allow_download)
    df = truncation_counts(tok, probes, max_prompt_tokens=ps.max_prompt_tokens,
                           max_response_tokens=ps.max_response_tokens, source=str(files.probes),
                           chat_template=ps.chat_template)
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
    from ldpipe.model.checkpoints import load_model_and_tokenizer, load_tokenizer
    from ldpipe.model.generate import GenerationConfig, generate
    from ldpipe.probes.build import random_token_rows

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
                                   batch_size=gen.batch_size, max_prompt_tokens=budget,
                                   chat_template=ps.chat_template)
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
