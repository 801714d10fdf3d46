"""Perplexity and bits per byte over packed validation tokens.

Windows are non-overlapping, `seq_len` tokens of input each, and never cross a domain
boundary. bits/byte = Σ NLL (nats) / ln 2 / Σ UTF-8 bytes of the predicted tokens (special
tokens count 0 bytes), so it compares models with different tokenizers.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from lmalloy.errors import UserError


def eval_windows(spans: dict[str, tuple[int, int]], seq_len: int, max_tokens: int
                 ) -> list[tuple[str, int]]:
    """(domain, start) of each window: the first windows of each domain, the budget shared
    in proportion to the domains' sizes, at least one window per non-empty domain."""
    total = sum(max(0, b - a - 1) for a, b in spans.values())
    out = []
    for name, (a, b) in spans.items():
        n = max(0, (b - a - 1) // seq_len)
        if n == 0:
            continue
        share = max(1, int(max_tokens * (b - a - 1) / max(total, 1)) // seq_len)
        out += [(name, a + i * seq_len) for i in range(min(n, share))]
    return out


def evaluate(model, tokens: np.ndarray, spans: dict[str, tuple[int, int]], seq_len: int,
             max_tokens: int, token_bytes: np.ndarray | None = None, batch_size: int = 8,
             autocast: bool = False, logits_fn=None) -> dict:
    """Loss, perplexity and bits per byte, overall and per domain.

    `logits_fn(input_ids) -> logits (B, T, V)` replaces `model(...)` when given (e.g. a
    proxy-tuned ensemble); `model` may then be None.
    """
    import torch
    import torch.nn.functional as F

    windows = eval_windows(spans, seq_len, max_tokens)
    per: dict[str, list[float]] = {n: [0.0, 0, 0] for n in spans}  # nll, tokens, bytes
    if model is not None:
        was_training = model.training
        model.eval()
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    tb = torch.from_numpy(token_bytes.astype(np.int64)) if token_bytes is not None else None
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64)
                             for _, s in batch])
            t = torch.from_numpy(rows).to(device)
            x, y = t[:, :-1], t[:, 1:]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = logits_fn(x) if logits_fn is not None else model(input_ids=x).logits
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                  reduction="none").view(y.shape)  # (B, T)
            for j, (name, _) in enumerate(batch):
                per[name][0] += float(nll[j].sum())
                per[name][1] += y.shape[1]
                if tb is not None:
                    per[name][2] += int(tb[y[j].cpu()].sum())
    if model is not None and was_training:
        model.train()
    return summarize(per)


def summarize(per: dict[str, list]) -> dict:
    def row(nll: float, n: int, nbytes: int) -> dict:
        loss = nll / n if n else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 50)) if n else float("nan"),
                "bpb": nll / math.log(2) / nbytes if nbytes else float("nan"), "tokens": n,
                "nll": nll, "bytes": nbytes}

    tot = [sum(v[k] for v in per.values()) for k in range(3)]
    out = row(*tot)
    out["domains"] = {n: row(*v) for n, v in per.items() if v[1]}
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("LMALLOY_CACHE", Path.home() / ".cache" / "lmalloy"))


def load_causal_lm(path: str, allow_pickle: bool = False, dtype: str = "float32"):
    """AutoModelForCausalLM from a local folder; checks the folder first (safe by default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmalloy.io.folder import open_model

    m = open_model(path, allow_pickle=allow_pickle)
    archs = m.config.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UserError(f"{path}: {archs[0]} is not a causal language model")
    kw = {}
    if m.pickle_state is not None:
        kw["state_dict"] = m.pickle_state
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: transformers cannot load it as a causal LM "
                        f"({str(e).splitlines()[0][:200]})") from None
    model.eval()
    return model


def main(cfg) -> int:
    import torch

    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.pack import load_tokens, pack
    from lmalloy.data.tokenizer import Tok
    from lmalloy.io.folder import open_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for p in cfg.models:  # validate every input before loading any
        m = open_model(p, allow_pickle=cfg.allow_pickle)
        limit = m.config.get("max_position_embeddings")
        if limit and cfg.seq_len > limit:
            raise UserError(f"`--seq-len` {cfg.seq_len} is above {p}'s maximum of {limit}")
    tok = Tok.load(cfg.tokenizer or cfg.models[0])
    corpus = load_corpus(cfg.data, cfg.domains, cfg.exclude_domains, cfg.max_chars_per_domain)
    folder = cache_dir() / "packed" / f"{tok.fingerprint()}"
    meta = pack(corpus, tok, folder, cfg.val_fraction, cfg.seed)
    splits = ["train", "val"] if cfg.split == "all" else [cfg.split]
    tb = tok.token_bytes()
    results = {}
    for p in cfg.models:
        model = load_causal_lm(p, cfg.allow_pickle)
        if model.config.vocab_size < tok.vocab_size:
            raise UserError(f"{p}: vocabulary {model.config.vocab_size} is smaller than the "
                            f"tokenizer's {tok.vocab_size}")
        per: dict = {}
        for split in splits:
            tokens = load_tokens(folder, split, meta)
            spans = {n: tuple(d[split]) for n, d in meta["domains"].items()}
            r = evaluate(model, tokens, spans, cfg.seq_len, cfg.max_tokens // len(splits), tb,
                         cfg.batch_size)
            for n, d in r["domains"].items():
                acc = per.setdefault(n, [0.0, 0, 0])
                acc[0] += d["nll"]
                acc[1] += d["tokens"]
                acc[2] += d["bytes"]
        results[p] = summarize(per)
        if not results[p]["tokens"]:
            raise UserError(f"no {cfg.split} tokens to evaluate (documents shorter than "
                            f"--seq-len {cfg.seq_len}?)")
        del model
    if cfg.json_output:
        print(json.dumps(results, indent=2))
        return 0
    w = max(len(p) for p in cfg.models)
    print(f"{'model':<{w}}  {'domain':<16} {'tokens':>9} {'loss':>8} {'ppl':>9} {'bpb':>7}",
          file=sys.stdout)
    for p, r in results.items():
        rows = [("all", r)] + (sorted(r["domains"].items()) if cfg.per_domain else [])
        for name, d in rows:
            print(f"{p:<{w}}  {name:<16} {d['tokens']:>9} {d['loss']:>8.4f} {d['ppl']:>9.2f} "
                  f"{d['bpb']:>7.4f}")
    return 0
