"""Packing: documents joined with EOS into flat uint16/uint32 token files.

Layout of a packed folder:
  train.bin, val.bin   raw token ids (numpy memmap; uint16 when the vocabulary fits)
  meta.json            dtype, sizes, EOS id, and per domain its [start, end) token span in
                       each file and its UTF-8 byte count (for bits per byte)

The split is by document and per domain (deterministic, seeded): each domain gives its
shuffled documents to validation until it holds `val_fraction` of the domain's UTF-8
bytes (at least one document when the domain has two or more), so small domains still
get a usable validation set. The split depends on the text alone, not on a tokenizer,
so a tokenizer can be trained on the training documents only (`split_documents`). Within a file, documents keep corpus order, grouped by domain;
each document is followed by one EOS. No padding token is ever written.

`EpochSampler` turns the train file into sequences: chunk i is tokens[i*T : i*T + T + 1]
(inputs and shifted targets), so every token is an input exactly once per epoch except the
final (N - 1) mod T tokens. Chunk order is a seeded permutation per epoch; the run is the
concatenation of epochs, and global step s takes positions [s*B, (s+1)*B) of it. The data
position is therefore a pure function of the step: resuming needs only the step.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmalloy.data.corpus import Corpus
from lmalloy.data.tokenizer import Tok

PACK_VERSION = 2


def corpus_fingerprint(corpus: Corpus) -> str:
    h = hashlib.sha256()
    for d in corpus.documents:
        h.update(d.domain.encode())
        h.update(d.name.encode())
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:16]


def split_documents(corpus: Corpus, val_fraction: float, seed: int) -> list[bool]:
    """Per document, whether it is held out for validation (see the module docstring)."""
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(corpus.documents):
        by_domain.setdefault(d.domain, []).append(i)
    sizes = [len(d.text.encode("utf-8")) + 1 for d in corpus.documents]
    is_val = [False] * len(corpus.documents)
    for name, idx in by_domain.items():
        if len(idx) < 2 or val_fraction <= 0:
            continue
        total = sum(sizes[i] for i in idx)
        order = idx[:]
        random.Random(f"{seed}:{name}").shuffle(order)
        got = 0
        for i in order[:-1]:  # never move a domain's last training document
            if got >= val_fraction * total:
                break
            is_val[i] = True
            got += sizes[i]
    return is_val


def pack_key(corpus: Corpus, tok: Tok, val_fraction: float, seed: int) -> dict:
    """What a packed folder depends on: the corpus content, the tokenizer, the split."""
    return {"version": PACK_VERSION, "corpus": corpus_fingerprint(corpus),
            "tokenizer": tok.fingerprint(), "val_fraction": val_fraction, "seed": seed}


def read_meta(out: Path, key: dict | None = None) -> dict | None:
    """The meta of a complete packed folder (with `key`, only if it matches), else None."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if key is not None and meta.get("key") != key:
        return None
    for split in ("train", "val"):
        f = out / f"{split}.bin"
        want = meta.get(f"{split}_tokens", -1) * np.dtype(meta.get("dtype", "uint16")).itemsize
        if not f.is_file() or f.stat().st_size != want:
            return None
    return meta


def pack(corpus: Corpus, tok: Tok, out: Path, val_fraction: float = 0.05, seed: int = 0
         ) -> dict:
    """Tokenize and pack `corpus` into `out` (reused when its inputs are unchanged).

    The folder is built beside `out` and renamed into place when complete: a reader never
    sees a half-written one, and a killed packing leaves the old folder (or none).
    """
    key = pack_key(corpus, tok, val_fraction, seed)
    meta = read_meta(out, key)
    if meta is not None:
        return meta
    from lmalloy.io.writer import atomic_output

    with atomic_output(out, overwrite=True) as tmp:
        meta = _write_packed(corpus, tok, tmp, split_documents(corpus, val_fraction, seed))
        meta["key"] = key
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _write_packed(corpus: Corpus, tok: Tok, out: Path, is_val: list[bool]) -> dict:
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    ids = tok.encode_batch([d.text for d in corpus.documents])
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(corpus.documents):
        by_domain.setdefault(d.domain, []).append(i)
    meta = {"dtype": np.dtype(dtype).name, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "vocab_size": tok.vocab_size, "domains": {}}
    for split, want in (("train", False), ("val", True)):
        pos = 0
        chunks = []
        for name, idx in by_domain.items():
            start, nbytes, ndocs = pos, 0, 0
            for i in idx:
                if is_val[i] != want:
                    continue
                chunks.append(np.asarray(ids[i] + [tok.eos_id], dtype=dtype))
                pos += len(ids[i]) + 1
                nbytes += len(corpus.documents[i].text.encode("utf-8"))
                ndocs += 1
            dm = meta["domains"].setdefault(name, {})
            dm[split] = [start, pos]
            dm[f"{split}_bytes"] = nbytes
            dm[f"{split}_docs"] = ndocs
        arr = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
        arr.tofile(out / f"{split}.bin")
        meta[f"{split}_tokens"] = int(pos)
    return meta


def load_tokens(folder: Path, split: str, meta: dict) -> np.ndarray:
    n = meta[f"{split}_tokens"]
    if n == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))


@dataclass
class EpochSampler:
    """Deterministic, resumable order of training sequences (see module docstring)."""

    num_tokens: int
    seq_len: int
    seed: int = 0

    @property
    def num_chunks(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)

    def chunk_ids(self, start: int, count: int) -> np.ndarray:
        """Chunk indices at run positions [start, start + count)."""
        n = self.num_chunks
        out = np.empty(count, dtype=np.int64)
        i = 0
        cache: dict[int, np.ndarray] = {}
        while i < count:
            epoch, off = divmod(start + i, n)
            perm = cache.get(epoch)
            if perm is None:
                perm = cache[epoch] = self._perm(epoch)
            take = min(count - i, n - off)
            out[i : i + take] = perm[off : off + take]
            i += take
        return out

    def batch(self, tokens: np.ndarray, start: int, count: int):
        """(inputs, targets) int64 tensors of shape (count, T) for run positions."""
        import torch

        T = self.seq_len
        ids = self.chunk_ids(start, count)
        rows = np.stack([np.asarray(tokens[c * T : c * T + T + 1], dtype=np.int64)
                         for c in ids])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]
