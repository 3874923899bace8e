"""Atomic file writes: write a temp file in the target directory, then os.replace.

A reader (or a crash) never sees a half-written file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import polars as pl


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_with(write, path: Path) -> Path:
    """Atomically create `path` with `write(tmp_path)` (any writer that takes a path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    def write(tmp: Path) -> None:
        df.write_parquet(tmp)
        with open(tmp, "rb") as f:   # on disk before the rename makes it visible
            os.fsync(f.fileno())

    return write_with(write, path)


def write_json(obj: Any, path: Path) -> Path:
    return write_with(lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)), path)


def write_bytes(data: bytes, path: Path) -> Path:
    return write_with(lambda tmp: tmp.write_bytes(data), path)


def fsync_dir(d: Path) -> None:
    """Flush a directory entry (e.g. after os.replace) so the rename survives a power loss; best effort."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:          # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_DISK_FULL = ("no space left", "storagefull", "file write failed", "disk quota")


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC, however the writer reports it: an OSError, safetensors' IoError text ("StorageFull"), torch's
    "file write failed"; the exception's causes are followed."""
    for _ in range(5):
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if any(k in text or k in text.replace(" ", "") for k in _DISK_FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_space(d: Path) -> str:
    try:
        return f"{shutil.disk_usage(d).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"


def process_gone(pid: int) -> bool:
    """True only when no process `pid` exists (signal 0). This process is never gone; another user's process
    (EPERM) counts as running. Callers that must also tell zombies or reused PIDs check that on top."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:                 # e.g. EPERM: it exists under another user
        return False
    return False


def remove_dead_owners(dirs: Iterable[Path], owner: Callable[[Path], int | None]) -> int:
    """Remove the directories among `dirs` whose owning process (`owner(dir)`, a PID read off its name; None:
    not such a directory) is gone: what a killed writer left behind. Returns how many were removed."""
    removed = 0
    for d in dirs:
        pid = owner(d)
        if pid is not None and d.is_dir() and process_gone(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed
