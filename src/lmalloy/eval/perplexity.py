"""`lmalloy eval`: perplexity and bits per byte of models on a corpus or domain.

The evaluator itself is `lmalloy.train.heldout` (the trainer's); this command checks every
model folder first (headers, context length, tokenizer identity), packs the corpus once
into the shared cache (`lmalloy.data.cache`) and prints a table or JSON.
"""

from __future__ import annotations

import json
import sys

from lmalloy.errors import UserError


def _check_models(cfg) -> None:
    """Every input before loading any: readable headers, the window fits, one tokenizer."""
    from pathlib import Path

    from lmalloy.io.folder import open_model
    from lmalloy.io.tokenizer_files import check_same_tokenizer

    for p in cfg.models:
        open_model(p, allow_pickle=cfg.allow_pickle).check_seq_len(cfg.seq_len)
    tok_dir = cfg.tokenizer or cfg.models[0]
    check_same_tokenizer([Path(tok_dir), *map(Path, cfg.models)],
                         hint=" (each model is scored with one tokenizer: evaluate them "
                         "in separate runs)")


def _score(model, folder, meta, splits: list[str], cfg, tb) -> dict:
    from lmalloy.data.pack import load_tokens
    from lmalloy.train.heldout import evaluate, summarize

    per: dict = {}
    for split in splits:
        tokens = load_tokens(folder, split, meta)
        spans = {n: tuple(d[split]) for n, d in meta["domains"].items()}
        r = evaluate(model, tokens, spans, cfg.seq_len, cfg.eval_tokens // len(splits), tb,
                     cfg.batch_size)
        for n, d in r["domains"].items():
            acc = per.setdefault(n, [0.0, 0, 0])
            acc[0] += d["nll"]
            acc[1] += d["tokens"]
            acc[2] += d["bytes"]
    return summarize(per)


def _print_table(cfg, results: dict) -> None:
    w = max(len(p) for p in cfg.models)
    print(f"{'model':<{w}}  {'domain':<16} {'tokens':>9} {'loss':>8} {'ppl':>9} {'bpb':>7}")
    for p, r in results.items():
        rows = [("all", r)] + (sorted(r["domains"].items()) if cfg.per_domain else [])
        for name, d in rows:
            print(f"{p:<{w}}  {name:<16} {d['tokens']:>9} {d['loss']:>8.4f} {d['ppl']:>9.2f} "
                  f"{d['bpb']:>7.4f}")


def main(cfg) -> int:
    from lmalloy.data.cache import packed
    from lmalloy.data.corpus import corpus_from
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.models import load_causal_lm

    _check_models(cfg)
    tok = Tok.load(cfg.tokenizer or cfg.models[0])
    corpus = corpus_from(cfg)
    folder, meta = packed(corpus, tok, cfg.val_fraction, cfg.seed)
    splits = ["train", "val"] if cfg.split == "all" else [cfg.split]
    tb = tok.token_bytes()
    results = {}
    for p in cfg.models:
        model = load_causal_lm(p, cfg.allow_pickle)
        if model.config.vocab_size < tok.vocab_size:
            raise UserError(f"{p}: vocabulary {model.config.vocab_size} is smaller than the "
                            f"tokenizer's {tok.vocab_size}")
        results[p] = _score(model, folder, meta, splits, cfg, tb)
        if not results[p]["tokens"]:
            raise UserError(f"no {cfg.split} tokens to evaluate (documents shorter than "
                            f"--seq-len {cfg.seq_len}?)")
        del model
    if cfg.json_output:
        print(json.dumps(results, indent=2))
    else:
        _print_table(cfg, results)
    sys.stdout.flush()
    return 0
