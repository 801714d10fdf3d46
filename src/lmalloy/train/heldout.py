"""Held-out loss, perplexity and bits per byte over packed tokens, and multiple-choice
accuracy: the one evaluator.

The trainer evaluates with it during training; `lmalloy eval`, `proxy eval`, greedy soup,
`merge search` and the demo call it too. Windows are non-overlapping, `seq_len` tokens of input each,
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
             autocast: bool = False, logits_fn=None, per_window: bool = False) -> dict:
    """Loss, perplexity and bits per byte, overall and per domain.

    `logits_fn(input_ids) -> logits (B, T, V)` replaces `model(...)` when given (e.g. a
    proxy-tuned ensemble); `model` may then be None. `per_window`: also "windows", {domain:
    [mean loss of each window, in order]}, for paired intervals (the same windows for every
    model evaluated with the same spans, `seq_len` and `max_tokens`).
    """
    import torch
    import torch.nn.functional as F

    windows = eval_windows(spans, seq_len, max_tokens)
    per: dict[str, list[float]] = {n: [0.0, 0, 0] for n in spans}  # nll, tokens, bytes
    win: dict[str, list[float]] = {}
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
                if per_window:
                    win.setdefault(name, []).append(float(nll[j].mean()))
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
    out = summarize(per)
    if per_window:
        out["windows"] = win
    return out


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


def evaluate_domains(model, tokens: np.ndarray, spans: dict[str, tuple[int, int]],
                     seq_len: int, max_tokens: int, token_bytes: np.ndarray | None = None,
                     **kw) -> dict[str, dict]:
    """Each domain evaluated alone on up to `max_tokens` of its own tokens (not a share of
    one budget): {domain: `evaluate`'s result}. Their mean loss weighs every domain alike."""
    return {d: evaluate(model, tokens, {d: span}, seq_len, max_tokens, token_bytes, **kw)
            for d, span in spans.items()}


# ------------------------------------------------------------------ multiple choice
# Items {"context": str, "choices": [str, ...], "answer": index} (`lmalloy.data.jsonl.
# read_choices`), ranked by the log-likelihood of each choice after its context, as
# lm-evaluation-harness ranks them: the sum (its `acc`) or, with `normalize`, the mean per
# token.

def choice_rows(tok, items) -> list[list[tuple[list[int], list[int]]]]:
    """Per item and choice, (context ids, continuation ids) for a `Tok`: the context after
    the end-of-document token (where every packed document starts), the continuation the
    tokens that encoding context + choice adds (the choice alone where that changes the
    context's own tokens), as lm-evaluation-harness splits them."""
    rows = []
    for it in items:
        ctx = tok.encode(it["context"])
        per = []
        for ch in it["choices"]:
            whole = tok.encode(it["context"] + ch)
            cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else tok.encode(ch)
            per.append(([tok.eos_id, *ctx], cont))
        rows.append(per)
    return rows


def continuation_logprobs(model, rows: list[tuple[list[int], list[int]]], batch_size: int = 8
                          ) -> list[dict]:
    """{"logprob": Σ log p (nats), "tokens": n} of each continuation after its context;
    rows are right-padded into batches (a causal model never sees the padding)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = rows[s : s + batch_size]
            width = max(len(c) + len(x) for c, x in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
            for i, (c, x) in enumerate(batch):
                ids[i, : len(c) + len(x)] = torch.tensor(c + x)
            logits = model(input_ids=ids.to(device)).logits.float()  # (B, T, V)
            for i, (c, x) in enumerate(batch):
                if not x:
                    out.append({"logprob": 0.0, "tokens": 0})
                    continue
                lp = logits[i, len(c) - 1 : len(c) + len(x) - 1].log_softmax(-1)  # (n, V)
                tgt = torch.tensor(x, device=lp.device)
                out.append({"logprob": float(lp.gather(-1, tgt[:, None]).sum()),
                            "tokens": len(x)})
    return out


def rank_choices(items, scores: list[dict], normalize: bool = False) -> dict:
    """Accuracy of picking each item's best-scored choice. `scores`: one {"logprob",
    "tokens"} per choice, item after item. Returns {"accuracy", "predictions",
    "answer_logprob": the mean per-token log-probability of the right answers}."""
    preds, right, k = [], [], 0
    for it in items:
        sc = scores[k : k + len(it["choices"])]
        k += len(it["choices"])
        v = [s["logprob"] / max(s["tokens"], 1) if normalize else s["logprob"] for s in sc]
        preds.append(max(range(len(v)), key=v.__getitem__))
        a = sc[it["answer"]]
        right.append(a["logprob"] / max(a["tokens"], 1))
    acc = sum(p == it["answer"] for p, it in zip(preds, items, strict=True)) / len(items)
    bad = [i + 1 for i, r in enumerate(right) if not math.isfinite(r)]
    if bad:
        raise UserError(f"multiple-choice item {bad[0]} has a non-finite log-likelihood: the "
                        "model's weights or logits hold NaN/Inf")
    return {"accuracy": acc, "predictions": preds, "answer_logprob": sum(right) / len(right)}


def choice_accuracy(model, rows: list[list[tuple[list[int], list[int]]]], items,
                    normalize: bool = False, batch_size: int = 8) -> dict:
    """`rank_choices` of a model on items tokenized by `choice_rows`."""
    flat = [r for per in rows for r in per]
    return rank_choices(items, continuation_logprobs(model, flat, batch_size), normalize)
