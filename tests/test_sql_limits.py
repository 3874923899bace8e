"""`ldpipe sql` resource limits: a statement timeout, a memory limit, a capped spill dir, no extension autoloading."""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ldpipe.store import sqlcli
from ldpipe.store.catalog import QueryTimeout, default_memory_limit, query, refresh_catalog
from ldpipe.store.sqlcli import add_sql_arguments, run_sql

ENDLESS = "select sum(i % 7) from range(100000000000) t(i)"        # minutes on any machine
# A sort of 10M rows: about 300 MB, so under a 100 MB memory limit it completes only by spilling.
BIG_SORT = "select count(*) as n from (select i, random() as r from range(10000000) t(i) order by r)"


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    cat = tmp_path / "home" / "catalog.duckdb"
    refresh_catalog(cat, tmp_path / "store", None)
    return cat


def sql_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ldpipe sql")
    add_sql_arguments(parser)
    return parser.parse_args(list(argv))


def settings(catalog: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    names = ("memory_limit", "temp_directory", "max_temp_directory_size", "autoload_known_extensions",
             "autoinstall_known_extensions")
    sql = "select " + ", ".join(f"current_setting('{n}') as {n}" for n in names)
    assert run_sql(sql_args(sql, "--catalog", str(catalog), "--format", "json", *flags)) == 0
    return pl.read_json(io.StringIO(capsys.readouterr().out)).row(0, named=True)


@pytest.mark.timeout(60)
def test_a_query_past_its_timeout_is_cancelled_in_one_line_naming_the_flag(
        catalog: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_sql(sql_args(ENDLESS, "--catalog", str(catalog), "--timeout-s", "1")) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("ldpipe sql: the query ran past --timeout-s 1 and was cancelled; give a larger "
                           "--timeout-s (0: no limit) or narrow the query")
    # the library call raises its own error; a query that ends in time is untouched by the timer
    with pytest.raises(QueryTimeout):
        query(catalog, ENDLESS, timeout_s=0.5)
    assert query(catalog, "select 42 as x", timeout_s=30)["x"][0] == 42


def test_the_sql_command_has_a_default_timeout(catalog: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict = {}

    def fake_query(cat, sql, **kw):
        seen.update(kw)
        return pl.DataFrame({"x": [1]})

    monkeypatch.setattr(sqlcli, "query", fake_query)
    assert run_sql(sql_args("select 1 as x", "--catalog", str(catalog))) == 0
    assert seen["timeout_s"] == 120
    assert run_sql(sql_args("select 1 as x", "--catalog", str(catalog), "--timeout-s", "0")) == 0
    assert seen["timeout_s"] is None
    for bad in ("-1", "nan", "inf"):
        assert run_sql(sql_args("select 1 as x", "--catalog", str(catalog), "--timeout-s", bad)) == 2
        assert "--timeout-s must be >= 0" in capsys.readouterr().err


def test_memory_limit_default_and_flag(catalog: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert default_memory_limit() <= 4 * 1024 ** 3
    got = settings(catalog, capsys)
    gib = default_memory_limit() / 1024 ** 3
    assert got["memory_limit"] in (f"{gib:.1f} GiB", f"{gib * 1024:.1f} MiB")   # DuckDB rounds to 0.1
    assert settings(catalog, capsys, "--memory-limit", "200MB")["memory_limit"] == "190.7 MiB"
    assert settings(catalog, capsys, "--memory-limit", "1GiB")["memory_limit"] == "1.0 GiB"
    for bad in ("lots", "0", "200%"):
        assert run_sql(sql_args("select 1", "--catalog", str(catalog), "--memory-limit", bad)) == 2
        err = capsys.readouterr().err
        assert "--memory-limit" in err and len(err.strip().splitlines()) == 1


def test_no_extension_is_installed_or_loaded_on_demand(catalog: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = settings(catalog, capsys)
    assert got["autoload_known_extensions"] is False and got["autoinstall_known_extensions"] is False


@pytest.mark.timeout(120)
def test_spill_goes_to_a_capped_dir_in_the_home_and_is_removed(catalog: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import os

    scratch = catalog.parent / "tmp"
    # a folder a killed `ldpipe sql` left behind (its PID is gone) is swept by the next query
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    scratch.mkdir(parents=True)
    (scratch / f"sql-{dead}-duckdb").mkdir()
    (scratch / f"sql-{dead}-duckdb" / "duckdb_temp_block").write_bytes(b"x" * 100)

    got = settings(catalog, capsys, "--spill-limit", "3GB")
    assert got["temp_directory"] == str(scratch.resolve() / f"sql-{os.getpid()}-duckdb")
    assert got["max_temp_directory_size"] == "2.7 GiB"
    assert not (scratch / f"sql-{dead}-duckdb").exists()
    assert settings(catalog, capsys)["max_temp_directory_size"] != "90% of available disk space"

    cat = str(catalog)
    # past the memory limit: spilling (default cap) finishes the query ...
    assert run_sql(sql_args(BIG_SORT, "--catalog", cat, "--memory-limit", "100MB", "--format", "csv")) == 0
    assert capsys.readouterr().out.split() == ["n", "10000000"]
    # ... and with no spilling, or too little, it fails in one line naming the flags
    for spill in ("0", "20MB"):
        assert run_sql(sql_args(BIG_SORT, "--catalog", cat, "--memory-limit", "100MB", "--spill-limit", spill)) == 2
        err = capsys.readouterr().err
        assert err.startswith("ldpipe sql: query failed: out of memory") and len(err.strip().splitlines()) == 1
        assert "--memory-limit" in err and "--spill-limit" in err
    # no spill file is left, in the home's tmp/ or next to the catalog (DuckDB's default place)
    assert list(scratch.iterdir()) == [] and not Path(f"{catalog}.tmp").exists()
