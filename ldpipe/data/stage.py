"""The dataset stage: the declared preference data loaded (any kind) and written as the experiment's
preferences.parquet (plus the synthetic world's files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ldpipe.atomic import write_parquet
from ldpipe.errors import LdpipeError
from ldpipe.layout import ExperimentFiles
from ldpipe.paths import project_path
from ldpipe.schema import PREFERENCE_SCHEMA
from ldpipe.spec import ExperimentSpec

Log = Callable[[str], None]


# ---------------------------------------------------------------- dataset

def load_dataset(spec: ExperimentSpec, *, sample_rows: int | None = None):
    """The declared preference data (PREFERENCE_SCHEMA), the source's extra facts, and the synthetic world (or
    None). Nothing is written: the dataset stage and `ldpipe check` both use it, so both give the same errors.
    `sample_rows` (check of a large file): read only that many rows of it."""
    ds = spec.dataset
    world = None
    if ds.kind == "synthetic":
        from ldpipe.data.synthetic import SyntheticConfig, generate

        s = ds.synthetic
        world = generate(SyntheticConfig(seed=s.seed, n_entities=s.n_entities, n_train=s.n_train,
                                         n_test=s.n_test, corpus_docs=s.corpus_docs))
        prefs = world.preferences
        extra = {"corpus_docs": len(world.corpus), "corpus_chars": sum(map(len, world.corpus)),
                 "facts": world.facts.height}
    elif ds.kind == "reference_probes":
        from ldpipe.data.loaders import reference_to_preferences

        prefs = reference_to_preferences(_resolve(ds.path), limit=sample_rows or ds.limit)
        extra = {}
    else:
        from ldpipe.data.loaders import DataSource, load_preferences

        prefs = load_preferences(DataSource(kind=ds.kind, path=str(_resolve(ds.path)) if ds.path else None,
                                            columns=dict(ds.columns), limit=ds.limit))
        extra = {}
    return prefs.select(list(PREFERENCE_SCHEMA)), extra, world


@dataclass(frozen=True)
class DatasetResult:
    """What the dataset stage wrote: files.preferences (and the synthetic world's files)."""

    kind: str                              # the dataset kind declared
    rows: int
    splits: dict[str, int]                 # rows per split
    path: Path                             # preferences.parquet
    source: dict = field(default_factory=dict)   # the source's own counts (synthetic: corpus_docs, facts, ...)


def build_dataset(spec: ExperimentSpec, files: ExperimentFiles, log: Log = print) -> DatasetResult:
    ds = spec.dataset
    prefs, extra, world = load_dataset(spec)
    if world is not None:
        world.save(files.world)
    write_parquet(prefs, files.preferences)
    counts = dict(prefs.group_by("split").len().sort("split").iter_rows())
    log(f"[{spec.name}] dataset {ds.kind}: {counts}")
    return DatasetResult(ds.kind, prefs.height, counts, files.preferences, extra)


def _resolve(path: str | None) -> Path:
    if path is None:
        raise LdpipeError("a path is required")
    return project_path(path)
