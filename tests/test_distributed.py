"""Data-parallel training under torchrun: 2 gloo processes on the CPU train the same global batches as one
process, rank 0 alone writes, and the results match the single-process run up to float reduction order.

Batch sizes are chosen so slices are uneven (5 -> 3 + 2) and empty (an epoch's last batch of 1 -> 1 + 0).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from conftest import TINY_YAML
from safetensors.torch import load_file

from ldpipe import pipeline
from ldpipe.defs.training import worker_command
from ldpipe.paths import Paths
from ldpipe.spec import parse_experiment
from ldpipe.store.shards import Store
from ldpipe.training import distributed

torch.set_num_threads(1)

# Measured on 2 CPU cores: max |delta logp_sum| <= 1e-5 nats, train loss <= 2e-5, grad norm <= 1e-6 relative,
# weights <= 4e-5 (AdamW's normalised steps carry the reduction-order noise). The bounds leave room for
# other float orders; a wrong loss scaling or a missed slice is orders of magnitude beyond them.
LOGP_TOL = 1e-3
WEIGHT_TOL = 1e-3

RUNS = [
    # 32 pairs, batches of 31: steps alternate 31 (16 + 15) and 1 (1 + 0: rank 1 has an empty slice)
    {"name": "sft", "algo": "sft", "epochs": 3, "batch_size": 31, "lr": 2.0e-3, "eval_every": 2,
     "checkpoint_every": 2, "warmup_steps": 0},
    # batches of 5 (3 + 2), last of the epoch 2 (1 + 1)
    {"name": "dpo", "algo": "dpo", "start_from": "sft", "epochs": 0.5, "batch_size": 5, "lr": 5.0e-3,
     "warmup_steps": 0, "eval_every": 2},
]


class Interrupt(Exception):
    pass


def _torchrun(decl: Path, home: Path, run: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "ldpipe.training.worker", "train", "--experiment-file", str(decl), "--run-name", run, "--home", str(home),
           "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _report(stdout: str) -> dict:
    """The worker's JSON report: printed once, by rank 0."""
    start = [i for i, line in enumerate(stdout.splitlines()) if line == "{"]
    assert len(start) == 1, stdout
    return json.loads("\n".join(stdout.splitlines()[start[0]:]))


def _rows(files, table: str, run_id: str) -> pl.DataFrame:
    key = ["step", "example_id", "response_type"] if table == "trajectories" else ["step"]
    return Store(files.paths.store).read(table, run_id=run_id).sort(key)


def _weights(files, spec, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(files.run_dir(spec.run(name)) / "final" / "model.safetensors"))


def _compare(spec, single, dp, name: str) -> dict[str, float]:
    run_id = spec.run_id(spec.run(name))
    a, b = _rows(single, "trajectories", run_id), _rows(dp, "trajectories", run_id)
    key = ["step", "example_id", "response_type"]
    assert b.select(key).is_duplicated().sum() == 0            # each row once: rank 1 wrote nothing
    assert a.select(key).equals(b.select(key))
    ma, mb = _rows(single, "train_metrics", run_id), _rows(dp, "train_metrics", run_id)
    assert mb["step"].to_list() == ma["step"].to_list() == list(range(1, ma.height + 1))
    wa, wb = _weights(single, spec, name), _weights(dp, spec, name)
    assert wa.keys() == wb.keys()
    return {"logp": float((a["logp_sum"] - b["logp_sum"]).abs().max()),
            "loss": float((ma["loss"] - mb["loss"]).abs().max()),
            "grad_norm_rel": float(((ma["grad_norm"] - mb["grad_norm"]).abs() / ma["grad_norm"]).max()),
            "weights": max(float((wa[k] - wb[k]).abs().max()) for k in wa),
            "steps": ma.height}


def test_my_slice_partitions_every_batch(monkeypatch):
    for n in range(0, 8):
        for w in (1, 2, 3):
            monkeypatch.setenv("WORLD_SIZE", str(w))
            parts = []
            for r in range(w):
                monkeypatch.setenv("RANK", str(r))
                parts.append(distributed.my_slice(list(range(100, 100 + n))))
            assert sum(parts, []) == list(range(100, 100 + n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_worker_command():
    assert worker_command(1)[1:] == ["-m", "ldpipe.training.worker", "train", "--pipes"]
    cmd = worker_command(2)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd
    assert cmd[-4:] == ["-m", "ldpipe.training.worker", "train", "--pipes"][-4:]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LDPIPE_THREADS", "1")
    data = yaml.safe_load(TINY_YAML)
    data["runs"] = RUNS
    decl = tmp_path / "tiny.yaml"
    decl.write_text(yaml.safe_dump(data))
    spec = parse_experiment(data, source=str(decl))
    single = pipeline.files_for(spec, Paths(tmp_path / "single"))
    quiet = lambda msg: None  # noqa: E731
    pipeline.build_dataset(spec, single, log=quiet)
    pipeline.build_probes(spec, single, log=quiet)
    pipeline.build_base_model(spec, single, device="cpu", log=quiet)
    shutil.copytree(tmp_path / "single", tmp_path / "dp")
    dp = pipeline.files_for(spec, Paths(tmp_path / "dp"))

    # single-process reference runs
    for name in ("sft", "dpo"):
        pipeline.train_run(spec, spec.run(name), single, device="cpu", log=quiet)

    # dp home: one process trains SFT to its step-2 resume checkpoint and dies; torchrun resumes it on 2 ranks
    def stop_at_checkpoint(msg: str) -> None:
        if " resume checkpoint at step 2:" in msg:
            raise Interrupt(msg)
    with pytest.raises(Interrupt):
        pipeline.train_run(spec, spec.run("sft"), dp, device="cpu", log=stop_at_checkpoint)
    out = _torchrun(decl, tmp_path / "dp", "sft")
    assert f"resuming {spec.run_id(spec.run('sft'))} from step 2/6" in out.stdout
    report = _report(out.stdout)
    assert report["metadata"]["steps"] == 6 and report["metadata"]["evals"] == 4
    assert report["metadata"]["processes"] == 2
    sft = _compare(spec, single, dp, "sft")

    # DPO fresh on 2 ranks (reference log-probs computed by every rank), from the dp home's SFT checkpoint
    report = _report(_torchrun(decl, tmp_path / "dp", "dpo").stdout)
    assert report["metadata"]["algo"] == "dpo" and "final_rewards_margin" in report["metadata"]
    dpo = _compare(spec, single, dp, "dpo")
    dmetrics = _rows(dp, "train_metrics", spec.run_id(spec.run("dpo")))
    # step 1 is before any update: the policy is the reference (slices batch differently: float noise only)
    assert abs(dmetrics["rewards_margin"][0]) < 1e-4
    assert not (dp.run_dir(spec.run("dpo")) / "resume").exists()

    print(f"max |delta| single vs 2 gloo ranks: sft {sft}, dpo {dpo}")
    for d in (sft, dpo):
        assert d["logp"] < LOGP_TOL and d["weights"] < WEIGHT_TOL and d["loss"] < LOGP_TOL
        assert d["grad_norm_rel"] < 1e-4


@pytest.mark.slow
def test_run_asset_trains_on_two_processes_through_pipes(tiny_project, monkeypatch):
    """Compute(nproc_per_node=2): the run asset launches torchrun; rank 0 reports metadata and checks through
    Pipes, rank 1 reads the same extras and trains its slices; the store holds each evaluation once."""
    import dagster as dg

    from ldpipe.analysis.directions import run_checks
    from ldpipe.defs.experiments import build_defs
    from ldpipe.defs.resources import Compute, LdpipeHome
    from ldpipe.spec import load_experiments

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    specs = load_experiments(tiny_project / "assets")
    defs = build_defs(specs)
    keys = {dg.AssetKey(["tiny", n]) for n in ("dataset", "probe_set", "base_model", "run_sft")}
    mine = [a for a in defs.assets if set(a.keys) & keys]
    result = dg.materialize(mine, resources={"ldpipe_home": LdpipeHome(),
                                             "compute": Compute(device="cpu", nproc_per_node=2)},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    mats = {m.asset_key.to_user_string(): m.materialization.metadata
            for m in result.get_asset_materialization_events()}
    sft = mats["tiny/run_sft"]
    assert sft["steps"].value == 4 and sft["device"].value == "cpu"   # 32 examples / batch 8
    assert sft["processes"].value == 2
    checks = {c.check_name for c in result.get_asset_check_evaluations()
              if c.asset_key == dg.AssetKey(["tiny", "run_sft"])}
    assert checks == {n for n, _ in run_checks(specs[0].run("sft"))}
    traj = Store(Paths.default().store).read("trajectories", run_id="tiny.sft")
    assert traj["step"].unique().sort().to_list() == [0, 2, 4] == list(range(0, 5, 2))
    assert traj.select("step", "example_id", "response_type").is_duplicated().sum() == 0
