"""Packing: documents joined with EOS into flat uint16/uint32 token files.

Layout of a packed folder:
  train.bin, val.bin   raw token ids (numpy memmap; uint16 when the vocabulary fits)
  meta.json            dtype, sizes, EOS id, and per domain its [start, end) token span in
                       each file and its UTF-8 byte count (for bits per byte)

The split is by document and per domain, seeded and deterministic, and depends on the text
(and corpus order) alone, never on a tokenizer, so a tokenizer can be trained on the
training documents only (`train_documents`). Two rules, by how a document is read:

- *Held* documents (stdlib, text files; `split_documents`): each domain gives its shuffled
  documents to validation until it holds `val_fraction` of the domain's UTF-8 bytes (at
  least one document when the domain has two or more), so small domains still get a usable
  validation set.
- *Streamed* documents (JSONL, Parquet; `StreamSplit`): decided one at a time in corpus
  order, so no pass needs the whole domain. Per domain, with b = a document's UTF-8 bytes
  + 1, S and V the bytes of its earlier documents and of those held out, and u a seeded
  hash of (domain, text) in [0, 1): the first document trains, the second is held out
  (when `val_fraction` > 0), and every later one is held out iff V + u·b < f·(S + b). The
  validation bytes track f·S within one document (dithered by u, not periodic), and
  appending documents to a file never moves an earlier one.

Within a file, documents keep corpus order, grouped by domain (in order of first
appearance); each document is followed by one EOS. No padding token is ever written.
Tokenization runs slice by slice (`lmalloy.data.encode`, across processes for streamed
files); each (domain, split) is appended to a part file in the temporary folder and the
parts are joined at the end, so memory never holds the corpus or its tokens.

`EpochSampler` turns the train file into sequences: chunk i is tokens[i*T : i*T + T + 1]
(inputs and shifted targets), so every token is an input exactly once per epoch except the
final (N - 1) mod T tokens. Chunk order is a seeded permutation per epoch; the run is the
concatenation of epochs, and global step s takes positions [s*B, (s+1)*B) of it. The data
position is therefore a pure function of the step: resuming needs only the step. With a
`pool` (`--unique-tokens`), the epochs run over a seeded random subset of `pool` chunks,
drawn from every part of the file, so a run sees less unique data, repeated more often.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmalloy.data.corpus import Corpus, progress, scan
from lmalloy.data.encode import Encoded, Job, run_slices, split_hash
from lmalloy.data.stream import identity
from lmalloy.data.tokenizer import Tok
from lmalloy.errors import UserError

PACK_VERSION = 2
STREAM_SPLIT = "stream-split-1"  # the streamed split rule's version, in the cache key
HELD_BATCH_CHARS = 8 << 20


def corpus_fingerprint(corpus: Corpus) -> str:
    """A held document counts by its domain, name and text hash. A streamed file counts by
    its identity (path, inode, size, mtime, ctime: `lmalloy.data.stream.identity`), with the
    options that shape what is read from it, not by a content hash: a cache check must not
    read the whole of a corpus of any size, and size + mtime is what make and rsync trust
    (ctime, which no tool sets back, catches an edit that restores the mtime). `pack`
    refuses a file that changes while it is read."""
    h = hashlib.sha256()
    for d in corpus.held:
        h.update(d.domain.encode())
        h.update(d.name.encode())
        h.update(hashlib.sha256(d.text.encode()).digest())
    if corpus.streams:
        h.update(json.dumps({
            "streams": [[s.kind, s.domain, *identity(s.path)] for s in corpus.streams],
            "text_field": corpus.text_field, "domains": corpus.keep, "exclude": corpus.drop,
            "max_chars_per_domain": corpus.max_chars_per_domain, "split": STREAM_SPLIT,
        }).encode())
    return h.hexdigest()[:16]


def split_documents(corpus: Corpus, val_fraction: float, seed: int) -> list[bool]:
    """Per held document, whether it is held out for validation (see the module docstring)."""
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(corpus.held):
        by_domain.setdefault(d.domain, []).append(i)
    sizes = [len(d.text.encode("utf-8")) + 1 for d in corpus.held]
    is_val = [False] * len(corpus.held)
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


class StreamSplit:
    """The split of streamed documents, one at a time in corpus order (module docstring)."""

    def __init__(self, val_fraction: float):
        self.f = val_fraction
        self.state: dict[str, list] = {}  # domain -> [documents, bytes, held out, val bytes]

    def __call__(self, domain: str, size: int, u: float) -> bool:
        """Whether the next document of `domain` (`size` = UTF-8 bytes + 1) is held out."""
        s = self.state.setdefault(domain, [0, 0, 0, 0])
        n, total, nval, vbytes = s
        val = (self.f > 0 and n > 0
               and (nval == 0 or vbytes + u * size < self.f * (total + size)))
        s[0], s[1] = n + 1, total + size
        if val:
            s[2], s[3] = nval + 1, vbytes + size
        return val

    def decide(self, enc: Encoded, cap) -> np.ndarray:
        """Per document of `enc`: -1 dropped by the cap, 0 train, 1 validation."""
        out = np.empty(len(enc.ntok), np.int8)
        rows = zip(enc.doc_domain.tolist(), enc.nchars.tolist(), enc.nbytes.tolist(),
                   enc.u.tolist(), strict=True)
        for i, (d, chars, nbytes, u) in enumerate(rows):
            name = enc.domains[d]
            out[i] = int(self(name, nbytes + 1, u)) if cap(name, chars) else -1
        return out


def train_documents(corpus: Corpus, val_fraction: float, seed: int) -> Iterator[str]:
    """The texts of the training documents, streamed, in corpus order (for the tokenizer)."""
    is_val = split_documents(corpus, val_fraction, seed)
    yield from (d.text for d, v in zip(corpus.held, is_val, strict=True) if not v)
    rule = StreamSplit(val_fraction)
    for domain, text, _, _ in corpus.streamed("tokenizer"):
        data = text.encode("utf-8")
        if not rule(domain, len(data) + 1, split_hash(seed, domain, data)):
            yield text


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


def pack(corpus: Corpus, tok: Tok, out: Path, val_fraction: float = 0.05, seed: int = 0,
         num_proc: int | None = None) -> dict:
    """Tokenize and pack `corpus` into `out` (reused when its inputs are unchanged).

    Streamed files are first read through once without a tokenizer (`scan`: every line
    checked before heavy work), then tokenized on `num_proc` processes (default: the
    corpus's, else min(4, cores)); the output does not depend on the number. The folder is
    built beside `out` and renamed into place when complete: a reader never sees a
    half-written one, and a killed packing leaves the old folder (or none).
    """
    key = pack_key(corpus, tok, val_fraction, seed)
    meta = read_meta(out, key)
    if meta is not None:
        return meta
    from lmalloy.io.writer import atomic_output

    before = [identity(s.path) for s in corpus.streams]
    scan(corpus, num_proc)
    with atomic_output(out, overwrite=True) as tmp:
        meta = _write_packed(corpus, tok, tmp, val_fraction, seed, num_proc)
        meta["key"] = key
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for s, was in zip(corpus.streams, before, strict=True):
            if not s.path.is_file() or identity(s.path) != was:
                raise UserError(f"{s.path} changed while it was being packed; nothing was "
                                "written: pack it again")
    return meta


class _Parts:
    """Each (domain, split)'s tokens appended to a part file, joined per split at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids: dict[str, int] = {}  # domain -> index, in order of first appearance
        self.stats: list[list[list[int]]] = []  # [domain][split] = [tokens, bytes, docs]

    def _id(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.ids)
            self.stats.append([[0, 0, 0], [0, 0, 0]])
        return self.ids[name]

    def _part(self, group: int) -> Path:
        return self.folder / f".part-{group}.bin"

    def add(self, enc: Encoded, split: np.ndarray) -> None:
        """Append `enc`'s documents; split[i] is -1 (dropped), 0 (train) or 1 (validation)."""
        gid = np.array([self._id(n) for n in enc.domains], np.int64)[enc.doc_domain]
        group = np.where(split >= 0, gid * 2 + split, -1)  # (D,)
        kept = np.flatnonzero(group >= 0)
        if not len(kept):
            return
        order = kept[np.argsort(group[kept], kind="stable")]  # by group, then corpus order
        g, lens = group[order], enc.ntok[order]
        ends = np.cumsum(lens)  # token ends of the ordered documents
        if len(order) == len(group) and g[0] == g[-1]:
            tokens = enc.tokens  # one group, nothing dropped: already in order
        else:
            starts = np.cumsum(enc.ntok) - enc.ntok
            tokens = enc.tokens[np.repeat(starts[order] - (ends - lens), lens)
                                + np.arange(ends[-1])]
        cuts = np.flatnonzero(np.diff(g)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(g)], strict=True):
            t0, t1 = (int(ends[a - 1]) if a else 0), int(ends[b - 1])
            with open(self._part(int(g[a])), "ab") as f:
                tokens[t0:t1].tofile(f)
            st = self.stats[int(g[a]) // 2][int(g[a]) % 2]
            st[0] += t1 - t0
            st[1] += int(enc.nbytes[order[a:b]].sum())
            st[2] += b - a

    def finish(self, meta: dict) -> dict:
        """Join the parts into train.bin and val.bin; the meta with each domain's spans."""
        meta["domains"] = {}
        for si, split in enumerate(("train", "val")):
            target = self.folder / f"{split}.bin"
            parts = [p for d in self.ids.values() if (p := self._part(2 * d + si)).exists()]
            if len(parts) == 1:
                os.rename(parts[0], target)
            else:
                with open(target, "wb") as out:
                    for p in parts:
                        with open(p, "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 22)
                        p.unlink()
            pos = 0
            for name, d in self.ids.items():
                tokens, nbytes, ndocs = self.stats[d][si]
                dm = meta["domains"].setdefault(name, {})
                dm[split] = [pos, pos + tokens]
                dm[f"{split}_bytes"] = nbytes
                dm[f"{split}_docs"] = ndocs
                pos += tokens
            meta[f"{split}_tokens"] = pos
        return meta


def _held_batches(docs: list) -> Iterator[tuple[int, int]]:
    lo, size = 0, 0
    for i, d in enumerate(docs):
        size += len(d.text)
        if size >= HELD_BATCH_CHARS:
            yield lo, i + 1
            lo, size = i + 1, 0
    if lo < len(docs):
        yield lo, len(docs)


def _write_packed(corpus: Corpus, tok: Tok, out: Path, val_fraction: float, seed: int,
                  num_proc: int | None) -> dict:
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    parts = _Parts(out)
    job = Job(tok.tk.to_str(), dtype.name, tok.eos_id, seed, corpus.text_field,
              **corpus.filters())
    job._tk = tok.tk  # this process's copy; workers rebuild theirs from the JSON
    todo = corpus.slices()
    bar = progress(sum(len(d.text) for d in corpus.held) + sum(sl.in_bytes for sl in todo),
                   "pack")
    try:
        is_val = split_documents(corpus, val_fraction, seed)
        for lo, hi in _held_batches(corpus.held):
            enc = job.encode(((d.domain, d.text) for d in corpus.held[lo:hi]), 0)
            parts.add(enc, np.array(is_val[lo:hi], np.int8))
            bar.update(int(enc.nchars.sum()))
        rule, cap = StreamSplit(val_fraction), corpus.cap()
        for enc in run_slices(job, todo, num_proc or corpus.num_proc):
            parts.add(enc, rule.decide(enc, cap))
            bar.update(enc.in_bytes)
    finally:
        bar.close()
    return parts.finish({"dtype": dtype.name, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                         "vocab_size": tok.vocab_size})

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
    pool: int | None = None  # chunks in the repeated subset (None: every chunk)

    @property
    def all_chunks(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    @property
    def num_chunks(self) -> int:
        """Chunks per epoch."""
        return self.all_chunks if self.pool is None else min(self.pool, self.all_chunks)

    def _perm(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
        if self.pool is None or self.pool >= self.all_chunks:
            return perm
        subset = np.sort(np.random.default_rng([self.seed, 1 << 30]).choice(
            self.all_chunks, self.num_chunks, replace=False))
        return subset[perm]

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
