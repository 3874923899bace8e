"""A TRL run with ldpipe's tracking callback on 2 processes: the Trainer's accelerate backend under torchrun, gloo on
the CPU, records the same trajectories as one process (each process takes half of every batch of 4), up to float
rounding. (On a CPU machine `accelerate launch --cpu` starts ONE process; several CPU processes need torchrun or
mpirun, so the test launches torchrun, as accelerate itself does for GPUs.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldpipe.store.shards import Store

pytest.importorskip("trl")
pytest.importorskip("accelerate")

HERE = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDPIPE_", "DAGSTER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(cmd: list[str]) -> tuple[int, str]:
    """`cmd` in its own process group, bounded; the whole group (accelerate's workers too) ends with it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    script = str(HERE / "trl_two_process.py")
    rc, out = _run([sys.executable, script, str(tmp_path / "one")])
    assert rc == 0, out[-3000:]
    rc, out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
                    str(tmp_path / "two")])
    assert rc == 0, out[-3000:]
    # the Trainer really trained on 2 processes (and on 1 in the first run)
    assert (tmp_path / "one.world_size").read_text() == "1" and (tmp_path / "two.world_size").read_text() == "2"
    key = ["step", "example_id", "response_type"]
    a = Store(tmp_path / "one").read("trajectories", run_id="dp.sft").sort(key)
    b = Store(tmp_path / "two").read("trajectories", run_id="dp.sft").sort(key)
    assert a["step"].unique().to_list() == [0, 2, 4, 6] and a.select(key).equals(b.select(key))
    # each evaluation written once, by the main process: one shard per step, as with one process
    assert len(list((tmp_path / "two" / "trajectories").rglob("*.parquet"))) == 4
    moved = np.abs(a.filter(a["step"] == 6)["logp_sum"].to_numpy() - a.filter(a["step"] == 0)["logp_sum"].to_numpy())
    assert moved.max() > 1.0                       # training moved the probes, so agreement means something
    np.testing.assert_allclose(b["logp_sum"].to_numpy(), a["logp_sum"].to_numpy(), rtol=0, atol=1e-4)
    ma = Store(tmp_path / "one").read("train_metrics", run_id="dp.sft").sort("step")
    mb = Store(tmp_path / "two").read("train_metrics", run_id="dp.sft").sort("step")
    np.testing.assert_allclose(mb["loss"].to_numpy(), ma["loss"].to_numpy(), rtol=1e-5)
