"""Tokenizer identity from the files of a model folder (no tokenizer library loaded).

Two models may be combined weight by weight only when their embedding rows mean the same
tokens: the same `tokenizer.json` (or, for folders without one, the same vocabulary
files). `check_same_tokenizer` is the one check every combining command makes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmalloy.errors import UserError

VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_digest(folder: str | Path) -> str | None:
    """A digest of the folder's vocabulary files, or None when it has none."""
    h = hashlib.sha256()
    found = False
    for name in VOCAB_FILES:
        p = Path(folder) / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
            found = True
    return h.hexdigest() if found else None


def tokenizer_vocab_size(folder: str | Path) -> int | None:
    """Tokens in the folder's tokenizer.json (vocabulary + added tokens), or None."""
    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        vocab = data["model"]["vocab"]
        return len(vocab) + len([a for a in data.get("added_tokens", [])
                                 if a["content"] not in vocab])
    except (KeyError, ValueError, TypeError):
        return None


def vocab_of(folder: str | Path) -> dict[str, int] | None:
    """token -> id of the folder's tokenizer.json (its model vocabulary plus added tokens),
    or None when there is no readable tokenizer.json."""
    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        vocab = dict(data["model"]["vocab"])
        for a in data.get("added_tokens", []):
            vocab[a["content"]] = a["id"]
    except (KeyError, ValueError, TypeError):
        return None
    return vocab if isinstance(vocab, dict) else None


def first_vocab_difference(a: dict[str, int], b: dict[str, int]) -> str | None:
    """None when two vocabularies (token -> id) are identical, else a description of the
    first (lowest-id) token where they differ."""
    if a == b:
        return None
    ia = {i: t for t, i in a.items()}
    ib = {i: t for t, i in b.items()}
    for i in range(max(len(ia), len(ib), max(ia, default=-1) + 1, max(ib, default=-1) + 1)):
        ta, tb = ia.get(i), ib.get(i)
        if ta != tb:
            return f"id {i} is {ta!r} vs {tb!r}"
    return "the vocabularies differ"  # unreachable for dicts with unique ids


def check_same_tokenizer(folders, hint: str = "") -> None:
    """UserError naming two folders whose tokenizer files differ (folders without any
    tokenizer file are not compared)."""
    seen: dict[str, Path] = {}
    for f in folders:
        path = Path(getattr(f, "path", f))
        d = tokenizer_digest(path)
        if d is None:
            continue
        if seen and d not in seen:
            other = next(iter(seen.values()))
            raise UserError(f"the tokenizers of {other} and {path} differ; their embedding "
                            f"rows do not mean the same tokens{hint}")
        seen.setdefault(d, path)
