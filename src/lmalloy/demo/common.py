"""What several demo stages share: training runs that feed the time budget, the held-out
tokens of some domains, and models scored on them with lmalloy's one evaluator
(`lmalloy.train.heldout.evaluate`).

The tokens come from the shared pack cache (`lmalloy.data.cache.packed`), so two stages
that evaluate on the same corpus, tokenizer and split pack it once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def train_run(ctx, command: str, out: Path, rate: str | None = None, **fields) -> dict:
    """`lmalloy pretrain` or `finetune` into `out`, in-process. Returns {"records" (the
    run's metrics), "seconds", "tokens_per_s" (median of its training logs)}; the
    throughput updates the budget's rate `rate` (e.g. `train:large`), so later estimates
    follow the machine's load."""
    from lmalloy.io.runs import METRICS_FILE
    from lmalloy.train.plot import read_metrics

    fields.setdefault("progress", False)
    t0 = time.perf_counter()
    ctx.call(command, out=str(out), overwrite=True, threads=ctx.threads, **fields)
    secs = time.perf_counter() - t0
    records = read_metrics(Path(out) / METRICS_FILE)
    tps = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    median = tps[len(tps) // 2] if tps else float("nan")
    if rate and tps:
        ctx.budget.rates.observe(rate, median, f"{command} {Path(out).name}")
    return {"records": records, "seconds": secs, "tokens_per_s": median}


def evals_of(records: list[dict]) -> list[dict]:
    """The evaluation records of a run's metrics."""
    return [r for r in records if "eval" in r]


def window_losses(result: dict) -> np.ndarray:
    """The per-window losses of an `evaluate(..., per_window=True)` result, domains in
    order, as one array (the same order for every model evaluated on the same windows)."""
    return np.asarray([x for w in result["windows"].values() for x in w], dtype=np.float64)


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
                    per_domain: bool = False, per_window: bool = False
                    ) -> dict[str, dict[str, dict]]:
    """{model name: {"all" and each domain: loss, ppl, bpb, tokens}} for {name: HF folder}.

    per_domain=False: one evaluation over all domains, `eval_tokens` shared in proportion
    to their sizes (a domain too short for one window is left out). per_domain=True: each
    domain evaluated alone on up to `eval_tokens` tokens (no "all"). per_window: each
    result also has "windows" (`lmalloy.train.heldout.evaluate`).
    """
    from lmalloy.io.models import load_causal_lm
    from lmalloy.train.heldout import evaluate, evaluate_domains

    out = {}
    for name, path in models.items():
        model = load_causal_lm(path)
        if per_domain:
            out[name] = evaluate_domains(model, data.tokens, data.spans, seq_len, eval_tokens,
                                         data.token_bytes, per_window=per_window)
        else:
            r = evaluate(model, data.tokens, data.spans, seq_len, eval_tokens,
                         data.token_bytes, per_window=per_window)
            out[name] = {"all": r, **r["domains"]}
        del model
    return out
