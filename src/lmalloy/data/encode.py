"""Reading and tokenizing a corpus slice by slice, in worker processes or in this one.

A unit of work is a `Slice` of a JSONL/Parquet file (`lmalloy.data.stream`) or a batch of
documents already in memory. `Job.encode` turns its documents into an `Encoded`: per
document its domain, characters, UTF-8 bytes, split hash (`split_hash`) and token count,
and the tokens of all of them in order (each document's ids, then EOS). A job without a
tokenizer only reads: the checking pass and `lmalloy data list`.

`run_slices` yields the results in slice order whatever the number of processes, so packing
with 1 or N processes writes the same bytes. With N > 1 (and more than one slice), N spawned
workers, one `tokenizers` thread each, take slices from a window of 2N in flight: memory is
bounded by the window, never by the corpus. With N = 1 everything runs in this process (and
`tokenizers` may use its own threads for each batch).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from lmalloy.data.stream import Slice, read_slice

BATCH_CHARS = 256 << 10  # text per encode_batch call: bounds the memory of its Encodings


def default_num_proc() -> int:
    """min(4, the CPU cores this process may use)."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return max(1, min(4, cores))


def split_hash(seed: int, domain: str, data: bytes) -> float:
    """A document's seeded hash in [0, 1): the random part of the streamed split rule."""
    h = hashlib.blake2b(f"{seed}\0{domain}\0".encode(), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "little") / 2**64


@dataclass
class Encoded:
    domains: list[str]  # the domains of this slice, in order of first appearance
    doc_domain: np.ndarray  # (D,) int32: index into `domains`
    nchars: np.ndarray  # (D,) int64
    nbytes: np.ndarray  # (D,) int64: UTF-8 bytes
    u: np.ndarray  # (D,) float64: split_hash (zeros for a read-only job)
    ntok: np.ndarray  # (D,) int64: ids + EOS (zeros for a read-only job)
    tokens: np.ndarray  # (ntok.sum(),) the documents' ids + EOS, in order
    in_bytes: int  # the slice's size, for progress


@dataclass
class Job:
    """What every slice of one pass needs; picklable (the tokenizer travels as JSON)."""

    tok_json: str | None  # None: read only
    dtype: str = "uint16"
    eos_id: int = 0
    seed: int = 0
    text_field: str = "text"
    keep: frozenset[str] | None = None
    drop: frozenset[str] = frozenset()
    _tk: object = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tk": None}

    def tokenizer(self):
        if self._tk is None:
            from tokenizers import Tokenizer

            self._tk = Tokenizer.from_str(self.tok_json)
        return self._tk

    def documents(self, sl: Slice) -> Iterator[tuple[str, str, int]]:
        """(domain, text, location) of the non-empty documents of `sl` the filters keep."""
        for domain, text, loc in read_slice(sl, self.text_field):
            if text and (self.keep is None or domain in self.keep) and domain not in self.drop:
                yield domain, text, loc

    def run(self, sl: Slice) -> Encoded:
        return self.encode(((d, t) for d, t, _ in self.documents(sl)), sl.in_bytes)

    def encode(self, docs: Iterable[tuple[str, str]], in_bytes: int) -> Encoded:
        names: dict[str, int] = {}
        dom, nchars, nbytes, u, ntok, parts = [], [], [], [], [], []
        batch: list[str] = []
        size = 0
        tokenize = self.tok_json is not None
        for domain, text in docs:
            data = text.encode("utf-8")
            dom.append(names.setdefault(domain, len(names)))
            nchars.append(len(text))
            nbytes.append(len(data))
            if tokenize:
                u.append(split_hash(self.seed, domain, data))
                batch.append(text)
                size += len(text)
                if size >= BATCH_CHARS:
                    parts.append(self._ids(batch, ntok))
                    batch, size = [], 0
        if batch:
            parts.append(self._ids(batch, ntok))
        n = len(dom)
        return Encoded(list(names), np.array(dom, np.int32), np.array(nchars, np.int64),
                       np.array(nbytes, np.int64), np.array(u or np.zeros(n), np.float64),
                       np.array(ntok or np.zeros(n), np.int64),
                       np.concatenate(parts) if parts else np.zeros(0, self.dtype), in_bytes)

    def _ids(self, texts: list[str], ntok: list[int]) -> np.ndarray:
        tk = self.tokenizer()
        enc = getattr(tk, "encode_batch_fast", tk.encode_batch)
        flat: list[int] = []
        for e in enc(texts, add_special_tokens=False):
            ids = e.ids
            flat += ids
            flat.append(self.eos_id)
            ntok.append(len(ids) + 1)
        return np.array(flat, self.dtype)


_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _JOB = job


def _work(sl: Slice) -> Encoded:
    return _JOB.run(sl)


def run_slices(job: Job, todo: list[Slice], num_proc: int | None = None) -> Iterator[Encoded]:
    """`job.run` of every slice, in order, on `num_proc` processes (default: min(4, cores))."""
    n = min(num_proc or default_num_proc(), len(todo))
    if n <= 1:
        for sl in todo:
            yield job.run(sl)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(job,))
    try:
        rest = iter(todo)
        window = deque(ex.submit(_work, sl) for sl in islice(rest, 2 * n))
        while window:
            enc = window.popleft().result()
            window.extend(ex.submit(_work, sl) for sl in islice(rest, 1))
            yield enc
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
