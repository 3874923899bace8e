"""Greedy generations of a checkpoint, cached on disk.

The squeezing and borrowing analyses decode the same prompts with the same settings at the same
checkpoints; the cache (keyed by the checkpoint's content fingerprint, the prompts and the decoding
settings) lets whichever asset runs second read the first one's generations instead of decoding again.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import polars as pl


def greedy_generations(ckpt_path: Path | str, prompts: Sequence[str], config, cache_dir: Path,
                       load: Callable[[], tuple], device=None) -> list[str]:
    """`generate(model, tokenizer, prompts, config)` for the checkpoint at `ckpt_path`, from the cache when the
    same checkpoint content, prompts and config were decoded before; `load()` gives (model, tokenizer) and is
    called only on a miss."""
    from ldpipe.atomic import write_parquet
    from ldpipe.hashing import content_hash
    from ldpipe.model.generate import generate
    from ldpipe.probes.model_stage import model_fingerprint

    prompts = list(prompts)
    key = content_hash({"model": model_fingerprint(ckpt_path), "prompts": prompts, "config": asdict(config)})
    path = Path(cache_dir) / f"{key}.parquet"
    if path.is_file():
        cached = pl.read_parquet(path)
        if cached["prompt"].to_list() == prompts:
            return cached["generation"].to_list()
    model, tok = load()
    gens = generate(model, tok, prompts, config, device=device)
    write_parquet(pl.DataFrame({"prompt": prompts, "generation": gens}, schema={"prompt": pl.String,
                                                                              "generation": pl.String}), path)
    return gens


def generation_config(spec):
    """Greedy decoding as the experiment's generation_analysis declares it (ldpipe.model.generate.GenerationConfig)."""
    from ldpipe.model.generate import GenerationConfig

    g = spec.generation_analysis
    return GenerationConfig(max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                            max_prompt_tokens=spec.probes.max_prompt_tokens, chat_template=spec.probes.chat_template)


def per_checkpoint(spec, files, store, table: str, schema: dict, measure: Callable, *, snapshots: bool) -> pl.DataFrame:
    """`measure(checkpoint)` -> a row dict or a list of them, once per distinct checkpoint folder (a chained run's
    start is its parent's final), tagged with run_id / checkpoint / step; each run's rows are one shard of `table`."""
    from ldpipe.analysis.checkpoints import run_checkpoints

    memo: dict[str, list[dict]] = {}
    frames = []
    for run in spec.runs:
        rows = []
        for ck in run_checkpoints(spec, run, files, snapshots=snapshots):
            key = str(ck.path)
            if key not in memo:
                got = measure(ck)
                memo[key] = got if isinstance(got, list) else [got]
            rows += [{"run_id": ck.run_id, "checkpoint": ck.label, "step": ck.step, **r} for r in memo[key]]
        df = pl.DataFrame(rows, schema_overrides=schema, infer_schema_length=None).select(list(schema)).cast(schema)
        store.write_shard(table, df, partition={"run_id": spec.run_id(run)}, name=table, schema=schema)
        frames.append(df)
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)
