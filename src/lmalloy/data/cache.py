"""The shared cache of packed corpora: `$LMALLOY_CACHE` (default ~/.cache/lmalloy).

Commands that evaluate a model on a corpus without a run folder of their own (`eval`,
`proxy eval`, greedy soup, the demo) pack it here once. A cached folder is named after
everything it depends on (corpus content, tokenizer, split: `lmalloy.data.pack.pack_key`),
so two corpora never share one; it is built under a lock (one builder per key, the others
wait and reuse it) into a temporary folder that is renamed into place when complete, so
concurrent or killed runs never expose a half cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("LMALLOY_CACHE", Path.home() / ".cache" / "lmalloy"))


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on `path` (created if missing), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def packed(corpus, tok, val_fraction: float = 0.05, seed: int = 0,
           num_proc: int | None = None) -> tuple[Path, dict]:
    """(folder, meta) of `corpus` packed with `tok`, from the cache or built into it."""
    from lmalloy.data.pack import pack, pack_key, read_meta
    from lmalloy.io.writer import clean_stale_tmp

    key = pack_key(corpus, tok, val_fraction, seed)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    root = cache_dir() / "packed"
    folder = root / name
    meta = read_meta(folder, key)
    if meta is not None:
        return folder, meta
    with file_lock(root / f".{name}.lock"):
        clean_stale_tmp(root)
        return folder, pack(corpus, tok, folder, val_fraction, seed, num_proc)
