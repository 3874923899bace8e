"""Resumable training: an interrupted run continues from its last resume checkpoint, and every trajectory and
train_metrics row exists exactly once, equal to an uninterrupted run's (CPU, same seed: bit for bit)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
import torch
import yaml
from conftest import TINY_YAML, build_inputs
from safetensors.torch import load_file

from ldpipe import pipeline
from ldpipe.layout import step_name
from ldpipe.model.checkpoints import read_metadata
from ldpipe.spec import load_experiment, parse_experiment
from ldpipe.store.shards import Store
from ldpipe.training import resume

torch.set_num_threads(1)

RUNS = [
    # 32 pairs / batch 8 = 4 steps per epoch: 12 steps, evals every 2, resume checkpoints every 4
    {"name": "sft", "algo": "sft", "epochs": 3, "batch_size": 8, "lr": 2.0e-3, "eval_every": 2,
     "checkpoint_every": 4, "snapshot_every": 5},
    # checkpoints not aligned with evals: train_metrics shards are cut at both
    {"name": "dpo", "algo": "dpo", "start_from": "sft", "epochs": 2, "batch_size": 8, "lr": 5.0e-3,
     "warmup_steps": 0, "eval_every": 3, "checkpoint_every": 2},
]


class Interrupt(Exception):
    pass


def _spec(**run_changes):
    data = yaml.safe_load(TINY_YAML)
    data["runs"] = [{**r, **run_changes.get(r["name"], {})} for r in RUNS]
    return parse_experiment(data, source="test")


def _interrupt_at(message_start: str, lines: list):
    def log(msg: str) -> None:
        lines.append(msg)
        if msg.startswith(message_start):
            raise Interrupt(msg)
    return log


def _rows(files, table, run_id):
    key = ["step", "example_id", "response_type"] if table == "trajectories" else ["step"]
    return Store(files.paths.store).read(table, run_id=run_id).sort(key)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    spec = _spec()
    return spec, build_inputs(spec, tmp_path_factory.mktemp("ldhome"))


@pytest.mark.parametrize("name,stop_at,resumes_from", [("sft", "[tiny.sft] eval step 6/", 4),
                                                       ("dpo", "[tiny.dpo] eval step 6/", 4)])
def test_interrupted_run_resumes_and_matches_uninterrupted(world, name, stop_at, resumes_from):
    spec, files = world
    run, run_id = spec.run(name), spec.run_id(spec.run(name))
    quiet = lambda msg: None  # noqa: E731
    if name == "dpo" and not (files.run_dir(spec.run("sft")) / "final").is_dir():
        pipeline.train_run(spec, spec.run("sft"), files, device="cpu", log=quiet)

    clean = pipeline.train_run(spec, run, files, device="cpu", log=quiet)
    assert clean.resumed_from is None
    assert not files.resume_dir(run).exists()          # finished: resume state removed
    want = {t: _rows(files, t, run_id) for t in ("trajectories", "train_metrics")}
    want_final = _weights(Path(clean.checkpoint))
    want_snaps = {p.name: _weights(p) for p in (files.run_dir(run) / "checkpoints").glob("step-*")}

    lines: list[str] = []
    with pytest.raises(Interrupt):   # the rerun of a finished run starts fresh, then stops after step 6's eval
        pipeline.train_run(spec, run, files, device="cpu", log=_interrupt_at(stop_at, lines))
    assert not any(line.startswith("resuming") for line in lines)
    ckpt = resume.latest(files.run_dir(run))
    assert ckpt is not None and ckpt.step == resumes_from and ckpt.meta["config_hash"] == clean.config_hash
    assert ckpt.path.parent == files.resume_dir(run)
    assert _rows(files, "trajectories", run_id)["step"].max() == 6   # rows after the checkpoint exist ...

    lines.clear()
    again = pipeline.train_run(spec, run, files, device="cpu", log=lines.append)
    assert again.resumed_from == resumes_from
    assert any(line.startswith(f"resuming {run_id} from step {resumes_from}/") for line in lines)
    assert not files.resume_dir(run).exists()
    got = {t: _rows(files, t, run_id) for t in ("trajectories", "train_metrics")}
    traj = got["trajectories"]
    assert traj.group_by("step", "example_id", "response_type").len()["len"].max() == 1   # ... exactly once
    assert got["train_metrics"]["step"].to_list() == list(range(1, clean.steps + 1))
    for table in got:   # bit for bit, every column (rewards too: DPO's restored reference log-probs)
        assert got[table].equals(want[table]), table
    got_final = _weights(Path(again.checkpoint))
    assert all(torch.equal(got_final[k], v) for k, v in want_final.items())
    assert again.evals == clean.evals and again.final_loss == clean.final_loss
    assert again.delta_by_type == clean.delta_by_type
    if run.snapshot_every:
        snaps = sorted(p.name for p in (files.run_dir(run) / "checkpoints").glob("step-*"))
        assert snaps == ["step-0000000", "step-0000005", "step-0000010", "step-0000012"] == sorted(want_snaps)
        for s in snaps:
            assert all(torch.equal(_weights(files.run_dir(run) / "checkpoints" / s)[k], v)
                       for k, v in want_snaps[s].items())
        meta = read_metadata(files.snapshot_dir(run, 10))
        assert (meta["step"], meta["run_id"], meta["config_hash"]) == (10, run_id, clean.config_hash)


def test_changed_config_starts_fresh_but_checkpoint_settings_do_not(world):
    spec, files = world
    run = spec.run("sft")
    lines: list[str] = []
    with pytest.raises(Interrupt):
        pipeline.train_run(spec, run, files, device="cpu", log=_interrupt_at("[tiny.sft] eval step 6/", lines))
    assert resume.latest(files.run_dir(run)).step == 4

    # checkpoint_every / snapshot_every are not in the config hash: still resumable
    same = _spec(sft={"checkpoint_every": 3, "snapshot_every": None})
    assert same.run_config_hash(same.run("sft")) == spec.run_config_hash(run)
    changed = _spec(sft={"lr": 1.0e-3})
    assert changed.run_config_hash(changed.run("sft")) != spec.run_config_hash(run)

    lines.clear()
    info = pipeline.train_run(changed, changed.run("sft"), files, device="cpu", log=lines.append)
    assert info.resumed_from is None
    assert any("not resuming" in line and "config_hash" in line for line in lines)
    traj = _rows(files, "trajectories", spec.run_id(run))
    assert traj["config_hash"].unique().to_list() == [info.config_hash]   # nothing of the old run left
    assert _rows(files, "train_metrics", spec.run_id(run))["step"].to_list() == list(range(1, info.steps + 1))
    snaps = list((files.run_dir(run) / "checkpoints").glob("step-*"))   # snapshots of the old config are gone
    assert snaps and {read_metadata(p)["config_hash"] for p in snaps} == {info.config_hash}
    pipeline.train_run(spec, run, files, device="cpu", log=lambda m: None)   # leave sft as declared


def test_a_smoke_run_keeps_the_full_runs_record_aside(world):
    """A run of another configuration (here the smoke preset over the declared run) never destroys the earlier
    record: its shards move to the store's archive (no view reads them), its checkpoints to <run>/archive."""
    from ldpipe.spec import apply_run_overrides

    spec, files = world
    run = spec.run("sft")
    full = pipeline.train_run(spec, run, files, device="cpu", log=lambda m: None)
    full_rows = _rows(files, "trajectories", spec.run_id(run))
    smoke_run = apply_run_overrides(run, {"preset": "smoke"})
    lines: list[str] = []
    smoke = pipeline.train_run(spec, smoke_run, files, device="cpu", log=lines.append)
    assert smoke.config_hash != full.config_hash
    assert any("kept it aside instead of replacing it" in m for m in lines)
    live = _rows(files, "trajectories", spec.run_id(run))
    assert live["config_hash"].unique().to_list() == [smoke.config_hash]        # no mixing in the views
    archived = files.paths.store / "_archive" / f"config_hash={full.config_hash}"
    kept = pl.read_parquet(str(archived / "trajectories" / "**" / "*.parquet")).sort(
        "step", "example_id", "response_type")
    assert kept.equals(full_rows.select(kept.columns))                              # the full record, intact
    assert (archived / "train_metrics").is_dir()
    old_final = files.run_dir(run) / "archive" / f"config_hash={full.config_hash}" / "final"
    assert read_metadata(old_final)["config_hash"] == full.config_hash
    assert read_metadata(files.run_dir(run) / "final")["config_hash"] == smoke.config_hash
    assert "_archive" not in Store(files.paths.store).tables()
    # back to the declaration: the smoke record is kept aside in turn, the live record is the full one again
    pipeline.train_run(spec, run, files, device="cpu", log=lambda m: None)
    assert _rows(files, "trajectories", spec.run_id(run)).equals(full_rows)
    assert (files.paths.store / "_archive" / f"config_hash={smoke.config_hash}" / "trajectories").is_dir()


def test_wiped_store_is_not_resumed(world, tmp_path):
    spec, files = world
    run = spec.run("sft")
    with pytest.raises(Interrupt):
        pipeline.train_run(spec, run, files, device="cpu", log=_interrupt_at("[tiny.sft] eval step 6/", []))
    lines: list[str] = []
    info = pipeline.train_run(spec, run, files, store_root=tmp_path / "other_store", device="cpu",
                              log=lines.append)
    assert info.resumed_from is None
    assert any("not resuming" in line and "step-0 evaluation" in line for line in lines)
    other = Store(tmp_path / "other_store").read("train_metrics")
    assert other["step"].sort().to_list() == list(range(1, info.steps + 1))


def test_truncate_rewrites_a_metrics_shard_that_straddles_the_checkpoint(tmp_path):
    store = Store(tmp_path)
    rows = pl.DataFrame({"run_id": ["r"] * 6, "step": list(range(1, 7)), "loss": [0.0] * 6})
    store.write_shard("train_metrics", rows.head(2), partition={"run_id": "r"}, name="steps-0000001-0000002")
    store.write_shard("train_metrics", rows.slice(2), partition={"run_id": "r"}, name="steps-0000003-0000006")
    for s in (0, 2, 4):
        store.write_shard("trajectories", pl.DataFrame({"step": [s]}), partition={"run_id": "r"},
                          name=step_name(s))
    removed = resume.truncate_store(store, "r", 3)
    assert removed == {"trajectories": 1, "train_metrics": 1}
    assert store.read("train_metrics")["step"].sort().to_list() == [1, 2, 3]
    assert sorted(p.name for p in store.shards("train_metrics")) == ["steps-0000001-0000002.parquet",
                                                                      "steps-0000003-0000003.parquet"]
    assert store.read("trajectories")["step"].sort().to_list() == [0, 2]
    assert resume.store_problem(store, "r", 3) is None
    assert "not steps 1..4" in resume.store_problem(store, "r", 4)


# ------------------------------------------------------------------ the promise: kill -9 mid-training

KILL_YAML_RUN = {"name": "sft", "algo": "sft", "epochs": 6, "batch_size": 8, "lr": 2.0e-3, "eval_every": 2,
                 "checkpoint_every": 4, "snapshot_every": 3}

TRAIN_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
from pathlib import Path
from ldpipe import pipeline
from ldpipe.spec import load_experiment

spec = load_experiment(Path(sys.argv[1]))
pause = float(sys.argv[2])   # seconds per log line: keeps the first attempt running until it is killed
def log(msg):
    print(msg, flush=True)
    time.sleep(pause)
info = pipeline.train_run(spec, spec.run("sft"), pipeline.files_for(spec), device="cpu", log=log)
print("RESUMED_FROM", info.resumed_from, flush=True)
"""


def _train_process(decl: Path, pause: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(decl), str(pause)],
                            stdout=out.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())


def test_sigkill_mid_training_then_rerun_completes_exactly_once(tiny_project, monkeypatch):
    monkeypatch.setenv("LDPIPE_THREADS", "1")
    decl = tiny_project / "assets" / "tiny.yaml"
    data = yaml.safe_load(TINY_YAML)
    data["runs"] = [KILL_YAML_RUN]
    decl.write_text(yaml.safe_dump(data))
    spec = load_experiment(decl)
    run, run_id = spec.run("sft"), spec.run_id(spec.run("sft"))
    files = pipeline.files_for(spec)
    quiet = lambda msg: None  # noqa: E731
    pipeline.build_dataset(spec, files, log=quiet)
    pipeline.build_probes(spec, files, log=quiet)
    pipeline.build_base_model(spec, files, device="cpu", log=quiet)
    store = Store(files.paths.store)
    traj_dir = store.shard_path("trajectories", {"run_id": run_id}, "x").parent

    # 1. start training in a subprocess; SIGKILL it once a resume checkpoint exists and later rows were written
    first_log = tiny_project / "first.log"
    proc = _train_process(decl, 0.1, first_log)
    deadline, killed_at = time.monotonic() + 120, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = resume.latest(files.run_dir(run))
            later = ckpt is not None and any(int(p.stem.split("-")[1]) > ckpt.step
                                             for p in traj_dir.glob("step-*.parquet"))
            if later:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = ckpt.step
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, f"no resume checkpoint before the run ended:\n{first_log.read_text()}"
    assert proc.returncode == -signal.SIGKILL
    assert not (files.run_dir(run) / "final").exists()
    steps_before = sorted(int(p.stem.split("-")[1]) for p in traj_dir.glob("step-*.parquet"))
    assert max(steps_before) > killed_at
    # a writer killed inside Store.write_shard leaves exactly this: a temp file next to the shards
    leftover = traj_dir / f"step-{max(steps_before) + 2:07d}.parquet.tmp-999999-{'0' * 32}"
    leftover.write_bytes((traj_dir / f"step-{max(steps_before):07d}.parquet").read_bytes())
    # and save_checkpoint killed mid-snapshot leaves a temp dir beside the snapshots
    (files.run_dir(run) / "checkpoints" / "step-0000021.tmp-999999").mkdir(parents=True)

    # 2. the rerun, in another process, resumes and completes
    second_log = tiny_project / "second.log"
    rerun = _train_process(decl, 0.0, second_log)
    assert rerun.wait(timeout=300) == 0, second_log.read_text()
    out = second_log.read_text()
    ckpt_step = int(out.split(f"resuming {run_id} from step ")[1].split("/")[0])
    assert ckpt_step >= killed_at and f"RESUMED_FROM {ckpt_step}" in out
    total = 6 * 4
    assert read_metadata(files.run_dir(run) / "final")["steps"] == total
    assert not files.resume_dir(run).exists()
    snaps = sorted(p.name for p in (files.run_dir(run) / "checkpoints").iterdir())
    assert snaps == [f"step-{s:07d}" for s in range(0, total + 1, 3)]
    assert all(read_metadata(files.snapshot_dir(run, s))["step"] == s for s in range(0, total + 1, 3))

    # 3. the store, through DuckDB: the catalog views and the raw shard glob
    pipeline.refresh(files)
    n_probes = pipeline.load_probes_file(files).height
    con = duckdb.connect(str(files.paths.catalog), read_only=True)
    try:
        dup = con.execute("select run_id, step, example_id, response_type, count(*) from trajectories "
                          "group by all having count(*) <> 1").fetchall()
        steps = [r[0] for r in con.execute("select step from trajectories group by step order by step").fetchall()]
        n_rows = con.execute("select count(*) from trajectories").fetchone()[0]
        metric_steps = [r[0] for r in con.execute("select step from train_metrics order by step").fetchall()]
        hashes = con.execute("select distinct config_hash from trajectories").fetchall()
    finally:
        con.close()
    assert dup == []
    assert steps == list(range(0, total + 1, 2))
    assert n_rows == len(steps) * n_probes
    assert metric_steps == list(range(1, total + 1))
    assert len(hashes) == 1
    assert leftover.exists() and leftover not in store.shards("trajectories")
    files_seen = [r[0] for r in duckdb.sql(
        f"select distinct filename from read_parquet('{store.glob('trajectories')}', filename=true)").fetchall()]
    assert files_seen and not any(".tmp-" in f for f in files_seen)
    assert len(files_seen) == len(steps)

    # 4. equal to an uninterrupted run (a rerun of a finished run trains from scratch)
    resumed = _rows(files, "trajectories", run_id)
    resumed_metrics = _rows(files, "train_metrics", run_id)
    fresh = pipeline.train_run(spec, run, files, device="cpu", log=quiet)
    assert fresh.resumed_from is None
    assert _rows(files, "trajectories", run_id).equals(resumed)
    assert _rows(files, "train_metrics", run_id).equals(resumed_metrics)


def test_check_store_finds_lost_changed_and_foreign_shards(tmp_path, monkeypatch, capsys):
    """A finished run records its shards; `ldpipe check --store` names a deleted, a rewritten and a foreign one."""
    from ldpipe.cli import main

    spec = _spec()
    files = build_inputs(spec, tmp_path / "home")
    run = spec.run("sft")
    pipeline.train_run(spec, run, files, device="cpu", log=lambda m: None)
    store = Store(files.paths.store)
    assert store.manifest_path("run_id", "tiny.sft").is_file()
    monkeypatch.setenv("LDPIPE_HOME", str(files.paths.home))
    decl = tmp_path / "assets"
    decl.mkdir()
    (decl / "tiny.yaml").write_text(TINY_YAML)
    assert main(["check", "--dir", str(decl), "--store"]) == 0
    assert "OK;" in capsys.readouterr().out

    shards = store.shards("trajectories")
    shards[0].unlink()                                              # lost
    pl.read_parquet(shards[1]).head(1).write_parquet(shards[1])     # rewritten with fewer rows
    foreign = shards[2].with_name("foreign.parquet")
    pl.DataFrame({"a": [1]}).write_parquet(foreign)                 # someone else's file
    assert main(["check", "--dir", str(decl), "--store"]) == 2
    err = capsys.readouterr().err
    assert f"missing shard {shards[0]}" in err and f"changed shard {shards[1]}: 1 rows" in err
    assert f"extra shard {foreign}" in err and "lacks required column(s)" in err and "4 problem(s)" in err   # the foreign file twice
