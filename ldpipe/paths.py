"""Where ldpipe keeps its files.

Everything lives under one home directory (default `<project>/.ldpipe`, override
with LDPIPE_HOME) so that a user can find, back up or delete it in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def project_dir() -> Path:
    """The project root: LDPIPE_PROJECT_DIR, else the nearest parent of cwd holding assets/ and sql/."""
    env = os.environ.get("LDPIPE_PROJECT_DIR")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "assets").is_dir() and (d / "sql").is_dir():
            return d
    return cwd


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
