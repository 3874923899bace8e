"""Training through Dagster Pipes: the run asset trains in `python -m ldpipe.training.worker` (a real subprocess).

Same metadata and trajectories as the in-process library call; a failing trainer gives a failed step with the
trainer's message; interrupting the launching process stops the worker; the worker runs without Dagster too.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from conftest import wait_until

from ldpipe import pipeline
from ldpipe.analysis.directions import run_checks
from ldpipe.defs.experiments import build_defs
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.defs.training import RunOverrides
from ldpipe.paths import Paths
from ldpipe.spec import load_experiments

RESOURCES = {"ldpipe_home": LdpipeHome(), "compute": Compute(device="cpu")}
RUN_KEYS = {"run_id", "config_hash", "algo", "checkpoint", "steps", "evals", "wall_s", "device", "final_loss",
            "train_examples", "step_offset", "delta_logp_by_type"}


def _declare(project: Path, extra_runs: str) -> list:
    decl = project / "assets" / "tiny.yaml"
    decl.write_text(decl.read_text() + extra_runs)
    return load_experiments(project / "assets")


def _assets(defs, *names: str) -> list:
    keys = {dg.AssetKey(["tiny", n]) for n in names}
    return [a for a in defs.assets if set(a.keys) & keys]


@pytest.mark.slow
def test_run_through_pipes_matches_the_library_and_reports_checks(tiny_project):
    specs = _declare(tiny_project, "  - {name: dpo, algo: dpo, start_from: sft, epochs: 0.5, batch_size: 8, "
                                         "lr: 1.0e-3, eval_every: 2}\n")
    spec = specs[0]
    defs = build_defs(specs)
    instance = dg.DagsterInstance.ephemeral()
    mine = _assets(defs, "dataset", "probe_set", "base_model", "run_sft", "run_dpo", "paper_directions")
    # a folder a killed worker left behind (its PID is gone) is swept; the workers' own scratch lives under the home
    stale = tiny_project / ".ldpipe" / "tmp" / "worker-999999999-x"
    stale.mkdir(parents=True)
    (stale / "error.json").write_text("{}")
    result = dg.materialize(mine, resources=RESOURCES, instance=instance)
    assert result.success
    assert (tiny_project / ".ldpipe" / "tmp").is_dir() and not list((tiny_project / ".ldpipe" / "tmp").iterdir())
    mats = {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}
    assert RUN_KEYS <= set(mats["tiny/run_sft"])
    assert RUN_KEYS | {"start_from", "parent_config_hash", "final_rewards_margin"} <= set(mats["tiny/run_dpo"])
    assert mats["tiny/run_dpo"]["step_offset"].value == mats["tiny/run_sft"]["steps"].value
    assert isinstance(mats["tiny/run_sft"]["checkpoint"], dg.PathMetadataValue)
    assert isinstance(mats["tiny/run_sft"]["delta_logp_by_type"].value, dict)

    # every declared check of each run came back from the worker, with its measured numbers
    evals = {(c.asset_key.to_user_string(), c.check_name): c for c in result.get_asset_check_evaluations()}
    for run in spec.runs:
        for name, _ in run_checks(run):
            ev = evals[(f"tiny/run_{run.name}", name)]
            assert ev.severity == dg.AssetCheckSeverity.WARN
            assert ev.metadata, name
    deltas = mats["tiny/run_dpo"]["delta_logp_by_type"].value
    fastest = evals[("tiny/run_dpo", "dpo_rejected_falls_fastest")]
    assert fastest.metadata["fastest_type"].value == min(deltas, key=deltas.get)
    share = evals[("tiny/run_dpo", "dpo_nearly_every_type_falls")].metadata["share_fell"].value
    assert share == pytest.approx(sum(v < 0 for v in deltas.values()) / len(deltas), abs=1e-3)
    assert "tiny/paper_directions" in mats

    # the store holds the run's trajectories, one evaluation per reported eval, under the reported hash
    paths = Paths.default()
    traj = pl.read_parquet(paths.store / "trajectories" / "**" / "*.parquet")
    sft = traj.filter(pl.col("run_id") == "tiny.sft")
    assert sft["step"].n_unique() == mats["tiny/run_sft"]["evals"].value
    assert sft["config_hash"].unique().to_list() == [mats["tiny/run_sft"]["config_hash"].value]

    # the same run trained in this process by the library gives the same trajectories
    other = tiny_project / "library_store"
    info = pipeline.train_run(spec, spec.run("sft"), pipeline.files_for(spec, paths), store_root=other,
                              device="cpu", log=lambda m: None)
    assert info.config_hash == mats["tiny/run_sft"]["config_hash"].value
    lib = pl.read_parquet(other / "trajectories" / "**" / "*.parquet")
    cols = ["step", "example_id", "response_type"]
    joined = sft.join(lib, on=cols, suffix="_lib")
    assert joined.height == sft.height == lib.height
    assert (joined["logp_sum"] - joined["logp_sum_lib"]).abs().max() < 1e-4

    # debugging without Dagster: the worker CLI with the smoke preset, on the project's files
    out = subprocess.run([sys.executable, "-m", "ldpipe.training.worker", "train", "--experiment-file",
                          str(tiny_project / "assets" / "tiny.yaml"), "--run", "sft", "--device", "cpu",
                          "--preset", "smoke", "--overrides", '{"seed": 3}'],
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout[out.stdout.index("{\n"):])
    smoke = RunOverrides(preset="smoke", seed=3).apply(spec.run("sft"))
    assert report["metadata"]["train_examples"] == smoke.n_train == 16
    assert report["metadata"]["steps"] == 2  # 16 examples / batch 8, one epoch
    assert report["metadata"]["config_hash"] != mats["tiny/run_sft"]["config_hash"].value
    assert {c["name"] for c in report["checks"]} == {n for n, _ in run_checks(smoke)}


@pytest.mark.slow
def test_failing_trainer_fails_the_step_with_its_message(tiny_project):
    specs = _declare(tiny_project, "  - {name: bad, algo: dpo, start_from: sft, epochs: 1, batch_size: 8}\n")
    defs = build_defs(specs)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(_assets(defs, "dataset", "probe_set", "base_model", "run_bad"), resources=RESOURCES,
                            instance=instance, raise_on_error=False)
    assert not result.success
    failures = [e for e in result.get_step_failure_events() if e.step_key == "tiny__run_bad"]
    assert len(failures) == 1
    message = failures[0].event_specific_data.error.message
    assert "training run tiny.bad failed: LdpipeError" in message
    assert "materialize tiny/run_sft first" in message  # its parent run was never trained
    # the upstream assets still materialized: the failure stayed in its step
    done = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert {"tiny/dataset", "tiny/probe_set", "tiny/base_model"} <= done

    # an invalid launch-time override fails before any process starts, naming the field
    result = dg.materialize(_assets(defs, "run_bad"), resources=RESOURCES, instance=instance, raise_on_error=False,
                            run_config=dg.RunConfig({"tiny__run_bad": RunOverrides(lr=-1.0)}))
    assert not result.success
    message = result.get_step_failure_events()[0].event_specific_data.error.message
    assert "invalid launch-time override" in message and "lr" in message


DRIVER = """
import sys
import dagster as dg
from ldpipe.defs.experiments import build_defs
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.paths import project_dir
from ldpipe.spec import load_experiments

defs = build_defs(load_experiments(project_dir() / "assets"))
keys = {dg.AssetKey(["tiny", n]) for n in ("dataset", "probe_set", "base_model", "run_sft")}
print("materializing", flush=True)
dg.materialize([a for a in defs.assets if set(a.keys) & keys], resources={"ldpipe_home": LdpipeHome(), "compute": Compute(device="cpu")},
               instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
print("driver done", flush=True)
"""


def _worker_pids(parent: int) -> list[int]:
    try:
        kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except FileNotFoundError:
        return []
    out = []
    for pid in map(int, kids):
        try:
            if b"ldpipe.training.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except FileNotFoundError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launching_process_stops_the_worker(tiny_project, sig):
    """SIGINT/SIGTERM (what Ctrl-C and a run termination deliver): Dagster interrupts the step and the Pipes
    client forwards SIGINT to the worker. SIGKILL (no chance to forward): the worker sees its parent gone."""
    decl = tiny_project / "assets" / "tiny.yaml"   # long enough to still be training when the signal comes
    decl.write_text(decl.read_text().replace("epochs: 1,", "epochs: 400,"))
    script = tiny_project / "driver.py"
    script.write_text(DRIVER)
    shards = Paths.default().store / "trajectories" / "run_id=tiny.sft"
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=os.environ.copy())
    worker = None
    try:
        def training():
            nonlocal worker
            pids = _worker_pids(driver.pid)
            worker = pids[0] if pids else worker
            return worker is not None and shards.is_dir() and any(shards.glob("*.parquet"))
        wait_until(lambda: training() or driver.poll() is not None, 240, "the worker to start training")
        assert driver.poll() is None, driver.stdout.read()
        driver.send_signal(sig)
        wait_until(lambda: not _alive(worker), 60, f"worker {worker} to exit after {sig.name}")
        driver.wait(timeout=60)
    finally:
        for pid in (worker, driver.pid):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
    log = driver.stdout.read()
    if sig == signal.SIGKILL:
        assert "worker stopped by SIGTERM" in log, log[-3000:]  # sent by its parent watch
    else:
        assert "[pipes] execution interrupted, sending SIGINT to subprocess" in log, log[-3000:]
        # the worker's own stderr line (inherited by the driver), written before it exits: the Pipes log message
        # "trainer failed: ..." may arrive after Dagster stopped reading the interrupted step's messages
        assert "ldpipe.training.worker: worker stopped by SIGINT" in log, log[-3000:]
    # the run was cut short: its last evaluation is far from the 400-epoch end (4 steps per epoch)
    steps = [int(p.stem.split("-")[1]) for p in shards.glob("step-*.parquet")]
    assert max(steps) < 400 * 4
