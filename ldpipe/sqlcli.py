"""`ldpipe sql`: run one read-only query against the catalog and show or export the result."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb
import polars as pl
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ldpipe.catalog import query
from ldpipe.errors import LdpipeError
from ldpipe.paths import Paths

_EXPORTERS = {".csv": pl.DataFrame.write_csv, ".parquet": pl.DataFrame.write_parquet}


def add_sql_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help='one SELECT-like statement, or "-" to read it from stdin')
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table (default) shows at most --limit rows; csv and json print every row")
    parser.add_argument("--limit", type=int, default=50, help="rows shown by --format table (default 50)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write every row to this file instead of printing; .csv or .parquet by extension")
    # None -> resolved at run time, so LDPIPE_HOME set after the parser was built still counts.
    parser.add_argument("--catalog", type=Path, default=None,
                        help="catalog file (default: <LDPIPE_HOME>/catalog.duckdb)")


def run_sql(args: argparse.Namespace) -> int:
    """Run the query; returns the exit code (2 with a one-line message on stderr for any user error)."""
    try:
        _run(args)
    except (LdpipeError, duckdb.Error, OSError) as e:
        print(f"ldpipe sql: {e}", file=sys.stderr)
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
    df = query(catalog, sql)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        _EXPORTERS[output.suffix.lower()](df, output)
        print(f"wrote {df.height} row(s) to {output}")
    elif args.format == "csv":
        sys.stdout.write(df.write_csv())
    elif args.format == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        _print_table(df, args.limit)


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
