"""Which rows of a preference table a declared run trains on. "First N" is the file's first N rows (the preferences
file keeps the rows in the order read), never the first N ids in string order."""
from __future__ import annotations

import polars as pl


def training_rows(prefs: pl.DataFrame, run) -> pl.DataFrame:
    """The train-split rows `run` trains on, in the order of the dataset file (the preferences file keeps the
    rows as read), cut to the first `run.n_train`: "first N" means the file's first N rows, not the first N ids
    in string order (with ids "0", "1", "10", "100" that would skip rows 2-9)."""
    train = prefs.filter(pl.col("split") == "train")
    return train.head(run.n_train) if run.n_train else train
