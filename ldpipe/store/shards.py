"""Append-only Parquet shards: the system of record for trajectories and metrics.

Every writer puts whole files under `root/<table>/<k>=<v>/.../<name>.parquet` and never
edits one in place, so any number of processes may write at once (DuckDB would allow
only one writing process per database file). A shard is written to a
temp name in the same directory and `os.replace`d into place, so a reader (or a crash)
never sees half a file, and rewriting the same name replaces it: a resumed run that
redoes step N leaves exactly one copy of that step's rows.

Each shard carries its own relative path in its Parquet key-value metadata (MARK_KEY), so the store
knows the files it wrote: `Store.audit` tells them from a copy under another name (its mark names
another path), a symlink (the store writes none) or, in a finished run's partition, a file its
manifest does not list. `shards()`/`read()` and the catalog refresh leave those out. A shard without
a mark (written before marks existed, or by hand) is accepted unless a manifest says otherwise.
Manifests record each shard's row count and content digest (ldpipe.hashing.file_hash).
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import polars as pl

from ldpipe.atomic import fsync_dir, process_gone, remove_dead_owners, write_json
from ldpipe.errors import DataValidationError, LdpipeError
from ldpipe.schema import conform

SHARD_SUFFIX = ".parquet"
MARK_KEY = "ldpipe.shard"     # Parquet key-value metadata: the shard's path relative to the store root, as written
_TMP_MARK = ".tmp-"                        # "<name>.parquet.tmp-<pid>-<uuid>": never matches *.parquet
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")   # table names become SQL view names
ARCHIVE_DIR = "_archive"   # records of earlier configurations, moved out of the tables (Store.archive_partition)
MANIFEST_DIR = "_manifests"   # per finished run: the shards it wrote (Store.write_manifest / verify_manifests)
# Per known table: zero rows, the table's whole schema (Store.write_schema_file). Not a shard: never listed as one.
SCHEMA_FILE = "_schema" + SHARD_SUFFIX
# A temp file whose writer process is gone is removed once it is this old. The grace covers a writer in
# another PID namespace (a container sharing the directory), whose live PID looks dead from here.
DEAD_WRITER_GRACE_S = 60.0
_TMP_PID = re.compile(r"\.tmp-(\d+)-[0-9a-f]+(?:\.wal)?$")


def _check_ident(value: str, what: str) -> str:
    if not isinstance(value, str) or not _IDENT.match(value):
        raise LdpipeError(f"invalid {what} {value!r}: use letters, digits and '_' (not starting with a digit)")
    return value


def _encode(value: object, what: str) -> str:
    """Percent-encode a partition value or shard name so it is one safe path segment.

    Encoding (rather than replacing odd characters) keeps distinct values distinct:
    "a/b" and "a_b" must not land in the same directory.
    """
    text = str(value)
    if text == "":
        raise LdpipeError(f"empty {what}")
    enc = quote(text, safe="-_.+,@")
    if enc in (".", ".."):
        enc = enc.replace(".", "%2E")
    return enc


def _replace_with(df: pl.DataFrame, path: Path, mark: str | None = None) -> Path:
    """Atomically write (or replace) `path` with `df`: a temp name in the same folder (never matching *.parquet),
    fsynced, then renamed over it. `mark`: recorded as the file's MARK_KEY metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}")
    try:
        df.write_parquet(tmp, metadata={MARK_KEY: mark} if mark else None)
        with open(tmp, "rb") as f:          # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)                 # the rename itself survives a power loss
    return path


class Store:
    """Hive-style Parquet shards under one root directory, one sub-directory per table."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()    # absolute: catalog views must work from any cwd

    # -- layout ---------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        return self.root / _check_ident(table, "table name")

    def shard_path(self, table: str, partition: dict[str, str], name: str) -> Path:
        d = self.table_dir(table)
        for k, v in partition.items():
            d = d / f"{_check_ident(k, 'partition key')}={_encode(v, f'value for partition key {k!r}')}"
        path = d / (_encode(name, "shard name") + SHARD_SUFFIX)
        if path == self.schema_file(table):
            raise LdpipeError(f"shard name {name!r} without a partition is reserved for the table's schema file")
        return path

    def schema_file(self, table: str) -> Path:
        return self.table_dir(table) / SCHEMA_FILE

    def partition_dir(self, table: str, partition: dict[str, str]) -> Path:
        """The folder holding one partition's shards (e.g. trajectories/run_id=<run>)."""
        return self.shard_path(table, partition, "x").parent

    def rel(self, path: Path) -> str:
        """A path under the root as the store names it (posix, relative to the root): a shard's mark."""
        return Path(path).relative_to(self.root).as_posix()

    def partition_files(self, table: str, partition: dict[str, str]) -> list[Path]:
        """Every *.parquet file under a partition (its schema file aside), the store's own or not."""
        d = self.partition_dir(table, partition)
        schema_file = self.schema_file(table)
        if not d.is_dir():
            return []
        return sorted(p for p in d.rglob(f"*{SHARD_SUFFIX}") if (p.is_file() or p.is_symlink()) and p != schema_file)

    def partition_shards(self, table: str, partition: dict[str, str]) -> list[Path]:
        """The partition's shards the store wrote (see `audit`: copies, symlinks and unlisted files left out)."""
        own, _foreign = self.audit(table, partition)
        return own

    def audit(self, table: str, partition: dict[str, str] | None = None) -> tuple[list[Path], dict[Path, str]]:
        """(own shards, {other file: why it is not one}) among the *.parquet files of a table (or a partition).

        Not the store's: a symlink (the store writes regular files only; a link can bring in rows from outside
        the home, or a second copy of a shard); a file whose mark names another path (a copy or a move under
        another name); in a partition a manifest describes, an unmarked file the manifest does not list. An
        unmarked file elsewhere is accepted (shards written before marks existed carry none). A file that cannot
        be read is listed as own: the schema check names it (`shard_problem`)."""
        manifests = self._manifest_listing()
        own: list[Path] = []
        foreign: dict[Path, str] = {}
        for p in self.partition_files(table, partition or {}):
            rel = self.rel(p)
            if p.is_symlink():
                foreign[p] = f"a symlink to {os.path.realpath(p)}; the store writes no links (refused)"
                continue
            mark = read_mark(p)
            if mark is _GONE:
                continue
            if isinstance(mark, str) and mark != rel:
                foreign[p] = f"a copy of shard {mark} under another name (its store mark names that path)"
                continue
            listed = None if mark else next((f for prefix, f in manifests.items() if rel.startswith(prefix)), None)
            if listed is not None and rel not in listed:
                foreign[p] = "not written by the finished run whose manifest describes this partition"
                continue
            own.append(p)
        return own, foreign

    def _manifest_listing(self) -> dict[str, set[str]]:
        """{"<table>/<key>=<value>/": shards the manifest lists} for each manifest and table it covers."""
        out: dict[str, set[str]] = {}
        for m in self.manifests():
            (key, value), = m["partition"].items()
            for t in m["tables"]:
                try:
                    prefix = self.rel(self.partition_dir(t, {key: value})) + "/"
                except LdpipeError:
                    continue
                out[prefix] = set(m["shards"])
        return out

    def glob(self, table: str) -> str:
        """The pattern readers (DuckDB views) use; temp files have another suffix so never match. It matches any
        *.parquet: the refresh excludes the files `audit` finds foreign at that time (catalog._table_select)."""
        return str(self.table_dir(table) / "**" / f"*{SHARD_SUFFIX}")

    # -- writing ----------------------------------------------------------------------------
    def write_shard(self, table: str, df: pl.DataFrame, *, partition: dict[str, str], name: str,
                    schema: dict[str, pl.DataType] | None = None) -> Path:
        """Atomically write (or replace) one shard and return its path."""
        path = self.shard_path(table, partition, name)
        if schema is not None:
            df = self._conform(table, path, df, schema)
        return _replace_with(df, path, mark=self.rel(path))

    def write_schema_file(self, table: str, schema: dict[str, pl.DataType]) -> bool:
        """Write <table>/_schema.parquet: zero rows with every column of `schema`, so the table's glob always
        matches a file that has every column. A catalog view over the glob then reads an empty table as zero
        typed rows and sees shards written after it was created, with no refresh. Rewritten (atomically) only
        when the schema changed; returns whether it wrote."""
        import pyarrow.parquet as pq

        path = self.schema_file(table)
        empty = pl.DataFrame(schema=schema)
        if path.is_file():
            try:
                if pq.read_schema(path).remove_metadata().equals(empty.to_arrow().schema.remove_metadata()):
                    return False
            except Exception:  # noqa: BLE001 (an unreadable file is simply replaced)
                pass
        _replace_with(empty, path)
        return True

    def _conform(self, table: str, path: Path, df: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        source = f"store table '{table}', shard {path.relative_to(self.root)}"
        missing = [c for c in schema if c not in df.columns]
        if missing:
            raise DataValidationError(source, f"missing column(s) {missing}; have {df.columns}", field=missing[0])
        try:
            return conform(df, schema, what=source)
        except pl.exceptions.PolarsError:
            pass
        for col, dtype in schema.items():     # find the column that fails to cast, to name it
            try:
                df.select(pl.col(col).cast(dtype))
            except pl.exceptions.PolarsError as e:
                first_line = str(e).splitlines()[0]
                raise DataValidationError(source, f"cannot cast to {dtype}: {first_line}", field=col) from None
        raise AssertionError("unreachable: conform failed but every column casts")

    # -- reading ----------------------------------------------------------------------------
    def tables(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # names starting with "_" are not tables: ARCHIVE_DIR holds records moved aside
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _IDENT.match(p.name) and not p.name.startswith("_"))

    def shards(self, table: str) -> list[Path]:
        return self.partition_shards(table, {})

    def read(self, table: str, **filters: object) -> pl.DataFrame:
        """All rows of `table`; keyword filters are column equalities (a list/tuple/set means "is in")."""
        frames: list[pl.DataFrame] = []
        seen: set[str] = set()
        for path in self.shards(table):
            try:
                f = open(path, "rb")
            except FileNotFoundError:       # deleted since listing: it is no longer part of the table
                continue
            # Read through one open handle: a lazy scan of the *path* opens it twice (footer, then data),
            # and a concurrent os.replace in between would pair one file's footer with another's bytes.
            with f:
                lf = pl.scan_parquet(f, hive_partitioning=False)
                cols = lf.collect_schema().names()
                seen.update(cols)
                if any(c not in cols for c in filters):   # null never equals a value: no rows from here
                    lf = lf.head(0)
                for col, value in filters.items():
                    if col in cols:
                        lf = lf.filter(_match(col, value))
                frames.append(lf.collect())
        unknown = [c for c in filters if c not in seen]
        if frames and unknown:
            raise LdpipeError(f"store table '{table}': no column {unknown[0]!r} to filter on; have {sorted(seen)}")
        # diagonal_relaxed: shards written before a column was added still concatenate (missing -> null).
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()

    # -- maintenance ------------------------------------------------------------------------
    def delete_partition(self, table: str, partition: dict[str, str]) -> int:
        """Remove every shard whose path has all the given key=value segments; returns how many."""
        if not partition:
            raise LdpipeError("delete_partition needs at least one key=value (refusing to delete a whole table)")
        wanted = {f"{_check_ident(k, 'partition key')}={_encode(v, f'value for partition key {k!r}')}"
                  for k, v in partition.items()}
        d = self.table_dir(table)
        removed = 0
        for p in self.shards(table):
            if wanted <= set(p.relative_to(d).parts[:-1]):
                p.unlink(missing_ok=True)
                removed += 1
        self._prune_empty_dirs(d)
        return removed

    def partition_values(self, table: str, partition: dict[str, str], column: str) -> set:
        """The distinct values of `column` in one partition's shards (read column-wise, not whole shards)."""
        out: set = set()
        for p in self.partition_shards(table, partition):
            try:
                with open(p, "rb") as f:
                    lf = pl.scan_parquet(f, hive_partitioning=False)
                    if column in lf.collect_schema().names():
                        out.update(lf.select(pl.col(column).unique()).collect()[column].to_list())
            except FileNotFoundError:
                continue
        return out

    def archive_dir(self, tag: dict[str, str]) -> Path:
        base = self.root / ARCHIVE_DIR
        for k, v in tag.items():
            base = base / f"{_check_ident(k, 'archive key')}={_encode(v, f'archive value for {k!r}')}"
        return base

    def archive_partitions(self, tables: tuple[str, ...], key: str, value: str, tag: dict[str, str]) -> list[Path]:
        """`archive_partition` of one partition (key=value, e.g. a run id) in each of `tables`, and the manifest
        that describes those shards with them. Returns the new locations."""
        moved = [d for t in tables if (d := self.archive_partition(t, {key: value}, tag)) is not None]
        manifest = self.manifest_path(key, value)
        if manifest.exists():
            dst = self.archive_dir(tag) / MANIFEST_DIR
            dst.mkdir(parents=True, exist_ok=True)
            os.replace(manifest, dst / manifest.name)
        return moved

    def archive_partition(self, table: str, partition: dict[str, str], tag: dict[str, str]) -> Path | None:
        """Move a partition's folder (e.g. one run's shards) out of the table, to
        `<root>/_archive/<k>=<v>/.../<table>/<partition>`: kept on disk, no longer read by views or `read`.
        Returns the new location (None when the partition holds no shards)."""
        src = self.partition_dir(table, partition)
        if not self.partition_shards(table, partition):
            return None
        dst = self.archive_dir(tag) / src.relative_to(self.root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():   # an earlier record of the same tag: the newer one replaces it (same config, same rows)
            old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dst, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(src, dst)
        fsync_dir(dst.parent)
        return dst

    # -- manifests: what a finished run wrote, to tell a deleted or foreign shard later --------------
    def manifest_path(self, key: str, value: str) -> Path:
        return self.root / MANIFEST_DIR / f"{_check_ident(key, 'partition key')}={_encode(value, 'manifest')}.json"

    def write_manifest(self, key: str, value: str, tables: tuple[str, ...]) -> Path:
        """Record the shards of one partition (e.g. run_id=<run>) in `tables` as written: per shard its row count
        and content digest (file_hash), so a shard rewritten with other values is told later."""
        import pyarrow.parquet as pq

        from ldpipe.hashing import file_hash

        shards = {self.rel(p): {"rows": pq.read_metadata(p).num_rows, "digest": file_hash(p)}
                  for t in tables for p in self.partition_shards(t, {key: value})}
        return write_json({"partition": {key: value}, "tables": list(tables), "shards": shards},
                          self.manifest_path(key, value))

    def manifests(self) -> list[dict]:
        """Every readable manifest (an unreadable one is named by `verify_manifests`)."""
        return [m for _mf, m, err in self._read_manifests() if err is None]

    def _read_manifests(self) -> list[tuple[Path, dict | None, str | None]]:
        import json

        d = self.root / MANIFEST_DIR
        out = []
        for mf in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                m = json.loads(mf.read_text())
                (_key, _value), = m["partition"].items()
                if not isinstance(m["shards"], dict) or not isinstance(m["tables"], list):
                    raise ValueError("'shards' must be an object, 'tables' a list")
                out.append((mf, m, None))
            except (OSError, ValueError, KeyError, TypeError) as e:
                out.append((mf, None, f"{type(e).__name__}: {e}"))
        return out

    def verify_manifests(self) -> tuple[list[str], dict[str, int]]:
        """(problems, counts): every shard a manifest records must exist, readable, with its row count and (where
        the manifest has one) its content digest; a recorded partition must hold no other shard. One line per
        problem shard. Partitions without a manifest (unfinished runs, older homes) are counted as unverified,
        not as problems; a manifest written before digests existed is checked by row count ("no_digest")."""
        from ldpipe.hashing import file_hash

        problems: list[str] = []
        counts = {"manifests": 0, "shards_verified": 0, "no_digest": 0}
        for mf, m, err in self._read_manifests():
            if m is None:
                problems.append(f"unreadable manifest {mf}: {err}")
                continue
            (key, value), = m["partition"].items()
            counts["manifests"] += 1
            present: dict[str, Path] = {}
            foreign: dict[Path, str] = {}
            for t in m["tables"]:
                own, other = self.audit(t, {key: value})
                present.update((self.rel(p), p) for p in own)
                foreign.update(other)
            for rel, rec in sorted(m["shards"].items()):
                n, digest = (rec.get("rows"), rec.get("digest")) if isinstance(rec, dict) else (rec, None)
                if rel not in present:
                    problems.append(f"missing shard {self.root / rel} ({n} rows recorded by {key}={value})")
                    continue
                path = present[rel]
                bad = shard_problem(path)
                if bad:
                    problems.append(bad)
                    continue
                import pyarrow.parquet as pq

                rows = pq.read_metadata(path).num_rows
                if rows != n:
                    problems.append(f"changed shard {path}: {rows} rows, {key}={value} wrote {n}")
                elif digest is None:
                    counts["no_digest"] += 1
                elif file_hash(path) != digest:
                    problems.append(f"changed shard {path}: its content digest is {file_hash(path)}, "
                                    f"{key}={value} wrote {digest} (same row count, other bytes)")
                counts["shards_verified"] += 1
            for rel in sorted(set(present) - set(m["shards"])):
                problems.append(f"extra shard {self.root / rel}: not written by {key}={value} (foreign or stale)")
            for p, why in sorted(foreign.items()):
                problems.append(f"extra shard {p}: {why}")
        return problems, counts

    def clean_temp(self, older_than_s: float = 3600, dead_after_s: float = DEAD_WRITER_GRACE_S) -> int:
        """Delete temp files left by crashed writers; returns how many. See `remove_stale_temps`."""
        if not self.root.is_dir():
            return 0
        return remove_stale_temps(self.root.rglob(f"*{SHARD_SUFFIX}{_TMP_MARK}*"), older_than_s=older_than_s,
                                  dead_after_s=dead_after_s)

    def _prune_empty_dirs(self, top: Path) -> None:
        if not top.is_dir():
            return
        # deepest first; rmdir refuses non-empty dirs, so a concurrent writer's new file is never lost
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
            if Path(dirpath) != top:
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass


_GONE = object()


def read_mark(path: Path):
    """A shard's MARK_KEY (None: no mark, or the file cannot be read; _GONE: deleted since listing)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path).metadata or {}
    except FileNotFoundError:
        return _GONE
    except Exception:  # noqa: BLE001 (pyarrow raises several types for a file that is not Parquet)
        return None
    mark = meta.get(MARK_KEY.encode())
    return mark.decode("utf-8", "replace") if mark is not None else None


def shard_problem(path: Path) -> str | None:
    """One line naming why a shard cannot be read (torn: empty or truncated; unreadable: anything else), or None."""
    import pyarrow.parquet as pq

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
    except OSError as e:
        return f"unreadable shard {path}: {e.strerror or e}"
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        return (f"torn shard {path}: {size} bytes, " + ("empty" if size == 0 else "no complete Parquet header and "
                "footer") + " (truncated, or not written by the store)")
    try:
        pq.read_metadata(path)
    except Exception as e:  # noqa: BLE001
        return f"unreadable shard {path}: not a readable Parquet file: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def writer_alive(path: Path) -> bool | None:
    """Whether the process named in a temp file's name ("...tmp-<pid>-<hex>") still runs; None: cannot tell."""
    m = _TMP_PID.search(path.name)
    return None if not m else not process_gone(int(m.group(1)))


def scratch_dir(root: Path, prefix: str):
    """A TemporaryDirectory under `root` named "<prefix>-<pid>-..." (so a sweep can tell a dead owner), after
    removing the folders of dead owners that a killed process left behind."""
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    sweep_scratch(root)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}-{os.getpid()}-", dir=root)


def sweep_scratch(root: Path) -> int:
    """Remove the scratch folders under `root` whose owning process (the PID in the name) is gone."""
    def owner(d: Path) -> int | None:
        m = re.match(r"[A-Za-z_]+-(\d+)-", d.name)
        return int(m.group(1)) if m else None

    return remove_dead_owners(root.iterdir() if root.is_dir() else (), owner)


def remove_stale_temps(paths, *, older_than_s: float = 3600, dead_after_s: float = DEAD_WRITER_GRACE_S) -> int:
    """Delete the temp files among `paths` that no writer will finish: older than `older_than_s`, or older
    than `dead_after_s` with their writer's PID gone. A live writer's file is never touched (a reused PID only
    delays the cleanup). Temp names never match a reader's glob, so this is tidying, not a correctness need."""
    now = time.time()
    removed = 0
    for p in paths:
        try:
            age = now - p.stat().st_mtime
            if not p.is_file():
                continue
            if age >= older_than_s or (age >= dead_after_s and writer_alive(p) is False):
                p.unlink()
                removed += 1
        except FileNotFoundError:   # its writer finished (renamed it) meanwhile
            pass
    return removed


def _match(col: str, value: object) -> pl.Expr:
    if isinstance(value, (list, tuple, set, frozenset)):
        return pl.col(col).is_in(list(value))
    return pl.col(col) == value

