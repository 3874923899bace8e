"""Where ldpipe keeps its files.

Everything lives under one home directory (default `<project>/.ldpipe`, override
with LDPIPE_HOME) so that a user can find, back up or delete it in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def project_dir() -> Path:
    """The project root: LDPIPE_PROJECT_DIR, else the nearest parent of cwd holding assets/ and sql/, else the
    nearest holding an assets/ folder with a YAML declaration (a user's own project need not have sql/)."""
    env = os.environ.get("LDPIPE_PROJECT_DIR")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "assets").is_dir() and (d / "sql").is_dir():
            return d
    for d in (cwd, *cwd.parents):
        if (d / "assets").is_dir() and any((d / "assets").glob("*.y*ml")):
            return d
    return cwd


def project_path(path: str) -> Path:
    """A path as declared in an experiment YAML: absolute (~ expanded), or relative to the project directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_dir() / p


# The analyses that ship with ldpipe (learning_curves, squeezing, ...): the sql/ folder of the checkout ldpipe is
# installed from (`pip install -e .`). Every catalog has them; a project's own sql/ adds views or redefines one.
BUILTIN_SQL = Path(__file__).resolve().parent.parent / "sql"


def sql_dirs(project_sql: Path | None = None) -> list[Path]:
    """The view folders of a catalog: the built-in analyses, then the project's sql/ (when it is another folder)."""
    project_sql = (project_sql or project_dir() / "sql").resolve()
    dirs = [BUILTIN_SQL] if BUILTIN_SQL.is_dir() else []
    return dirs + ([project_sql] if project_sql not in dirs else [])


@dataclass(frozen=True)
class Paths:
    home: Path

    @classmethod
    def default(cls) -> "Paths":
        env = os.environ.get("LDPIPE_HOME")
        return cls(Path(env).resolve() if env else project_dir() / ".ldpipe")

    @property
    def store(self) -> Path:          # append-only Parquet shards
        return self.home / "store"

    @property
    def llm_cache(self) -> Path:      # SQLite cache of LLM calls (probe types, judges): one per home
        return self.home / "llm_cache.sqlite"

    @property
    def catalog(self) -> Path:        # DuckDB file with views over the shards and sql/*.sql
        return self.home / "catalog.duckdb"

    @property
    def models(self) -> Path:         # checkpoints, tokenizers
        return self.home / "models"

    @property
    def datasets(self) -> Path:       # materialized datasets and probe sets (Parquet)
        return self.home / "datasets"

    @property
    def plots(self) -> Path:
        return self.home / "plots"

    @property
    def scratch(self) -> Path:        # per-process scratch folders (worker error files); swept when dead
        return self.home / "tmp"

    def ensure(self) -> "Paths":
        for p in (self.store, self.models, self.datasets, self.plots):
            p.mkdir(parents=True, exist_ok=True)
        return self
