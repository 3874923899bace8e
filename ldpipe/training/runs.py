"""The run stage: one declared run trained from its start point (the base model or its parent run's final
checkpoint) by ldpipe's loop or TRL, with its training rows taken in file order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from ldpipe.data.selection import training_rows
from ldpipe.errors import LdpipeError
from ldpipe.layout import ExperimentFiles, load_preferences_file, load_probes_file
from ldpipe.model.base import base_model_path
from ldpipe.spec import EXTEND_SUPERVISE, ExperimentSpec, RunSpec

Log = Callable[[str], None]


# ---------------------------------------------------------------- training runs

@dataclass(frozen=True)
class RunResult:
    """One trained run: where its final checkpoint is and what it measured on the way."""

    run_id: str
    config_hash: str
    algo: str
    start_from: str | None              # the parent run's name in a chain
    parent_config_hash: str | None      # the config hash the parent's checkpoint was trained with
    step_offset: int                    # steps of the runs before this one in its chain
    checkpoint: Path                    # the final checkpoint
    steps: int
    evals: int                          # probe evaluations recorded
    wall_s: float
    device: str
    precision: str
    final_loss: float
    train_examples: int
    final_rewards: dict[str, float]     # rewards_* of the last step (DPO/IPO)
    resumed_from: int | None            # the step of the resume checkpoint it continued from, else None
    delta_by_type: dict[str, float]     # response type -> mean change of log pi(y|x), last evaluation minus first


def train_run(spec: ExperimentSpec, run: RunSpec, files: ExperimentFiles, *, store_root: Path | None = None,
              device: str = "auto", log: Log = print) -> RunResult:
    """Train one declared run from its start point (base model or parent run), tracking the probe set.

    Resumes from the run's resume checkpoint when one with the same config hash exists."""
    from ldpipe.model.checkpoints import load_tokenizer
    from ldpipe.model.lm import configure_threads
    from ldpipe.model.scoring import encode_probes
    from ldpipe.store.shards import Store
    from ldpipe.training.loop import run_training

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
    if run.trainer == "trl":   # TRL's SFTTrainer/DPOTrainer with ldpipe's tracking callback (ldpipe.training.trl_run)
        from ldpipe.training.trl_run import run_trl as train_fn
        tracked = probes
    else:
        import functools

        tok = load_tokenizer(start.path)
        # an on-policy judge caches in this run's home, not in whatever LDPIPE_HOME says
        train_fn = functools.partial(run_training, llm_cache=files.paths.llm_cache)
        tracked = encode_probes(tok, probes, max_prompt_tokens=spec.probes.max_prompt_tokens,
                                max_response_tokens=spec.probes.max_response_tokens,
                                chat_template=spec.probes.chat_template)
    result = train_fn(run, run_id=spec.run_id(run), config_hash=config_hash, model_path=start.path,
                          examples=examples, probes=tracked, store=Store(store_root or files.paths.store),
                          out_dir=files.run_dir(run), max_prompt_tokens=spec.probes.max_prompt_tokens,
                          max_response_tokens=spec.probes.max_response_tokens,
                          chat_template=spec.probes.chat_template, device=device,
                          step_offset=start.step_offset,
                          checkpoint_metadata={"start_from": run.start_from, "parent_config_hash": start.parent_hash},
                          log=log)
    delta = (result.last_eval.group_by("response_type").agg(pl.col("logp_sum").mean().alias("end"))
             .join(result.first_eval.group_by("response_type").agg(pl.col("logp_sum").mean().alias("start")),
                   on="response_type").with_columns((pl.col("end") - pl.col("start")).alias("delta"))
             .sort("response_type"))
    rewards = {k: v for k, v in result.final_metrics.items() if k.startswith("rewards_") and v is not None}
    return RunResult(
        run_id=result.run_id, config_hash=config_hash, algo=run.algo, start_from=run.start_from,
        parent_config_hash=start.parent_hash, step_offset=result.step_offset, checkpoint=Path(result.checkpoint),
        steps=result.steps, evals=result.evals, wall_s=round(result.wall_s, 2), device=str(result.device),
        precision=result.precision, final_loss=result.final_loss, train_examples=len(examples),
        final_rewards=rewards, resumed_from=result.resumed_from,
        delta_by_type={t: round(d, 3) for t, d in delta.select("response_type", "delta").iter_rows()})


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: a checkpoint, the steps already taken before it, the parent's config hash."""

    path: Path | str
    step_offset: int = 0
    parent_hash: str | None = None


def start_point(spec: ExperimentSpec, run: RunSpec, files: ExperimentFiles) -> StartPoint:
    """The base model, or the final checkpoint of the run named by `start_from`."""
    from ldpipe.model.checkpoints import is_checkpoint, read_metadata

    parent = spec.parent(run)
    if parent is None:
        return StartPoint(base_model_path(spec, files))
    ckpt = files.final_dir(parent)
    meta = read_metadata(ckpt) if is_checkpoint(ckpt) else {}
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
