"""The DuckDB catalog: views over the Parquet store and one view per sql/*.sql file.

DuckDB lets one read-write process OR many read-only processes open a file, never both
(DuckDB allows one writing process per database file). So the refresh, the only writer, never opens the live catalog:
it builds a new file at a temp path and `os.replace`s it over the old one. Readers that
hold the old file keep their (old) views; the next connection sees the new ones. Caveat:
within ONE process DuckDB reuses an open database instance for the same path, so a
process that keeps an old connection open also gets the old views on reconnect.

A table view reads its table's glob when a query runs, so shards written after a refresh are
seen at once; only new sql/ files, new unknown tables or a changed schema need a refresh
(the catalog asset's job; analyses never refresh). The refresh names (a warning) and leaves out
every file under a table that the store did not write (`Store.audit`: a copy under another name, a
symlink, a file a finished run's manifest does not list): the view excludes those files by name.
Trade-off: such a file put there *after* the refresh is read by the views until the next refresh
(or named by `ldpipe check --store`); `Store.read` leaves it out at once.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import duckdb
import polars as pl

from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.schema import (
    AKG_SCHEMA,
    GENERATION_BORROWING_SCHEMA,
    GENERATION_STATS_SCHEMA,
    INFLUENCE_AGREEMENT_SCHEMA,
    INFLUENCE_HEATMAP_SCHEMA,
    INFLUENCE_SCHEMA,
    ONPOLICY_PAIRS_TABLE_SCHEMA,
    PROBE_PAIRS_SCHEMA,
    PROBE_TRUNCATION_SCHEMA,
    TRAIN_METRICS_SCHEMA,
    TRAJECTORY_SCHEMA,
    WIN_RATE_JUDGMENT_SCHEMA,
)
from ldpipe.store.shards import Store, remove_stale_temps, sweep_scratch, shard_problem

_log = logging.getLogger("ldpipe.catalog")
_FILE_COL = "__ldpipe_shard_file"   # the view's filename column, to leave out files the store did not write

KNOWN_TABLES: dict[str, dict[str, pl.DataType]] = {
    "trajectories": TRAJECTORY_SCHEMA,
    "train_metrics": TRAIN_METRICS_SCHEMA,
    "onpolicy_pairs": ONPOLICY_PAIRS_TABLE_SCHEMA,
    "generation_stats": GENERATION_STATS_SCHEMA,
    "generation_borrowing": GENERATION_BORROWING_SCHEMA,
    "win_rate_judgments": WIN_RATE_JUDGMENT_SCHEMA,
    "influence": INFLUENCE_SCHEMA,
    "influence_agreement": INFLUENCE_AGREEMENT_SCHEMA,
    "akg": AKG_SCHEMA,
    "influence_heatmap": INFLUENCE_HEATMAP_SCHEMA,
    "probe_pairs": PROBE_PAIRS_SCHEMA,
    "probe_truncation": PROBE_TRUNCATION_SCHEMA,
}

# Columns every shard of a known table must have (the rest may be missing in shards written before they existed).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "trajectories": ("run_id", "config_hash", "step", "example_id", "response_type", "logp_sum"),
    "train_metrics": ("run_id", "config_hash", "step", "loss"),
    "onpolicy_pairs": ("run_id", "config_hash", "step"),
    "generation_stats": ("run_id", "checkpoint", "step"),
    "generation_borrowing": ("run_id", "checkpoint", "example_id"),
    "win_rate_judgments": ("experiment", "model_a", "model_b", "example_id"),
    "influence": ("run_id", "checkpoint", "method", "value"),
    "influence_agreement": ("run_id", "checkpoint", "estimate"),
    "akg": ("run_id", "checkpoint"),
    "influence_heatmap": ("run_id", "checkpoint", "trained_type", "observed_type", "value"),
    "probe_pairs": ("experiment", "example_id"),
    "probe_truncation": ("experiment", "response_type"),
}

# Statement types that cannot change the database, files, settings or extensions.
# DESCRIBE/SHOW/SUMMARIZE/VALUES/TABLE/FROM all parse as SELECT.
_READ_TYPES = {duckdb.StatementType.SELECT}
# PRAGMAs that only report; others set options or, like IMPORT DATABASE, write.
_READ_PRAGMAS = {"version", "platform", "show_tables", "show_tables_expanded", "table_info", "show",
                 "database_list", "database_size", "storage_info", "functions", "collations", "metadata_info",
                 "user_agent"}
_EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(?:analy[sz]e\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE)
_PRAGMA_NAME = re.compile(r"^\s*pragma\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)
_READER_CONFIG = {
    "autoinstall_known_extensions": False,  # no network downloads from a query
    "autoload_known_extensions": False,     # nor loading an installed extension (httpfs: the network) by name
    "lock_configuration": True,             # belt and braces behind the statement check
}
_GIB = 1024 ** 3
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib|%)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": _GIB, "tib": 1024 ** 4}


def _q(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _parse(sql: str, source: str) -> list[duckdb.Statement]:
    try:
        return duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise LdpipeError(f"{source}: {e}") from None


# -- refresh (the only writer) ------------------------------------------------------------------
def refresh_catalog(catalog_path: Path, store_root: Path, sql_dir: Path | Sequence[Path] | None) -> dict:
    """Rebuild the catalog in a temp file, then atomically swap it in. On any error the old one stays.

    `sql_dir`: a folder of view files, or several (a later folder's file replaces an earlier one's of the same
    name: a project's sql/ can redefine a built-in view)."""
    catalog_path = Path(catalog_path).resolve()
    store = Store(store_root)
    catalog_path.parent.mkdir(parents=True, exist_ok=True)
    # Tidy what killed writers left: shard temps and earlier refreshes' catalog temps (never read as data).
    cleaned = store.clean_temp() + remove_stale_temps(catalog_path.parent.glob(f"{catalog_path.name}.tmp-*"))
    dirs = [] if sql_dir is None else [Path(sql_dir)] if isinstance(sql_dir, (str, Path)) else [Path(d) for d in sql_dir]
    left_out: dict[str, str] = {}
    views, counts = _swap_in(catalog_path, lambda con: _build(con, store, dirs, left_out))
    for path, why in left_out.items():
        _log.warning("catalog refresh: left out %s: %s", path, why)
    return {"views": views, "tables": counts, "path": str(catalog_path), "temp_files_removed": cleaned,
            "left_out": left_out}


def _swap_in(catalog_path: Path, build):
    """`build(con)` into a new database at a temp path, then os.replace it over `catalog_path` (readers never see
    a half-built catalog; on any error the old one stays). Returns what `build` returned."""
    tmp = catalog_path.with_name(f"{catalog_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        con = duckdb.connect(str(tmp))
        try:
            out = build(con)
        finally:
            con.close()             # closing checkpoints: the file is complete, no .wal left
        os.replace(tmp, catalog_path)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
    return out


def _build(con: duckdb.DuckDBPyConnection, store: Store, sql_dirs: list[Path],
           left_out: dict[str, str] | None = None) -> tuple[list[str], dict[str, int]]:
    views: list[str] = []
    counts: dict[str, int] = {}
    for table in sorted(set(store.tables()) | set(KNOWN_TABLES)):
        own, foreign = store.audit(table)
        if left_out is not None:
            left_out.update((str(p), why) for p, why in foreign.items())
        n = len(own)
        counts[table] = n
        schema = KNOWN_TABLES.get(table)
        if n == 0 and schema is None:
            continue                # an unknown, empty table has no columns to show
        if schema is not None:
            validate_shards(store, table, schema, own)
            store.write_schema_file(table, schema)
        con.execute(f"create view {_q(table)} as {_table_select(con, store, table, schema, sorted(foreign))}")
        views.append(table)
    files = {p.name: p for d in sql_dirs if d.is_dir() for p in sorted(d.glob("*.sql"))}
    for path in (files[k] for k in sorted(files)):
        name = path.stem
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise DataValidationError(str(path), f"file name must be a valid view name (letters, digits, '_'), got {name!r}")
        if name in views:
            raise DataValidationError(str(path), f"view {name!r} is already defined (a store table or another file)")
        select = _single_select(path)
        try:
            con.execute(f"create view {_q(name)} as\n{select}\n")
        except duckdb.Error as e:
            raise DataValidationError(
                str(path), f"view {name!r} failed to bind (views are created in file-name order, so a view may "
                           f"only use tables and views from files sorted before it): {e}") from None
        views.append(name)
    return views, counts


def _kind(t) -> str:
    """A coarse class of an Arrow type: shards may differ in width (int32/int64) or string flavour, not class."""
    import pyarrow as pa

    if pa.types.is_null(t):
        return "null"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "boolean"
    return str(t)


def validate_shards(store: Store, table: str, schema: dict[str, pl.DataType], paths: list[Path] | None = None) -> None:
    """Every shard of a known table (or each of `paths`) has its required columns, no foreign column, and column
    types of the schema's class; the first shard that does not fit is named (DataValidationError), so the refresh
    keeps the old catalog instead of views with rows of nulls or queries that fail later without a file name."""
    for path in store.shards(table) if paths is None else paths:
        err = _schema_error(store, table, schema, path)
        if err is not None:
            raise err


def _schema_error(store: Store, table: str, schema: dict[str, pl.DataType], path: Path) -> DataValidationError | None:
    import pyarrow.parquet as pq

    want = {f.name: _kind(f.type) for f in pl.DataFrame(schema=schema).to_arrow().schema}
    required = REQUIRED_COLUMNS.get(table, tuple(schema)[:1])
    try:
        got = pq.read_schema(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a file that is not Parquet)
        return DataValidationError(str(path), f"store table {table!r}: not a readable Parquet shard: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    names = set(got.names)
    missing = [c for c in required if c not in names]
    if missing:
        return DataValidationError(str(path), f"store table {table!r}: shard lacks required column(s) "
                                   f"{missing}; is it a foreign file? (move it out of {store.table_dir(table)})",
                                   field=missing[0])
    for f in got:
        if f.name not in want:
            return DataValidationError(str(path), f"store table {table!r}: column {f.name!r} is not in the "
                                       f"table's schema (known: {sorted(want)})", field=f.name)
        k = _kind(f.type)
        if k != "null" and k != want[f.name]:
            return DataValidationError(str(path), f"store table {table!r}: column {f.name!r} is {f.type}, the "
                                       f"table's schema has {schema[f.name]}", field=f.name)
    return None


def check_store(store: Store) -> tuple[list[str], dict[str, int]]:
    """(problems, counts) of `ldpipe check --store`, one line per problem and never a traceback: torn (empty or
    truncated) and unreadable shards; files the store did not write (extra: copies, symlinks, files a manifest
    does not list); shards of a known table that do not fit its schema (validate_shards); and every finished
    run's shards there, unchanged (row count and content digest) and alone (Store.verify_manifests)."""
    problems: list[str] = []
    reported: set[str] = set()     # a torn/unreadable file: one line, not one per check
    n_shards = 0
    for table in store.tables():
        own, foreign = store.audit(table)
        n_shards += len(own)
        for path in sorted([*own, *foreign]):
            bad = None if path in foreign and path.is_symlink() else shard_problem(path)
            if bad:
                problems.append(bad)
                reported.add(str(path))
            elif table in KNOWN_TABLES:
                err = _schema_error(store, table, KNOWN_TABLES[table], path)
                if err is not None:
                    problems.append(str(err))
        for path, why in sorted(foreign.items()):
            if not _in_manifested(store, path):     # those verify_manifests names
                problems.append(f"extra shard {path}: {why}")
    found, counts = store.verify_manifests()
    problems += [p for p in found if not any(p.startswith(f"{k} shard {r}") for r in reported
                                                 for k in ("torn", "unreadable"))]
    return problems, {**counts, "shards": n_shards}


def _in_manifested(store: Store, path: Path) -> bool:
    rel = store.rel(path)
    return any(rel.startswith(prefix) for prefix in store._manifest_listing())


def _table_select(con: duckdb.DuckDBPyConnection, store: Store, table: str,
                  schema: dict[str, pl.DataType] | None, exclude: Sequence[Path] = ()) -> str:
    """A table view's SELECT. DuckDB expands the glob when a query runs, not when the view is made; for a known
    table the glob always matches its schema file (Store.write_schema_file), which has every column. So the
    view reads shards written after this refresh, an empty table gives zero typed rows, and shards written before
    a column was added read it as null: only the catalog asset ever needs to rebuild the catalog. `exclude`: files
    under the glob that the store did not write (Store.audit), left out by name."""
    src = f"read_parquet({_lit(store.glob(table))}, union_by_name = true, hive_partitioning = false"
    if exclude:
        src += (f", filename = {_lit(_FILE_COL)}) where {_q(_FILE_COL)} not in ("
                + ", ".join(_lit(str(p)) for p in exclude) + ")")
    else:
        src += ")"
    if schema is None:
        return f"select * exclude ({_q(_FILE_COL)}) from {src}" if exclude else f"select * from {src}"
    # Known tables get fixed column types, so sql/*.sql binds the same way before and after the first shard.
    rel = con.from_arrow(pl.DataFrame(schema=schema).to_arrow())   # DuckDB's own mapping of the polars types
    return "select " + ", ".join(f"cast({_q(c)} as {t}) as {_q(c)}" for c, t in zip(rel.columns, map(str, rel.types))
                                 ) + f" from {src}"


def _single_select(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataValidationError(str(path), f"cannot read: {e}") from None
    stmts = _parse(text, str(path))
    if len(stmts) != 1:
        raise DataValidationError(str(path), f"must hold exactly one SELECT statement, found {len(stmts)}")
    if stmts[0].type not in _READ_TYPES:
        raise DataValidationError(str(path), f"must hold a SELECT statement, found {stmts[0].type.name}")
    return stmts[0].query.strip().rstrip(";")


# -- readers ------------------------------------------------------------------------------------
class QueryTimeout(LdpipeError):
    """The query ran past its statement timeout and was cancelled."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the query ran past its {timeout_s:g} s timeout and was cancelled")
        self.timeout_s = timeout_s


class QueryOutOfMemory(LdpipeError):
    """The query needed more than its memory limit plus its spill limit."""

    def __init__(self, detail: str, memory_limit: int, spill_limit: int) -> None:
        super().__init__(f"query failed: out of memory ({detail}; memory limit {format_size(memory_limit)}, "
                         f"spill limit {format_size(spill_limit)})")
        self.memory_limit, self.spill_limit = memory_limit, spill_limit


def total_memory() -> int:
    """Physical memory in bytes, or the cgroup (container) limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total


def default_memory_limit() -> int:
    """A reader's DuckDB memory limit unless told otherwise: 25% of memory, at most 4 GiB (DuckDB's own default
    is 80% of memory)."""
    return min(total_memory() // 4, 4 * _GIB)


def parse_size(text: str, what: str) -> int:
    """Bytes from "4GB", "512MiB", "1000000" (bytes) or "10%" (of memory)."""
    m = _SIZE.match(str(text))
    if not m:
        raise LdpipeError(f"{what} {text!r}: give a size such as 4GB, 512MB or 10% (of memory)")
    number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit == "%":
        if number > 100:
            raise LdpipeError(f"{what} {text!r}: a percentage of memory is at most 100%")
        return int(total_memory() * number / 100)
    return int(number * _UNITS[unit])


def format_size(n: int) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / 1024 ** 2:.0f} MiB"


def spill_dir(catalog_path: Path) -> Path:
    """Where a reader of this process spills: <home>/tmp/sql-<pid>-duckdb (DuckDB creates it when it first spills
    and removes it when the database closes; `sweep_scratch` removes a killed process's). One name per process,
    so concurrent readers in one process share one DuckDB configuration. A home without a writable tmp/ (a reader
    creates nothing in the home: `ldpipe sql` leaves it as it was) spills in the system temp dir instead."""
    import tempfile

    root = Path(catalog_path).expanduser().resolve().parent / "tmp"
    if root.is_dir():
        try:
            sweep_scratch(root)
        except OSError:
            pass
    if not (root.is_dir() and os.access(root, os.W_OK)):
        root = Path(tempfile.gettempdir())
    return root / f"sql-{os.getpid()}-duckdb"


_SPILL_DEFAULTS: dict[Path, int] = {}


def default_spill_limit(where: Path) -> int:
    """10 GiB or half the free disk at `where`, the smaller (DuckDB's own default is 90% of the free disk); worked
    out once per process and place, so readers of one process keep one configuration."""
    import shutil

    if where not in _SPILL_DEFAULTS:
        probe = where
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        _SPILL_DEFAULTS[where] = max(0, min(10 * _GIB, shutil.disk_usage(probe).free // 2))
    return _SPILL_DEFAULTS[where]


def reader_limits(catalog_path: Path, memory_limit: int | None = None,
                  spill_limit: int | None = None) -> tuple[int, int, Path]:
    """(memory limit, spill limit, spill dir) of a read-only connection: the given ones or the defaults."""
    where = spill_dir(catalog_path)
    memory = default_memory_limit() if memory_limit is None else memory_limit
    spill = default_spill_limit(where) if spill_limit is None else spill_limit
    return memory, spill, where


def connect_readonly(catalog_path: Path, *, memory_limit: int | None = None,
                     spill_limit: int | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection with bounded resources: `memory_limit` bytes of memory (default: 25% of memory, at
    most 4 GiB), spilling past that into `spill_dir` up to `spill_limit` bytes (default: 10 GiB or half the free
    disk; 0: no spilling), no extension installed or loaded on demand, configuration locked."""
    catalog_path = Path(catalog_path)
    if not catalog_path.is_file():
        raise LdpipeError(f"no catalog at {catalog_path}: refresh the catalog first (ldpipe.store.catalog.refresh_catalog)")
    memory, spill, where = reader_limits(catalog_path, memory_limit, spill_limit)
    if memory <= 0:
        raise LdpipeError(f"memory limit must be > 0 bytes, got {memory}")
    config = dict(_READER_CONFIG, memory_limit=f"{memory}B")
    if spill > 0:
        config.update(temp_directory=str(where), max_temp_directory_size=f"{spill}B")
    else:
        config.update(temp_directory="")       # no spilling: past the memory limit the query fails
    try:
        return duckdb.connect(str(catalog_path), read_only=True, config=config)
    except duckdb.Error as e:
        raise LdpipeError(f"cannot open catalog {catalog_path} read-only: {e}") from None


def check_readonly_statement(sql: str) -> None:
    """Refuse anything but one statement that only reads (DuckDB's parser decides the type)."""
    stmts = _parse(sql, "query")
    if not stmts:
        raise LdpipeError("empty query: give one SELECT statement")
    if len(stmts) > 1:
        raise LdpipeError(f"refusing to run {len(stmts)} statements: give exactly one")
    _check_one(stmts[0])


def _check_one(stmt: duckdb.Statement) -> None:
    text = stmt.query.strip()
    if stmt.type in _READ_TYPES:
        return
    if stmt.type == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE executes its statement, so the inner statement must be read-only too.
        m = _EXPLAIN_PREFIX.match(text)
        inner = _parse(text[m.end():], "query") if m else []
        if len(inner) == 1:
            return _check_one(inner[0])
    if stmt.type == duckdb.StatementType.PRAGMA:
        m = _PRAGMA_NAME.match(text)
        if m and m.group(1).lower() in _READ_PRAGMAS:
            return
    short = " ".join(text.split())[:80]
    raise LdpipeError(f"refusing to run a statement that writes: {stmt.type.name} ({short}); "
                      "`ldpipe sql` only runs SELECT/WITH/FROM/DESCRIBE/SHOW/SUMMARIZE/EXPLAIN/VALUES/TABLE")


_VIEW_GLOB = re.compile(r"read_parquet\('((?:[^']|'')+?)/[A-Za-z_][A-Za-z0-9_]*/\*\*/\*\.parquet'")


def _view_sqls(catalog_path: Path) -> list[str]:
    """The CREATE VIEW statements of a catalog, in creation order (empty when there is no readable catalog)."""
    try:
        con = connect_readonly(catalog_path)
    except LdpipeError:
        return []
    try:
        return [r[0] for r in con.execute("select sql from duckdb_views() where not internal order by view_oid")
                .fetchall() if r[0]]
    except duckdb.Error:
        return []
    finally:
        con.close()


def _roots(sqls: list[str]) -> set[Path]:
    return {Path(m.group(1).replace("''", "'")).resolve() for q in sqls for m in _VIEW_GLOB.finditer(q)}


def store_roots(catalog_path: Path) -> set[Path]:
    """The store directories a catalog's table views read (empty when there is no readable catalog)."""
    return _roots(_view_sqls(catalog_path))


def relocate_if_moved(catalog_path: Path) -> tuple[Path, Path] | None:
    """Views hold the absolute store path of their refresh. If the catalog's home was moved or copied (its views
    read a store other than the `store/` beside it, and that one exists), rebuild the catalog with every view
    pointed at the store beside it: a moved home keeps working, a copied one reads its own shards, and external
    readers (duckdb CLI, Python) keep plain absolute paths. Returns (old store, new store) when it rebuilt."""
    catalog_path = Path(catalog_path).resolve()
    here = (catalog_path.parent / "store").resolve()
    views = _view_sqls(catalog_path)
    roots = _roots(views)
    if not roots or here in roots or not here.is_dir() or len(roots) != 1:
        return None
    old = roots.pop()
    old_lit, new_lit = _lit(str(old) + "/")[:-1], _lit(str(here) + "/")[:-1]   # "'<root>/" as it appears

    def build(con: duckdb.DuckDBPyConnection) -> None:
        pending = [sql.replace(old_lit, new_lit) for sql in views]
        while pending:      # in passes, so a view is created after the views it reads
            failed = []
            for sql in pending:
                try:
                    con.execute(sql)
                except duckdb.CatalogException:
                    failed.append(sql)
            if len(failed) == len(pending):
                raise LdpipeError(f"cannot rebuild the views of {catalog_path} for the moved store: "
                                  "run `ldpipe catalog refresh`")
            pending = failed

    _swap_in(catalog_path, build)
    return old, here


# DuckDB result types polars cannot import: shown as text instead of failing the query.
_AS_TEXT = ("INTERVAL", "UNION")


def query_runs(catalog_path: Path, view: str, run_ids: list[str]) -> pl.DataFrame:
    """Every row of `view` whose run_id is one of `run_ids` (none: an empty frame with the view's columns)."""
    ids = ", ".join("'" + r.replace("'", "''") + "'" for r in run_ids) or "''"
    return query(catalog_path, f"select * from {_q(view)} where run_id in ({ids})")


class _Deadline:
    """Cancels a cursor's query `timeout_s` seconds from now (None or 0: never): DuckDB has no statement timeout,
    so a daemon thread calls cursor.interrupt(), again every 0.2 s until the query has ended (an interrupt that
    lands before execution starts would otherwise be lost)."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, timeout_s: float | None) -> None:
        import threading

        self._done = threading.Event()
        self._lock = threading.Lock()
        self.fired = False
        if timeout_s:
            threading.Thread(target=self._watch, args=(cur, timeout_s), daemon=True,
                             name="ldpipe-sql-timeout").start()

    def _watch(self, cur: duckdb.DuckDBPyConnection, timeout_s: float) -> None:
        if self._done.wait(timeout_s):
            return
        while True:
            with self._lock:
                if self._done.is_set():
                    return
                self.fired = True
                try:
                    cur.interrupt()
                except duckdb.Error:
                    pass
            if self._done.wait(0.2):
                return

    def stop(self) -> bool:
        """Ends the watch; whether the timeout fired (the query was, or was being, cancelled)."""
        with self._lock:
            self._done.set()
            return self.fired


def _interruptible(con: duckdb.DuckDBPyConnection, fetch, timeout_s: float | None = None):
    """`fetch(cursor)` on a cursor of `con`, cancelled by Ctrl-C (KeyboardInterrupt) or, with `timeout_s`, after
    that many seconds (QueryTimeout)."""
    cur = con.cursor()
    deadline = _Deadline(cur, timeout_s)
    try:
        try:
            out = _sigint_cancels(cur, fetch)
        except (duckdb.Error, RuntimeError, KeyboardInterrupt):
            if deadline.stop():
                raise QueryTimeout(timeout_s) from None
            raise
        if deadline.stop():                 # cancelled, whatever DuckDB made of it
            raise QueryTimeout(timeout_s)
        return out
    finally:
        deadline.stop()
        cur.close()


def _sigint_cancels(cur: duckdb.DuckDBPyConnection, fetch):
    """`fetch(cur)`, where Ctrl-C (SIGINT) cancels the query: a handler, installed while it runs in the main
    thread, calls cursor.interrupt() (DuckDB's own cancel flag, which its executor checks) before raising
    KeyboardInterrupt. Raising alone relied on DuckDB turning the Python exception into a cancel, which missed 6 of
    16 Ctrl-Cs sent 2-5 s into a long `ldpipe sql` query (duckdb 2.0.1), which then ran on."""
    import signal
    import threading

    # signals reach only the main thread; an ignored SIGINT (a background job of a shell script) stays ignored
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return fetch(cur)
    hit: list[bool] = []

    def on_sigint(signum, frame):
        hit.append(True)
        try:
            cur.interrupt()
        except duckdb.Error:
            pass
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        out = fetch(cur)
    except duckdb.InterruptException:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:                            # cancelled, whatever DuckDB made of the exception
        raise KeyboardInterrupt
    return out


def query(catalog_path: Path, sql: str, *, timeout_s: float | None = None, memory_limit: int | None = None,
          spill_limit: int | None = None) -> pl.DataFrame:
    """The result of one read-only statement, on a connection with `connect_readonly`'s resource limits;
    `timeout_s` (None or 0: none) cancels it with QueryTimeout, running out of memory and spill space raises
    QueryOutOfMemory."""
    check_readonly_statement(sql)
    memory, spill, _ = reader_limits(catalog_path, memory_limit, spill_limit) if Path(catalog_path).is_file() \
        else (memory_limit, spill_limit, None)
    con = connect_readonly(catalog_path, memory_limit=memory, spill_limit=spill)

    def fetch(cur: duckdb.DuckDBPyConnection) -> pl.DataFrame:
        rel = cur.sql(sql)
        if rel is None:
            raise LdpipeError("the statement returned no result")
        text = [c for c, t in zip(rel.columns, rel.types) if any(k in str(t).upper() for k in _AS_TEXT)]
        if text:
            rel = rel.project(", ".join(f"cast({_q(c)} as varchar) as {_q(c)}" if c in text else _q(c)
                                        for c in rel.columns))
        return rel.pl()

    try:
        return _interruptible(con, fetch, timeout_s)
    except duckdb.OutOfMemoryException as e:
        raise QueryOutOfMemory(str(e).splitlines()[0], memory, spill) from None
    except duckdb.Error as e:
        hint = (" (a store table's folder was removed after the catalog was built: rebuild it with "
                "`ldpipe catalog refresh`)" if "No files found that match the pattern" in str(e) else "")
        raise LdpipeError(f"query failed: {e}{hint}") from None
    except RuntimeError as e:
        if "interrupt" in str(e).lower():       # DuckDB turns Ctrl-C during a query into this
            raise KeyboardInterrupt from None
        raise LdpipeError(f"query failed: {e}") from None
    except pl.exceptions.PolarsError as e:
        raise LdpipeError(f"query failed: the result cannot be converted: {str(e).splitlines()[0]}") from None
    finally:
        con.close()


def refresh(files, sql_dir: Path | None = None) -> dict:
    """Rebuild the catalog of an ldpipe home (`files`: its Paths or an experiment's layout) with the built-in
    views and the project's sql/."""
    from ldpipe.paths import sql_dirs

    paths = getattr(files, "paths", files)
    return refresh_catalog(paths.catalog, paths.store, sql_dirs(sql_dir))

