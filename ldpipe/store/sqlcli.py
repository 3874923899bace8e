"""`ldpipe sql`: run one read-only query against the catalog and show or export the result."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import duckdb
import polars as pl
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ldpipe.atomic import write_with
from ldpipe.errors import LdpipeError
from ldpipe.paths import Paths
from ldpipe.store.catalog import (
    QueryOutOfMemory,
    QueryTimeout,
    parse_size,
    query,
    relocate_if_moved,
    store_roots,
)

_EXPORTERS = {".csv": pl.DataFrame.write_csv, ".parquet": pl.DataFrame.write_parquet}
DEFAULT_TIMEOUT_S = 120.0


def add_sql_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help='one SELECT-like statement, or "-" to read it from stdin')
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table (default) shows at most --limit rows; csv and json print every row")
    parser.add_argument("--limit", type=int, default=50, help="rows shown by --format table (default 50)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write every row to this file instead of printing; .csv or .parquet by extension "
                             "(never inside the ldpipe home; an existing file only with --force)")
    parser.add_argument("--force", action="store_true", help="let --output replace an existing file")
    # None -> resolved at run time, so LDPIPE_HOME set after the parser was built still counts.
    parser.add_argument("--catalog", type=Path, default=None,
                        help="catalog file (default: <LDPIPE_HOME>/catalog.duckdb)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"cancel the query after this many seconds (default {DEFAULT_TIMEOUT_S:g}; 0: no limit)")
    parser.add_argument("--memory-limit", default=None,
                        help="DuckDB memory for the query, e.g. 2GB, 512MB or 10%% (of memory) "
                             "(default: 25%% of memory, at most 4 GiB)")
    parser.add_argument("--spill-limit", default=None,
                        help="disk the query may spill to past --memory-limit, in <home>/tmp/ (removed afterwards), "
                             "e.g. 20GB (default: 10 GiB or half the free disk, the smaller; 0: no spilling)")


def run_sql(args: argparse.Namespace) -> int:
    """Run the query; returns the exit code (2 with a one-line message on stderr for any user error, 130 for
    Ctrl-C)."""
    try:
        _run(args)
    except KeyboardInterrupt:
        print("ldpipe sql: interrupted", file=sys.stderr)
        return 130
    except QueryTimeout as e:
        print(f"ldpipe sql: the query ran past --timeout-s {e.timeout_s:g} and was cancelled; give a larger "
              "--timeout-s (0: no limit) or narrow the query", file=sys.stderr)
        return 2
    except QueryOutOfMemory as e:
        print(f"ldpipe sql: {e}; give a larger --memory-limit or --spill-limit, or narrow the query", file=sys.stderr)
        return 2
    except (LdpipeError, duckdb.Error, OSError, pl.exceptions.PolarsError) as e:
        print(f"ldpipe sql: {str(e).splitlines()[0] if isinstance(e, pl.exceptions.PolarsError) else e}",
              file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    sql = sys.stdin.read() if args.query == "-" else args.query
    catalog = args.catalog if args.catalog is not None else Paths.default().catalog
    output: Path | None = args.output
    if output is not None and output.suffix.lower() not in _EXPORTERS:
        raise LdpipeError(f"--output {output}: unknown extension; use one of {sorted(_EXPORTERS)}")
    if args.limit < 0:
        raise LdpipeError(f"--limit must be >= 0, got {args.limit}")
    if not (math.isfinite(args.timeout_s) and args.timeout_s >= 0):
        raise LdpipeError(f"--timeout-s must be >= 0 (0: no limit), got {args.timeout_s:g}")
    memory = None if args.memory_limit is None else parse_size(args.memory_limit, "--memory-limit")
    if memory is not None and memory <= 0:
        raise LdpipeError(f"--memory-limit must be more than 0 bytes, got {args.memory_limit!r}")
    spill = None if args.spill_limit is None else parse_size(args.spill_limit, "--spill-limit")
    moved = relocate_if_moved(catalog) if Path(catalog).is_file() else None
    if moved is not None:
        print(f"ldpipe sql: the catalog read {moved[0]} (its home was moved or copied); its views now read "
              f"{moved[1]}", file=sys.stderr)
    if output is not None:
        _check_output(output, catalog, force=args.force)
    df = query(catalog, sql, timeout_s=args.timeout_s or None, memory_limit=memory, spill_limit=spill)
    if output is not None:
        if output.suffix.lower() == ".csv":
            _csv_ready(df, f"--output {output}")
        output.parent.mkdir(parents=True, exist_ok=True)
        write_with(lambda tmp: _EXPORTERS[output.suffix.lower()](df, tmp), output)
        print(f"wrote {df.height} row(s) to {output}")
    elif args.format == "csv":
        _csv_ready(df, "--format csv")
        sys.stdout.write(df.write_csv())
    elif args.format == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        _print_table(df, args.limit)


def _check_output(output: Path, catalog: Path, *, force: bool) -> None:
    """--output never writes into an ldpipe home (the store, datasets and catalog are the record) and replaces
    an existing file only with --force."""
    target = output.expanduser().resolve()
    homes = {Paths.default().home.resolve(), Path(catalog).expanduser().resolve().parent, *store_roots(catalog)}
    for home in homes:
        if target == home or home in target.parents:
            raise LdpipeError(f"--output {output} is inside the ldpipe home {home}, which holds the record "
                              "(store, datasets, catalog); write the result somewhere else")
    if target.is_dir():
        raise LdpipeError(f"--output {output} is a directory; give a file name ending in .csv or .parquet")
    if target.exists() and not force:
        raise LdpipeError(f"--output {output} exists; pass --force to replace it")


def _csv_ready(df: pl.DataFrame, what: str) -> None:
    nested = [f"{c} ({t})" for c, t in df.schema.items() if t.is_nested()]
    if nested:
        raise LdpipeError(f"{what}: CSV cannot hold nested values, and column(s) {', '.join(nested)} are nested; "
                          "use --format json or --output <file>.parquet, or unnest them in the query")


def _print_table(df: pl.DataFrame, limit: int) -> None:
    table = Table(show_lines=False)
    for name, dtype in df.schema.items():
        table.add_column(f"{escape(name)}\n[dim]{dtype}[/dim]", overflow="fold")
    for row in df.head(limit).iter_rows():
        table.add_row(*("[dim]null[/dim]" if v is None else _cell(v) for v in row))
    # rich squeezes to 80 columns when stdout is not a terminal; piped output reads better wider.
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
    console.print(table)
    shown = min(limit, df.height)
    more = f" (showing the first {shown}; use --limit or --output for more)" if shown < df.height else ""
    console.print(f"{df.height} row(s){more}", highlight=False)


def _cell(value: object) -> str:
    return escape(str(value))      # so values like "[x]" print literally, not as rich markup
