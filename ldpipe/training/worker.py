"""Out-of-process trainer: `python -m ldpipe.training.worker train ...`.

The Dagster run asset launches this through Dagster Pipes (`PipesSubprocessClient`), so torch training runs in
its own process rather than in the code server or the step process: its logs stream to the Dagster run, its
materialization metadata and measured checks are reported back, a crash becomes a failed step carrying the
trainer's message, and a terminated run stops it (SIGINT from Pipes; SIGTERM or the death of the launching
process also stop it). This module imports `dagster_pipes` only, never `dagster`.

Without Dagster (debugging):
    python -m ldpipe.training.worker train --experiment-file assets/default.yaml --run sft [--home .ldpipe]
        [--device cpu] [--preset smoke] [--overrides '{"lr": 1e-3}']
prints the logs, then the metadata and check results as JSON.

Data-parallel (ldpipe.training.distributed): under torchrun every rank runs this module and trains its slice of each
batch; rank 0 alone opens the Pipes channel, reports, and writes files. The run asset launches
`python -m torch.distributed.run --nproc-per-node N -m ldpipe.training.worker train --pipes` when the Compute resource's
`nproc_per_node` is above 1; by hand:
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m ldpipe.training.worker train \
        --experiment-file ... --run-name sft     (torchrun's own parser takes "--run" for its --run-path)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# The asset passes a file path here; on failure the worker writes {"type", "message"} to it so that the
# Dagster step fails with the trainer's own message (Pipes itself only reports the exit code).
ERROR_FILE_ENV = "LDPIPE_WORKER_ERROR_FILE"


class Stopped(KeyboardInterrupt):
    """The worker was asked to stop (SIGINT/SIGTERM, or its launching process went away)."""


def train_and_measure(spec, run, *, home: str | None, device: str,
                      log: Callable[[str], None]) -> tuple[dict, list]:
    """Train one run of `spec` (a RunSpec: its declaration with any launch-time overrides applied, once, by the
    caller) and measure its checks from the stored trajectories.
    Returns (materialization metadata as (value, pipes type) pairs, list of CheckOutcome)."""
    from ldpipe import pipeline
    from ldpipe.analysis.directions import evaluate_run, run_trajectory
    from ldpipe.paths import Paths
    from ldpipe.store.shards import Store
    from ldpipe.training import distributed

    declared = spec.run(run.name)
    if run != declared:
        changed = {k: v for k, v in run.model_dump().items() if v != getattr(declared, k)}
        log(f"[{spec.run_id(run)}] launch-time overrides: {changed}")
    files = pipeline.files_for(spec, Paths(Path(home).resolve()) if home else None)
    info = pipeline.train_run(spec, run, files, device=device, log=log)
    if not distributed.is_main():   # rank 0 measures and reports
        return run_metadata(info), []
    traj = run_trajectory(Store(files.paths.store), info.run_id, info.config_hash)
    return run_metadata(info), evaluate_run(run, traj)


def run_metadata(info) -> dict[str, tuple[Any, str]]:
    """The run asset's materialization metadata from a training.runs.RunResult: key -> (raw value, Pipes
    metadata type)."""
    from ldpipe.training import distributed

    meta: dict[str, tuple[Any, str]] = {
        "run_id": (info.run_id, "text"), "config_hash": (info.config_hash, "text"),
        "algo": (info.algo, "text"), "checkpoint": (str(info.checkpoint), "path"),
        "steps": (int(info.steps), "int"), "evals": (int(info.evals), "int"),
        "wall_s": (float(info.wall_s), "float"), "device": (info.device, "text"),
        "precision": (info.precision, "text"),
        "final_loss": (float(info.final_loss), "float"), "train_examples": (int(info.train_examples), "int"),
        # steps of the runs before this one in its chain: add to `step` to put a chain on one axis
        "step_offset": (int(info.step_offset), "int"),
        "delta_logp_by_type": (dict(info.delta_by_type), "json"),
        "processes": (distributed.world_size(), "int"),   # data-parallel ranks (torchrun), 1 otherwise
    }
    if info.start_from:
        meta["start_from"] = (info.start_from, "text")
        meta["parent_config_hash"] = (info.parent_config_hash, "text")
    meta.update({f"final_{k}": (float(v), "float") for k, v in info.final_rewards.items()})
    return meta


def _pipes_metadata(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        raw, kind = v if isinstance(v, tuple) else (v, "__infer__")
        if kind == "__infer__" and isinstance(raw, (dict, list)):
            kind = "json"
        out[k] = {"raw_value": raw, "type": kind}
    return out


# ---------------------------------------------------------------- stopping

def _install_stop_handlers() -> None:
    # Installed explicitly: a process started from a background shell job inherits SIGINT ignored
    # (Dagster Pipes forwards only SIGINT to its subprocess), and Python's default SIGTERM would skip every cleanup.
    def stop(signum, _frame):
        raise Stopped(f"worker stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _watch_parent(parent: int, poll_s: float = 1.0) -> None:
    """If the launching process dies without signalling (SIGKILL), stop: never train as an orphan."""
    def loop():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)          # the handler's clean stop had its chance
        os._exit(143)

    threading.Thread(target=loop, name="ldpipe-parent-watch", daemon=True).start()


def _write_error(exc: BaseException) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:   # exclusive: under torchrun the first rank to fail (the cause) wins over the others' aftermath
            with open(path, "x") as fh:
                fh.write(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        except FileExistsError:
            pass


# ---------------------------------------------------------------- entry points

def _train_pipes() -> int:
    from dagster_pipes import open_dagster_pipes

    from ldpipe.spec import ExperimentSpec, RunSpec
    from ldpipe.training import distributed

    if not distributed.is_main():
        return _train_pipes_follower()

    with open_dagster_pipes() as pipes:
        x = pipes.extras
        spec, run = ExperimentSpec.model_validate(x["spec"]), RunSpec.model_validate(x["run"])
        try:
            meta, checks = train_and_measure(spec, run, home=x.get("home"),
                                             device=x.get("device", "auto"), log=pipes.log.info)
        except BaseException as e:
            _write_error(e)
            pipes.log.error(f"trainer failed: {type(e).__name__}: {e}")
            raise
        pipes.report_asset_materialization(metadata=_pipes_metadata(meta))
        for c in checks:
            pipes.report_asset_check(c.name, passed=c.passed, severity="WARN", metadata=_pipes_metadata(c.metadata))
    return 0


def _train_pipes_follower() -> int:
    """A rank > 0 under torchrun: reads the same extras, trains its slices, reports nothing (one Pipes
    channel per step: rank 0's)."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    from ldpipe.spec import ExperimentSpec, RunSpec
    from ldpipe.training import distributed

    with PipesDefaultContextLoader().load_context(PipesEnvVarParamsLoader().load_context_params()) as data:
        x = data["extras"]
    spec, run = ExperimentSpec.model_validate(x["spec"]), RunSpec.model_validate(x["run"])
    train_and_measure(spec, run, home=x.get("home"), device=x.get("device", "auto"),
                      log=lambda m: print(f"[rank {distributed.rank()}] {m}", file=sys.stderr, flush=True))
    return 0


def _train_cli(args: argparse.Namespace) -> int:
    from ldpipe.spec import apply_run_overrides, load_experiment
    from ldpipe.training import distributed

    spec = load_experiment(Path(args.experiment_file))
    overrides = json.loads(args.overrides) if args.overrides else {}
    if args.preset:
        overrides["preset"] = args.preset
    run = apply_run_overrides(spec.run(args.run), overrides)
    meta, checks = train_and_measure(spec, run, home=args.home, device=args.device,
                                     log=lambda m: print(m, flush=True))
    if not distributed.is_main():
        return 0
    print(json.dumps({"metadata": {k: v[0] for k, v in meta.items()},
                      "checks": [{"name": c.name, "passed": c.passed, "metadata": c.metadata} for c in checks]},
                     indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldpipe.training.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one declared run")
    t.add_argument("--pipes", action="store_true", help="launched by Dagster Pipes: everything comes as extras")
    t.add_argument("--experiment-file", help="the experiment's YAML declaration")
    # --run-name: the spelling to use after torchrun, whose parser rejects "--run" as an ambiguous prefix
    t.add_argument("--run", "--run-name", dest="run", help="the run's name in the declaration")
    t.add_argument("--home", default=None, help="ldpipe home (default: LDPIPE_HOME or <project>/.ldpipe)")
    t.add_argument("--device", default="auto")
    t.add_argument("--preset", default=None, help="smoke | full")
    t.add_argument("--overrides", default=None, help='JSON object of RunSpec fields, e.g. \'{"lr": 1e-3}\'')
    args = p.parse_args(argv)
    if not args.pipes and not (args.experiment_file and args.run):
        p.error("train needs --pipes, or --experiment-file and --run")
    _install_stop_handlers()
    if args.pipes:
        _watch_parent(os.getppid())
    try:
        return _train_pipes() if args.pipes else _train_cli(args)
    except Stopped as e:
        print(f"ldpipe.training.worker: {e}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001  (the CLI boundary: message first, traceback after)
        _write_error(e)
        traceback.print_exc()
        print(f"ldpipe.training.worker: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        from ldpipe.training import distributed

        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
