"""Held-out loss, perplexity and bits per byte over packed tokens: the one evaluator.

The trainer evaluates with it during training; `lmalloy eval`, `proxy eval`, greedy soup
and the demo call it too. Windows are non-overlapping, `seq_len` tokens of input each,
and never cross a domain boundary. bits/byte = Σ NLL (nats) / ln 2 / Σ UTF-8 bytes of the
predicted tokens (special tokens count 0 bytes), so it compares models with different
tokenizers. A non-finite loss is an error (a NaN weight must not pass as a score).
"""

from __future__ import annotations

import math

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
    for name, (nll, _, _) in per.items():
        if not math.isfinite(nll):
            raise UserError(f"evaluation gave a non-finite loss on `{name}`: the model's "
                            "weights or logits hold NaN/Inf")
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
