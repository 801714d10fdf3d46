"""Reading JSONL input files line by line, with errors that name the file and line.

Lines end at `\\n` only (a JSON string may hold U+2028 or U+0085 raw; they do not end a
line). The file is read as it is iterated, never held.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmalloy.errors import UserError


def parse_line(raw: bytes) -> tuple[object, str]:
    """(value, "") for a JSON line, or (None, what is wrong with it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    try:
        return json.loads(text), ""
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})"


def open_binary(path: Path, what: str):
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def iter_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; UserError on a missing file,
    non-UTF-8 text or a line that is not JSON."""
    p = Path(path)
    with open_binary(p, what) as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            obj, err = parse_line(raw)
            if err:
                raise UserError(f"{p} line {i}: {err}")
            yield i, obj


def line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line that starts at byte `offset` (for error messages)."""
    n = 1
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 24))
            if not block:
                break
            n += block.count(b"\n")
            offset -= len(block)
    return n


def read_choices(path: str | Path) -> list[dict]:
    """Multiple-choice items, one a line: {"context": str, "choices": [str, ...], "answer":
    index of the right choice} (`proxy eval --choices`, `merge search --choices`)."""
    items = []
    for n, it in iter_jsonl(path, "choices file"):
        ok = (isinstance(it, dict) and isinstance(it.get("context"), str)
              and isinstance(it.get("choices"), list) and len(it["choices"]) >= 2
              and all(isinstance(c, str) for c in it["choices"])
              and isinstance(it.get("answer"), int) and not isinstance(it["answer"], bool)
              and 0 <= it["answer"] < len(it["choices"]))
        if not ok:
            raise UserError(f"{path} line {n}: expected {{\"context\": str, \"choices\": [2 or "
                            "more str], \"answer\": index}}")
        items.append(it)
    if not items:
        raise UserError(f"{path}: no items (the file is empty)")
    return items
