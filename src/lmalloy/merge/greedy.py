"""Greedy soup (Wortsman et al. 2022, arXiv 2203.05482, Recipe 1).

Score every model on held-out data (perplexity with lmalloy's evaluator), sort best first,
start the soup with the best, and add each next model only if the uniform average of the
soup plus it has a lower held-out loss than the soup without it. Each candidate soup is
the streaming weighted average (`lmalloy.average.weighted`) assembled in memory and loaded
into one model: memory holds one model and one averaged state, not the N inputs. The
chosen models are then averaged into the output like any uniform soup, and the choice is
written beside it as `greedy_soup.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmalloy.errors import UserError


def heldout_tokens(cfg) -> tuple:
    """(val or train tokens, {domain: span}, UTF-8 bytes per token) of the corpus the config
    chooses, split as training splits it, packed once into the shared cache."""
    from lmalloy.data.cache import packed
    from lmalloy.data.corpus import corpus_from
    from lmalloy.data.pack import load_tokens
    from lmalloy.data.tokenizer import Tok

    tok = Tok.load(cfg.base_model or cfg.models[0].model)
    corpus = corpus_from(cfg, quiet=True)
    folder, meta = packed(corpus, tok, cfg.val_fraction, cfg.split_seed)
    tokens = load_tokens(folder, cfg.eval_split, meta)
    spans = {n: tuple(d[cfg.eval_split]) for n, d in meta["domains"].items()}
    return tokens, spans, tok.token_bytes()


def greedy_select(cfg) -> tuple:
    """(cfg with the chosen models, notes for merge_config.yaml, {file: text} to write)."""
    from lmalloy.average.weighted import Combination, averaged_model
    from lmalloy.io.folder import open_model
    from lmalloy.io.models import load_causal_lm
    from lmalloy.train.heldout import evaluate

    tokens, spans, tb = heldout_tokens(cfg)
    folders = {m.model: open_model(m.model) for m in cfg.models}

    def score(members: list) -> float:
        with averaged_model([folders[m.model] for m in members],
                            Combination.uniform(len(members)), load_causal_lm, Path(cfg.out),
                            folders[members[0].model]) as model:
            r = evaluate(model, tokens, spans, cfg.seq_len, cfg.eval_tokens, tb)
        if not r["tokens"]:
            raise UserError(f"greedy_soup: no held-out tokens (documents shorter than "
                            f"--seq-len {cfg.seq_len}?)")
        return r["loss"]

    scores = {}
    for m in cfg.models:
        scores[m.model] = score([m])
        print(f"greedy_soup: {m.model}: held-out loss {scores[m.model]:.4f}", file=sys.stderr)
    order = sorted(cfg.models, key=lambda m: scores[m.model])
    soup, best = [order[0]], scores[order[0].model]
    steps = []
    for m in order[1:]:
        s = score([*soup, m])
        keep = s < best
        print(f"greedy_soup: + {m.model}: soup loss {s:.4f} ({'kept' if keep else 'skipped'})",
              file=sys.stderr)
        steps.append({"model": m.model, "soup_loss": s, "kept": keep})
        if keep:
            soup.append(m)
            best = s
    notes = ["greedy_soup held-out loss per model: "
             + ", ".join(f"{m.model}={scores[m.model]:.4f}" for m in order)]
    notes += [f"greedy_soup + {x['model']}: {x['soup_loss']:.4f} "
              f"{'kept' if x['kept'] else 'skipped'}" for x in steps]
    notes.append("greedy_soup chose: " + ", ".join(m.model for m in soup))
    record = {"scores": scores, "order": [m.model for m in order], "steps": steps,
              "chosen": [m.model for m in soup], "soup_loss": best}
    return (cfg.model_copy(update={"models": soup}), notes,
            {"greedy_soup.json": json.dumps(record, indent=1) + "\n"})
