"""Corpora, tokenizer and packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common import assert_user_error, run_cli
from lmalloy.data.corpus import load_corpus
from lmalloy.data.pack import EpochSampler, load_tokens, pack, split_documents
from lmalloy.data.tokenizer import EOS, PAD, Tok, train_tokenizer
from lmalloy.errors import UserError


def test_stdlib_corpus_is_deterministic_and_split_by_package():
    a = load_corpus(["stdlib"], domains=["json", "email"])
    b = load_corpus(["stdlib"], domains=["json", "email"])
    assert [d.name for d in a.documents] == [d.name for d in b.documents]
    assert set(a.domains()) == {"json", "email"}
    assert any(d.name == "json/decoder.py" for d in a.documents)


def test_user_sources_files_folders_globs_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hello world")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.md").write_text("second doc")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n"
                                      + json.dumps({"text": "two", "domain": "z"}) + "\n")
    c = load_corpus([str(tmp_path)], quiet=True)
    assert {d.text for d in c.documents} >= {"hello world", "second doc", "one", "two"}
    assert len(c.skipped) == 1 and c.skipped[0].endswith("latin1.txt")
    assert c.domains()["a"][0].text == "hello world" and "z" in c.domains()
    g = load_corpus([str(tmp_path / "*" / "*.txt")])
    assert [d.text for d in g.documents] == ["hello world"]


def test_bad_corpora(tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        load_corpus([str(tmp_path / "*.nothing")])
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "bin.dat").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(UserError, match="corpus is empty.*skipped 1"):
        load_corpus([str(tmp_path / "e")], quiet=True)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match="line 2"):
        load_corpus([str(tmp_path / "bad.jsonl")])
    with pytest.raises(UserError, match="did you mean `json`"):
        load_corpus(["stdlib"], domains=["jsn"])
    # an excluded stdlib domain is not read, and is not "unknown" either
    c = load_corpus(["stdlib"], domains=["json", "tomllib"], exclude=["json"])
    assert {d.domain for d in c.documents} == {"tomllib"}


def test_data_list_cli(capsys):
    rc, out, _ = run_cli(capsys, "data", "list", "--domains", "json,email")
    assert rc == 0 and "email" in out and "json" in out and "total" in out


def test_tokenizer_round_trip_and_transformers(tmp_path):
    texts = ["def f(x):\n    return x * 2  # ünïcödé ✓\n", "import os\nprint(os.sep)\n"] * 30
    train_tokenizer(texts, 300, tmp_path / "tok", min_frequency=1)
    tok = Tok.load(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.tk.token_to_id(EOS) == 0 and tok.pad_id == 1
    probe = "class Ω:\n\tpass  # never seen: 漢字 \x00 🙂\n"
    ids = tok.encode(probe)
    assert tok.decode(ids) == probe
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf.encode(probe, add_special_tokens=False) == ids
    assert hf.eos_token == EOS and hf.pad_token == PAD
    tb = tok.token_bytes()
    assert tb[0] == 0 and tb[1] == 0
    assert sum(int(tb[i]) for i in ids) == len(probe.encode())


def test_vocab_too_small(capsys, tmp_path):
    assert_user_error(capsys, "tokenizer", "--vocab-size", "200", "--out", tmp_path / "t",
                      match="at least 258")
    assert not (tmp_path / "t").exists()


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer_dir):
    corpus = load_corpus(["stdlib"], domains=["json", "tomllib", "zoneinfo"])
    tok = Tok.load(tokenizer_dir)
    out = tmp_path_factory.mktemp("packed")
    meta = pack(corpus, tok, out, val_fraction=0.2, seed=3)
    return corpus, tok, out, meta


def test_pack_split_by_document_with_eos(packed):
    corpus, tok, out, meta = packed
    train, val = load_tokens(out, "train", meta), load_tokens(out, "val", meta)
    n_docs = len(corpus.documents)
    assert int((train == tok.eos_id).sum() + (val == tok.eos_id).sum()) == n_docs
    assert not (train == tok.pad_id).any() and not (val == tok.pad_id).any()
    for name, d in meta["domains"].items():
        assert d["val_docs"] >= 1 and d["train_docs"] >= 1, name
    # every document is in exactly one split, whole: re-encode and find it
    ids = tok.encode_batch([d.text for d in corpus.documents])
    total = sum(len(x) + 1 for x in ids)
    assert meta["train_tokens"] + meta["val_tokens"] == total
    # deterministic: packing again gives identical files
    meta2 = pack(corpus, tok, out / "again", val_fraction=0.2, seed=3)
    assert np.array_equal(load_tokens(out / "again", "train", meta2), train)


def test_every_token_once_per_epoch_no_padding(packed):
    _, tok, out, meta = packed
    train = load_tokens(out, "train", meta)
    T = 32
    s = EpochSampler(len(train), T, seed=7)
    n = s.num_chunks
    assert len(train) - 1 - n * T < T  # only the final partial chunk is left out
    for epoch in range(2):
        seen = np.zeros(len(train), dtype=np.int64)
        ids = s.chunk_ids(epoch * n, n)
        assert sorted(ids.tolist()) == list(range(n))
        x, y = s.batch(train, epoch * n, n)
        for row, c in enumerate(ids):
            seen[c * T : c * T + T] += 1
            assert np.array_equal(x[row].numpy(), train[c * T : c * T + T])
            assert np.array_equal(y[row].numpy(), train[c * T + 1 : c * T + T + 1])
        assert (seen[: n * T] == 1).all() and (seen[n * T :] == 0).all()
        assert not (x == tok.pad_id).any()
    # epochs differ in order; a batch spanning an epoch boundary is the two epochs joined
    assert not np.array_equal(s.chunk_ids(0, n), s.chunk_ids(n, n))
    both = s.chunk_ids(n - 3, 6)
    assert np.array_equal(both, np.concatenate([s.chunk_ids(n - 3, 3), s.chunk_ids(n, 3)]))


def test_held_corpus_packs_to_the_reference_layout(packed):
    # the layout the streaming packer must keep for held corpora (stdlib, text files):
    # per split, per domain in order of first appearance, each document's ids then EOS
    corpus, tok, out, meta = packed
    is_val = split_documents(corpus, 0.2, 3)
    ids = tok.encode_batch([d.text for d in corpus.documents])
    order = list(dict.fromkeys(d.domain for d in corpus.documents))
    for split, want in (("train", False), ("val", True)):
        ref = [x + [tok.eos_id] for dom in order
               for d, x, v in zip(corpus.documents, ids, is_val, strict=True)
               if d.domain == dom and v == want]
        ref = np.array([t for x in ref for t in x], dtype=np.uint16)
        assert (out / f"{split}.bin").read_bytes() == ref.tobytes(), split
    assert list(meta["domains"]) == order
    assert list(meta) == ["dtype", "eos_id", "pad_id", "vocab_size", "domains", "train_tokens",
                          "val_tokens", "key"]


def test_a_pool_repeats_one_subset_of_every_part(packed):
    """`--unique-tokens`: each epoch is a new order of the same seeded subset of chunks,
    drawn from the whole file (not its first domains)."""
    _, _, out, meta = packed
    train = load_tokens(out, "train", meta)
    T = 16
    full = EpochSampler(len(train), T, seed=3)
    s = EpochSampler(len(train), T, seed=3, pool=full.num_chunks // 4)
    n = s.num_chunks
    assert n == full.num_chunks // 4 and s.all_chunks == full.num_chunks
    first = s.chunk_ids(0, n)
    assert len(set(first.tolist())) == n
    for epoch in range(1, 3):
        again = s.chunk_ids(epoch * n, n)
        assert sorted(again.tolist()) == sorted(first.tolist())
        assert not np.array_equal(again, first)
    assert first.max() > full.num_chunks // 2  # spread over the file
    # without a pool, or with one as large as the file, it is the plain sampler
    same = EpochSampler(len(train), T, seed=3, pool=10 ** 9)
    assert np.array_equal(same.chunk_ids(0, full.num_chunks), full.chunk_ids(0, full.num_chunks))
