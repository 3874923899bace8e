"""Catalog: views over real Parquet shards and sql/*.sql, swapped in atomically; read-only `ldpipe sql`."""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.schema import TRAJECTORY_SCHEMA
from ldpipe.store.catalog import KNOWN_TABLES, check_readonly_statement, connect_readonly, query, refresh_catalog
from ldpipe.store.shards import Store
from ldpipe.store.sqlcli import add_sql_arguments, run_sql

LEARNING_CURVE = """\
-- mean log-probability per run, step and response type (the paper's learning curves)
select run_id, step, response_type, avg(logp_mean) as mean_logp, count(*) as n_examples
from trajectories
group by run_id, step, response_type
order by run_id, step, response_type;
"""


def traj(run: str, step: int) -> pl.DataFrame:
    rows = [
        {"run_id": run, "config_hash": "h", "phase": "sft", "step": step, "epoch": step / 4,
         "example_id": ex, "response_type": rt, "logp_sum": lp * 3, "n_tokens": 3, "logp_mean": lp,
         "argmax_logp_sum": -1.0, "A_o": 1.0, "p_e": 0.5, "energy": 0.4, "except_argmax": -0.1,
         "argmax_match": 1}
        for ex, base in (("e1", -2.0), ("e2", -4.0))
        for rt, lp in (("chosen", base + 0.1 * step), ("rejected", base - 0.2 * step))
    ]
    return pl.DataFrame(rows)


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Path]:
    store = Store(tmp_path / "store")
    for run in ("r1", "r2"):
        for step in (0, 2, 4):
            store.write_shard("trajectories", traj(run, step), partition={"run_id": run, "step": str(step)},
                              name="probes", schema=TRAJECTORY_SCHEMA)
    sql = tmp_path / "sql"
    sql.mkdir()
    (sql / "learning_curve.sql").write_text(LEARNING_CURVE)
    (sql / "loss_curve.sql").write_text("select run_id, step, avg(loss) as loss from train_metrics group by all\n")
    return {"store": tmp_path / "store", "sql": sql, "catalog": tmp_path / "home" / "catalog.duckdb"}


def refresh(p: dict[str, Path]) -> dict:
    return refresh_catalog(p["catalog"], p["store"], p["sql"])


def test_refresh_creates_views_over_shards_and_sql_files(project: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    info = refresh(project)
    assert info["path"] == str(project["catalog"].resolve())
    # every known table gets a view (empty ones typed); only trajectories has shards here
    assert info["tables"] == {"trajectories": 6, **{t: 0 for t in KNOWN_TABLES if t != "trajectories"}}
    assert set(info["views"]) == {*KNOWN_TABLES, "learning_curve", "loss_curve"}
    assert sorted(project["catalog"].parent.iterdir()) == [project["catalog"]]    # no temp or .wal left

    curve = query(project["catalog"], "select * from learning_curve")
    # Independent computation of the same curve with polars straight from the shards.
    expected = (Store(project["store"]).read("trajectories")
                .group_by("run_id", "step", "response_type")
                .agg(pl.col("logp_mean").mean().alias("mean_logp"), pl.len().alias("n_examples"))
                .sort("run_id", "step", "response_type"))
    assert curve.height == 2 * 3 * 2
    assert curve["n_examples"].to_list() == [2] * curve.height
    assert curve["mean_logp"].to_list() == pytest.approx(expected["mean_logp"].to_list())

    # Views use absolute paths: the catalog works from any working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert query(project["catalog"], "select count(*) as n from trajectories")["n"][0] == 24

    # The view is a glob, so a new shard shows up without a refresh.
    Store(project["store"]).write_shard("trajectories", traj("r3", 0), partition={"run_id": "r3", "step": "0"},
                                        name="probes", schema=TRAJECTORY_SCHEMA)
    runs = query(project["catalog"], "select distinct run_id from trajectories order by 1")["run_id"].to_list()
    assert runs == ["r1", "r2", "r3"]


def test_empty_known_table_gives_an_empty_typed_view(project: dict[str, Path]) -> None:
    refresh(project)
    desc = query(project["catalog"], "describe train_metrics")
    types = dict(zip(desc["column_name"], desc["column_type"]))
    assert types == {"run_id": "VARCHAR", "config_hash": "VARCHAR", "phase": "VARCHAR", "step": "BIGINT",
                     "epoch": "DOUBLE", "loss": "DOUBLE", "grad_norm": "DOUBLE", "clip_factor": "DOUBLE",
                     "lr": "DOUBLE", "rewards_chosen": "DOUBLE", "rewards_rejected": "DOUBLE",
                     "rewards_accuracy": "DOUBLE", "rewards_margin": "DOUBLE", "onpolicy_score_mean": "DOUBLE",
                     "onpolicy_tied_share": "DOUBLE"}
    assert query(project["catalog"], "select * from loss_curve").height == 0      # the sql view bound
    # Known tables keep their declared types once shards exist, too.
    traj_types = dict(query(project["catalog"], "describe trajectories").select("column_name", "column_type").rows())
    assert traj_types["step"] == "BIGINT" and traj_types["logp_mean"] == "DOUBLE"


def test_views_of_empty_tables_see_shards_written_after_the_refresh(project: dict[str, Path]) -> None:
    """Only the catalog asset refreshes: an analysis that writes its first rows reads them through the views at
    once, including a shard that lacks a newer column."""
    store = Store(project["store"])
    refresh(project)
    assert query(project["catalog"], "select * from loss_curve").height == 0
    old = pl.DataFrame({"run_id": ["r"], "config_hash": ["h"], "phase": ["sft"], "step": [1], "epoch": [0.1],
                        "loss": [2.0], "grad_norm": [1.0], "clip_factor": [1.0], "lr": [1e-3]})
    store.write_shard("train_metrics", old, partition={"run_id": "r"}, name="old")
    assert query(project["catalog"], "select run_id, loss from loss_curve").rows() == [("r", 2.0)]
    assert store.schema_file("train_metrics").is_file()
    assert [p.name for p in store.shards("train_metrics")] == ["old.parquet"]   # the schema file is not a shard
    out = query(project["catalog"], "select rewards_margin, step from train_metrics")
    assert out.rows() == [(None, 1)] and out.schema["step"] == pl.Int64
    assert refresh(project)["tables"]["train_metrics"] == 1


def test_a_removed_table_folder_names_the_fix(project: dict[str, Path]) -> None:
    import shutil

    refresh(project)
    shutil.rmtree(Store(project["store"]).table_dir("akg"))
    with pytest.raises(LdpipeError, match=r"No files found.*rebuild it with `ldpipe catalog refresh`"):
        query(project["catalog"], "select count(*) from akg")
    refresh(project)
    assert query(project["catalog"], "select count(*) as n from akg")["n"][0] == 0


def test_a_schema_file_of_an_older_schema_is_rewritten(project: dict[str, Path]) -> None:
    store = Store(project["store"])
    older = {k: v for k, v in KNOWN_TABLES["train_metrics"].items() if not k.startswith("rewards_")}
    assert store.write_schema_file("train_metrics", older)
    assert not store.write_schema_file("train_metrics", older)      # unchanged: left alone
    refresh(project)
    assert not store.write_schema_file("train_metrics", KNOWN_TABLES["train_metrics"])   # the refresh rewrote it
    store.write_shard("train_metrics", pl.DataFrame({"run_id": ["r"], "step": [1], "loss": [1.5]}),
                      partition={"run_id": "r"}, name="s")
    assert query(project["catalog"], "select loss, rewards_margin from train_metrics").rows() == [(1.5, None)]
    with pytest.raises(LdpipeError, match="reserved"):
        store.shard_path("train_metrics", {}, "_schema")


def test_unknown_store_table_gets_a_plain_view(project: dict[str, Path]) -> None:
    Store(project["store"]).write_shard("extra_notes", pl.DataFrame({"k": ["a", "b"], "v": [1, 2]}),
                                        partition={"run_id": "r1"}, name="x")
    info = refresh(project)
    assert info["tables"]["extra_notes"] == 1
    assert query(project["catalog"], "select sum(v) as s from extra_notes")["s"][0] == 3


def test_bad_sql_file_names_the_file_and_keeps_the_old_catalog(project: dict[str, Path]) -> None:
    refresh(project)
    before = project["catalog"].read_bytes()
    bad = project["sql"] / "broken_view.sql"
    bad.write_text("select run_id, no_such_column from trajectories\n")
    with pytest.raises(DataValidationError) as e:
        refresh(project)
    msg = str(e.value)
    assert "broken_view.sql" in msg and "no_such_column" in msg and "Binder Error" in msg
    assert project["catalog"].read_bytes() == before
    assert sorted(project["catalog"].parent.iterdir()) == [project["catalog"]]    # temp file removed
    assert query(project["catalog"], "select count(*) as n from learning_curve")["n"][0] == 12

    bad.write_text("select 1 as a; select 2 as b\n")
    with pytest.raises(DataValidationError, match=r"broken_view\.sql.*exactly one SELECT.*found 2"):
        refresh(project)
    bad.write_text("create table t as select 1\n")
    with pytest.raises(DataValidationError, match=r"broken_view\.sql.*must hold a SELECT statement, found CREATE"):
        refresh(project)
    bad.write_text("selct oops\n")
    with pytest.raises(LdpipeError, match=r"broken_view\.sql.*Parser Error"):
        refresh(project)
    assert project["catalog"].read_bytes() == before


READER = textwrap.dedent("""
    import duckdb, sys
    con = duckdb.connect(sys.argv[1], read_only=True)
    print("ready", con.execute("select count(*) from trajectories").fetchone()[0], flush=True)
    for line in sys.stdin:                      # one query per line until stdin closes
        print("result", con.execute(line).fetchone()[0], flush=True)
""")


def start_reader(catalog: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", READER, str(catalog)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().split() == ["ready", "24"]
    return proc


def ask(proc: subprocess.Popen, sql: str) -> str:
    proc.stdin.write(sql + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line.startswith("result"), proc.stderr.read() if not line else line
    return line.split(maxsplit=1)[1].strip()


def test_readers_in_two_processes_and_refresh_under_an_open_reader(project: dict[str, Path]) -> None:
    refresh(project)
    reader = start_reader(project["catalog"])
    try:
        # Another read-only connection (this process) works while the subprocess holds one.
        assert query(project["catalog"], "select count(*) as n from trajectories")["n"][0] == 24
        # The refresh is not blocked by the reader and adds a view...
        (project["sql"] / "zz_final.sql").write_text("select max(step) as last_step from trajectories")
        info = refresh(project)
        assert "zz_final" in info["views"]
        assert query(project["catalog"], "select last_step from zz_final")["last_step"][0] == 4
        # ...while the old reader keeps querying its (old) catalog.
        assert ask(reader, "select count(*) from learning_curve") == "12"
        assert ask(reader, "select count(*) from duckdb_views() where view_name = 'zz_final'") == "0"
    finally:
        reader.stdin.close()
        assert reader.wait(timeout=30) == 0, reader.stderr.read()


@pytest.mark.parametrize("sql", [
    "insert into trajectories values (1)",
    "update trajectories set step = 0",
    "delete from trajectories",
    "create table t as select 1",
    "create or replace view v as select 1",
    "drop view trajectories",
    "attach 'other.duckdb' as o",
    "copy (select 1) to 'out.csv'",
    "copy trajectories from 'in.csv'",
    "install httpfs",
    "load httpfs",
    "export database 'dump'",
    "import database 'dump'",
    "set threads = 1",
    "pragma threads = 1",
    "checkpoint",
    "explain analyze create table t as select 1",
    "select 1; select 2",
    "select 1; drop view trajectories",
])
def test_check_readonly_statement_refuses(sql: str) -> None:
    with pytest.raises(LdpipeError, match="refusing"):
        check_readonly_statement(sql)


@pytest.mark.parametrize("sql", [
    "select 1", "with a as (select 1 as x) select x from a", "from trajectories", "describe trajectories",
    "show tables", "summarize trajectories", "explain select 1", "explain analyze select 1", "values (1), (2)",
    "table trajectories", "pragma table_info('trajectories')", "-- comment\nselect 1;",
])
def test_check_readonly_statement_allows_reads(sql: str) -> None:
    check_readonly_statement(sql)


def test_query_refuses_copy_to_and_writes_no_file(project: dict[str, Path], tmp_path: Path) -> None:
    refresh(project)
    out = tmp_path / "leak.csv"
    with pytest.raises(LdpipeError, match="refusing to run a statement that writes: COPY"):
        query(project["catalog"], f"copy (select * from trajectories) to '{out}'")
    assert not out.exists()


def test_connect_readonly_missing_catalog(tmp_path: Path) -> None:
    with pytest.raises(LdpipeError, match="no catalog at .*missing.duckdb"):
        connect_readonly(tmp_path / "missing.duckdb")


# -- run_sql (the `ldpipe sql` body) ------------------------------------------------------------
def sql_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ldpipe sql")
    add_sql_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_sql_table_csv_json(project: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    refresh(project)
    cat = str(project["catalog"])
    assert run_sql(sql_args("select * from learning_curve", "--catalog", cat, "--limit", "5")) == 0
    out = capsys.readouterr().out
    assert "12 row(s)" in out and "showing the first 5" in out and "mean_logp" in out
    assert out.count("chosen") + out.count("rejected") == 5

    assert run_sql(sql_args("select run_id, step, mean_logp from learning_curve", "--catalog", cat,
                            "--format", "csv")) == 0
    printed = pl.read_csv(io.StringIO(capsys.readouterr().out))
    assert printed.height == 12 and printed.columns == ["run_id", "step", "mean_logp"]   # csv: all rows

    assert run_sql(sql_args("select distinct run_id from trajectories order by 1", "--catalog", cat,
                            "--format", "json")) == 0
    assert pl.read_json(io.StringIO(capsys.readouterr().out))["run_id"].to_list() == ["r1", "r2"]


def test_run_sql_reads_stdin(project: dict[str, Path], capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    refresh(project)
    monkeypatch.setattr(sys, "stdin", io.StringIO("select count(*) as n from trajectories\n"))
    assert run_sql(sql_args("-", "--catalog", str(project["catalog"]), "--format", "csv")) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "24"]


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_run_sql_exports_all_rows(project: dict[str, Path], tmp_path: Path, ext: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    refresh(project)
    out = tmp_path / "exports" / f"traj.{ext}"
    rc = run_sql(sql_args("select * from trajectories order by run_id, step, example_id, response_type",
                          "--catalog", str(project["catalog"]), "--output", str(out), "--limit", "3"))
    assert rc == 0 and f"wrote 24 row(s) to {out}" in capsys.readouterr().out
    got = pl.read_csv(out) if ext == "csv" else pl.read_parquet(out)
    want = Store(project["store"]).read("trajectories").sort("run_id", "step", "example_id", "response_type")
    assert got.height == 24                                         # --limit only affects the table view
    assert got["logp_mean"].to_list() == pytest.approx(want["logp_mean"].to_list())
    assert got["run_id"].to_list() == want["run_id"].to_list()


@pytest.mark.parametrize("argv, message", [
    (["insert into trajectories values (1)"], "refusing to run a statement that writes: INSERT"),
    (["select * from no_such_view"], "no_such_view"),
    (["select 1", "--output", "x.xlsx"], "unknown extension"),
])
def test_run_sql_errors_exit_2_without_traceback(project: dict[str, Path], argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    refresh(project)
    assert run_sql(sql_args(*argv, "--catalog", str(project["catalog"]))) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and captured.out == ""


def test_run_sql_default_catalog_from_ldpipe_home(project: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDPIPE_HOME", str(project["catalog"].parent))
    assert run_sql(sql_args("select 1")) == 2                        # not refreshed yet
    assert "no catalog at" in capsys.readouterr().err
    refresh(project)
    assert run_sql(sql_args("select count(*) as n from trajectories", "--format", "csv")) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "24"]


def test_old_shards_missing_a_new_known_column_get_typed_nulls(project: dict[str, Path]) -> None:
    # a train_metrics shard from before the reward columns existed
    old = pl.DataFrame({"run_id": ["r"], "config_hash": ["h"], "phase": ["sft"], "step": [1], "epoch": [0.1],
                        "loss": [2.0], "grad_norm": [1.0], "clip_factor": [1.0], "lr": [1e-3]})
    Store(project["store"]).write_shard("train_metrics", old, partition={"run_id": "r"}, name="old")
    refresh(project)
    out = query(project["catalog"], "select loss, rewards_margin from train_metrics")
    assert out["loss"].to_list() == [2.0] and out["rewards_margin"].to_list() == [None]


def test_run_sql_output_never_overwrites_the_record_or_an_existing_file(
        project: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refresh(project)
    cat = str(project["catalog"])
    home = project["catalog"].parent
    shard = Store(project["store"]).shards("trajectories")[0]
    before = shard.read_bytes()
    # a store shard (inside the home that holds the catalog): refused, the shard untouched
    assert run_sql(sql_args("select 1 as a", "--catalog", cat, "--output", str(shard), "--force")) == 2
    assert "inside the ldpipe home" in capsys.readouterr().err and shard.read_bytes() == before
    assert run_sql(sql_args("select 1 as a", "--catalog", cat, "--output", str(home / "x.csv"))) == 2
    assert not (home / "x.csv").exists()
    # an existing file elsewhere: only with --force
    out = tmp_path / "elsewhere" / "r.csv"
    assert run_sql(sql_args("select 1 as a", "--catalog", cat, "--output", str(out))) == 0
    assert run_sql(sql_args("select 2 as a", "--catalog", cat, "--output", str(out))) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "a\n1\n"
    assert run_sql(sql_args("select 2 as a", "--catalog", cat, "--output", str(out), "--force")) == 0
    assert out.read_text() == "a\n2\n"


@pytest.mark.parametrize("sql, fmt, rc, text", [
    ("select [1, 2] as x", "csv", 2, "CSV cannot hold nested values"),
    ("select {'a': 1} as s", "csv", 2, "column(s) s"),
    ("select interval 1 day as i", "csv", 0, "1 day"),            # shown as text, not a conversion error
    ("select union_value(k := 7) as u", "table", 0, "7"),
    ("select [1, 2] as x", "json", 0, "[1,2]"),
])
def test_run_sql_result_types_end_in_a_result_or_one_line(project: dict[str, Path], sql: str, fmt: str, rc: int,
                                                          text: str, capsys: pytest.CaptureFixture[str]) -> None:
    refresh(project)
    assert run_sql(sql_args(sql, "--catalog", str(project["catalog"]), "--format", fmt)) == rc
    captured = capsys.readouterr()
    assert text in (captured.err if rc else captured.out) and "Traceback" not in captured.err
    if rc:
        assert len(captured.err.strip().splitlines()) == 1


def test_ctrl_c_during_a_query_exits_130_in_one_line(project: dict[str, Path]) -> None:
    import signal
    import time

    refresh(project)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ldpipe"), "sql", "--catalog", str(project["catalog"]),
                             "select sum(i % 7) from range(100000000000) t(i)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as a terminal's foreground process: a suite run from a script's background job
                            # hands its children SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # python start-up and the query under way (it runs for minutes; i % 7, as i * i overflows INT64 past
        # i = 3.04e9, which a fast machine reaches within these 4 s)
        time.sleep(4)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert err.strip() == "ldpipe sql: interrupted" and out == ""


def test_a_moved_home_keeps_working_and_a_copy_reads_its_own_shards(
        project: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from ldpipe.cli import main

    # a home laid out as ldpipe lays it out: <home>/store and <home>/catalog.duckdb
    home = tmp_path / "home"
    shutil.move(str(project["store"]), str(home / "store"))
    refresh_catalog(home / "catalog.duckdb", home / "store", project["sql"])
    count = "select count(*) as n from trajectories"

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(home), str(moved))
    monkeypatch.setenv("LDPIPE_HOME", str(moved))
    assert main(["sql", "--format", "csv", count]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == ["n", "24"] and "its views now read" in out.err and str(moved) in out.err
    assert main(["sql", "--format", "csv", count]) == 0 and capsys.readouterr().err == ""   # rebuilt once

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(copy / "store" / "trajectories" / "run_id=r2")   # change the copy only
    monkeypatch.setenv("LDPIPE_HOME", str(copy))
    assert main(["sql", "--format", "csv", count]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "12"]
    monkeypatch.setenv("LDPIPE_HOME", str(moved))
    assert main(["sql", "--format", "csv", count]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "24"]

    # `ldpipe catalog refresh` rebuilds from the home's store and the sql views
    Store(moved / "store").write_shard("trajectories", traj("r3", 0), partition={"run_id": "r3"}, name="probes",
                                       schema=TRAJECTORY_SCHEMA)
    assert main(["catalog", "refresh", "--sql-dir", str(project["sql"])]) == 0
    assert "views over 7 shard(s)" in capsys.readouterr().out
    assert main(["sql", "--format", "csv", count]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "28"]


@pytest.mark.parametrize("foreign, needle", [
    (pl.DataFrame({"a": [1], "b": ["x"]}), "lacks required column(s)"),             # someone else's file
    (None, "column 'step' is"),                                                      # step written as text
    (pl.DataFrame({"run_id": ["r9"], "config_hash": ["h"], "step": [0], "example_id": ["e"],
                   "response_type": ["chosen"], "logp_sum": [-1.0], "score": [0.3]}), "column 'score' is not"),
])
def test_refresh_names_a_shard_that_does_not_fit(project: dict[str, Path], foreign,
                                                                          needle: str) -> None:
    refresh(project)
    before = project["catalog"].read_bytes()
    if foreign is None:   # a real shard's columns, with step as a string
        foreign = traj("r9", 0).with_columns(pl.col("step").cast(pl.String))
    bad = project["store"] / "trajectories" / "run_id=r9" / "extra.parquet"
    bad.parent.mkdir(parents=True)
    foreign.write_parquet(bad)
    with pytest.raises(DataValidationError) as e:
        refresh(project)
    assert str(bad) in str(e.value) and needle in str(e.value)
    assert project["catalog"].read_bytes() == before      # the refresh failed whole: the old catalog stays
