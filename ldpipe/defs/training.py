"""Training assets of one experiment: <exp>/base_model -> <exp>/run_<name> (pool "gpu")."""

import dagster as dg

from ldpipe import pipeline
from ldpipe.defs.probes import probe_keys
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.spec import ExperimentSpec, RunSpec


class RunOverrides(dg.Config):
    """Launch-time overrides of a declared run (e.g. a quick smoke run from the launchpad)."""

    epochs: float | None = None
    lr: float | None = None
    eval_every: int | None = None
    batch_size: int | None = None
    seed: int | None = None

    def apply(self, run: RunSpec) -> RunSpec:
        changes = {k: v for k, v in self.model_dump().items() if v is not None}
        return run.model_copy(update=changes) if changes else run


def training_assets(spec: ExperimentSpec) -> list:
    exp = spec.name
    k = lambda *parts: dg.AssetKey([exp, *parts])  # noqa: E731

    @dg.asset(key=k("base_model"), group_name=exp, deps=[k("dataset")], pool="gpu", kinds={"pytorch"},
              description="Tokenizer + causal LM checkpoint (built-in: trained offline once per config hash).")
    def base_model(context: dg.AssetExecutionContext, ldpipe_home: LdpipeHome,
                   compute: Compute) -> dg.MaterializeResult:
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.build_base_model(spec, files, device=compute.device, log=context.log.info)
        meta = {"path": dg.MetadataValue.path(info["path"]), "cached": info.get("cached", False),
                "parameters": info.get("parameters", 0)}
        for key in ("val_loss", "val_ppl", "train_loss", "wall_s", "tokens_seen"):
            if isinstance(info.get(key), (int, float)):
                meta[key] = float(info[key])
        return dg.MaterializeResult(metadata=meta)

    return [base_model, *[_run_asset(spec, run) for run in spec.runs]]


def _run_check(run: RunSpec) -> tuple[str, str]:
    """Name and description of a run's measured (WARN-only) check."""
    if run.algo == "sft":
        return "sft_raises_supervised_target", (f"Measured: does SFT raise log π of the supervised type(s) "
                                                f"({run.supervise}) on the probe prompts?")
    return (f"{run.algo}_widens_chosen_rejected_gap",
            f"Measured: does {run.algo.upper()} raise log π(y+) − log π(y−) on the probe prompts?")


def _run_check_result(run: RunSpec, name: str, deltas: dict[str, float]) -> dg.AssetCheckResult:
    if run.algo == "sft":
        got = [deltas.get(t) for t in run.supervised_types]
        measured = min(got) if None not in got else None
        what = run.supervise
    else:
        c, r = deltas.get("chosen"), deltas.get("rejected")
        measured = c - r if c is not None and r is not None else None
        what = "chosen - rejected"
    return dg.AssetCheckResult(
        check_name=name, passed=measured is not None and measured > 0, severity=dg.AssetCheckSeverity.WARN,
        metadata={"measured_delta": float(measured) if measured is not None else float("nan"),
                  "response_type": what})


def _run_asset(spec: ExperimentSpec, declared: RunSpec):
    exp = spec.name
    key = dg.AssetKey([exp, f"run_{declared.name}"])
    check_name, check_desc = _run_check(declared)
    check = dg.AssetCheckSpec(check_name, asset=key, description=check_desc)
    # A chained run starts from its parent run's final checkpoint (and uses it as DPO reference).
    start = (dg.AssetKey([exp, f"run_{declared.start_from}"]) if declared.start_from
             else dg.AssetKey([exp, "base_model"]))
    origin = f"run '{declared.start_from}'" if declared.start_from else "the base model"

    @dg.asset(key=key, group_name=exp, pool="gpu", kinds={"pytorch"},
              deps=[start, *probe_keys(spec)],
              check_specs=[check], tags={"ldpipe/algo": declared.algo},
              description=f"{declared.algo.upper()} run '{declared.name}' from {origin} with probe tracking every "
                          f"{declared.eval_every} steps; trajectories go to the Parquet store.")
    def run_asset(context: dg.AssetExecutionContext, config: RunOverrides, ldpipe_home: LdpipeHome,
                  compute: Compute) -> dg.MaterializeResult:
        run = config.apply(declared)
        files = pipeline.files_for(spec, ldpipe_home.paths())
        info = pipeline.train_run(spec, run, files, device=compute.device, log=context.log.info)
        meta = {
            "run_id": info["run_id"], "config_hash": info["config_hash"], "algo": info["algo"],
            "checkpoint": dg.MetadataValue.path(info["checkpoint"]),
            "steps": info["steps"], "evals": info["evals"], "wall_s": info["wall_s"],
            "device": info["device"], "final_loss": info["final_loss"], "train_examples": info["train_examples"],
            # steps of the runs before this one in its chain: add to `step` to put a chain on one axis
            "step_offset": info["step_offset"],
            "delta_logp_by_type": dg.MetadataValue.json(info["delta_by_type"]),
        }
        if info["start_from"]:
            meta["start_from"] = info["start_from"]
            meta["parent_config_hash"] = info["parent_config_hash"]
        meta.update({f"final_{k}": float(v) for k, v in info["final_rewards"].items()})
        return dg.MaterializeResult(metadata=meta,
                                    check_results=[_run_check_result(run, check_name, info["delta_by_type"])])

    return run_asset
