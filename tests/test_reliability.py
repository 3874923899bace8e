"""Reliability under injected faults, with real processes, signals, files and sockets.

Promise 2: a writer killed with SIGKILL in the middle of `Store.write_shard` or `refresh_catalog` never leaves a
torn file that a reader sees, and the next refresh heals (old temp files of dead writers are removed).
Promise 3: while a writer process appends shards and refreshes the catalog, `ldpipe sql` (subprocess) and a
second Python process query it repeatedly without a lock error or a failed query.
Promise 8: servers bind to 127.0.0.1 by default; `ldpipe sql` refuses statements that write.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

from ldpipe.errors import LdpipeError
from ldpipe.schema import TRAJECTORY_SCHEMA
from ldpipe.store.catalog import connect_readonly, query, refresh_catalog
from ldpipe.store.shards import Store, writer_alive

REPO = Path(__file__).resolve().parents[1]
LDPIPE = str(Path(sys.executable).parent / "ldpipe")
BIG = 150_000          # rows per shard in the kill tests: big enough that a write takes a while


def _traj(run: str, step: int, n: int) -> pl.DataFrame:
    df = pl.DataFrame({
        "run_id": [run] * n, "config_hash": ["h"] * n, "phase": ["sft"] * n, "step": [step] * n,
        "epoch": [0.0] * n, "example_id": [f"e{i % 50}" for i in range(n)],
        "response_type": [("chosen", "rejected")[i % 2] for i in range(n)], "logp_sum": [-1.0 * step] * n,
        "n_tokens": [3] * n, "logp_mean": [-step / 3] * n, "argmax_logp_sum": [-0.5] * n,
    })
    # columns the schema gained later (per-token diagnostics) stay null here
    return df.with_columns(pl.lit(None, dtype=t).alias(c) for c, t in TRAJECTORY_SCHEMA.items() if c not in df.columns)


# A writer process. MODE=loop writes big shards forever (new names and rewrites of old ones); MODE=before_rename
# and MODE=mid_write stop at that point of the next write (temp file complete / half written) and wait to be
# killed; MODE=refresh_loop refreshes forever; MODE=hold_swap / hold_build stop inside a refresh.
WRITER = textwrap.dedent("""
    import os, sys, time
    import polars as pl
    sys.path.insert(0, sys.argv[4])
    from test_reliability import _traj, BIG
    import ldpipe.store.catalog as catalog
    from ldpipe.schema import TRAJECTORY_SCHEMA
    from ldpipe.store.shards import Store
    mode, root, cat = sys.argv[1], sys.argv[2], sys.argv[3]
    store = Store(root)
    df = _traj("r", 1, BIG)

    def hold(what):
        print("holding", what, flush=True)
        time.sleep(600)

    if mode == "before_rename":
        os.replace = lambda a, b: hold(a)
    if mode == "mid_write":
        real = pl.DataFrame.write_parquet
        def half(self, file, *a, **k):
            real(self, file, *a, **k)
            data = open(file, "rb").read()
            open(file, "wb").write(data[: len(data) // 2])
            hold(file)
        pl.DataFrame.write_parquet = half
    if mode == "hold_swap":
        catalog.os.replace = lambda a, b: hold(a)
    if mode == "hold_build":
        real_select = catalog._table_select
        def slow(*a, **k):
            out = real_select(*a, **k)
            hold("build")
        catalog._table_select = slow
    print("ready", os.getpid(), flush=True)
    i = 0
    while True:
        if mode in ("refresh_loop", "hold_swap", "hold_build"):
            catalog.refresh_catalog(cat, root, None)
        else:
            store.write_shard("trajectories", df, partition={"run_id": "r"}, name=f"step-{i % 3}",
                              schema=TRAJECTORY_SCHEMA)
        i += 1
        print("done", i, flush=True)
""")


def _start(mode: str, root: Path, cat: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, mode, str(root), str(cat), str(Path(__file__).parent)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("ready"), line + p.stderr.read()
    return p


def _wait_for(p: subprocess.Popen, prefix: str, count: int = 1) -> None:
    seen = 0
    while seen < count:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        seen += line.startswith(prefix)


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    p.stdout.close()
    p.stderr.close()


def _temps(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if ".tmp-" in p.name)


def _backdate(paths: list[Path], seconds: float = 120) -> None:
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def _assert_store_whole(root: Path, cat: Path) -> int:
    """Every visible shard is complete (polars and DuckDB both read all of it); returns the shard count."""
    store = Store(root)
    shards = store.shards("trajectories")
    for s in shards:
        assert pl.read_parquet(s).height == BIG
    assert store.read("trajectories").height == BIG * len(shards)
    refresh_catalog(cat, root, None)
    assert query(cat, "select count(*) as n from trajectories")["n"][0] == BIG * len(shards)
    return len(shards)


@pytest.mark.parametrize("mode", ["before_rename", "mid_write"])
def test_kill_9_inside_write_shard_leaves_no_visible_torn_file(tmp_path, mode):
    root, cat = tmp_path / "store", tmp_path / "catalog.duckdb"
    Store(root).write_shard("trajectories", _traj("r", 1, BIG), partition={"run_id": "r"}, name="step-0",
                            schema=TRAJECTORY_SCHEMA)
    before = (root / "trajectories" / "run_id=r" / "step-0.parquet").read_bytes()
    p = _start(mode, root, cat)
    _wait_for(p, "holding")
    temps = _temps(root)
    assert len(temps) == 1 and writer_alive(temps[0]) is True     # the kill lands with a temp file on disk
    _kill(p)
    assert writer_alive(temps[0]) is False
    assert (root / "trajectories" / "run_id=r" / "step-0.parquet").read_bytes() == before   # old shard intact
    assert _assert_store_whole(root, cat) == 1
    # The next refresh heals: a dead writer's temp file goes once past the grace period (a fresh one stays,
    # as its writer might be alive in another PID namespace).
    assert refresh_catalog(cat, root, None)["temp_files_removed"] == 0 and temps[0].exists()
    _backdate(temps)
    assert refresh_catalog(cat, root, None)["temp_files_removed"] == 1
    assert _temps(tmp_path) == []


def test_kill_9_at_random_moments_while_writing_big_shards(tmp_path):
    root, cat = tmp_path / "store", tmp_path / "catalog.duckdb"
    for trial, delay in enumerate((0.0, 0.03, 0.07, 0.11)):
        p = _start("loop", root, cat)
        _wait_for(p, "done", 2)
        # a reader in this process while the writer runs: counts are always whole shards
        n = query(cat, "select count(*) as n from trajectories")["n"][0] if cat.exists() else 0
        assert n % BIG == 0
        time.sleep(delay)
        _kill(p)
        assert 1 <= _assert_store_whole(root, cat) <= 3
    _backdate(_temps(root))
    refresh_catalog(cat, root, None)
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("mode", ["hold_build", "hold_swap"])
def test_kill_9_inside_refresh_keeps_the_old_catalog_and_the_next_refresh_heals(tmp_path, mode):
    root, cat = tmp_path / "store", tmp_path / "catalog.duckdb"
    Store(root).write_shard("trajectories", _traj("r", 1, 10), partition={"run_id": "r"}, name="s1")
    refresh_catalog(cat, root, None)
    old = cat.read_bytes()
    Store(root).write_shard("extra", pl.DataFrame({"v": [1, 2]}), partition={"run_id": "r"}, name="x")
    p = _start(mode, root, cat)
    _wait_for(p, "holding")
    _kill(p)
    leftovers = _temps(tmp_path)
    assert leftovers and all(x.name.startswith("catalog.duckdb.tmp-") for x in leftovers)
    assert cat.read_bytes() == old                       # the live catalog was never touched
    assert query(cat, "select count(*) as n from trajectories")["n"][0] == 10
    with pytest.raises(LdpipeError, match="extra"):      # the killed refresh's new view never went live
        query(cat, "select * from extra")
    _backdate(leftovers)
    info = refresh_catalog(cat, root, None)
    assert info["temp_files_removed"] == len(leftovers) and _temps(tmp_path) == []
    assert query(cat, "select sum(v) as s from extra")["s"][0] == 3


def test_kill_9_at_random_moments_during_refresh(tmp_path):
    root, cat = tmp_path / "store", tmp_path / "catalog.duckdb"
    for step in range(3):
        Store(root).write_shard("trajectories", _traj("r", step, 10), partition={"run_id": "r"}, name=f"s{step}")
    refresh_catalog(cat, root, REPO / "sql")
    for delay in (0.0, 0.02, 0.05):
        p = _start("refresh_loop", root, cat)
        _wait_for(p, "done", 1)
        time.sleep(delay)
        _kill(p)
        assert query(cat, "select count(*) as n from trajectories")["n"][0] == 30
    _backdate(_temps(tmp_path))
    refresh_catalog(cat, root, REPO / "sql")
    assert _temps(tmp_path) == []


def test_live_writer_temp_files_are_never_cleaned(tmp_path):
    """Another live process's temp file stays, however old; one with an unparsable name stays until the age limit."""
    d = tmp_path / "store" / "t" / "run_id=r"
    d.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = d / f"s.parquet.tmp-{sleeper.pid}-abc123"
        odd = d / "s.parquet.tmp-x"
        for f in (live, odd):
            f.write_bytes(b"partial")
        _backdate([live, odd], 600)
        assert Store(tmp_path / "store").clean_temp() == 0
        assert Store(tmp_path / "store").clean_temp(older_than_s=300) == 2
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------- promise 3

APPENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from test_reliability import _traj
    from ldpipe.store.catalog import refresh_catalog
    from ldpipe.schema import TRAJECTORY_SCHEMA
    from ldpipe.store.shards import Store
    root, cat, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    store, refreshes = Store(root), 0
    sql = Path(sys.argv[4]).parent / "sql"
    for step in range(2000):                      # bounded; the test stops it much earlier
        store.write_shard("trajectories", _traj("w.sft", step, 8), partition={"run_id": "w.sft"},
                          name=f"step-{step:07d}", schema=TRAJECTORY_SCHEMA)
        if step % 3 == 0:
            refresh_catalog(cat, root, sql)
            refreshes += 1
        if step == 0:
            print("ready", flush=True)
        if stop.exists():
            break
        time.sleep(0.02)
    print("refreshes", refreshes, "steps", step + 1, flush=True)
""")

READER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from ldpipe.store.catalog import query
    cat, stop = Path(sys.argv[1]), Path(sys.argv[2])
    counts = []
    for i in range(400):                          # bounded
        counts.append(int(query(cat, "select count(*) as n from trajectories")["n"][0]))
        query(cat, "select * from learning_curves")   # a view from sql/ over the same shards
        if stop.exists() and i >= 20:
            break
    print(json.dumps({"counts": counts}), flush=True)
""")


def test_readers_query_while_a_writer_appends_and_refreshes(tmp_path):
    root, cat, stop = tmp_path / "store", tmp_path / "home" / "catalog.duckdb", tmp_path / "stop"
    env = {**os.environ, "LDPIPE_HOME": str(tmp_path / "home"), "LDPIPE_PROJECT_DIR": str(tmp_path)}
    writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(root), str(cat), str(stop),
                               str(Path(__file__).parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    reader = subprocess.Popen([sys.executable, "-c", READER, str(cat), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        cli_counts = []
        for _ in range(4):                        # bounded: each `ldpipe sql` is a fresh process
            r = subprocess.run([LDPIPE, "sql", "--format", "csv",
                                "select (select count(*) from trajectories) as n, "
                                "(select count(*) from learning_curves) as c"],
                               capture_output=True, text=True, env=env, timeout=120)
            assert r.returncode == 0, r.stderr
            n, _c = r.stdout.strip().splitlines()[1].split(",")
            cli_counts.append(int(n))
        assert writer.poll() is None, "the writer finished before the readers: nothing ran concurrently"
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=300)
        wout, werr = writer.communicate(timeout=120)
    assert reader.returncode == 0, err
    assert writer.returncode == 0, werr
    counts = json.loads(out)["counts"]
    assert len(counts) >= 21
    assert all(c % 8 == 0 and c > 0 for c in counts + cli_counts)     # only whole shards are ever seen
    assert counts == sorted(counts) and cli_counts == sorted(cli_counts)   # append-only: never goes back
    refreshes = int(wout.split()[1])
    assert refreshes >= 3 and counts[-1] > counts[0]                  # the writer really ran meanwhile


# ---------------------------------------------------------------------------------------------- promise 8

def test_servers_bind_to_loopback_by_default(monkeypatch):
    from fake_openai import FakeOpenAI

    from ldpipe import cli

    assert cli.build_parser().parse_args(["ui"]).host == "127.0.0.1"
    seen = {}
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: seen.setdefault("argv", argv))
    monkeypatch.setattr(cli.os, "chdir", lambda d: None)
    monkeypatch.setenv("PATH", os.environ["PATH"])            # `ldpipe ui` prepends the venv's bin; restore it
    monkeypatch.setattr("ldpipe.instance.ensure_dagster_home", lambda: Path("/nonexistent"))
    assert cli.main(["ui"]) == 0
    argv = seen["argv"]
    assert argv[argv.index("-h") + 1] == "127.0.0.1"           # what `ldpipe ui` really starts: dg dev -h 127.0.0.1
    with FakeOpenAI() as srv:
        assert srv._server.server_address[0] == "127.0.0.1" and srv.base_url.startswith("http://127.0.0.1:")


@pytest.fixture
def home_with_catalog(tmp_path):
    home = tmp_path / "home"
    Store(home / "store").write_shard("trajectories", _traj("r", 0, 4), partition={"run_id": "r"}, name="s",
                                      schema=TRAJECTORY_SCHEMA)
    refresh_catalog(home / "catalog.duckdb", home / "store", REPO / "sql")
    return home


@pytest.mark.parametrize("stmt", [
    "insert into trajectories select * from trajectories",
    "attach '{d}/other.duckdb' as o",
    "copy (select * from trajectories) to '{d}/out.csv'",
    "copy trajectories to '{d}/out.parquet' (format parquet)",
    "install httpfs",
    "select 1; attach '{d}/other.duckdb' as o",
])
def test_ldpipe_sql_refuses_writes_with_exit_2(home_with_catalog, stmt, tmp_path):
    cat = home_with_catalog / "catalog.duckdb"
    before = cat.read_bytes()
    listing = sorted(tmp_path.rglob("*"))
    r = subprocess.run([LDPIPE, "sql", stmt.format(d=tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LDPIPE_HOME": str(home_with_catalog)}, cwd=tmp_path)
    assert r.returncode == 2
    assert "refusing" in r.stderr and "Traceback" not in r.stderr
    assert cat.read_bytes() == before and sorted(tmp_path.rglob("*")) == listing


def test_the_reader_connection_itself_is_read_only(home_with_catalog):
    """Behind the statement check: the connection `ldpipe sql` uses cannot write or load extensions."""
    con = connect_readonly(home_with_catalog / "catalog.duckdb")
    try:
        for stmt in ("create table t as select 1", "create or replace view trajectories as select 1 as x"):
            with pytest.raises(duckdb.Error, match="read-only|read only"):
                con.execute(stmt)
        with pytest.raises(duckdb.Error):
            con.execute("set autoinstall_known_extensions = true")   # configuration is locked
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------- promise 5
# tests/test_llm.py covers each fault once then success, backoff bounds, Retry-After, the wait budget, and the cache.
# Here: each fault that never clears ends, after max_attempts requests, in an error naming the item, while what
# succeeded stays cached and a rerun asks only for the rest, and a third run asks for nothing.

@pytest.mark.parametrize("fault_kind", ["429", "500", "timeout", "reset", "bad_json", "empty_choices"])
def test_a_persistent_llm_fault_fails_clearly_after_bounded_attempts(tmp_path, fault_kind):
    from fake_openai import FakeOpenAI, Fault

    from ldpipe.llm import ChatRequest, LLMClient, LLMConfig, LLMError

    special = {"429": Fault("429", retry_after="0.05"), "timeout": Fault("delay", seconds=1.0)}
    fault = special[fault_kind] if fault_kind in special else Fault(fault_kind)
    reqs = [ChatRequest.chat("ok-item", "fine request"), ChatRequest.chat("victim-item", "victim request")]

    def client(srv):
        cfg = LLMConfig(base_url=srv.base_url, model="m", api_key_env="NO_KEY_NEEDED", concurrency=1,
                        cache_path=tmp_path / "llm.sqlite", backoff_base_s=0.01, backoff_max_s=0.05, max_wait_s=2.0,
                        timeout_s=0.3, max_attempts=3)
        return LLMClient(cfg, environ={})

    def victim_calls(srv):
        return sum("victim" in b["messages"][-1]["content"] for b in srv.chat_bodies)

    with FakeOpenAI() as srv:
        srv.fail_prompt("victim", forever=fault)
        with client(srv) as c:
            with pytest.raises(LLMError, match=r"'victim-item' failed \(gave up after 3 attempt\(s\)"):
                c.complete_many(reqs)
        assert victim_calls(srv) == 3                      # bounded: exactly max_attempts requests
        srv.clear_faults()
        before = srv.n_chat
        with client(srv) as c:
            out = c.complete_many(reqs)
            assert c.stats.cache_hits == 1
        assert srv.n_chat - before == 1                    # only the item that failed is asked again
        assert [r.text for r in out] == ["request fine", "request victim"] and [r.cached for r in out] == [True, False]
        before = srv.n_chat
        with client(srv) as c:
            assert [r.text for r in c.complete_many(reqs)] == ["request fine", "request victim"]
        assert srv.n_chat == before                        # a rerun repeats nothing that succeeded
