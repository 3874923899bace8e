"""Store: atomic, idempotent, hive-partitioned Parquet shards (real files in tmp_path)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.schema import TRAJECTORY_SCHEMA
from ldpipe.store.shards import Store


def traj(run: str, step: int, examples: list[str], *, logp: float = -2.0) -> pl.DataFrame:
    n = len(examples)
    return pl.DataFrame({
        "run_id": [run] * n, "config_hash": ["h0"] * n, "phase": ["sft"] * n, "step": [step] * n,
        "epoch": [step / 10] * n, "example_id": examples, "response_type": ["chosen"] * n,
        "logp_sum": [logp * 4] * n, "n_tokens": [4] * n, "logp_mean": [logp] * n, "argmax_logp_sum": [-1.0] * n,
        **{c: [0.5] * n for c in ("A_o", "p_e", "energy", "except_argmax")}, "argmax_match": [2] * n,
    })


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_partition_layout_and_no_temp_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = store.write_shard("trajectories", traj("r1", 3, ["a", "b"]), partition={"run_id": "r1", "step": "3"},
                             name="part-0", schema=TRAJECTORY_SCHEMA)
    assert path == tmp_path / "trajectories" / "run_id=r1" / "step=3" / "part-0.parquet"
    assert files_under(tmp_path) == ["trajectories/run_id=r1/step=3/part-0.parquet"]
    assert store.tables() == ["trajectories"]
    assert store.shards("trajectories") == [path]
    back = pl.read_parquet(path)
    assert back.schema == pl.Schema(TRAJECTORY_SCHEMA)
    assert back["example_id"].to_list() == ["a", "b"]


def test_partition_values_are_encoded_not_merged(tmp_path: Path) -> None:
    store = Store(tmp_path)
    p1 = store.write_shard("t", pl.DataFrame({"v": [1]}), partition={"run": "a/b"}, name="x")
    p2 = store.write_shard("t", pl.DataFrame({"v": [2]}), partition={"run": "a_b"}, name="x")
    p3 = store.write_shard("t", pl.DataFrame({"v": [3]}), partition={"run": ".."}, name="x")
    assert len({p1, p2, p3}) == 3
    for p in (p1, p2, p3):                      # nothing escapes the table directory
        assert p.resolve().is_relative_to(tmp_path / "t")
        assert len(p.relative_to(tmp_path / "t").parts) == 2
    assert sorted(store.read("t")["v"].to_list()) == [1, 2, 3]
    with pytest.raises(LdpipeError, match="table name"):
        store.write_shard("../evil", pl.DataFrame({"v": [1]}), partition={}, name="x")
    with pytest.raises(LdpipeError, match="partition key"):
        store.write_shard("t", pl.DataFrame({"v": [1]}), partition={"a b": "1"}, name="x")


def test_rewriting_a_shard_replaces_its_rows(tmp_path: Path) -> None:
    store = Store(tmp_path)
    part = {"run_id": "r1", "step": "5"}
    store.write_shard("trajectories", traj("r1", 5, ["a", "b"], logp=-2.0), partition=part, name="s5")
    store.write_shard("trajectories", traj("r1", 5, ["a", "b"], logp=-1.5), partition=part, name="s5")
    df = store.read("trajectories")
    assert df.height == 2                                   # a resumed run's rewrite: no duplicates
    assert df["logp_mean"].to_list() == [-1.5, -1.5]
    assert len(store.shards("trajectories")) == 1


def test_failed_write_leaves_old_shard_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    part = {"run_id": "r1"}
    store.write_shard("trajectories", traj("r1", 0, ["a"], logp=-3.0), partition=part, name="s")
    real_write = pl.DataFrame.write_parquet

    def write_then_crash(self: pl.DataFrame, file: Path, *a: object, **k: object) -> None:
        real_write(self, file, *a, **k)
        Path(file).write_bytes(Path(file).read_bytes()[:20])   # a half-written file, then the "disk fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", write_then_crash)
    with pytest.raises(OSError, match="No space"):
        store.write_shard("trajectories", traj("r1", 0, ["a"], logp=-9.0), partition=part, name="s")
    monkeypatch.undo()
    assert files_under(tmp_path) == ["trajectories/run_id=r1/s.parquet"]
    assert store.read("trajectories")["logp_mean"].to_list() == [-3.0]


def test_leftover_temp_file_is_never_read_and_clean_temp_removes_it(tmp_path: Path) -> None:
    store = Store(tmp_path)
    good = store.write_shard("trajectories", traj("r1", 0, ["a"]), partition={"run_id": "r1"}, name="s0")
    # What a writer killed between write and rename leaves: a complete-looking Parquet file under a temp name.
    tmp = good.with_name("s1.parquet.tmp-12345-deadbeef")
    traj("r1", 1, ["zzz"]).write_parquet(tmp)
    assert store.shards("trajectories") == [good]
    assert store.read("trajectories")["example_id"].to_list() == ["a"]
    assert store.clean_temp(older_than_s=3600) == 0          # might still be a live writer's file
    assert tmp.exists()
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    assert store.clean_temp(older_than_s=3600) == 1
    assert not tmp.exists() and good.exists()


def test_read_with_filters(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for run in ("r1", "r2"):
        for step in (0, 10):
            store.write_shard("trajectories", traj(run, step, ["a", "b", "c"]),
                              partition={"run_id": run, "step": str(step)}, name="p")
    assert store.read("trajectories").height == 12
    one = store.read("trajectories", run_id="r2", step=10)
    assert one.height == 3 and set(one["run_id"]) == {"r2"} and set(one["step"]) == {10}
    some = store.read("trajectories", example_id=["a", "c"], run_id="r1")
    assert sorted(some["example_id"].to_list()) == ["a", "a", "c", "c"]
    assert store.read("trajectories", run_id="nope").height == 0
    with pytest.raises(LdpipeError, match="no column 'bogus'"):
        store.read("trajectories", bogus=1)
    assert store.read("absent").is_empty()


def test_read_concatenates_shards_with_added_columns(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_shard("t", pl.DataFrame({"a": [1]}), partition={"p": "1"}, name="x")
    store.write_shard("t", pl.DataFrame({"a": [2], "b": ["new"]}), partition={"p": "2"}, name="x")
    df = store.read("t").sort("a")
    assert df.to_dicts() == [{"a": 1, "b": None}, {"a": 2, "b": "new"}]


def test_schema_conform_errors_name_the_field(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(DataValidationError) as e:
        store.write_shard("trajectories", traj("r1", 0, ["a"]).drop("n_tokens"), partition={"run_id": "r1"},
                          name="s", schema=TRAJECTORY_SCHEMA)
    assert e.value.field == "n_tokens" and "trajectories" in str(e.value) and "missing column" in str(e.value)
    bad = traj("r1", 0, ["a"]).with_columns(pl.lit("three").alias("step"))
    with pytest.raises(DataValidationError) as e:
        store.write_shard("trajectories", bad, partition={"run_id": "r1"}, name="s", schema=TRAJECTORY_SCHEMA)
    assert e.value.field == "step"
    assert store.shards("trajectories") == []               # nothing half-written
    # Conforming casts and drops extra columns.
    extra = traj("r1", 0, ["a"]).with_columns(pl.col("step").cast(pl.Int32), pl.lit(1).alias("junk"))
    p = store.write_shard("trajectories", extra, partition={"run_id": "r1"}, name="s", schema=TRAJECTORY_SCHEMA)
    assert pl.read_parquet(p).schema == pl.Schema(TRAJECTORY_SCHEMA)


def test_delete_partition(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for run in ("r1", "r2"):
        for step in (0, 10):
            store.write_shard("trajectories", traj(run, step, ["a"]),
                              partition={"run_id": run, "step": str(step)}, name="p")
    assert store.delete_partition("trajectories", {"run_id": "r1"}) == 2
    assert set(store.read("trajectories")["run_id"]) == {"r2"}
    assert not (tmp_path / "trajectories" / "run_id=r1").exists()       # empty directories pruned
    # A key that is not the first level matches too.
    assert store.delete_partition("trajectories", {"step": "10"}) == 1
    assert store.read("trajectories")["step"].to_list() == [0]
    assert store.delete_partition("trajectories", {"run_id": "r9"}) == 0
    with pytest.raises(LdpipeError, match="whole table"):
        store.delete_partition("trajectories", {})


WRITER = """
import sys, polars as pl
from pathlib import Path
from ldpipe.store.shards import Store
s = Store(Path(sys.argv[1])); wid = sys.argv[2]
for i in range(15):
    s.write_shard("t", pl.DataFrame({"writer": [wid] * 500, "i": [i] * 500}), partition={"run": "r"}, name="same")
"""


def test_concurrent_writers_of_one_shard_never_expose_a_partial_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_shard("t", pl.DataFrame({"writer": ["init"] * 500, "i": [0] * 500}), partition={"run": "r"}, name="same")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), w]) for w in ("w1", "w2")]
    reads = 0
    while any(p.poll() is None for p in procs) or reads < 3:
        df = store.read("t")
        assert df.height == 500 and df["writer"].n_unique() == 1 and df["i"].n_unique() == 1
        reads += 1
    assert [p.wait() for p in procs] == [0, 0]
    assert files_under(tmp_path) == ["t/run=r/same.parquet"]
    assert store.read("t")["writer"][0] in {"w1", "w2"}


def test_scratch_folders_of_dead_owners_are_swept_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from ldpipe.store.shards import scratch_dir, sweep_scratch

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()
    (tmp_path / f"worker-{dead}-abc").mkdir()
    (tmp_path / f"worker-{dead}-abc" / "error.json").write_text("{}")
    (tmp_path / "worker-1-init").mkdir()            # PID 1 is alive: never touched
    (tmp_path / "notes").mkdir()                    # not a scratch name: never touched
    assert sweep_scratch(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "worker-1-init"]
    with scratch_dir(tmp_path, "worker") as d:      # a new one is named after this process
        assert Path(d).parent == tmp_path and Path(d).name.startswith(f"worker-{os.getpid()}-")
        assert sweep_scratch(tmp_path) == 0 and Path(d).exists()
    assert not Path(d).exists()


# -- issue 22 items 2 and 3: the catalog reads only the store's own shards; manifests prove their contents ------
def _home_with_run(tmp_path: Path) -> tuple[Path, Store]:
    """A home whose store holds 3 shards of a finished run (manifest written) and 1 of an unfinished run."""
    home = tmp_path / "home"
    store = Store(home / "store")
    for step in (0, 1, 2):
        store.write_shard("trajectories", traj("done", step, ["e1", "e2"]), partition={"run_id": "done"},
                          name=f"steps-{step:07d}", schema=TRAJECTORY_SCHEMA)
    store.write_manifest("run_id", "done", ("trajectories",))
    store.write_shard("trajectories", traj("open", 0, ["e1"]), partition={"run_id": "open"}, name="steps-0000000",
                      schema=TRAJECTORY_SCHEMA)
    return home, store


def _count(home: Path) -> int:
    from ldpipe.store.catalog import query

    return query(home / "catalog.duckdb", "select count(*) as n from trajectories")["n"][0]


def _check(home: Path, monkeypatch, capsys) -> tuple[int, str]:
    from ldpipe.cli import _check_store

    monkeypatch.setenv("LDPIPE_HOME", str(home))
    rc = _check_store()
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_refresh_leaves_out_a_copied_or_symlinked_shard(tmp_path: Path, monkeypatch, capsys) -> None:
    """A copy of a shard under another name, or a symlink from outside the home, is named and left out by the
    refresh (no double count), by Store.read and by `check --store`; a shard written after the refresh is still
    read by the views at once (they read the glob when a query runs)."""
    import shutil

    from ldpipe.store.catalog import refresh_catalog

    home, store = _home_with_run(tmp_path)
    refresh_catalog(home / "catalog.duckdb", store.root, None)
    assert _count(home) == 7
    open_shard = store.partition_dir("trajectories", {"run_id": "open"}) / "steps-0000000.parquet"
    done_shard = store.shards("trajectories")[0]
    copy = open_shard.with_name("copy-of-shard.parquet")
    shutil.copy(open_shard, copy)                       # a run without a manifest: its mark names the original
    outside = tmp_path / "elsewhere" / "rows.parquet"
    outside.parent.mkdir()
    shutil.copy(done_shard, outside)
    link = open_shard.with_name("linked.parquet")
    link.symlink_to(outside)
    info = refresh_catalog(home / "catalog.duckdb", store.root, None)
    assert _count(home) == 7                            # before this change: 10 (both extra files counted)
    assert set(info["left_out"]) == {str(copy), str(link)}
    assert "a copy of shard trajectories/run_id=open/steps-0000000.parquet" in info["left_out"][str(copy)]
    assert "symlink" in info["left_out"][str(link)]
    assert info["tables"]["trajectories"] == 4
    assert copy not in store.shards("trajectories") and link not in store.shards("trajectories")
    assert store.read("trajectories").height == 7
    store.write_shard("trajectories", traj("open", 1, ["e1"]), partition={"run_id": "open"}, name="steps-0000001",
                      schema=TRAJECTORY_SCHEMA)
    assert _count(home) == 8                            # no refresh needed for the store's own new shard
    rc, text = _check(home, monkeypatch, capsys)
    assert rc == 2 and f"extra shard {copy}: a copy of shard" in text and f"extra shard {link}: a symlink" in text
    assert "2 problem(s)" in text


def test_check_store_names_changed_torn_unreadable_missing_and_extra_shards(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    """Manifests hold a digest per shard: a shard rewritten with the same schema and row count but other values
    is "changed"; an empty and a truncated shard are "torn", one line each and no traceback."""
    home, store = _home_with_run(tmp_path)
    rc, text = _check(home, monkeypatch, capsys)
    assert rc == 0 and "OK; 4 shard(s), 3 checked" in text
    s0, s1, s2 = store.partition_shards("trajectories", {"run_id": "done"})
    pl.read_parquet(s0).with_columns(pl.lit(123.0).alias("logp_sum")).write_parquet(s0)   # same rows, other values
    s1.write_bytes(b"")                                                                    # 0 bytes
    s2.write_bytes(s2.read_bytes()[:-40])                                                  # truncated
    open_shard = store.partition_dir("trajectories", {"run_id": "open"}) / "steps-0000000.parquet"
    open_shard.write_bytes(b"PAR1 not really parquet PAR1")                                # unreadable
    rc, text = _check(home, monkeypatch, capsys)
    assert rc == 2 and "Traceback" not in text
    assert f"changed shard {s0}: its content digest is" in text
    assert f"torn shard {s1}: 0 bytes, empty" in text and f"torn shard {s2}:" in text
    assert f"unreadable shard {open_shard}" in text
    assert "4 problem(s)" in text                        # one line per shard
    s0.unlink()
    rc, text = _check(home, monkeypatch, capsys)
    assert rc == 2 and f"missing shard {s0}" in text


def test_check_store_accepts_an_old_manifest_without_digests(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    home, store = _home_with_run(tmp_path)
    mf = store.manifest_path("run_id", "done")
    m = json.loads(mf.read_text())
    m["shards"] = {rel: rec["rows"] for rel, rec in m["shards"].items()}   # the format before digests
    mf.write_text(json.dumps(m))
    rc, text = _check(home, monkeypatch, capsys)
    assert rc == 0 and "OK;" in text and "3 of them by row count only: no digest recorded" in text


def test_check_store_on_a_home_that_does_not_exist(tmp_path: Path, monkeypatch, capsys) -> None:
    rc, text = _check(tmp_path / "no-such-home", monkeypatch, capsys)
    assert rc == 2 and "does not exist" in text and "OK" not in text
