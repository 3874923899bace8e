"""Shared helpers of the Dagster wiring: declarations dir, markdown tables and inline PNGs in metadata."""

import base64
import os
from pathlib import Path

import dagster as dg
import polars as pl

from ldpipe.paths import project_dir

CATALOG_KEY = dg.AssetKey("catalog")


def declarations_dir() -> Path:
    env = os.environ.get("LDPIPE_ASSETS_DIR")
    return Path(env).resolve() if env else project_dir() / "assets"


def md_table(df: pl.DataFrame, max_rows: int = 20) -> str:
    cols = df.columns
    rows = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in df.head(max_rows).iter_rows():
        rows.append(" | ".join(_cell(v) for v in r))
    return "\n".join(rows)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    s = str(v).replace("\n", "⏎").replace("|", "\\|")
    return s if len(s) <= 80 else s[:77] + "..."


def png_markdown(png_path: str, alt: str) -> dg.MetadataValue:
    data = base64.b64encode(Path(png_path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")
