"""Greedy soup (Wortsman et al. 2022, arXiv 2203.05482, Recipe 1).

Score every model on held-out data (perplexity with lmalloy's evaluator), sort best first,
start the soup with the best, and add each next model only if the uniform average of the
soup plus it has a lower held-out perplexity than the soup without it. The selected models
are then averaged by the streaming engine like any uniform soup.
"""

from __future__ import annotations

import sys

from lmalloy.errors import UserError


def _heldout(cfg):
    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.pack import load_tokens, pack
    from lmalloy.data.tokenizer import Tok
    from lmalloy.eval.perplexity import cache_dir

    tok = Tok.load(cfg.base_model or cfg.models[0].model)
    corpus = load_corpus(cfg.data, cfg.domains, cfg.exclude_domains, cfg.max_chars_per_domain,
                         quiet=True)
    folder = cache_dir() / "packed" / tok.fingerprint()
    meta = pack(corpus, tok, folder, cfg.val_fraction, 0)
    tokens = load_tokens(folder, cfg.eval_split, meta)
    spans = {n: tuple(d[cfg.eval_split]) for n, d in meta["domains"].items()}
    return tokens, spans, tok.token_bytes()


def greedy_select(cfg) -> tuple[list, list[str]]:
    """(the chosen ModelEntry list, notes for merge_config.yaml)."""
    import torch

    from lmalloy.eval.perplexity import evaluate, load_causal_lm

    tokens, spans, tb = _heldout(cfg)

    def score(model) -> float:
        r = evaluate(model, tokens, spans, cfg.seq_len, cfg.eval_tokens, tb)
        if not r["tokens"]:
            raise UserError(f"greedy_soup: no held-out tokens (documents shorter than "
                            f"--seq-len {cfg.seq_len}?)")
        return r["loss"]

    model = load_causal_lm(cfg.models[0].model)
    scores = {}
    for m in cfg.models:
        sd = load_causal_lm(m.model).state_dict()
        model.load_state_dict(sd)
        scores[m.model] = score(model)
        print(f"greedy_soup: {m.model}: held-out loss {scores[m.model]:.4f}", file=sys.stderr)
    order = sorted(cfg.models, key=lambda m: scores[m.model])
    soup = [order[0]]
    total = {k: v.float().clone() for k, v in load_causal_lm(order[0].model).state_dict().items()}
    best = scores[order[0].model]
    notes = ["greedy_soup held-out loss per model: "
             + ", ".join(f"{m.model}={scores[m.model]:.4f}" for m in order)]
    for m in order[1:]:
        cand = load_causal_lm(m.model).state_dict()
        k = len(soup) + 1
        with torch.no_grad():
            model.load_state_dict({n: (total[n] + cand[n].float()) / k for n in total})
        s = score(model)
        keep = s < best
        print(f"greedy_soup: + {m.model}: soup loss {s:.4f} ({'kept' if keep else 'skipped'})",
              file=sys.stderr)
        notes.append(f"greedy_soup + {m.model}: {s:.4f} {'kept' if keep else 'skipped'}")
        if keep:
            soup.append(m)
            best = s
            for n in total:
                total[n] += cand[n].float()
        del cand
    notes.append("greedy_soup chose: " + ", ".join(m.model for m in soup))
    return soup, notes
