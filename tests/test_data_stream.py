"""Streamed corpora: JSONL and Parquet files packed slice by slice, never held in memory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmalloy.data.pack as pack_mod
import lmalloy.data.stream as stream
from common import assert_user_error, run_cli
from lmalloy.data.cache import packed
from lmalloy.data.corpus import load_corpus
from lmalloy.data.encode import split_hash
from lmalloy.data.pack import StreamSplit, pack, train_documents
from lmalloy.data.tokenizer import Tok
from lmalloy.errors import UserError

WORDS = ["def", "return", "self", "import", "value", "class", "None", "print", "ünï", "✓"]


def make_docs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(domain, text): three domains, lengths from one word to a few hundred bytes."""
    rng = random.Random(seed)
    return [(rng.choice("abc"), " ".join(rng.choices(WORDS, k=rng.randint(1, 80))))
            for _ in range(n)]


def write_jsonl(path: Path, docs, field: str = "text") -> Path:
    with open(path, "w") as f:
        for dom, text in docs:
            f.write(json.dumps({field: text, "domain": dom}) + "\n")
    return path


def write_parquet(path: Path, docs, field: str = "text", rows_per_group: int = 50) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), field: [t for _, t in docs],
                      "domain": [d for d, _ in docs]})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


def reference(docs, tok: Tok, f: float, seed: int) -> dict[str, bytes]:
    """train.bin / val.bin bytes derived from the streamed split rule by hand."""
    rule = StreamSplit(f)
    order = list(dict.fromkeys(d for d, _ in docs))
    ids = tok.encode_batch([t for _, t in docs])
    is_val = [rule(d, len(t.encode()) + 1, split_hash(seed, d, t.encode())) for d, t in docs]
    out = {}
    for split, want in (("train", False), ("val", True)):
        seq = [t for dom in order for (d, _), x, v in zip(docs, ids, is_val, strict=True)
               if d == dom and v == want for t in [*x, tok.eos_id]]
        out[split] = np.array(seq, dtype=np.uint16).tobytes()
    return out


def test_jsonl_and_parquet_with_a_text_field_pack_the_documents_whole(tmp_path, tokenizer_dir):
    docs = make_docs(400)
    tok = Tok.load(tokenizer_dir)
    cj = load_corpus([str(write_jsonl(tmp_path / "c.jsonl", docs, "body"))], text_field="body")
    cp = load_corpus([str(write_parquet(tmp_path / "c.parquet", docs, "content"))],
                     text_field="content")
    mj = pack(cj, tok, tmp_path / "pj", 0.1, 0, num_proc=1)
    mp = pack(cp, tok, tmp_path / "pp", 0.1, 0, num_proc=1)
    ref = reference(docs, tok, 0.1, 0)
    for split in ("train", "val"):
        assert (tmp_path / "pj" / f"{split}.bin").read_bytes() == ref[split]
        assert (tmp_path / "pp" / f"{split}.bin").read_bytes() == ref[split]
    assert mj["domains"] == mp["domains"] and set(mj["domains"]) == {"a", "b", "c"}
    for name, d in mj["domains"].items():
        assert d["train_docs"] >= 1 and d["val_docs"] >= 1, name
        assert d["train_docs"] + d["val_docs"] == sum(dom == name for dom, _ in docs)
    # the tokenizer's training texts are exactly the packed training documents
    train = list(train_documents(cj, 0.1, 0))
    assert len(train) == sum(d["train_docs"] for d in mj["domains"].values())
    assert sum(len(t.encode()) for t in train) == sum(
        d["train_bytes"] for d in mj["domains"].values())
    # held and streamed documents mix: held ones first, with today's split
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "n.txt").write_text("held text " * 20)
    both = load_corpus([str(tmp_path / "c.jsonl"), str(tmp_path / "notes")], text_field="body")
    mb = pack(both, tok, tmp_path / "pb", 0.1, 0, num_proc=1)
    assert list(mb["domains"]) == ["notes", *dict.fromkeys(d for d, _ in docs)]
    assert mb["domains"]["notes"]["train_docs"] == 1


def test_streamed_split_rule():
    rng = random.Random(1)
    sizes = [rng.randint(10, 2000) for _ in range(3000)]
    for f in (0.01, 0.1, 0.5):
        rule = StreamSplit(f)
        val = [rule("d", s, split_hash(0, "d", str(i).encode())) for i, s in enumerate(sizes)]
        assert val[:2] == [False, True]  # the first trains, the second is held out
        held = sum(s for s, v in zip(sizes, val, strict=True) if v)
        assert abs(held - f * sum(sizes)) <= max(max(sizes), sizes[1]), f
    one = StreamSplit(0.5)
    assert one("solo", 100, 0.0) is False  # a one-document domain trains
    none = StreamSplit(0.0)
    assert not any(none("d", 10, 0.0) for _ in range(5))


def test_appending_documents_never_moves_earlier_ones(tmp_path):
    docs = make_docs(300, seed=2)
    short = load_corpus([str(write_jsonl(tmp_path / "s.jsonl", docs[:200]))])
    long = load_corpus([str(write_jsonl(tmp_path / "l.jsonl", docs))])
    a, b = list(train_documents(short, 0.2, 5)), list(train_documents(long, 0.2, 5))
    assert b[: len(a)] == a and len(b) > len(a)


def test_multiprocess_packing_is_byte_identical(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(stream, "SLICE_BYTES", 8 << 10)
    docs = make_docs(1200, seed=3)
    (tmp_path / "held.txt").write_text("a held document\n" * 30)
    corpus = load_corpus([str(write_jsonl(tmp_path / "x.jsonl", docs[:700])),
                          str(write_parquet(tmp_path / "y.parquet", docs[700:], "text", 60)),
                          str(tmp_path / "held.txt")], max_chars_per_domain=40_000)
    assert len(corpus.slices()) >= 8
    tok = Tok.load(tokenizer_dir)
    pack(corpus, tok, tmp_path / "one", 0.1, 4, num_proc=1)
    pack(corpus, tok, tmp_path / "two", 0.1, 4, num_proc=2)
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    chars = {d: sum(len(t) for dd, t in docs if dd == d) for d in "abc"}
    assert all(chars[d] > 40_000 for d in "abc")  # the cap bites on every domain
    assert not list(tmp_path.glob("one/.part-*"))
    assert set(meta["domains"]) == {"held", "a", "b", "c"}


_MEMORY_SCRIPT = r"""
import json, random, sys
from pathlib import Path
import lmalloy.data.stream as stream
from lmalloy.data.corpus import load_corpus
from lmalloy.data.pack import pack
from lmalloy.data.tokenizer import Tok

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

stream.SLICE_BYTES = 1 << 18
tok, root, size = Tok.load(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
words = ["def", "return", "self", "import", "value", "class", "None", "print", "for", "in"]
for name, n in (("warm", 1 << 18), ("big", size)):
    with open(root / f"{name}.jsonl", "w") as f:
        done = 0
        while done < n:
            text = " ".join(rng.choices(words, k=rng.randint(20, 400)))
            done += f.write(json.dumps({"text": text}) + "\n")
pack(load_corpus([str(root / "warm.jsonl")]), tok, root / "warm", num_proc=1)
base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
meta = pack(load_corpus([str(root / "big.jsonl")]), tok, root / "big", num_proc=1)
print(json.dumps({"growth": status("VmHWM") - base, "tokens": meta["train_tokens"]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streaming_never_holds_the_corpus(tmp_path, tokenizer_dir):
    size = 12 << 20
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tokenizer_dir),
                          str(tmp_path), str(size)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["tokens"] > size // 4  # it did pack the file
    # holding the corpus would cost more than its 12 MB of text (plus its token lists)
    assert out["growth"] < size // 2, out


def _late_bad_line(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(stream.PEEK_LINES + 500):
            f.write(json.dumps({"text": f"line {i}"}) + "\n")
        f.write(json.dumps({"txt": "no text", "id": 1}) + "\n")
    return path


def test_bad_streamed_inputs(capsys, tmp_path, monkeypatch):
    docs = make_docs(20)
    pq_body = write_parquet(tmp_path / "body.parquet", docs, "body")
    assert_user_error(capsys, "data", "list", "--data", pq_body,
                      match="no `text` column (its columns: id, body, domain)")
    first = tmp_path / "first.jsonl"
    first.write_text('{"body": "x"}\n')
    assert_user_error(capsys, "data", "list", "--data", first,
                      match="first.jsonl line 1: no string `text` field (its keys: body)")
    late = _late_bad_line(tmp_path / "late.jsonl")
    load_corpus([str(late)])  # the cheap check reads only the first lines
    bad = f"late.jsonl line {stream.PEEK_LINES + 501}: no string `text` field"
    assert_user_error(capsys, "data", "list", "--data", late, match=bad)
    monkeypatch.setattr(stream, "SLICE_BYTES", 4 << 10)  # the bad line read by a worker
    assert_user_error(capsys, "data", "list", "--data", late, "--num-proc", "2", match=bad)
    assert_user_error(capsys, "data", "list", "--num-proc", "0", match="`--num-proc`")
    assert_user_error(capsys, "data", "list", "--data", write_jsonl(tmp_path / "d.jsonl", docs),
                      "--domains", "a,nope", match="unknown domain `nope`")
    nulls = write_parquet(tmp_path / "nulls.parquet", [("a", "x"), ("a", None)])
    assert_user_error(capsys, "data", "list", "--data", nulls, match="null in 1 row(s)")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert_user_error(capsys, "data", "list", "--data", tmp_path / "junk.parquet",
                      match="not a readable Parquet file")
    (tmp_path / "sur.jsonl").write_text('{"text": "a\\ud800b"}\n')
    assert_user_error(capsys, "data", "list", "--data", tmp_path / "sur.jsonl",
                      match="sur.jsonl line 1: `text` holds an unpaired surrogate")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert_user_error(capsys, "data", "list", "--data", tmp_path / "blank.jsonl",
                      match="the corpus is empty")


def test_pretrain_refuses_a_bad_line_before_any_work(capsys, tmp_path):
    out = tmp_path / "run"
    assert_user_error(capsys, "pretrain", "--preset", "tiny", "--data",
                      _late_bad_line(tmp_path / "late.jsonl"), "--seq-len", "32",
                      "--global-batch-tokens", "64", "--micro-batch-size", "2",
                      "--vocab-size", "300", "--out", out, "--no-progress",
                      match=f"line {stream.PEEK_LINES + 501}")
    assert not out.exists()


def test_data_list_shows_streamed_domains_and_sizes(capsys, tmp_path):
    docs = make_docs(90)
    rc, out, _ = run_cli(capsys, "data", "list", "--data",
                         f"{write_jsonl(tmp_path / 'j.jsonl', docs[:60])},"
                         f"{write_parquet(tmp_path / 'p.parquet', docs[60:], 'content')}",
                         "--text-field", "content")
    assert rc == 2  # the JSONL file has no `content` field
    write_jsonl(tmp_path / "j.jsonl", docs[:60], "content")
    rc, out, _ = run_cli(capsys, "data", "list", "--data",
                         f"{tmp_path / 'j.jsonl'},{tmp_path / 'p.parquet'}",
                         "--text-field", "content")
    assert rc == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    for d in "abc":
        n = sum(dom == d for dom, _ in docs)
        mb = sum(len(t.encode()) for dom, t in docs if dom == d) / 1e6
        assert rows[d][0] == str(n) and rows[d][2] == f"{mb:.2f}", (d, rows[d])
    assert rows["total"][0] == "90" and "2 streamed file(s)" in out


def test_cache_keys_a_streamed_file_by_identity_and_refuses_a_change(tmp_path, tokenizer_dir,
                                                                      monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(50))
    tok = Tok.load(tokenizer_dir)
    folder, meta = packed(load_corpus([str(path)]), tok)
    again, meta2 = packed(load_corpus([str(path)]), tok)
    assert again == folder and meta2 == meta
    os.utime(path, ns=(1, 1))  # same bytes, another mtime: a new key (rebuilt, not reused)
    other, _ = packed(load_corpus([str(path)]), tok)
    assert other != folder
    # a file that changes while it is packed: refused, nothing written
    real = pack_mod._write_packed

    def grow(*args):
        meta = real(*args)
        with open(path, "a") as f:
            f.write(json.dumps({"text": "late"}) + "\n")
        return meta

    monkeypatch.setattr(pack_mod, "_write_packed", grow)
    with pytest.raises(UserError, match="changed while it was being packed"):
        pack(load_corpus([str(path)]), tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pretrain_on_parquet_with_a_text_field(capsys, tmp_path):
    docs = make_docs(300, seed=4)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--data",
                         write_parquet(tmp_path / "c.parquet", docs, "content"),
                         "--text-field", "content", "--num-proc", "1", "--seq-len", "32",
                         "--global-batch-tokens", "64", "--micro-batch-size", "2",
                         "--max-steps", "2", "--vocab-size", "300", "--out", out,
                         "--no-progress", "--threads", "1")
    assert rc == 0, err
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert set(meta["domains"]) == {"a", "b", "c"} and meta["val_tokens"] > 0
    assert (out / "final" / "tokenizer.json").is_file()


def test_every_corpus_command_takes_the_text_field(capsys, tmp_path, tiny_llama):
    # eval reads a JSONL corpus by --text-field; every other command that reads a corpus
    # goes through the same `corpus_from`, so none can drop the field
    data = write_jsonl(tmp_path / "c.jsonl", make_docs(200, seed=5), "body")
    rc, out, err = run_cli(capsys, "eval", tiny_llama, "--data", data, "--text-field", "body",
                           "--num-proc", "1", "--seq-len", "32", "--eval-tokens", "256",
                           "--json")
    assert rc == 0, err
    assert json.loads(out)
    src = Path(__file__).parents[1] / "src" / "lmalloy"
    calls = [p for p in src.rglob("*.py")
             if "load_corpus(cfg." in p.read_text() and p.name != "corpus.py"]
    assert not calls, f"use corpus_from(cfg): {calls}"
