"""Reading preference files: local JSONL/JSON/CSV/Parquet files and folders (pre-scanned line by line so a bad row is
named with its line and field before datasets reads it), and hub splits with an up-front reachability check.

Splits of a folder follow `datasets`' `data_files` rules (`name_splits`): its own patterns decide which file is which
split (data/train-00000-of-00001.parquet, train.jsonl, my_test.csv, test/part-0.jsonl, ...), and its split keywords
which ldpipe split that is: train/training -> train; test/testing/eval/evaluation -> test; validation/valid/dev/val ->
test as well (ldpipe has a train split and one held-out split, and a validation file is held out too). Where
`datasets` would leave a data file out (no split in its name while other files have one) or read it twice (a name
with two splits), ldpipe stops with the file's name instead."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import polars as pl

from ldpipe.errors import DataValidationError, LdpipeError

ROW = "_row"  # internal column: the 1-based row number used in error messages
_TEXT_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}



# --------------------------------------------------------------------------- reading


def _raw_split(hub_id: str, data_dir: str | None, hub_split: str, split: str, source: str | Path | None,
               types: dict[str, tuple[type, ...]], limit: int | None) -> Iterator[tuple[str, pl.DataFrame]]:
    """Yield (source name, raw frame with ROW) for one split: the hub's, or local file(s) under `source`."""
    if source is None:
        yield f"{hub_id}/{data_dir}" if data_dir else hub_id, _hub_split(hub_id, data_dir, hub_split, types, limit)
        return
    left = limit
    for f in _split_files(Path(source), data_dir, (hub_split, split)):
        if left is not None and left <= 0:
            return
        raw = _read_file(f, required=list(types), types=types, max_rows=left)
        left = None if left is None else left - raw.height
        yield str(f), raw


def _hub_split(hub_id: str, data_dir: str | None, hub_split: str, types: dict[str, tuple[type, ...]],
               limit: int | None) -> pl.DataFrame:
    name = f"{hub_id}/{data_dir}" if data_dir else hub_id
    hint = f"Loading {name} needs network access to the Hugging Face Hub, or a local copy passed as source=/path."
    reason = _hub_unreachable()
    if reason:
        raise LdpipeError(f"{name} ({hub_split}): {reason}. {hint}")
    import datasets

    spec = f"{hub_split}[:{limit}]" if limit else hub_split
    try:
        ds = datasets.load_dataset(hub_id, data_dir=data_dir, split=spec)
    except Exception as e:  # network, auth and hub-layout failures all end the same way for the user
        raise LdpipeError(f"{name} ({hub_split}): could not load: {type(e).__name__}: {e}. {hint}") from e
    missing = [c for c in types if c not in ds.column_names]
    if missing:
        raise DataValidationError(name, f"missing column '{missing[0]}'; available columns: {ds.column_names}",
                                  field=missing[0])
    df = ds.select_columns(list(types)).to_polars()
    return df.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))


def _hub_unreachable() -> str | None:
    """Why the hub cannot be used now, else None; checked up front so that offline runs fail in
    milliseconds instead of after the hub client's retries (~25 s)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"offline mode is on ({var}={os.environ[var]})"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a direct connection test says nothing behind a proxy; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({e})"
    return None


def _split_token(name: str) -> str:
    return name.split(".")[0].split("-")[0]


def _files(path: Path) -> list[Path]:
    """The file, or the data files under a folder in name order; hidden ones (.x, __x) are left out, as by
    `datasets`."""
    if not path.exists():
        raise LdpipeError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and _format(p, strict=False)
                   and not any(part.startswith((".", "__")) for part in p.relative_to(path).parts))
    if not found:
        raise LdpipeError(f"{path}: no .jsonl/.json/.parquet/.csv (optionally .gz) files in this directory")
    return found


def _split_files(path: Path, data_dir: str | None, names: tuple[str, str]) -> list[Path]:
    """The file(s) of one split under a local copy: the file itself, or the directory's files whose
    name starts with the hub split name (train_prefs-00000-of-00001.parquet) or the plain one (train.jsonl.gz)."""
    if path.is_dir() and data_dir and (path / data_dir).is_dir():
        path = path / data_dir  # a snapshot of the whole hub repo
    files = _files(path)
    if path.is_file():
        return files
    for name in names:
        hit = [f for f in files if _split_token(f.name) == name]
        if hit:
            return hit
    raise LdpipeError(f"{path}: no file for split {names[-1]!r} (expected a name starting with "
                      f"{' or '.join(repr(n) for n in dict.fromkeys(names))}); found {[f.name for f in files][:10]}")


# --------------------------------------------------------------------------- splits

# ldpipe's split for each of datasets' split kinds (datasets.data_files.SPLIT_KEYWORDS): one held-out split.
LDPIPE_SPLIT = {"train": "train", "validation": "test", "test": "test"}


def split_keywords() -> dict[str, list[str]]:
    """datasets' split keywords: {'train': ['train', 'training'], 'validation': [...], 'test': [...]}."""
    from datasets.data_files import SPLIT_KEYWORDS

    return {str(k): list(v) for k, v in SPLIT_KEYWORDS.items()}


def split_kind(name: str, *, by_words: bool = False) -> str | None:
    """'train', 'validation' or 'test' for a split value (case and surrounding space ignored), or None.

    `by_words`: a split name of datasets' own (a sharded file's "train_prefs") is read by its words, split on
    datasets' separators (-._ space and digits), and must hold the keywords of one kind only."""
    value = name.strip().lower()
    words = set(re.split(r"[-._ 0-9]+", value)) if by_words else {value}
    kinds = {k for k, kws in split_keywords().items() if words & set(kws)}
    return kinds.pop() if len(kinds) == 1 else None


def name_splits(folder: Path, files: Sequence[Path]) -> dict[Path, str] | None:
    """{file: the split `datasets` gives it by its path under `folder`} for `files` (from `_files`), or None when no
    file's path names a split (then `datasets` reads all as one split too).

    `datasets`' own pattern search (`data_files`), limited to these files. Errors name the file that `datasets`
    would leave out or read into two splits, and a split name that is neither train, test nor validation."""
    from datasets.data_files import DEFAULT_PATTERNS_ALL, _get_data_files_patterns, resolve_pattern

    ours = {f.resolve(): f for f in files}

    def resolver(pattern: str) -> list[str]:
        try:
            found = resolve_pattern(pattern, str(folder))
        except FileNotFoundError:
            return []
        return [p for p in found if Path(p).resolve() in ours]

    try:
        patterns = _get_data_files_patterns(resolver)
    except FileNotFoundError:
        return None
    except ValueError as e:   # a sharded split name datasets refuses
        raise LdpipeError(f"{folder}: {e}") from None
    if patterns == DEFAULT_PATTERNS_ALL:
        return None
    found: dict[Path, list[str]] = {}
    for split, pats in patterns.items():
        for hit in dict.fromkeys(h for p in pats for h in resolver(p)):
            found.setdefault(ours[Path(hit).resolve()], []).append(str(split))
    kinds: dict[str, list[str]] = {}
    for split in patterns:
        kind = split_kind(str(split), by_words=True)
        if kind is None:
            raise LdpipeError(f"{folder}: split {str(split)!r} (from file names {_names(folder, found, str(split))}) "
                              "is neither train, test nor validation; rename the files (train*, test*, validation*) "
                              "or give path one file")
        kinds.setdefault(kind, []).append(str(split))
    for kind, names in kinds.items():
        if len(names) > 1:
            raise LdpipeError(f"{folder}: the file names give several {kind} splits {names}; ldpipe reads one "
                              f"{kind} split: point path at a folder holding the files of one of them")
    out: dict[Path, str] = {}
    for f in files:
        got = found.get(f, [])
        rel = f.relative_to(folder).as_posix()
        if not got:
            named = sorted(g.relative_to(folder).as_posix() for g in found)[:4]
            raise LdpipeError(f"{folder}: {rel} has no split in its name, while other files' names give splits "
                              f"({', '.join(named)}), so `datasets` would leave it out; rename it "
                              f"(e.g. train-{f.name}) or move it out of the folder")
        if len(got) > 1:
            raise LdpipeError(f"{folder}: {rel} matches the splits {got} by its name, so `datasets` would read it "
                              "into each; rename it")
        out[f] = got[0]
    return out


def _names(folder: Path, found: dict[Path, list[str]], split: str) -> list[str]:
    return sorted(f.relative_to(folder).as_posix() for f, s in found.items() if split in s)[:3]


def _format(path: Path, *, strict: bool = True) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _TEXT_SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None and strict:
        raise LdpipeError(f"{path}: unsupported file type; use .jsonl, .json, .parquet or .csv (text ones may be .gz)")
    return fmt


def _read_file(path: Path, *, required: Sequence[str], optional: Sequence[str] = (),
               types: dict[str, tuple[type, ...]], max_rows: int | None = None,
               hint: Callable[[list[str]], str] | None = None) -> pl.DataFrame:
    """Read the `required` and present `optional` columns of one file through `datasets`, plus ROW.

    A column typed (str, list) holds text or TRL's conversational messages (a list of {role, content}), one of the
    two in every row; `hint(available columns)` is added to a missing-column error."""
    fmt, src = _format(path), str(path)
    rows: list[int] | None = None
    features = None
    if fmt == "json":
        rows = _scan_jsonl(path, types, max_rows)
    elif fmt == "csv":
        header, rows = _scan_csv(path, max_rows)
    import datasets

    if fmt == "csv":  # every CSV cell is text: stop pandas from turning "42" into an int or "NA" into null
        features = datasets.Features({c: datasets.Value("string") for c in header})
        kwargs = {"features": features, "keep_default_na": False}
    else:
        kwargs = {}
    # A throwaway cache: the file is already local, and a persistent Arrow copy could go stale.
    with tempfile.TemporaryDirectory(prefix="ldpipe-ds-") as tmp:
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=tmp,
                                       keep_in_memory=True, **kwargs)
        except Exception as e:
            raise DataValidationError(src, f"could not read as {fmt}: {type(e).__name__}: {e}") from e
        missing = [c for c in required if c not in ds.column_names]
        if missing:
            more = hint(list(ds.column_names)) if hint else ""
            raise DataValidationError(src, f"missing column '{missing[0]}'; available columns: {ds.column_names}"
                                      + (f". {more}" if more else ""), field=missing[0])
        keep = list(dict.fromkeys([*required, *(c for c in optional if c in ds.column_names)]))
        if max_rows is not None:
            ds = ds.select(range(min(max_rows, len(ds))))
        df = ds.select_columns(keep).to_polars()
    if rows is None or len(rows) != df.height:  # Parquet, or a file the scan counted differently
        rows = list(range(1, df.height + 1))
    df = df.with_columns(pl.Series(ROW, rows, dtype=pl.Int64))
    for c in keep:  # Parquet types, and CSV/JSON columns that came out non-text despite the scan
        if types.get(c) == (str,):
            df = df.with_columns(_text(df, c, src))
        elif types.get(c) == (str, list):
            df = df.with_columns(_text_or_messages(df, c, src))
    return df


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a UTF-8 file, or an error naming the line and byte offset."""
    offset = 0
    with _open_bytes(path) as fh:
        for n, raw in enumerate(fh, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataValidationError(
                    str(path), f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                               f"(byte {e.start + 1} of line {n}); the file must be UTF-8", row=n,
                    field=_json_field_at(raw, e.start)) from None
            offset += len(raw)


def _json_field_at(raw: bytes, start: int) -> str | None:
    """The top-level key of a JSON-object line whose value holds the bad byte at `start` (None if not JSON).

    Decoding with surrogateescape keeps every byte, so the line still parses and the bad byte shows up
    as a lone surrogate in exactly one value."""
    try:
        rec = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    bad = chr(0xDC00 + raw[start])
    for key, value in rec.items():
        if bad in json.dumps(value, ensure_ascii=False) or bad in key:
            return key
    return None


_JSON_TYPE = {str: "a string", int: "an integer", list: "a list"}
_TEXT_OR_MESSAGES = (str, list)
MESSAGES_NOTE = "a text field holds a string, or TRL's conversational list of {role, content} messages"


def _scan_jsonl(path: Path, types: dict[str, tuple[type, ...]], max_rows: int | None) -> list[int]:
    """Check each JSON line's raw value types (before any casting) and return the record line numbers
    (the first `max_rows`). The whole file is checked: `datasets` reads it all, and a type clash
    past the limit would otherwise surface as an opaque Json column. A (str, list) key holds text in every row
    or messages in every row."""
    rows: list[int] = []
    form: dict[str, tuple[str, int]] = {}   # key -> ("text" | "messages", first row)
    for n, text in _lines(path):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataValidationError(str(path), f"not valid JSON ({e.msg} at column {e.colno}); "
                                                 "expected one JSON object per line", row=n) from None
        if not isinstance(rec, dict):
            raise DataValidationError(str(path), f"expected a JSON object, got {_describe(rec)}", row=n)
        for key, ok in types.items():
            v = rec.get(key)
            if v is None:
                continue
            not_messages = ok == _TEXT_OR_MESSAGES and isinstance(v, list) and not (v and isinstance(v[0], dict))
            if not isinstance(v, ok) or isinstance(v, bool) or not_messages:   # (a list of strings is no messages)
                want = " or ".join(_JSON_TYPE[t] for t in ok if t is not list or ok != _TEXT_OR_MESSAGES)
                note = f" ({MESSAGES_NOTE})" if ok == _TEXT_OR_MESSAGES else ""
                raise DataValidationError(str(path), f"expected {want}, got {_describe(v)}{note}", row=n, field=key)
            if isinstance(v, list):
                bad = message_problem(v)
                if bad:
                    raise DataValidationError(str(path), "expected a list of {role, content} messages with text "
                                                         f"content: {bad}", row=n, field=key)
            if ok == _TEXT_OR_MESSAGES:
                kind = "messages" if isinstance(v, list) else "text"
                first = form.setdefault(key, (kind, n))
                if first[0] != kind:
                    said = {"messages": "a list of messages", "text": "text"}
                    raise DataValidationError(
                        str(path), f"{said[kind]}, but row {first[1]} holds {said[first[0]]}: every row of a file is "
                                   "in one format (TRL's standard: text; conversational: messages)", row=n, field=key)
        if "\\u" in text:   # a \\uXXXX escape may be a lone surrogate, which no UTF-8 text can hold
            _no_lone_surrogate(path, n, rec)
        rows.append(n)
    if not rows:
        raise DataValidationError(str(path), "empty file: no rows" if _is_empty(path)
                                  else "no rows: the file holds only blank lines")
    return rows[:max_rows] if max_rows is not None else rows


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogate(path: Path, n: int, rec: dict) -> None:
    """An error naming the line and field of the first lone surrogate (\\ud800 without its pair) in a record:
    json reads it, but it is no text (UTF-8 cannot encode it) and `datasets` would fail on it without a row."""
    def find(v: object) -> str | None:
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            return m.group() if m else None
        if isinstance(v, list):
            return next((c for c in map(find, v) if c), None)
        if isinstance(v, dict):
            return next((c for c in map(find, [*v.keys(), *v.values()]) if c), None)
        return None

    for key, value in rec.items():
        bad = find(key) or find(value)
        if bad:
            raise DataValidationError(str(path), f"a lone surrogate \\u{ord(bad):04x} is not valid text (a JSON "
                                                 "\\ud800-\\udfff escape must be one of a pair)", row=n, field=key)


def _is_empty(path: Path) -> bool:
    """No bytes at all (after decompression for .gz)."""
    with _open_bytes(path) as fh:
        return not fh.read(1)


def message_problem(messages: list) -> str | None:
    """What makes `messages` no list of {role, content} messages with text content, else None."""
    if not messages:
        return "an empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"item {i} is {_describe(m)}"
        if not isinstance(m.get("role"), str):
            return f"message {i} has no text 'role' ({show_value(m)})"
        if not isinstance(m.get("content"), str):
            return f"message {i} has no text 'content' ({show_value(m.get('content'))})"
    return None


def _describe(v: object) -> str:
    kind = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object", str: "string",
            type(None): "null"}
    return f"a JSON {kind.get(type(v), type(v).__name__)} ({show_value(v, 40)})"


def show_value(v: object, limit: int = 60) -> str:
    """A value as JSON text for a message (a polars Series or list as its items, never polars' display text)."""
    if isinstance(v, pl.Series):
        v = v.to_list()
    try:
        text = json.dumps(v, ensure_ascii=False, default=str)
    except ValueError:   # a circular structure, which no file holds
        text = str(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scan_csv(path: Path, max_rows: int | None) -> tuple[list[str], list[int]]:
    """Check UTF-8 and return the header and each record's first line number (quoted cells may span lines)."""
    text = "".join(t for _, t in _lines(path))
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DataValidationError(str(path), "empty CSV file (no header line)", row=1)
    rows, last, any_row = [], reader.line_num, False
    for rec in reader:
        if rec:
            any_row = True
            if max_rows is None or len(rows) < max_rows:
                rows.append(last + 1)
        last = reader.line_num
    if not any_row:
        raise DataValidationError(str(path), f"CSV has a header but no rows (header: {show_value(header)})", row=1)
    return header, rows


def _text(df: pl.DataFrame, col: str, source: str | Path) -> pl.Expr:
    """`col` as a String expression, or an error naming the first row whose value is not text."""
    dtype = df.schema[col]
    if dtype == pl.String or dtype == pl.Null:
        return pl.col(col).cast(pl.String)
    i = df[col].is_not_null().arg_max() or 0
    row = df[ROW][i] if ROW in df.columns else i + 1
    raise DataValidationError(str(source), f"expected text, got {dtype} (value {show_value(df[col][i])})",
                              row=row, field=col)


def _text_or_messages(df: pl.DataFrame, col: str, source: str | Path) -> pl.Expr:
    """`col` as text, or as it is when it holds {role, content} messages with text content (Parquet's
    list<struct>); otherwise an error naming the first row with a value."""
    dtype = df.schema[col]
    if dtype == pl.String or dtype == pl.Null:
        return pl.col(col).cast(pl.String)
    inner = dtype.inner if isinstance(dtype, pl.List) else None
    if isinstance(inner, pl.Struct):
        fields = {f.name: f.dtype for f in inner.fields}
        if fields.get("role") == pl.String and fields.get("content") == pl.String:
            return pl.col(col)
    i = df[col].is_not_null().arg_max() or 0
    row = df[ROW][i] if ROW in df.columns else i + 1
    raise DataValidationError(str(source), f"expected text or a list of {{role, content}} messages with text "
                                           f"content, got {dtype} (value {show_value(df[col][i])})",
                              row=row, field=col)
