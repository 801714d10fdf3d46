"""What several demo stages share: the held-out tokens of some domains, and models scored on
them with lmalloy's one evaluator (`lmalloy.train.heldout.evaluate`).

The tokens come from the shared pack cache (`lmalloy.data.cache.packed`), so two stages
that evaluate on the same corpus, tokenizer and split pack it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Heldout:
    tokens: np.ndarray  # (N,) the validation split of every domain, packed
    spans: dict[str, tuple[int, int]]  # domain -> [start, end) in `tokens`
    token_bytes: np.ndarray  # (V,) UTF-8 bytes of each token (for bits per byte)


def heldout(tokenizer: str, domains: list[str], max_chars_per_domain: int | None,
            val_fraction: float, seed: int, data: list[str] | None = None) -> Heldout:
    """The validation documents of `domains`, split as a fine-tune with these data settings
    splits them (so no model fine-tuned on them has seen these tokens)."""
    from lmalloy.data.cache import packed
    from lmalloy.data.corpus import load_corpus
    from lmalloy.data.pack import load_tokens
    from lmalloy.data.tokenizer import Tok

    tok = Tok.load(tokenizer)
    corpus = load_corpus(data or ["stdlib"], domains, [], max_chars_per_domain, quiet=True)
    folder, meta = packed(corpus, tok, val_fraction, seed)
    return Heldout(load_tokens(folder, "val", meta),
                   {d: tuple(meta["domains"][d]["val"]) for d in domains}, tok.token_bytes())


def evaluate_models(models: dict[str, str], data: Heldout, seq_len: int, eval_tokens: int,
                    per_domain: bool = False) -> dict[str, dict[str, dict]]:
    """{model name: {"all" and each domain: loss, ppl, bpb, tokens}} for {name: HF folder}.

    per_domain=False: one evaluation over all domains, `eval_tokens` shared in proportion
    to their sizes (a domain too short for one window is left out). per_domain=True: each
    domain evaluated alone on up to `eval_tokens` tokens (no "all").
    """
    from lmalloy.io.models import load_causal_lm
    from lmalloy.train.heldout import evaluate, evaluate_domains

    out = {}
    for name, path in models.items():
        model = load_causal_lm(path)
        if per_domain:
            out[name] = evaluate_domains(model, data.tokens, data.spans, seq_len, eval_tokens,
                                         data.token_bytes)
        else:
            r = evaluate(model, data.tokens, data.spans, seq_len, eval_tokens,
                         data.token_bytes)
            out[name] = {"all": r, **r["domains"]}
        del model
    return out
