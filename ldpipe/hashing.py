"""The content hashes ldpipe keys things by, in one place. Each is part of stored names (cache keys, config hashes,
folder names), so none may change its rendering or length.

- config_hash: a declaration's settings (pydantic models rendered as JSON), 12 hex digits: run and base-model hashes.
- content_hash: any JSON-able value (dicts sorted, other objects as str), 16 hex digits: probe-cache keys.
- file_hash: a file's bytes, 16 hex digits; frame_hash: a frame's rows (not how Parquet encodes them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl


def config_hash(obj: Any) -> str:
    from pydantic import BaseModel

    def default(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        raise TypeError(type(o))

    blob = json.dumps(obj, default=default, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def content_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (dicts sorted); 16 hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_hash(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def frame_hash(df: pl.DataFrame) -> str:
    """Content hash of a frame's rows (order-sensitive), independent of how Parquet encodes them."""
    return content_hash([df.columns, df.rows()])
