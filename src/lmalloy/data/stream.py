"""JSONL and Parquet corpus files, read document by document and never held in memory.

A `Stream` is one such file. Opening it checks, cheaply and before any heavy work, what can
be checked without reading it all: a JSONL file's first `PEEK_LINES` lines (at most
`PEEK_BYTES`) parse and hold a string `--text-field`; a Parquet file's schema has that
column as text and its statistics show no nulls. (Every line is checked by the read-only pass that precedes packing:
`lmalloy.data.corpus.scan`.) A line's `domain` field, or a `domain` column, overrides the
file's domain for that document.

`slices` cuts a file into independent units of work of about `SLICE_BYTES`: byte ranges that
begin at a line start (JSONL) or runs of whole row groups (Parquet; a row group is the
smallest unit a Parquet reader can start at, so a file written as one giant row group is one
slice and is read at that granularity). `read_slice` turns a slice back into
(domain, text, location) in file order; the worker processes of `lmalloy.data.encode` call it.

A stream's `identity` (resolved path, inode, size, mtime and ctime in ns) keys the packed
cache instead of a content hash: see `lmalloy.data.pack.corpus_fingerprint`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmalloy.data.jsonl import line_number, open_binary, parse_line
from lmalloy.errors import UserError

STREAM_SUFFIXES = (".jsonl", ".parquet")
PEEK_LINES = 1000
PEEK_BYTES = 4 << 20
SLICE_BYTES = 8 << 20
PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class Stream:
    path: Path
    kind: str  # "jsonl" | "parquet"
    domain: str  # the domain of a document that names none
    size: int  # bytes on disk
    line_domains: bool  # documents may name their own domain (JSONL; a `domain` column)
    empty: bool  # known to hold no document


@dataclass(frozen=True)
class Slice:
    kind: str
    path: str
    domain: str
    start: int  # JSONL: byte offset of a line start; Parquet: first row group
    end: int  # JSONL: end offset; Parquet: the row group after the last
    first: int  # JSONL: line number at `start`, 0 when unknown; Parquet: row index at `start`
    in_bytes: int  # work it represents, for progress bars (Parquet: uncompressed bytes)


def identity(path: Path) -> list:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def open_stream(path: Path, domain: str, text_field: str) -> Stream:
    """A checked `Stream` (UserError for what the first lines or the metadata reveal)."""
    if path.suffix == ".parquet":
        return _open_parquet(path, domain, text_field)
    return _open_jsonl(path, domain, text_field)


def _text_of(obj: object, field: str) -> tuple[str | None, str]:
    if isinstance(obj, dict) and isinstance(obj.get(field), str):
        return obj[field], ""
    if isinstance(obj, dict):
        keys = ", ".join(list(obj)[:8]) or "none"
        return None, (f"no string `{field}` field (its keys: {keys}); name the text "
                      "field with --text-field")
    return None, f"expected a JSON object with a string `{field}` field"


def _jsonl_doc(raw: bytes, field: str, domain: str) -> tuple[str, str, str]:
    """(domain, text, "") of one non-blank line, or ("", "", what is wrong)."""
    obj, err = parse_line(raw)
    text, err = _text_of(obj, field) if not err else (None, err)
    if err:
        return "", "", err
    if b"\\u" in raw:  # an escaped lone surrogate is not text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "", "", f"`{field}` holds an unpaired surrogate escape (\\ud800-\\udfff)"
    return str(obj.get("domain", domain)), text, ""


def _open_jsonl(path: Path, domain: str, field: str) -> Stream:
    seen = read = 0
    with open_binary(path, "--data file") as f:
        for i, raw in enumerate(f, 1):
            read += len(raw)
            if raw.strip():
                _, text, err = _jsonl_doc(raw, field, domain)
                if err:
                    raise UserError(f"{path} line {i}: {err}")
                seen += bool(text)
            if i >= PEEK_LINES or read >= PEEK_BYTES:
                break
        else:
            if not seen:
                return Stream(path, "jsonl", domain, path.stat().st_size, True, True)
    return Stream(path, "jsonl", domain, path.stat().st_size, True, False)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install pyarrow "
                        "(or lmalloy[parquet])") from None
    return pa, pq


def _parquet_file(path: Path):
    pa, pq = _pyarrow()
    if not path.is_file():
        raise UserError(f"--data file not found: {path}")
    try:
        return pq.ParquetFile(path, buffer_size=1 << 20)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})"
                        ) from None


def _open_parquet(path: Path, domain: str, field: str) -> Stream:
    pa, _ = _pyarrow()
    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path}: no `{field}` column (its columns: {', '.join(names)}); "
                        "name the text column with --text-field")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"{path}: column `{field}` holds {kind}, not text")
    md = pf.metadata
    col = [md.schema.column(j).path for j in range(md.num_columns)].index(field)
    nulls = 0
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        nulls += st.null_count if st is not None and st.has_null_count else 0
    if nulls:
        raise UserError(f"{path}: column `{field}` is null in {nulls} row(s); drop or fill "
                        "them first")
    return Stream(path, "parquet", domain, path.stat().st_size, "domain" in names,
                  md.num_rows == 0)


def slices(s: Stream, slice_bytes: int | None = None) -> list[Slice]:
    """`s` cut into slices of about `slice_bytes` (default `SLICE_BYTES`), in file order."""
    size = slice_bytes or SLICE_BYTES
    if s.kind == "parquet":
        return _parquet_slices(s, size)
    bounds = [0]
    with open(s.path, "rb") as f:
        while True:
            f.seek(bounds[-1] + size - 1)
            f.readline()  # to the start of the next line
            at = f.tell()
            if at >= s.size:
                break
            bounds.append(at)
    bounds.append(s.size)
    return [Slice("jsonl", str(s.path), s.domain, a, b, 1 if a == 0 else 0, b - a)
            for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _parquet_slices(s: Stream, size: int) -> list[Slice]:
    md = _parquet_file(s.path).metadata
    out, start, row, first, acc = [], 0, 0, 0, 0
    for g in range(md.num_row_groups):
        acc += md.row_group(g).total_byte_size
        row += md.row_group(g).num_rows
        if acc >= size or g == md.num_row_groups - 1:
            out.append(Slice("parquet", str(s.path), s.domain, start, g + 1, first, acc))
            start, first, acc = g + 1, row, 0
    return out


def whole(s: Stream) -> Slice:
    """`s` as one slice (read start to end in this process; JSONL line numbers known)."""
    if s.kind == "parquet":
        n = _parquet_file(s.path).metadata.num_row_groups
        return Slice("parquet", str(s.path), s.domain, 0, n, 0, s.size)
    return Slice("jsonl", str(s.path), s.domain, 0, s.size, 1, s.size)


def read_slice(sl: Slice, field: str) -> Iterator[tuple[str, str, int]]:
    """(domain, text, line number or row index) of each document of `sl`, in order.

    A JSONL location is 0 when the slice starts mid-file (its errors still name the line)."""
    if sl.kind == "parquet":
        yield from _read_parquet(sl, field)
        return
    path = Path(sl.path)
    with open(path, "rb") as f:
        f.seek(sl.start)
        pos, line = sl.start, sl.first
        while pos < sl.end:
            raw = f.readline()
            if not raw:
                break
            at, pos = pos, pos + len(raw)
            if raw.strip():
                domain, text, err = _jsonl_doc(raw, field, sl.domain)
                if err:
                    raise UserError(f"{path} line {line or line_number(path, at)}: {err}")
                yield domain, text, line
            line += bool(line)


def _read_parquet(sl: Slice, field: str) -> Iterator[tuple[str, str, int]]:
    pf = _parquet_file(Path(sl.path))
    with_domain = "domain" in pf.schema_arrow.names and field != "domain"
    cols = [field, "domain"] if with_domain else [field]
    row = sl.first
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols,
                                 row_groups=range(sl.start, sl.end), use_threads=False):
        texts = batch.column(0).to_pylist()
        doms = batch.column(1).to_pylist() if with_domain else [None] * len(texts)
        for k, (text, dom) in enumerate(zip(texts, doms, strict=True)):
            if text is None:
                raise UserError(f"{sl.path} row {row + k}: `{field}` is null")
            yield (sl.domain if dom is None else str(dom)), text, row + k
        row += len(texts)
