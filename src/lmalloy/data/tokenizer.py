"""Byte-level BPE tokenizers, saved as Hugging Face tokenizer folders.

A trained tokenizer has 256 byte tokens (GPT-2's byte-to-unicode alphabet, so every
string round-trips), the merges learned by `tokenizers`' BPE trainer, and two special
tokens: `<|endoftext|>` (id 0: BOS/EOS, the document separator in packed data) and
`<|pad|>` (id 1: used only for batching prompts, never inside packed sequences).
The folder holds `tokenizer.json` and `tokenizer_config.json` and loads with
`transformers.AutoTokenizer` (as `PreTrainedTokenizerFast`).

`Tok` wraps a folder for lmalloy's own use: fast batch encoding through `tokenizers`
without importing transformers, plus the per-token UTF-8 byte lengths that bits per byte
needs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmalloy.errors import UserError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIALS = [EOS, PAD]
MIN_VOCAB = 256 + len(SPECIALS)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: Path,
                    min_frequency: int = 2, model_max_length: int = 2048) -> None:
    """Train a byte-level BPE and write it (tokenizer.json, tokenizer_config.json) to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(f"`--vocab-size` must be at least {MIN_VOCAB} (256 byte tokens + "
                        f"{len(SPECIALS)} special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
           "pad_token": PAD, "unk_token": None, "model_max_length": model_max_length,
           "clean_up_tokenization_spaces": False, "add_bos_token": False,
           "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")


@dataclass
class Tok:
    """A tokenizer folder opened with `tokenizers` (no transformers import)."""

    path: Path
    tk: object
    eos_id: int
    pad_id: int | None
    vocab_size: int

    @classmethod
    def load(cls, path: str | Path) -> Tok:
        from tokenizers import Tokenizer

        p = Path(path)
        f = p / "tokenizer.json"
        if not f.is_file():
            raise UserError(f"{p}: no tokenizer.json (expected an HF tokenizer folder)")
        tk = Tokenizer.from_file(str(f))
        cfg_path = p / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def tok_id(key: str) -> int | None:
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return tk.token_to_id(v) if isinstance(v, str) else None

        eos = tok_id("eos_token")
        if eos is None:
            eos = tk.token_to_id(EOS)
        if eos is None:
            raise UserError(f"{p}: the tokenizer has no eos_token to separate documents")
        return cls(p, tk, eos, tok_id("pad_token"), tk.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def token_bytes(self):
        """UTF-8 byte length of each token id (0 for special tokens): a numpy int32 array."""
        import numpy as np

        specials = set(self.tk.get_added_tokens_decoder())
        out = np.zeros(self.vocab_size, dtype=np.int32)
        byte_decoder = _byte_decoder()
        vocab = self.tk.get_vocab(with_added_tokens=True)
        for piece, i in vocab.items():
            if i in specials or i >= self.vocab_size:
                continue
            if all(ch in byte_decoder for ch in piece):
                out[i] = len(piece)  # one unicode char per byte in byte-level BPE
            else:
                out[i] = len(self.tk.decode([i]).encode("utf-8"))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256((self.path / "tokenizer.json").read_bytes()).hexdigest()[:16]


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def main(cfg) -> int:
    """`lmalloy tokenizer`: train a byte-level BPE on a corpus (streamed files included)."""
    import time
    from itertools import islice

    from lmalloy.data.corpus import corpus_from, scan
    from lmalloy.io.writer import atomic_output, check_output

    out = check_output(cfg.out, cfg.overwrite)
    corpus = corpus_from(cfg)
    scan(corpus)  # every streamed line checked before training
    t0 = time.perf_counter()
    with atomic_output(out, cfg.overwrite) as tmp:
        train_tokenizer(corpus.texts(), cfg.vocab_size, tmp, cfg.min_frequency)
    tok = Tok.load(out)
    sample = list(islice(corpus.texts(), 200))
    n_chars = sum(len(t) for t in sample)
    n_tok = sum(len(x) for x in tok.encode_batch(sample))
    print(f"tokenizer: {tok.vocab_size} tokens, {n_chars / max(n_tok, 1):.2f} chars/token, "
          f"trained in {time.perf_counter() - t0:.1f}s -> {out}", file=sys.stderr)
    return 0
