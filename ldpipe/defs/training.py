"""Training assets of one experiment: <exp>/base_model -> <exp>/run_<name> (pool "gpu") -> <exp>/paper_directions.

A run asset trains out of process: it launches `python -m ldpipe.training.worker train --pipes` through Dagster Pipes
(`PipesSubprocessClient`), which streams the trainer's logs, metadata and measured checks back. Why a subprocess:
torch training holds the CPU/GPU and the GIL for minutes; in the step process it would starve heartbeats, a crash
(OOM, segfault) would take the step process down with it, and a terminated run could leave it running. Through
Pipes, a terminated run interrupts the step, the client sends SIGINT to the worker, and the worker also stops by
itself if the launching process dies.
"""

import json
import sys
from enum import Enum
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not re-exported at the top level in 1.13

from ldpipe import pipeline
from ldpipe.analysis.directions import SQUEEZE_COMPARISONS, collateral_pairs, run_checks, squeeze_comparisons
from ldpipe.analysis.directions import paper_directions as measure_directions
from ldpipe.defs.common import md_table
from ldpipe.defs.probes import probe_keys
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.errors import SpecError
from ldpipe.spec import ExperimentSpec, RunSpec, apply_run_overrides
from ldpipe.store.shards import Store, scratch_dir
from ldpipe.training.worker import ERROR_FILE_ENV

# How long the worker gets to stop after SIGINT before the step gives up waiting.
TERMINATION_TIMEOUT_S = 30


class Preset(str, Enum):
    smoke = "smoke"
    full = "full"


class RunOverrides(dg.Config):
    """Launch-time overrides of a declared run (e.g. a quick smoke run from the launchpad).

    `preset`: "smoke" caps the run at a few steps (spec.RUN_PRESETS), "full" runs the declaration as written;
    any other field set here is applied after the preset.
    """

    preset: Preset | None = None
    epochs: float | None = None
    lr: float | None = None
    eval_every: int | None = None
    batch_size: int | None = None
    seed: int | None = None

    def apply(self, run: RunSpec) -> RunSpec:
        return apply_run_overrides(run, self.model_dump(mode="json"))


def preset_run_config(spec: ExperimentSpec, preset: str) -> dict:
    """Run config that launches every run asset of `spec` with `preset` (for the launchpad, `dg launch
    --config-json`, a schedule or a sensor)."""
    return {"ops": {f"{spec.name}__run_{r.name}": {"config": {"preset": preset}} for r in spec.runs}}


def training_assets(spec: ExperimentSpec) -> list:
    exp = spec.name
    k = lambda *parts: dg.AssetKey([exp, *parts])  # noqa: E731

    # a builtin model pretrained on the dataset's own rows leaves out the probed ones: it reads the probe set
    needs_probes = spec.model.kind == "builtin" and spec.model.corpus is None and spec.dataset.kind != "synthetic"

    @dg.asset(key=k("base_model"), group_name=exp, deps=[k("dataset"), *([k("probe_set")] if needs_probes else [])],
              pool="gpu", kinds={"pytorch"},
              description="Tokenizer + causal LM checkpoint (built-in: trained offline once per config hash).")
    def base_model(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                   compute: Compute) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_base_model(spec, files, device=compute.device, log=context.log.info,
                                         warn=context.log.warning)
        meta = {"path": dg.MetadataValue.path(str(info.path)), "cached": info.cached, "parameters": info.parameters,
                **info.pretraining}
        if info.corpus is not None:   # what the builtin model was pretrained on, and how much
            meta |= {"corpus": info.corpus, "corpus_docs": info.corpus_docs, "corpus_tokens": info.corpus_tokens}
        return dg.MaterializeResult(metadata=meta)

    out = [base_model, *[_run_asset(spec, run) for run in spec.runs]]
    if spec.runs:
        out.append(_paper_directions_asset(spec))
    return out


def _run_asset(spec: ExperimentSpec, declared: RunSpec):
    exp = spec.name
    key = dg.AssetKey([exp, f"run_{declared.name}"])
    checks = [dg.AssetCheckSpec(name, asset=key, description=desc) for name, desc in run_checks(declared)]
    # A chained run starts from its parent run's final checkpoint (and uses it as DPO reference).
    start = (dg.AssetKey([exp, f"run_{declared.start_from}"]) if declared.start_from
             else dg.AssetKey([exp, "base_model"]))
    origin = f"run '{declared.start_from}'" if declared.start_from else "the base model"

    @dg.asset(key=key, group_name=exp, pool="gpu", kinds={"pytorch"},
              deps=[start, *probe_keys(spec)],
              check_specs=checks, tags={"ldpipe/algo": declared.algo},
              description=f"{declared.algo.upper()} run '{declared.name}' from {origin} with probe tracking every "
                          f"{declared.eval_every} steps; trajectories go to the Parquet store. Trains in a "
                          f"subprocess (`python -m ldpipe.training.worker`) through Dagster Pipes.")
    def run_asset(context: dg.AssetExecutionContext, config: RunOverrides, ldpipe_home: LdpipeHome,
                  compute: Compute) -> dg.MaterializeResult:
        try:
            run = config.apply(declared)  # a bad override fails here, before a process starts
        except SpecError as e:
            raise dg.Failure(description=str(e)) from None
        # the run as launched (overrides applied once, here): the worker trains exactly this
        extras = {"spec": spec.model_dump(mode="json"), "run": run.model_dump(mode="json"),
                  "home": str(ldpipe_home.paths().home), "device": compute.device}
        client = dg.PipesSubprocessClient(termination_timeout_seconds=TERMINATION_TIMEOUT_S)
        # under the home, not the system temp dir: a killed run's folder stays findable and is swept next time
        with scratch_dir(ldpipe_home.paths().scratch, "worker") as tmp:
            err_file = Path(tmp) / "error.json"
            try:
                invocation = client.run(context=context, extras=extras,
                                        command=worker_command(compute.nproc_per_node),
                                        env={ERROR_FILE_ENV: str(err_file)})
            except DagsterPipesExecutionError as e:
                raise _trainer_failure(spec.run_id(declared), err_file, e) from None
        return invocation.get_materialize_result()

    return run_asset


def worker_command(nproc_per_node: int = 1) -> list[str]:
    """The trainer's command line: the worker itself, or torchrun starting `nproc_per_node` data-parallel
    copies of it (ldpipe.training.distributed; rank 0 talks to Pipes)."""
    worker = ["-m", "ldpipe.training.worker", "train", "--pipes"]
    if nproc_per_node < 1:
        raise dg.Failure(description=f"Compute.nproc_per_node must be >= 1, got {nproc_per_node}")
    if nproc_per_node == 1:
        return [sys.executable, *worker]
    # --standalone: a local rendezvous on a free port, so concurrent runs on one machine do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            *worker]


def _trainer_failure(run_id: str, err_file: Path, exc: Exception) -> dg.Failure:
    err = json.loads(err_file.read_text()) if err_file.exists() else {}
    what = f"{err['type']}: {err['message']}" if err else f"{exc} (no error report: see the step's stderr)"
    return dg.Failure(description=f"training run {run_id} failed: {what}",
                      metadata={"error_type": err.get("type", "unknown"), "error": err.get("message", str(exc))})


def _paper_directions_asset(spec: ExperimentSpec):
    exp = spec.name
    pairs = collateral_pairs(spec)
    checks = []
    if pairs:
        desc = ("Measured (paper §4, extend-SFT): DPO started from extend-SFT (y+ and y-) loses less log π(y+) "
                "and less on the mean over non-target types than DPO started from plain SFT. Pairs: "
                + ", ".join(f"{p.name} vs {e.name}" for p, e in pairs))
        checks.append(dg.AssetCheckSpec("extend_sft_reduces_collateral_decline",
                                        asset=dg.AssetKey([exp, "paper_directions"]), description=desc))
    for name, run_pairs in squeeze_comparisons(spec).items():
        if run_pairs:
            desc = SQUEEZE_COMPARISONS[name][1] + " Pairs: " + ", ".join(f"{a.name} vs {b.name}" for a, b in run_pairs)
            checks.append(dg.AssetCheckSpec(name, asset=dg.AssetKey([exp, "paper_directions"]), description=desc))

    @dg.asset(key=dg.AssetKey([exp, "paper_directions"]), group_name=exp, kinds={"polars"},
              deps=[dg.AssetKey([exp, f"run_{r.name}"]) for r in spec.runs], check_specs=checks,
              description="The paper's directions per run (SFT borrowing, DPO decline, squeezing) and plain- vs "
                          "extend-SFT before DPO, measured on the stored trajectories; WARN checks, never tuned.")
    def paper_directions(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome) -> dg.MaterializeResult:
        res = measure_directions(spec, Store(ldpipe_home.paths().store))
        meta: dict = {"runs_measured": sum(1 for v in res.deltas.values() if v)}
        if not res.verdicts.is_empty():
            meta["verdicts"] = dg.MetadataValue.md(md_table(res.verdicts, 100))
        meta["delta_by_run"] = dg.MetadataValue.json(res.deltas)
        meta["squeeze_by_run"] = dg.MetadataValue.json({k: v for k, v in res.squeeze.items() if v})
        results = []
        for outcome in res.comparisons:
            context.log.info(f"{outcome.name}: passed={outcome.passed} {outcome.metadata}")
            results.append(dg.AssetCheckResult(
                check_name=outcome.name, passed=outcome.passed, severity=dg.AssetCheckSeverity.WARN,
                metadata={k: dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else v
                          for k, v in outcome.metadata.items()}))
        return dg.MaterializeResult(metadata=meta, check_results=results)

    return paper_directions
