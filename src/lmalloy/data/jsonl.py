"""Reading JSONL input files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmalloy.errors import UserError


def iter_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; UserError on a missing file,
    non-UTF-8 text or a line that is not JSON."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {i}: not valid JSON ({e.msg})") from None
