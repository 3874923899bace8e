"""The `ldpipe` command line, run as a user would (subprocess), and a bad-input step failing cleanly in Dagster."""
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from ldpipe.defs.experiments import build_defs
from ldpipe.defs.resources import Compute, LdpipeHome
from ldpipe.spec import load_experiments

LDPIPE = [str(Path(sys.executable).parent / "ldpipe")]
REPO = Path(__file__).resolve().parents[1]


def _run(args, **env):
    return subprocess.run(LDPIPE + args, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_check_lists_repo_experiments():
    r = _run(["check", "--dir", str(REPO / "assets")])
    assert r.returncode == 0, r.stderr
    assert "default: dataset=synthetic model=builtin" in r.stdout


def test_bad_declaration_exits_2_naming_file_and_key(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\nprobes: {n_exampels: 3}\n")
    r = _run(["check", "--dir", str(tmp_path)])
    assert r.returncode == 2
    assert "x.yaml" in r.stderr and "probes.n_exampels" in r.stderr and "Traceback" not in r.stderr


def test_sql_reads_and_refuses_writes(tmp_path):
    import duckdb

    cat = tmp_path / "c.duckdb"
    con = duckdb.connect(str(cat))
    con.execute("create table t as select range as i from range(5)")
    con.close()
    r = _run(["sql", "--catalog", str(cat), "--format", "csv", "select sum(i) as s from t"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["s", "10"]
    for stmt in ("insert into t values (9)", "copy t to 'x.csv'", f"attach '{tmp_path}/y.duckdb' as y",
                 "install httpfs"):
        r = _run(["sql", "--catalog", str(cat), stmt])
        assert r.returncode == 2, stmt
        assert "Traceback" not in r.stderr
    con = duckdb.connect(str(cat), read_only=True)
    assert con.execute("select count(*) from t").fetchone()[0] == 5
    con.close()
    assert not (tmp_path / "x.csv").exists()


def _materialize_dataset(proj, monkeypatch):
    """Materialize only the `local/dataset` asset of the project's declarations, in-process."""
    monkeypatch.setenv("LDPIPE_PROJECT_DIR", str(proj))
    monkeypatch.setenv("LDPIPE_HOME", str(proj / ".ldpipe"))
    defs = build_defs(load_experiments(proj / "assets"))
    ds = [a for a in defs.assets if dg.AssetKey(["local", "dataset"]) in a.keys]
    return dg.materialize(ds, resources={"ldpipe_home": LdpipeHome(), "compute": Compute(device="cpu")},
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def test_bad_local_dataset_fails_the_step_and_writes_nothing(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "sql").symlink_to(REPO / "sql")
    data = proj / "pairs.jsonl"
    data.write_text('{"prompt": "Q1", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "Q2", "chosen": "a"}\n')
    (proj / "assets" / "local.yaml").write_text(
        "name: local\ndataset: {kind: local, path: pairs.jsonl}\nmodel: {kind: pretrained, name_or_path: nowhere}\n")
    result = _materialize_dataset(proj, monkeypatch)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1
    msg = str(failures[0].step_failure_data.error.message) + str(failures[0].step_failure_data.error.cause)
    assert "pairs.jsonl" in msg and "rejected" in msg
    assert not (proj / ".ldpipe" / "datasets" / "local" / "preferences.parquet").exists()
    assert not list((proj / ".ldpipe").rglob("*.tmp-*"))


def test_good_local_dataset_materializes(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "assets").mkdir(parents=True)
    rows = [{"q": f"\n\nHuman: question {i}?\n\nAssistant:", "good": f" answer {i}", "bad": " no"} for i in range(6)]
    pl.DataFrame(rows).write_parquet(proj / "pairs.parquet")
    (proj / "assets" / "local.yaml").write_text(
        "name: local\ndataset: {kind: local, path: pairs.parquet, "
        "columns: {prompt: q, chosen: good, rejected: bad}}\n")
    result = _materialize_dataset(proj, monkeypatch)
    assert result.success
    prefs = pl.read_parquet(proj / ".ldpipe" / "datasets" / "local" / "preferences.parquet")
    assert prefs.height == 6 and prefs["chosen"][0] == " answer 0"


@pytest.mark.slow
def test_run_with_smoke_preset_trains_fewer_steps(tiny_project, monkeypatch, capsys):
    """`ldpipe run --preset smoke` materializes the graph with every run capped by the preset."""
    from ldpipe.cli import main
    from ldpipe.instance import latest_run_step_durations
    from ldpipe.spec import RUN_PRESETS
    from ldpipe.store.shards import Store

    yaml = (tiny_project / "assets" / "tiny.yaml").read_text()
    (tiny_project / "assets" / "tiny.yaml").write_text(
        yaml + "influence: {enabled: false}\ngeneration_analysis: {enabled: false}\n")
    # a study declared next to it is not part of a plain `ldpipe run`
    (tiny_project / "assets" / "study.yaml").write_text(
        yaml.replace("name: tiny", "name: study\nrun_by_default: false"))
    monkeypatch.setenv("DAGSTER_HOME", str(tiny_project / ".dagster_home"))
    assert main(["run", "--preset", "smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "skipping experiment 'study' (run_by_default: false); run it with `ldpipe run -e study`" in out
    assert not (tiny_project / ".ldpipe" / "datasets" / "study").exists()
    metrics = Store(tiny_project / ".ldpipe" / "store").read("train_metrics", run_id="tiny.sft")
    # declared: 32 train prompts, batch 8, 1 epoch = 4 steps; smoke caps n_train at 16 -> 2 steps
    assert RUN_PRESETS["smoke"]["n_train"] == 16
    assert sorted(metrics["step"].to_list()) == [1, 2]
    traj = Store(tiny_project / ".ldpipe" / "store").read("trajectories", run_id="tiny.sft")
    assert sorted(traj["step"].unique().to_list()) == [0, 2]
    # where the time went: the run's steps from Dagster's event log, slowest first, and the slowest printed
    run_id, steps = latest_run_step_durations(tiny_project / ".dagster_home")
    secs = [v for _, v in steps]
    assert len(steps) >= 5 and secs == sorted(secs, reverse=True) and min(secs) >= 0
    assert any("sft" in k for k, _ in steps)
    line = next(x for x in out.splitlines() if x.startswith("Slowest steps: "))
    assert line.startswith(f"Slowest steps: {steps[0][0]} ")
