"""Benchmark of packing a large streamed corpus: lmalloy's `pack` of JSONL and Parquet
(`--num-proc` 1 and 2) against the `tokenizers` library's own `encode_batch` on the same
text, the limit.

Data: the standard library corpus of this interpreter, its documents repeated in a seeded
shuffled order until `--gb` GB of UTF-8 text, written once as JSONL (`text` and `domain`
fields) and as Parquet (row groups of 2,000 documents, snappy). Tokenizer: lmalloy's
byte-level BPE of 4,096 tokens trained on the stdlib corpus (the demo's setting).

Each measured run is a subprocess of its own; its peak memory is that of its whole process
tree (workers included), sampled from /proc by `bench/procmem.py`. MB/s = MB of document
text (UTF-8) / seconds, timed inside the run after imports:
- `tokenizers` (the limit): `Tokenizer.encode_batch` over batches of 1,000 documents, on all
  cores (its own threads); only the calls are timed (the JSONL is parsed between them,
  off the clock) and the ids are dropped. Also `encode_batch_fast` (the same ids without
  character offsets), which is what lmalloy calls, so the honest ceiling for it.
- lmalloy: `lmalloy.data.pack.pack` into a fresh folder: the read-only check pass (`scan`,
  timed on its own too) and the tokenizing pass, writing train.bin / val.bin. Its token
  count must equal the limit's plus one EOS per document (the `ok` column).

Free disk is checked first (about 4 × the text size is needed) and everything is removed at
the end (unless `--keep`). Prints one markdown table on stdout.

    PYTHONPATH=src .venv/bin/python bench/pack_bench.py            # 1 GB, about 20-30 min
    PYTHONPATH=src .venv/bin/python bench/pack_bench.py --quick    # 20 MB smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmem import run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "true"}
ROWS_PER_GROUP = 2000


def generate(work: Path, target: int, formats: list[str]) -> tuple[int, int]:
    """Write corpus.jsonl (and corpus.parquet) of >= `target` text bytes; (bytes, docs)."""
    from lmalloy.data.corpus import load_corpus

    docs = [(d.domain, d.text) for d in load_corpus(["stdlib"], quiet=True).documents]
    rng = random.Random(0)
    total = n = 0
    writer = None
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(work / "corpus.parquet", pa.schema(
            [("text", pa.string()), ("domain", pa.string())]), compression="snappy")
    batch: list[tuple[str, str]] = []
    with open(work / "corpus.jsonl", "w") as f:
        while total < target:
            order = docs[:]
            rng.shuffle(order)
            for dom, text in order:
                f.write(json.dumps({"text": text, "domain": dom}) + "\n")
                total += len(text.encode())
                n += 1
                batch.append((dom, text))
                if len(batch) == ROWS_PER_GROUP:
                    _flush(writer, batch)
                if total >= target:
                    break
    _flush(writer, batch)
    if writer is not None:
        writer.close()
    return total, n


def _flush(writer, batch: list) -> None:
    if writer is not None and batch:
        import pyarrow as pa

        writer.write_table(pa.table({"text": [t for _, t in batch],
                                     "domain": [d for d, _ in batch]}))
    batch.clear()


def child_limit(jsonl: str, tok_dir: str, method: str) -> dict:
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    encode = getattr(tk, method)
    secs = 0.0
    nbytes = tokens = 0
    batch: list[str] = []

    def run() -> None:
        nonlocal secs, tokens
        t0 = time.perf_counter()
        out = encode(batch, add_special_tokens=False)
        secs += time.perf_counter() - t0
        tokens += sum(len(e.ids) for e in out)
        batch.clear()

    with open(jsonl, "rb") as f:
        for line in f:
            text = json.loads(line)["text"]
            nbytes += len(text.encode())
            batch.append(text)
            if len(batch) == 1000:
                run()
    if batch:
        run()
    return {"seconds": secs, "bytes": nbytes, "tokens": tokens}


def child_pack(path: str, tok_dir: str, out: str, num_proc: int) -> dict:
    from lmalloy.data.corpus import load_corpus, scan
    from lmalloy.data.pack import pack
    from lmalloy.data.tokenizer import Tok

    tok = Tok.load(tok_dir)
    t0 = time.perf_counter()
    corpus = load_corpus([path], num_proc=num_proc, quiet=True)
    stats = scan(corpus)
    t1 = time.perf_counter()
    meta = pack(corpus, tok, Path(out), num_proc=num_proc)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "check": t1 - t0, "bytes": sum(s[2] for s in stats.values()),
            "docs": sum(s[0] for s in stats.values()),
            "tokens": meta["train_tokens"] + meta["val_tokens"]}


def measured(work: Path, args: list[str]) -> dict:
    """Run this script's `--child` mode in a subprocess; its result + wall + peak memory."""
    res_file = work / "result.json"
    cmd = [sys.executable, __file__, "--child", str(res_file), *args]
    m = run_measured(cmd, ENV)
    res = json.loads(res_file.read_text())
    res_file.unlink()
    return {**res, **m}


def train_tok(work: Path, max_chars: int | None) -> Path:
    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.tokenizer import train_tokenizer

    texts = [d.text for d in load_corpus(["stdlib"], quiet=True).documents]
    if max_chars:
        keep, n = [], 0
        for t in texts:
            keep.append(t)
            n += len(t)
            if n >= max_chars:
                break
        texts = keep
    train_tokenizer(texts, 4096, work / "tok")
    return work / "tok"


def row(name: str, r: dict, limit: float, ok: str = "") -> str:
    mbs = r["bytes"] / 1e6 / r["seconds"]
    check = f"{r['check']:.1f}" if "check" in r else "—"
    return (f"| {name} | {r['bytes'] / 1e6:,.0f} | {r['seconds']:.1f} | {check} | "
            f"{mbs:.2f} | {mbs / limit:.2f}× | {r['rss'] / 2**20:,.0f} | {r['tokens']:,} | "
            f"{ok} |")


def run_all(a, work: Path) -> None:
    need = int(4.2 * a.gb * 1e9)
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"pack_bench: {free / 1e9:.1f} GB free in {work}, {need / 1e9:.1f} GB needed")
    t0 = time.perf_counter()
    nbytes, ndocs = generate(work, int(a.gb * 1e9), a.formats)
    tok = train_tok(work, 5_000_000 if a.quick else None)
    print(f"generated {nbytes / 1e6:,.0f} MB of text, {ndocs:,} documents in "
          f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
    lim = measured(work, ["limit", str(work / "corpus.jsonl"), str(tok), "encode_batch"])
    limit = lim["bytes"] / 1e6 / lim["seconds"]
    fast = measured(work, ["limit", str(work / "corpus.jsonl"), str(tok), "encode_batch_fast"])
    threads = len(os.sched_getaffinity(0))
    lines = ["| run | text MB | seconds | of which check | MB/s | vs limit | peak RSS MB "
             "| tokens | ok |", "|---|---:|---:|---:|---:|---:|---:|---:|---|",
             row(f"tokenizers encode_batch ({threads} threads), the limit", lim, limit),
             row(f"tokenizers encode_batch_fast ({threads} threads; no offsets, what lmalloy "
                 "calls)", fast, limit)]
    print("\n".join(lines[2:]), file=sys.stderr)
    for fmt in a.formats:
        for n in a.num_proc:
            out = work / f"packed-{fmt}-{n}"
            r = measured(work, ["pack", str(work / f"corpus.{fmt}"), str(tok), str(out), str(n)])
            ok = "yes" if r["tokens"] == lim["tokens"] + r["docs"] else "NO"
            lines.append(row(f"lmalloy pack {fmt}, --num-proc {n}", r, limit, ok))
            print(lines[-1], file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="GB of text to generate")
    ap.add_argument("--quick", action="store_true", help="20 MB smoke run")
    ap.add_argument("--formats", default="jsonl,parquet")
    ap.add_argument("--num-proc", default="1,2")
    ap.add_argument("--workdir", help="where to write the data (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res_file, kind, *rest = a.child
        res = (child_limit(*rest) if kind == "limit"
               else child_pack(rest[0], rest[1], rest[2], int(rest[3])))
        Path(res_file).write_text(json.dumps(res))
        return
    a.gb = 0.02 if a.quick else a.gb
    a.formats = a.formats.split(",")
    a.num_proc = [int(x) for x in a.num_proc.split(",")]
    base = Path(a.workdir) if a.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lmalloy-pack-bench-", dir=base))
    try:
        run_all(a, work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
